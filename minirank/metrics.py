"""Retrieval metrics with trec_eval semantics, exactly (what pytrec_eval, and so BRIGHT, computes).

The rules that matter, all checked against pytrec_eval in tests/test_metrics.py:
- a ranking is the run's documents sorted by score descending, ties broken by document id
  *descending* (trec_eval's comparator, strcmp on the ids); the rank column of a file is ignored;
- a document is relevant when its qrels level is >= 1; nDCG's gain is the level itself (graded),
  discount log2(rank + 1), ideal DCG from all judged levels of the query, cut at k;
- P@k always divides by k; Recall@k and MAP divide by the number of relevant documents (0 if none);
- only queries present in the run and with at least one qrels line are scored (an empty ranking
  still counts and scores 0), and the summary is the plain mean over those queries, like BRIGHT's averaging of
  pytrec_eval's per-query dict.
Excluded ids (BRIGHT's `excluded_ids`) are removed from the ranking and from the qrels before
anything else: they are neither hits nor misses.
"""

import math
import re

DEFAULT_METRICS = ("ndcg@10", "recall@100", "map", "mrr", "p@10")

_METRIC_RE = re.compile(r"^(ndcg|recall|p|map|mrr|success)(?:@(\d+))?$")
# trec_eval / pytrec_eval spellings, accepted for convenience: ndcg_cut_10, ndcg_cut.10, P_10,
# recall_100, map_cut_10, recip_rank, success_1.
_TREC_RE = re.compile(r"^(ndcg_cut|ndcg|recall|p|map_cut|map|recip_rank|success)(?:[_.](\d+))?$")
_TREC_KIND = {"ndcg_cut": "ndcg", "map_cut": "map", "recip_rank": "mrr"}


def parse_metric(name):
    """'ndcg@10' -> ('ndcg', 10); 'map' -> ('map', None). Also takes trec_eval names (ndcg_cut_10)."""
    s = name.strip().lower()
    m = _METRIC_RE.match(s)
    if m:
        kind, k = m.group(1), m.group(2)
    else:
        m = _TREC_RE.match(s)
        if not m:
            raise ValueError(f"unknown metric {name!r}: use ndcg[@k], recall@k, p@k, map[@k], mrr, success@k")
        kind, k = _TREC_KIND.get(m.group(1), m.group(1)), m.group(2)
    k = int(k) if k is not None else None
    if kind in ("recall", "p", "success") and k is None:
        raise ValueError(f"metric {name!r} needs a cutoff, e.g. {kind}@10")
    if kind == "mrr" and k is not None:
        raise ValueError(f"metric {name!r}: mrr takes no cutoff (trec_eval's recip_rank)")
    if k is not None and k < 1:
        raise ValueError(f"metric {name!r}: the cutoff must be >= 1")
    return kind, k


def canonical(name):
    """The key a metric is reported under: 'NDCG_cut_10' -> 'ndcg@10'."""
    kind, k = parse_metric(name)
    return kind if k is None else f"{kind}@{k}"


def rank(scores):
    """Document ids of a {docid: score} dict in trec_eval order: score desc, then docid desc."""
    return [d for d, _ in sorted(scores.items(), key=lambda x: (float(x[1]), x[0]), reverse=True)]


def _dcg(gains, k):
    # trec_eval adds gain / log2(rank + 1) in rank order; keep the same order of additions.
    total = 0.0
    for i, g in enumerate(gains[:k]):
        if g > 0:
            total += g / math.log2(i + 2)
    return total


def query_metrics(ranking, judged, metrics):
    """Metrics of one ranked list. ranking: docids best first; judged: {docid: level}."""
    levels = [judged.get(d, 0) for d in ranking]
    hit = [lvl >= 1 for lvl in levels]
    num_rel = sum(1 for lvl in judged.values() if lvl >= 1)
    ideal = sorted((lvl for lvl in judged.values() if lvl > 0), reverse=True)
    out = {}
    for name in metrics:
        kind, k = parse_metric(name)
        n = len(ranking) if k is None else min(k, len(ranking))
        if kind == "ndcg":
            idcg = _dcg(ideal, len(ideal) if k is None else k)
            v = _dcg(levels, n) / idcg if idcg > 0 else 0.0
        elif kind == "recall":
            v = sum(hit[:n]) / num_rel if num_rel else 0.0
        elif kind == "p":
            v = sum(hit[:n]) / k
        elif kind == "success":
            v = 1.0 if any(hit[:n]) else 0.0
        elif kind == "mrr":
            v = next((1.0 / (i + 1) for i, h in enumerate(hit) if h), 0.0)
        else:  # map / map@k: precision at each relevant rank, over all relevant documents
            found, total = 0, 0.0
            for i in range(n):
                if hit[i]:
                    found += 1
                    total += found / (i + 1)
            v = total / num_rel if num_rel else 0.0
        out[canonical(name)] = v
    return out


def per_query(run, qrels, metrics=DEFAULT_METRICS, excluded=None):
    """{qid: {metric: value}} for the queries in both run and qrels (trec_eval/pytrec_eval rule).

    run: {qid: {docid: score}}; qrels: {qid: {docid: level}}; excluded: {qid: iterable of docids}.
    """
    for name in metrics:
        parse_metric(name)  # fail early on a bad name, even with nothing to score
    excluded = excluded or {}
    out = {}
    for qid, scores in run.items():
        if not qrels.get(qid):  # trec_eval only knows queries with at least one qrels line
            continue
        judged = qrels[qid]
        drop = set(excluded.get(qid, ())) - {"N/A"}
        if drop:
            scores = {d: s for d, s in scores.items() if d not in drop}
            judged = {d: r for d, r in judged.items() if d not in drop}
        out[qid] = query_metrics(rank(scores), judged, metrics)
    return out


def evaluate(run, qrels, metrics=DEFAULT_METRICS, excluded=None):
    """Mean of each metric over the scored queries: {'ndcg@10': 0.43, ...} (0.0 when none)."""
    return average(per_query(run, qrels, metrics, excluded), metrics)


def average(pq, metrics=DEFAULT_METRICS):
    """Mean of each metric over per_query's result (0.0 when no query was scored)."""
    keys = [canonical(m) for m in metrics]
    return {key: (sum(q[key] for q in pq.values()) / len(pq) if pq else 0.0) for key in keys}


def mean(values):
    """The benchmark average: plain mean over domains (BRIGHT reports the mean of the 12)."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
