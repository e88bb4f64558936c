"""BRIGHT's BM25: analysis (Lucene English), Porter stemmer, weights and ranking vs gensim."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from minirank import bm25
from minirank.bm25 import (STOP_WORDS, Analyzer, analyze, build_index, load_index, porter_stem, save_index,
                           search, tokenize, top_k)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "bright"
needs_shared = pytest.mark.skipif(not (SHARED / "examples").is_dir(),
                                  reason=f"BRIGHT offline slice absent (looked in {SHARED})")


def example_rows():
    rows = []
    for f in sorted((SHARED / "examples").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


# ---------------------------------------------------------------------------------------------
# Porter stemmer

# Lucene's PorterStemmer output (= nltk MARTIN_EXTENSIONS): Porter's paper examples plus his
# departures (possibly, archaeology: -bli and -logi rules; is, as: 2-letter words untouched).
PORTER = {
    "caresses": "caress", "ponies": "poni", "ties": "ti", "caress": "caress", "cats": "cat", "feed": "feed",
    "agreed": "agre", "plastered": "plaster", "bled": "bled", "motoring": "motor", "sing": "sing",
    "conflated": "conflat", "troubled": "troubl", "sized": "size", "hopping": "hop", "tanned": "tan",
    "falling": "fall", "hissing": "hiss", "fizzed": "fizz", "failing": "fail", "filing": "file",
    "happy": "happi", "sky": "sky", "relational": "relat", "conditional": "condit", "rational": "ration",
    "valenci": "valenc", "hesitanci": "hesit", "digitizer": "digit", "conformabli": "conform",
    "radicalli": "radic", "differentli": "differ", "vileli": "vile", "analogousli": "analog",
    "vietnamization": "vietnam", "predication": "predic", "operator": "oper", "feudalism": "feudal",
    "decisiveness": "decis", "hopefulness": "hope", "callousness": "callous", "formaliti": "formal",
    "sensitiviti": "sensit", "sensibiliti": "sensibl", "triplicate": "triplic", "formative": "form",
    "formalize": "formal", "electriciti": "electr", "electrical": "electr", "hopeful": "hope",
    "goodness": "good", "revival": "reviv", "allowance": "allow", "inference": "infer", "airliner": "airlin",
    "gyroscopic": "gyroscop", "adjustable": "adjust", "defensible": "defens", "irritant": "irrit",
    "replacement": "replac", "adjustment": "adjust", "dependent": "depend", "adoption": "adopt",
    "homologou": "homolog", "communism": "commun", "activate": "activ", "angulariti": "angular",
    "homologous": "homolog", "effective": "effect", "bowdlerize": "bowdler", "probate": "probat",
    "rate": "rate", "cease": "ceas", "controll": "control", "roll": "roll", "generalizations": "gener",
    "possibly": "possibl", "geology": "geologi", "archaeology": "archaeolog", "is": "is", "as": "as",
    "ion": "ion", "oed": "o", "aed": "a", "eed": "eed", "news": "new", "dying": "dy", "lying": "ly",
}


def test_porter_known_words():
    assert {w: porter_stem(w) for w in PORTER} == PORTER


@needs_shared
def test_porter_equals_reference_on_bright_vocabulary():
    # Lucene's PorterStemmer is Porter's own C release (with his departures from the 1980 paper);
    # nltk reproduces exactly that as MARTIN_EXTENSIONS (ORIGINAL_ALGORITHM is the paper's text).
    porter = pytest.importorskip("nltk.stem.porter")
    ref = porter.PorterStemmer(mode=porter.PorterStemmer.MARTIN_EXTENSIONS)
    words = set()
    for row in example_rows():
        for key in ("query", "reasoning", "gold_answer"):
            words.update(t.lower() for t in tokenize(row[key] or "") if t.isascii())
    words.update(w + s for w in list(words)[:3000] for s in ("s", "ed", "ing", "ness", "ational", "ly"))
    assert len(words) > 30000
    bad = {w: (porter_stem(w), ref.stem(w, to_lowercase=False)) for w in words
           if porter_stem(w) != ref.stem(w, to_lowercase=False)}
    assert not bad, list(bad.items())[:20]


# ---------------------------------------------------------------------------------------------
# Analysis


def test_tokenizer_follows_standard_tokenizer_rules():
    assert tokenize("The U.S.A. economy's growth was 3.5% (1,000.50 dollars), e.g. x.5") == [
        "The", "U.S.A", "economy's", "growth", "was", "3.5", "1,000.50", "dollars", "e.g", "x", "5"]
    # connectors join, ':' joins letters, URLs split at '/', apostrophes inside words stay
    assert tokenize("__init__ foo_bar note:This http://www.google.com/a?q=1 can't") == [
        "__init__", "foo_bar", "note:This", "http", "www.google.com", "a", "q", "1", "can't"]
    assert tokenize("abc123def 12ab ___ x²") == ["abc123def", "12ab", "x"]
    # CJK: one token per ideograph and hiragana, katakana and Hangul runs, Thai runs whole
    assert tokenize("日本語のテキスト 한국어 ภาษาไทย") == ["日", "本", "語", "の", "テキスト", "한국어", "ภาษาไทย"]
    # combining marks stay in the word; emoji are tokens
    assert tokenize("cafe\u0301 😀 👍🏽 ©") == ["cafe\u0301", "😀", "👍🏽", "©"]
    # tokens longer than 255 chars are cut into pieces
    assert [len(t) for t in tokenize("a" * 600 + " b")] == [255, 255, 90, 1]


def test_analyzer_filters():
    assert analyze("The Cats' owner's CATS are running and it WAS there") == ["cat", "owner", "cat", "run"]
    assert analyze("John’s ＩＢＭ＇s") == ["john", "ｉｂｍ"]  # all three apostrophes of the filter
    # Java lowercases char by char: no final sigma, dotted capital I becomes a plain i
    assert analyze("ΟΔΟΣ İstanbul") == ["οδοσ", "istanbul"]
    assert len(STOP_WORDS) == 33 and {"the", "with", "will", "such"} <= STOP_WORDS and "from" not in STOP_WORDS
    a = Analyzer(cache_size=3)
    assert [a(t) for t in ("Running dogs", "the dogs", "dogs ran")] == [["run", "dog"], ["dog"], ["dog", "ran"]]


# ---------------------------------------------------------------------------------------------
# Weights and ranking vs gensim (what BRIGHT's retrieval_bm25 runs)


@pytest.fixture(scope="module")
def gold_corpus():
    if not (SHARED / "examples").is_dir():
        pytest.skip(f"BRIGHT offline slice absent (looked in {SHARED})")
    rows = example_rows()
    # real text: the gold answers and the questions (the documents are not in the offline slice)
    texts = [r["gold_answer"] for r in rows if r["gold_answer"] and r["gold_answer"] != "N/A"]
    texts += [r["query"] for r in rows[1::2]]
    queries = [r["query"] for r in rows[::7]] + [r["reasoning"] for r in rows[::31] if r["reasoning"]]
    return texts, queries


def gensim_reference(texts):
    corpora = pytest.importorskip("gensim.corpora")
    models = pytest.importorskip("gensim.models")
    corpus = [analyze(t) for t in texts]
    dictionary = corpora.Dictionary(corpus)
    model = models.LuceneBM25Model(dictionary=dictionary, k1=0.9, b=0.4)
    return dictionary, model, [model[dictionary.doc2bow(doc)] for doc in corpus]


def test_scores_equal_gensim_lucene_bm25(gold_corpus):
    texts, queries = gold_corpus
    ids = [f"doc{i}" for i in range(len(texts))]
    index = build_index(texts, ids)
    dictionary, model, doc_vecs = gensim_reference(texts)
    assert len(index.vocab) == len(dictionary) and len(texts) > 1400
    # document weights, term by term
    weights = index.weights.T.tocsr()
    for i in range(0, len(texts), 13):
        ours = dict(zip(weights[i].indices.tolist(), weights[i].data.tolist()))
        ref = {index.vocab[dictionary[t]]: w for t, w in doc_vecs[i]}
        assert ours.keys() == ref.keys()
        assert max(abs(ours[k] - ref[k]) for k in ref) < 1e-9
    # query scores = sum of query weight x document weight
    dense = np.zeros((len(texts), len(dictionary)))
    for i, vec in enumerate(doc_vecs):
        for t, w in vec:
            dense[i, t] = w
    worst = 0.0
    for q in queries:
        qvec = model[dictionary.doc2bow(analyze(q))]
        ref = dense[:, [t for t, _ in qvec]] @ np.array([w for _, w in qvec]) if qvec else np.zeros(len(texts))
        worst = max(worst, float(np.abs(index.score(q) - ref).max()))
    assert len(queries) > 240
    assert worst < 1e-6


def test_search_equals_bright_retrieval(gold_corpus):
    similarities = pytest.importorskip("gensim.similarities")
    texts, queries = gold_corpus
    texts = texts[:800]
    ids = [f"doc{i}" for i in range(len(texts))]
    index = build_index(texts, ids)
    dictionary, model, doc_vecs = gensim_reference(texts)
    sim = similarities.SparseMatrixSimilarity(doc_vecs, num_docs=len(texts), num_terms=len(dictionary),
                                              normalize_queries=False, normalize_documents=False)
    qs = {f"q{i}": q for i, q in enumerate(queries[:60])}
    excluded = {"q0": {"doc3", "doc5", "N/A"}, "q1": {"doc7"}}
    run = search(index, qs, k=50, excluded=excluded)
    for qid, q in qs.items():
        # BRIGHT: score everything, pop excluded ids, stable sort by score, keep the top k
        s = sim[model[dictionary.doc2bow(analyze(q))]].tolist()
        all_scores = {d: v for d, v in zip(ids, s) if d not in excluded.get(qid, ())}
        top = sorted(all_scores.items(), key=lambda x: x[1], reverse=True)[:50]
        assert len(run[qid]) == 50 and not set(run[qid]) & excluded.get(qid, set())
        assert [run[qid][d] for d, _ in top] == pytest.approx([v for _, v in top], rel=1e-5)
        # same set of documents up to float32 near-ties at the cut
        assert len(set(run[qid]) ^ {d for d, _ in top}) <= 2


def test_top_k_ties_keep_corpus_order():
    scores = np.array([1.0, 3.0, 2.0, 3.0, 0.0, 2.0, 2.0])
    assert top_k(scores, 4).tolist() == [1, 3, 2, 5]
    assert top_k(scores, 4, exclude=[3]).tolist() == [1, 2, 5, 6]
    assert top_k(scores, 100, exclude=[0, 1]).tolist() == [3, 2, 5, 6, 4]  # zeros included, all scored
    assert top_k(scores, 0).tolist() == [] and top_k(np.zeros(0), 5).tolist() == []
    rng = np.random.default_rng(0)
    for _ in range(500):  # vs a stable Python sort, with many ties and exclusions
        n = int(rng.integers(0, 40))
        s = rng.choice([0.0, 1.0, 2.0, 0.5, rng.random()], size=n)
        ex = rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False) if n else []
        k = int(rng.integers(0, 50))
        ref = sorted((i for i in range(n) if i not in set(ex)), key=lambda i: -s[i])[:k]
        assert top_k(s, k, ex).tolist() == ref


def test_dictionary_pruning_equals_gensim():
    # gensim's Dictionary (BRIGHT builds it with the default prune_at=2,000,000) forgets the rarest
    # terms every 10,000 documents once the vocabulary is larger than prune_at
    corpora = pytest.importorskip("gensim.corpora")
    models = pytest.importorskip("gensim.models")
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}x" for i in range(3000)])
    p = 1 / np.arange(1, 3001) ** 1.1
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 12), p=p / p.sum())) for _ in range(25000)]
    corpus = [analyze(t) for t in texts]
    for prune_at in (400, 1500):
        index = build_index(texts, [str(i) for i in range(len(texts))], prune_at=prune_at)
        dictionary = corpora.Dictionary(corpus, prune_at=prune_at)
        model = models.LuceneBM25Model(dictionary=dictionary, k1=0.9, b=0.4)
        assert set(index.vocab) == set(dictionary.token2id) and len(index.vocab) < 3000
        assert index.avgdl == pytest.approx(model.avgdl, rel=1e-15)
        weights = index.weights.T.tocsr()
        for i in range(0, len(texts), 251):
            ref = {index.vocab[dictionary[t]]: w for t, w in model[dictionary.doc2bow(corpus[i])]}
            ours = dict(zip(weights[i].indices.tolist(), weights[i].data.tolist()))
            assert ours.keys() == ref.keys()
            assert all(abs(ours[k] - ref[k]) < 1e-12 for k in ref)


def test_save_load_and_edge_cases(tmp_path):
    texts = ["Cats chase mice.", "", "Dogs chase cats!", "the and of"]
    index = build_index(texts, ["a", "b", "c d", "e"])
    save_index(index, tmp_path / "idx")
    again = load_index(tmp_path / "idx")
    assert again.doc_ids == ["a", "b", "c d", "e"] and again.vocab == index.vocab
    assert np.array_equal(again.score("cat chase"), index.score("cat chase"))
    assert load_index(tmp_path / "missing") is None
    run = search(again, {"q": "cats", "unknown": "zebra", "stop": "the"}, k=3)
    assert list(run["q"]) == ["a", "c d", "b"] and run["q"]["b"] == 0.0
    assert run["unknown"] == {"a": 0.0, "b": 0.0, "c d": 0.0}  # no known term: all zeros, corpus order


def test_index_source_key_and_crash_during_rebuild(tmp_path, monkeypatch):
    old = build_index(["Cats chase mice.", "Dogs bark."], ["a", "b"])
    new = build_index(["Fish swim in water.", "Birds fly.", "Cats sleep."], ["x", "y", "z"])
    path = tmp_path / "idx"
    save_index(old, path, source={"files": ["v1"]})
    assert load_index(path, source={"files": ["v1"]}).doc_ids == ["a", "b"]
    assert load_index(path, source={"files": ["v2"]}) is None  # other data: not this index
    # a rebuild that dies after writing the new arrays, before the rest: no index at all, never
    # the new arrays under the old vocabulary and document ids
    real_dumps = json.dumps

    def dying_dumps(obj, **kw):
        if isinstance(obj, list) and obj == ["x", "y", "z"]:
            raise OSError("disk full")
        return real_dumps(obj, **kw)

    monkeypatch.setattr(json, "dumps", dying_dumps)
    with pytest.raises(OSError):
        save_index(new, path, source={"files": ["v2"]})
    monkeypatch.undo()
    assert load_index(path) is None and load_index(path, source={"files": ["v1"]}) is None
    save_index(new, path, source={"files": ["v2"]})
    assert load_index(path, source={"files": ["v2"]}).doc_ids == ["x", "y", "z"]
    # files of two builds side by side (meta of one, arrays of the other) are refused as well
    meta = json.loads((path / "meta.json").read_text())
    save_index(old, tmp_path / "other")
    (path / "doc_ids.json").write_text((tmp_path / "other" / "doc_ids.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta))
    assert load_index(path) is None


def test_cli_any_corpus(tmp_path, capsys):
    """python -m minirank.bm25: a TREC run of our own docs/queries files, equal to the library's search;
    a bad row is one line naming file and row, exit 2."""
    from minirank.files import read_run
    docs = {"d1": "espresso grind size and crema", "d2": "filament warps on a cold bed", "d3": "grind finer for espresso"}
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs.items()))
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q1", "text": "espresso grind"}) + "\n")
    assert bm25.main(["--docs", str(tmp_path / "docs.jsonl"), "--queries", str(tmp_path / "q.jsonl"),
                      "--out", str(tmp_path / "run.trec"), "--k", "2"]) == 0
    want = bm25.search(bm25.build_index(list(docs.values()), list(docs)), {"q1": "espresso grind"}, k=2)
    assert read_run(tmp_path / "run.trec") == want and len(want["q1"]) == 2
    (tmp_path / "q.jsonl").write_text('{"id": "q1", "text": "a"}\n{"id": "q2"}\n')
    assert bm25.main(["--docs", str(tmp_path / "docs.jsonl"), "--queries", str(tmp_path / "q.jsonl"),
                      "--out", str(tmp_path / "run.trec")]) == 2
    assert "q.jsonl: row 2: expected fields 'id'" in capsys.readouterr().err
