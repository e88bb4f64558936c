"""Teacher data: StackExchange questions + documents (the pages their answers link to, or the answers
themselves) + one BM25 negative per question -> a teacher's explanation and 0/1/2 label per pair.

    python train.py data --posts Posts.xml --out DIR (--teacher-url URL --teacher-model NAME | --teacher SPEC)

Stages: questions (stackexchange.py: one streaming pass) -> documents (crawl.py, cached on disk; or
--documents answers: no web at all) -> negatives (bm25.py over every question's documents) -> teacher
(teacher.py) -> DIR/pairs.jsonl, train.jsonl, val.jsonl, summary.json.

Resuming: every labelled (or failed) pair is appended to pairs.jsonl and fsync'ed as it completes
(pairs completing together share one fsync);
pages live in the page cache. Rerunning the same command redoes the cheap deterministic stages
(reading, BM25), skips every pair already in pairs.jsonl and labels the rest. settings.json holds the
settings that decide the output; a run dir written with other settings is refused. train/val/summary
are recomputed from pairs.jsonl + page cache at the end of every run, so they always add up.
"""

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urldefrag

from . import prompts
from .files import DataError, check_settings, write_json
from .crawl import USER_AGENT, Crawler, PageCache
from .bright import BrightFilter, default_dir
from .stackexchange import DumpError, iter_rows, read_questions
from .teacher import APITeacher, LocalTeacher, StructureTeacher, TeacherFatal


