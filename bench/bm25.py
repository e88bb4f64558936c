"""BM25 first-stage speed: minirank.bm25 vs BRIGHT's own pipeline (gensim) on the same corpus.

    python bench/bm25.py                    # 100k synthetic documents, 200 short + 50 long queries
    python bench/bm25.py --docs 20000       # smaller
    python bench/bm25.py --no-gensim --bm25s  # bm25s (pip install bm25s) instead of gensim

The corpus is synthetic English-like text (Zipfian words built from syllables and English suffixes,
capitals, punctuation, numbers), ~120 words per document, fixed seed. Both sides use minirank's
Lucene-English analysis (BRIGHT runs pyserini's, which is Java), timed separately, so the comparison
of indexing and scoring is like for like: gensim = Dictionary + LuceneBM25Model + SparseMatrixSimilarity
exactly as xlang-ai/BRIGHT retrievers.py builds them; its queries are scored one at a time like there
(but cut to the top k with numpy, not BRIGHT's Python sort of every score, and given pre-analysed,
while minirank's queries/s includes analysing them: both choices favour the reference). Reported: documents/s to index (analysis included and excluded), queries/s to score every document
and keep the top 1000, and the ratio minirank / reference (> 1: minirank is faster).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirank import bm25  # noqa: E402


def synthetic_corpus(n_docs, n_words=120, vocab=60_000, seed=0):
    rng = np.random.default_rng(seed)
    syll = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["str", "th", "ch", "qu"]
    suffixes = ["", "", "", "s", "ed", "ing", "ation", "ly", "ness", "er", "'s", "ity", "al"]
    stems = {"".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(vocab)}
    words = np.array(sorted(f"{s}{rng.choice(suffixes)}" for s in stems)
                     + ["the", "of", "and", "to", "in", "is", "a", "that", "for", "it", "with", "as", "this"])
    numbers = rng.integers(0, 5000, len(words) // 20)
    words[rng.integers(0, len(words), size=len(numbers))] = [str(x) for x in numbers]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    p /= p.sum()
    rng.shuffle(p[:-13])  # stop words stay frequent, the rest get random ranks
    lengths = rng.poisson(n_words, size=n_docs) + 5
    flat = rng.choice(len(words), size=int(lengths.sum()), p=p)
    caps = rng.random(len(flat)) < 0.05
    texts, pos = [], 0
    for n in lengths:
        toks = [words[i].capitalize() if c else words[i] for i, c in zip(flat[pos:pos + n], caps[pos:pos + n])]
        for j in range(9, len(toks), 11):
            toks[j] += "."
        texts.append(" ".join(toks))
        pos += n
    return texts


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def bench_minirank(texts, queries, k):
    ids = [str(i) for i in range(len(texts))]
    index, t_index = timed(bm25.build_index, texts, ids)
    _, t_query = timed(bm25.search, index, {str(i): q for i, q in enumerate(queries)}, k)
    return index, t_index, t_query


def bench_gensim(tokens, query_tokens, k):
    from gensim.corpora import Dictionary
    from gensim.models import LuceneBM25Model
    from gensim.similarities import SparseMatrixSimilarity

    def build():
        dictionary = Dictionary(tokens)
        model = LuceneBM25Model(dictionary=dictionary, k1=0.9, b=0.4)
        corpus = model[list(map(dictionary.doc2bow, tokens))]
        index = SparseMatrixSimilarity(corpus, num_docs=len(tokens), num_terms=len(dictionary),
                                       normalize_queries=False, normalize_documents=False)
        return dictionary, model, index

    (dictionary, model, index), t_index = timed(build)

    def run():
        for q in query_tokens:
            s = index[model[dictionary.doc2bow(q)]]
            top = np.argpartition(-s, k)[:k]  # cheaper than BRIGHT's full Python sort: favours gensim
            top[np.argsort(-s[top], kind="stable")]

    _, t_query = timed(run)
    return t_index, t_query


def bench_bm25s(tokens, query_tokens, k):
    import bm25s

    def build():
        retriever = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
        retriever.index(tokens, show_progress=False)
        return retriever

    retriever, t_index = timed(build)
    _, t_query = timed(lambda: retriever.retrieve(query_tokens, k=k, show_progress=False, n_threads=1))
    return t_index, t_query


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200, help="short queries (~25 words)")
    ap.add_argument("--long-queries", type=int, default=50, help="reasoning-length queries (~400 words)")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--no-gensim", action="store_true")
    ap.add_argument("--bm25s", action="store_true", help="also time bm25s (method='lucene'; not BRIGHT's formula)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    texts, t_gen = timed(synthetic_corpus, args.docs)
    qtexts = synthetic_corpus(args.queries, 25, seed=1) + synthetic_corpus(args.long_queries, 400, seed=2)
    print(f"corpus: {len(texts)} docs, {sum(map(len, texts)) / 1e6:.0f} MB of text, "
          f"{len(qtexts)} queries (generated in {t_gen:.0f}s)", file=sys.stderr)

    bm25.analyze("warm up")  # compile the tokenizer regex outside the timings
    index, t_index, t_query = bench_minirank(texts, qtexts, args.k)
    analyzer = bm25.Analyzer()  # a cold cache, like build_index's own
    tokens, t_analysis = timed(lambda: [analyzer(t) for t in texts])
    query_tokens = [analyzer(q) for q in qtexts]  # the references get their queries pre-analysed
    n, nq = len(texts), len(qtexts)
    res = {"docs": n, "queries": nq, "terms": len(index.vocab), "analysis_docs_per_s": n / t_analysis,
           "minirank": {"index_docs_per_s": n / t_index,
                        "index_docs_per_s_without_analysis": n / (t_index - t_analysis),
                        "queries_per_s": nq / t_query}}
    refs = []
    if not args.no_gensim:
        refs.append(("gensim", bench_gensim))
    if args.bm25s:
        refs.append(("bm25s", bench_bm25s))
    for name, fn in refs:
        t_i, t_q = fn(tokens, query_tokens, args.k)
        res[name] = {"index_docs_per_s": n / (t_analysis + t_i), "index_docs_per_s_without_analysis": n / t_i,
                     "queries_per_s": nq / t_q}
        res[f"ratio_vs_{name}"] = {k: res["minirank"][k] / res[name][k] for k in res[name]}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"\n{n} docs, {nq} queries, {res['terms']} terms; analysis alone {res['analysis_docs_per_s']:.0f} docs/s")
    print(f"{'':10s} {'index docs/s':>14s} {'(no analysis)':>14s} {'queries/s':>10s}")
    for name in ["minirank"] + [r for r, _ in refs]:
        r = res[name]
        print(f"{name:10s} {r['index_docs_per_s']:14.0f} {r['index_docs_per_s_without_analysis']:14.0f} "
              f"{r['queries_per_s']:10.1f}")
    for name, _ in refs:
        r = res[f"ratio_vs_{name}"]
        print(f"{'ratio/' + name:10s} {r['index_docs_per_s']:14.2f} {r['index_docs_per_s_without_analysis']:14.2f} "
              f"{r['queries_per_s']:10.2f}")


if __name__ == "__main__":
    main()
