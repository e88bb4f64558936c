"""minirank.metrics against pytrec_eval (trec_eval itself) on randomized runs and qrels."""

import math
import random

import pytest

from minirank.metrics import canonical, evaluate, parse_metric, per_query, rank

pytrec_eval = pytest.importorskip("pytrec_eval")

# ours -> pytrec_eval's measure and result key
MEASURES = {
    "ndcg@1": ("ndcg_cut.1", "ndcg_cut_1"), "ndcg@3": ("ndcg_cut.3", "ndcg_cut_3"),
    "ndcg@10": ("ndcg_cut.10", "ndcg_cut_10"), "ndcg": ("ndcg", "ndcg"),
    "recall@5": ("recall.5", "recall_5"), "recall@100": ("recall.100", "recall_100"),
    "p@1": ("P.1", "P_1"), "p@5": ("P.5", "P_5"), "p@10": ("P.10", "P_10"),
    "map": ("map", "map"), "map@10": ("map_cut.10", "map_cut_10"),
    "mrr": ("recip_rank", "recip_rank"), "success@3": ("success.3", "success_3"),
}


def reference(run, qrels):
    measures = {m for m, _ in MEASURES.values()}
    # pytrec_eval takes "ndcg_cut.1" and "ndcg_cut.3" as two separate sets: fine
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def random_case(rng):
    docs = [f"d{i}" for i in range(rng.randint(1, 25))] + ["doc with spaces", "Z", "é", "d10b"]
    qrels, run = {}, {}
    for q in range(rng.randint(1, 6)):
        qid = f"q{q}"
        if rng.random() < 0.85:  # some queries only in the run
            # graded levels; a few queries judged but with nothing relevant, a few with no lines
            # (negative levels are left out: they make pytrec_eval hang)
            qrels[qid] = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(0, len(docs)))}
        if rng.random() < 0.85:  # some queries only in the qrels; some runs empty
            # few distinct score values: lots of ties, which trec_eval breaks by docid
            values = [0.5, 1.0, 0.25, -1.0, 0.0, rng.random()]
            run[qid] = {d: rng.choice(values) for d in rng.sample(docs, rng.randint(0, len(docs)))}
    return run, qrels


def test_random_runs_equal_pytrec_eval():
    rng = random.Random(1234)
    worst, n_queries = 0.0, 0
    for _ in range(400):
        run, qrels = random_case(rng)
        ref = reference(run, qrels)
        ours = per_query(run, qrels, tuple(MEASURES))
        assert set(ours) == set(ref)  # same queries scored: run ∩ qrels with >= 1 qrels line
        for qid in ref:
            for m, (_, key) in MEASURES.items():
                worst = max(worst, abs(ours[qid][m] - ref[qid][key]))
        n_queries += len(ref)
        if ref:
            means = evaluate(run, qrels, tuple(MEASURES))
            for m, (_, key) in MEASURES.items():
                assert means[m] == pytest.approx(sum(r[key] for r in ref.values()) / len(ref), abs=1e-12)
    assert n_queries > 800
    assert worst <= 1e-9


def test_larger_rankings_equal_pytrec_eval():
    # 1000-document rankings with many relevant documents (BM25-sized), distinct and tied scores
    rng = random.Random(7)
    docs = [f"doc{i:04d}" for i in range(1500)]
    for trial in range(5):
        qrels = {f"q{q}": {d: rng.choice([1, 1, 2, 0]) for d in rng.sample(docs, rng.randint(1, 120))}
                 for q in range(20)}
        run = {q: {d: round(rng.random(), 2 if trial % 2 else 12) for d in rng.sample(docs, 1000)} for q in qrels}
        ref = reference(run, qrels)
        ours = per_query(run, qrels, tuple(MEASURES))
        for qid in ref:
            for m, (_, key) in MEASURES.items():
                assert ours[qid][m] == pytest.approx(ref[qid][key], abs=1e-9)


def test_ties_broken_by_docid_descending():
    assert rank({"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5, "y": 2.0}) == ["y", "c", "b", "a", "z"]
    # one relevant doc "a" tied with "b": trec_eval ranks "b" first, so P@1 is 0
    run, qrels = {"q": {"a": 1.0, "b": 1.0}}, {"q": {"a": 1}}
    assert per_query(run, qrels, ("p@1", "mrr"))["q"] == {"p@1": 0.0, "mrr": 0.5}
    assert reference(run, qrels)["q"]["P_1"] == 0.0


def test_graded_ndcg_by_hand():
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    qrels = {"q": {"a": 1, "b": 0, "c": 2, "x": 3}}
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert per_query(run, qrels, ("ndcg@10",))["q"]["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-15)
    assert reference(run, qrels)["q"]["ndcg_cut_10"] == pytest.approx(dcg / idcg, abs=1e-15)


def test_excluded_ids_are_neither_hits_nor_misses():
    run = {"q": {"x": 9.0, "a": 3.0, "b": 2.0}, "r": {"a": 1.0}}
    qrels = {"q": {"a": 1, "b": 1}, "r": {"a": 1}}
    with_ex = evaluate(run, qrels, ("ndcg@10", "p@1"), excluded={"q": {"x", "N/A"}})
    assert with_ex == {"ndcg@10": 1.0, "p@1": 1.0}
    assert evaluate(run, qrels, ("p@1",)) == {"p@1": 0.5}
    # an excluded id in the qrels no longer counts as a relevant document to find
    assert evaluate({"q": {"a": 1.0}}, {"q": {"a": 1, "b": 1}}, ("recall@10",), {"q": ["b"]}) == {"recall@10": 1.0}


def test_queries_scored_like_trec_eval():
    qrels = {"judged": {"a": 1}, "no_relevant": {"a": 0}, "no_lines": {}, "not_in_run": {"a": 1}}
    run = {"judged": {"a": 1.0}, "no_relevant": {"a": 1.0}, "no_lines": {"a": 1.0}, "unjudged": {"a": 1.0}}
    assert set(per_query(run, qrels, ("ndcg@10",))) == {"judged", "no_relevant"} == set(reference(run, qrels))
    assert evaluate(run, qrels, ("ndcg@10",)) == {"ndcg@10": 0.5}
    # an empty ranking of a judged query counts, as 0
    assert evaluate({"judged": {}}, qrels, ("ndcg@10",)) == {"ndcg@10": 0.0}
    assert set(reference({"judged": {}}, qrels)) == {"judged"}
    assert evaluate({}, qrels, ("ndcg@10",)) == {"ndcg@10": 0.0}


def test_metric_names():
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    assert parse_metric("ndcg_cut_10") == ("ndcg", 10)
    assert parse_metric("ndcg_cut.5") == ("ndcg", 5)
    assert parse_metric("P_5") == ("p", 5)
    assert parse_metric("recip_rank") == ("mrr", None)
    assert parse_metric("map_cut_100") == ("map", 100)
    assert canonical("Recall_100") == "recall@100"
    for bad in ("ndcg@0", "recall", "mrr@10", "bleu", "p@x"):
        with pytest.raises(ValueError):
            parse_metric(bad)
    with pytest.raises(ValueError, match="unknown metric"):
        per_query({}, {}, ("bleu",))