class UsageError(Exception):
    """Bad input or settings: one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train.py data",
        description="Make teacher-labelled (question, document) training pairs from a StackExchange dump. "
                    "Resumable: rerun the same command after any interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("input and output")
    g.add_argument("--posts", required=True, help="the dump's Posts.xml (.xml or .xml.gz; extract .7z archives first)")
    g.add_argument("--out", required=True,
                   help="run directory: pairs.jsonl, train.jsonl, val.jsonl, summary.json, settings.json")
    g.add_argument("--format", choices=prompts.FORMATS, default="explain",
                   help="explain: the teacher explains, then labels (InteRank); label: the label line only "
                        "(train/val keep an empty explanation)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of questions (not pairs) in val.jsonl; a question is never on both sides")
    g = ap.add_argument_group("questions")
    g.add_argument("--min-score", type=int, default=None, help="keep questions with at least this score")
    g.add_argument("--require-accepted", action="store_true", help="keep only questions with an accepted answer")
    g.add_argument("--tags", default=None, help="comma-separated: keep questions carrying any of these tags")
    g.add_argument("--max-questions", type=int, default=None, help="stop after this many kept questions (file order)")
    g.add_argument("--exclude-bright", nargs="?", const="default", default="auto", metavar="DIR",
                   help="drop questions that are BRIGHT test queries and pairs whose document is a BRIGHT gold "
                        "answer (DIR/examples/; without DIR: $MINIRANK_BRIGHT, else ../shared/bright next to the "
                        "repository, else the BRIGHT cache). On by default whenever such a copy is found")
    g.add_argument("--no-exclude-bright", dest="exclude_bright", action="store_const", const=None,
                   help="keep questions and documents that overlap BRIGHT (the model then cannot be evaluated "
                        "on those BRIGHT domains without --allow-contaminated)")
    g = ap.add_argument_group("documents")
    g.add_argument("--documents", choices=("web", "answers"), default="web",
                   help="web: the pages the answers link to (the paper's data); answers: the question's own "
                        "answers as documents (accepted first), needs no network at all")
    g.add_argument("--max-docs", type=int, default=8,
                   help="documents per question (links, or answers), accepted answer's first, then by answer score")
    g.add_argument("--negatives", type=int, default=1, metavar="N",
                   help="extra BM25 negatives per question: the N best matches among other questions' documents "
                        "(0: none). A reranker's candidates are mostly such near misses")
    g = ap.add_argument_group("crawling (--documents web)")
    g.add_argument("--cache", default=None, help="page cache directory (default: OUT/pages); share it between runs")
    g.add_argument("--offline", action="store_true", help="fetch nothing: use cached pages only, count the rest as 'offline'")
    g.add_argument("--refetch-failed", action="store_true", help="fetch again the pages whose failure is cached")
    g.add_argument("--fetch-workers", type=int, default=32, help="requests in flight over all hosts")
    g.add_argument("--host-delay", type=float, default=1.0,
                   help="seconds between requests to one host (robots.txt Crawl-delay wins if longer)")
    g.add_argument("--fetch-timeout", type=float, default=20.0, help="connect/read timeout per request, seconds")
    g.add_argument("--max-page-bytes", type=int, default=2_000_000, help="pages larger than this are refused")
    g.add_argument("--max-redirects", type=int, default=5, help="redirect hops followed per link")
    g.add_argument("--fetch-retries", type=int, default=3, help="retries on 429/5xx/timeouts/connection errors")
    g.add_argument("--user-agent", default=USER_AGENT, help="User-Agent sent, and matched against robots.txt")
    g = ap.add_argument_group("teacher")
    g.add_argument("--teacher-url", default=None, help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    g.add_argument("--teacher-model", default=None, help="model name sent to --teacher-url")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never logged or written)")
    g.add_argument("--teacher", default=None, metavar="SPEC",
                   help="local teacher: any model minirank.load accepts (dir, .gguf, pypi:PKG, org/name); or "
                        "'structure': no model, labels from the thread (accepted answer 2, other answers 1, "
                        "negative 0) with one fixed explanation per kind, for offline plumbing data "
                        "(needs --documents answers)")
    g.add_argument("--inflight", type=int, default=16, help="API requests in flight")
    g.add_argument("--max-tokens", type=int, default=1024, help="longest teacher answer, tokens")
    g.add_argument("--teacher-retries", type=int, default=6,
                   help="retries on 429/5xx/timeouts/connection errors/malformed responses (exponential backoff, Retry-After)")
    g.add_argument("--teacher-backoff", type=float, default=1.0,
                   help="first retry waits this many seconds, doubling each time (capped at 60; Retry-After wins)")
    g.add_argument("--parse-retries", type=int, default=2, help="API retries of an answer without a parseable label")
    g.add_argument("--request-timeout", type=float, default=120.0, help="seconds per API request")
    g.add_argument("--retry-failed", action="store_true",
                   help="label again the pairs recorded as failed (e.g. after the server was down)")
    g.add_argument("--batch-size", type=int, default=16, help="local teacher: sequences decoded together")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="local teacher dtype")
    g.add_argument("--device", default="cpu", help="local teacher device (cpu, cuda)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


# ----------------------------------------------------------------------------------------------
# run directory: settings fingerprint, pairs.jsonl


def _settings(args) -> dict:
    """What decides the output. Speed/politeness knobs (workers, delays, timeouts, retries) may change
    between runs; these may not."""
    posts = Path(args.posts).resolve()
    return {
        "posts": str(posts), "posts_bytes": posts.stat().st_size,
        "documents": args.documents, "format": args.format, "prompt_hash": prompts.prompt_hash(args.format),
        "min_score": args.min_score, "require_accepted": args.require_accepted, "tags": args.tags,
        "max_questions": args.max_questions, "exclude_bright": args.exclude_bright,
        "max_docs": args.max_docs, "negatives": args.negatives, "max_doc_chars": prompts.MAX_DOC_CHARS,
        "teacher": args.teacher or args.teacher_model, "max_tokens": args.max_tokens,
        "val_fraction": args.val_fraction,
    }


def _records(path: Path):
    """(line number, byte offset, record) of every record of pairs.jsonl, streamed. A torn last line
    (the run was killed mid-write) is cut off the file first."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":  # find the last newline, reading backwards in blocks
                end = size
                while end > 0:
                    start = max(0, end - 65536)
                    f.seek(start)
                    i = f.read(end - start).rfind(b"\n")
                    if i >= 0:
                        break
                    end = start
                f.truncate(start + i + 1 if end > 0 else 0)
    with open(path, "rb") as f:
        n, pos = 0, 0
        for line in f:
            n += 1
            at, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                r["pair_id"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{path}:{n}: not a pair record") from None
            yield n, at, r


def read_pairs(path: Path) -> dict[str, tuple[bool, int]]:
    """{pair id: (labelled, byte offset of its final record)}. A labelled record is final; a failed
    one is superseded by a later record of the same pair (--retry-failed). Only this small index is
    held in memory, never the records (each carries an 8,000-character document)."""
    final = {}
    for _, at, r in _records(path):
        pid = r["pair_id"]
        if pid in final and final[pid][0]:
            continue
        final[pid] = (r.get("label") is not None, at)
    return final


# ----------------------------------------------------------------------------------------------
# pipeline


def _progress(args):
    return not args.quiet


def make_teacher(args):
    if bool(args.teacher) == bool(args.teacher_url):
        raise UsageError("give either --teacher-url URL --teacher-model NAME, or --teacher SPEC")
    if args.teacher == "structure":
        if args.documents != "answers":
            raise UsageError("--teacher structure labels answers by their place in the thread: "
                             "it needs --documents answers")
        return StructureTeacher(args.format)
    if args.teacher:
        return LocalTeacher(args.teacher, args.format, args.batch_size, args.max_tokens, args.dtype, args.device)
    if not args.teacher_model:
        raise UsageError("--teacher-url needs --teacher-model NAME")
    key = os.environ.get(args.api_key_env) or None
    t = APITeacher(args.teacher_url, args.teacher_model, key, args.format, args.inflight, args.max_tokens,
                   args.teacher_retries, args.parse_retries, args.request_timeout, backoff=args.teacher_backoff,
                   key_env=args.api_key_env)
    t.check()
    return t


def documents(args, questions, out: Path):
    """{qid: [(doc id, kind)]} in priority order, a text getter, and link statistics."""
    per_q, links = {}, {"found": 0, "unique": 0, "used": 0}
    if args.documents == "answers":
        texts = {}
        for q in questions:
            docs = []
            for a in q.ordered_answers():
                if a.text.strip() and len(docs) < args.max_docs:
                    did = f"answer:{a.id}"
                    texts[did] = a.text
                    docs.append((did, "accepted" if a.id == q.accepted_id else "answer"))
            per_q[q.id] = docs
        return per_q, texts.get, links
    cache = PageCache(args.cache or out / "pages")
    want = {}
    for q in questions:
        # page.html#part and page.html are one page: fetch, cache and label it once
        ql = list(dict.fromkeys(urldefrag(u)[0] for u in q.links()))
        links["found"] += sum(len(a.links) for a in q.answers)
        want[q.id] = ql[: args.max_docs]
    used = list(dict.fromkeys(u for v in want.values() for u in v))
    links["unique"] = len({urldefrag(u)[0] for q in questions for a in q.answers for u in a.links})
    links["used"] = len(used)
    crawler = Crawler(cache, delay=args.host_delay, workers=args.fetch_workers, timeout=args.fetch_timeout,
                      max_bytes=args.max_page_bytes, max_redirects=args.max_redirects, retries=args.fetch_retries,
                      user_agent=args.user_agent)
    status = crawler.crawl(used, offline=args.offline, refetch_failed=args.refetch_failed, progress=_progress(args))
    n = Counter(status.values())
    # used = fetched + refused_robots + sum(failed) + offline
    links.update(fetched=n.pop("ok", 0), refused_robots=n.pop("robots", 0), offline=n.pop("offline", 0),
                 failed=dict(sorted(n.items())))
    for q in questions:
        per_q[q.id] = [(u, "linked") for u in want[q.id] if status.get(u) == "ok"]

    def text(url):
        p = cache.get(url)
        return p.text if p is not None and p.status == "ok" else None
    return per_q, text, links


def negatives(questions, per_q, text, n=1, progress=False) -> dict[str, list[str]]:
    """{qid: [doc id, ...]}: the n best BM25 matches for the question among the documents of other
    questions (a document whose text equals one of the question's own is skipped too)."""
    from .bm25 import build_index, top_k
    ids = list(dict.fromkeys(d for docs in per_q.values() for d, _ in docs))
    if len(ids) < 2:
        return {}
    cut = [(text(d) or "")[: prompts.MAX_DOC_CHARS] for d in ids]
    digest = {d: hashlib.sha1(t.encode()).digest() for d, t in zip(ids, cut)}
    index = build_index(cut, ids, progress=progress)
    del cut
    neg = {}
    qs = [q for q in questions if per_q.get(q.id)]
    if progress:
        from tqdm import tqdm
        qs = tqdm(qs, desc="negatives", unit="q")
    for q in qs:
        own = {d for d, _ in per_q[q.id]}
        own_text = {digest[d] for d in own}
        scores = index.score(q.query)
        found, seen = [], set(own_text)
        for i in top_k(scores, k=len(own) + 20 + n):
            d = ids[i]
            # nothing lexically close (all zeros): the first other documents still make negatives
            if d not in own and digest[d] not in seen:
                found.append(d)
                seen.add(digest[d])
                if len(found) == n:
                    break
        neg[q.id] = found
    return neg


def is_val(qid: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(f"split:{qid}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def run(args) -> int:
    posts = Path(args.posts)
    if not posts.is_file():
        raise UsageError(f"{posts}: no such file")
    if not 0 <= args.val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one run per directory: two appending to pairs.jsonl would label pairs twice. The lock dies with
    # the process (even on SIGKILL), so a killed run never blocks its rerun.
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        fcntl = None
    if fcntl is not None:
        lock = open(out / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"{out} is in use by another run (rerun once it has finished)") from None
        args._lock = lock  # held until the process exits
    exclude = None
    if args.exclude_bright is not None:
        bdir = args.exclude_bright if args.exclude_bright not in ("auto", "default") else default_dir()
        if not bdir and args.exclude_bright == "default":
            raise UsageError("--exclude-bright: no BRIGHT directory given and none found "
                             "(set $MINIRANK_BRIGHT or pass DIR)")
        args.exclude_bright = str(Path(bdir).resolve()) if bdir else None
        exclude = BrightFilter(bdir) if bdir else None
    rows = iter_rows(posts)
    next(rows, None)  # a file that is not a Posts.xml fails here, in a second, not after the teacher check
    rows.close()
    settings = _settings(args)
    check_settings(out / "settings.json", settings, write=False)  # before loading a local teacher model
    teacher = make_teacher(args)  # fail fast (unreachable, 401, unknown model) before hours of crawling
    check_settings(out / "settings.json", settings)  # only now: a mistyped model name must not claim the dir
    progress = _progress(args)

    tags = [t.strip() for t in args.tags.split(",") if t.strip()] if args.tags else None
    questions, st = read_questions(posts, args.min_score, args.require_accepted, tags, args.max_questions,
                                   exclude, progress=progress)
    per_q, text, links = documents(args, questions, out)
    neg = negatives(questions, per_q, text, args.negatives, progress) if args.negatives > 0 else {}

    # every pair of the run, in a fixed order; a negative's id does not name its document, so a
    # rerun that picks another negative (more pages fetched since) never labels a second one
    plan = []
    for q in questions:
        for d, kind in per_q.get(q.id, ()):
            if exclude is not None and exclude.document_domains((text(d) or "")[: prompts.MAX_DOC_CHARS]):
                st.excluded_documents += 1  # a BRIGHT gold answer (BRIGHT has no source URLs to match)
                continue
            plan.append((f"{q.id}|{d}", q, d, kind))
        for i, d in enumerate(neg.get(q.id, ())):  # the first keeps its old id: runs made with one negative resume
            plan.append((f"{q.id}|negative" + (str(i + 1) if i else ""), q, d, "negative"))
    pairs_path = out / "pairs.jsonl"
    done = read_pairs(pairs_path)
    todo = [p for p in plan if p[0] not in done or (args.retry_failed and not done[p[0]][0])]
    by_id = {p[0]: p for p in todo}
    sent = {}  # pair id -> the document as the teacher saw it, until its record is written

    def items():
        for pid, q, d, kind in todo:
            sent[pid] = (text(d) or "")[: prompts.MAX_DOC_CHARS]  # one page-cache read per pair
            yield pid, q.query, sent[pid], kind

    phash = prompts.prompt_hash(args.format)
    fatal = None
    if todo:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="teacher", unit="pair")
        with open(pairs_path, "a", encoding="utf-8") as f:
            try:
                for batch in teacher.label(items()):
                    for pid, res in batch:
                        _, q, d, kind = by_id[pid]
                        rec = {"pair_id": pid, "question_id": q.id, "query": q.query, "url": d, "kind": kind,
                               "document": sent.pop(pid),
                               "explanation": res.explanation if res.label is not None else "",
                               "label": res.label, "teacher": teacher.name, "prompt_hash": phash,
                               "format": args.format, "failure": res.failure, "detail": res.detail or None,
                               "attempts": res.attempts, "usage": res.usage}
                        if res.label is None:
                            rec["raw"] = res.text[-2000:]
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())  # one fsync per batch of completed pairs (group commit)
                    if bar is not None:
                        bar.update(len(batch))
            except TeacherFatal as e:
                fatal = e
        if bar is not None:
            bar.close()

    summary = finish(out, args, st, links, plan, teacher.name)
    if fatal is not None:
        raise fatal
    if not args.quiet:
        print(f"wrote {out}/train.jsonl ({summary['split']['train_pairs']} pairs), val.jsonl "
              f"({summary['split']['val_pairs']}), summary.json", file=sys.stderr)
    return 0


def finish(out: Path, args, st, links, plan, teacher_name) -> dict:
    """train/val + summary, recomputed from pairs.jsonl (every run ends here, so they always agree)."""
    path = out / "pairs.jsonl"
    final = read_pairs(path)
    planned = {p[0] for p in plan}
    n_split = Counter()
    q_split = {"train": set(), "val": set()}
    labels, fails, kinds = Counter(), Counter(), Counter()
    usage = Counter()
    attempts = 0
    tmp = {name: out / f"{name}.jsonl.tmp" for name in ("train", "val")}
    files = {name: open(p, "w", encoding="utf-8") for name, p in tmp.items()}
    try:
        for _, at, r in _records(path):
            # every record counts for the cost, superseded failures too: their tokens were spent
            usage.update(r.get("usage") or {})
            attempts += r.get("attempts") or 0
            if final[r["pair_id"]][1] != at:
                continue
            if r.get("label") is None:
                fails[r.get("failure") or "unknown"] += 1
                continue
            labels[r["label"]] += 1
            kinds[r["kind"]] += 1
            row = {"query": r["query"], "document": r["document"], "explanation": r["explanation"],
                   "label": r["label"], "question_id": r["question_id"], "url": r["url"], "kind": r["kind"]}
            side = "val" if is_val(r["question_id"], args.val_fraction) else "train"
            files[side].write(json.dumps(row, ensure_ascii=False) + "\n")
            n_split[side] += 1
            q_split[side].add(r["question_id"])
    finally:
        for f in files.values():
            f.close()
    for name, p in tmp.items():
        os.replace(p, out / f"{name}.jsonl")
    n_lab = sum(labels.values())
    summary = {
        "questions": {"read": st.questions, "answers_read": st.answers, "filtered": st.filtered,
                      "excluded_bright": st.excluded, "excluded_bright_documents": st.excluded_documents, "kept": st.kept, "answers_of_kept": st.answers_kept,
                      "with_documents": len({p[1].id for p in plan})},
        "documents": args.documents,
        "links": links if args.documents == "web" else None,
        "pairs": {"planned": len(plan), "labelled": n_lab, "failed": sum(fails.values()),
                  "pending": len(planned - set(final)), "not_in_plan": len(set(final) - planned),
                  "labelled_by_kind": dict(kinds)},
        "labels": {str(k): labels[k] for k in prompts.LABELS},
        "teacher": {"name": teacher_name, "format": args.format, "prompt_hash": prompts.prompt_hash(args.format),
                    "failures": dict(fails), "requests": attempts,
                    "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]},
        "split": {"train_pairs": n_split["train"], "val_pairs": n_split["val"],
                  "train_questions": len(q_split["train"]), "val_questions": len(q_split["val"])},
    }
    write_json(out / "summary.json", summary)
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, DumpError, DataError, TeacherFatal) as e:
        print(f"train.py data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py data: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
