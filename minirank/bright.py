"""BRIGHT evaluation: data, qrels and exclusions, run files, metrics, BM25 first stage, report, CLI.

    python -m minirank.bright evaluate --run RUN --examples biology [--json]
    python -m minirank.bright bm25 --domain biology [--reasoning gpt4] --out runs/bm25/biology.trec
    python -m minirank.bright report --runs runs/bm25 [--json]

Data come from the hub (xlangai/BRIGHT parquet files, cached under $MINIRANK_CACHE/bright in the
hub's own layout) or from a local directory laid out the same way, where `examples`-like configs may
also be JSONL or JSONL.gz (e.g. ../shared/bright/examples/biology.jsonl.gz). Metrics follow trec_eval
(see metrics.py); BM25 follows BRIGHT's gensim/pyserini baseline (see bm25.py).
"""

import argparse
import gzip
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import bm25
from .metrics import DEFAULT_METRICS, canonical, evaluate, mean, per_query

DOMAINS = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
           "sustainable_living", "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems")
LABELS = ("Bio.", "Earth.", "Econ.", "Psy.", "Rob.", "Stack.", "Sus.", "Leet.", "Pony", "AoPS",
          "TheoQ.", "TheoT.")  # column heads of the BRIGHT paper's tables
REPO_ID = "xlangai/BRIGHT"
DEFAULT_ENDPOINT = "https://huggingface.co"


class BrightError(ValueError):
    """Bad input or missing data; the CLI prints the message without a traceback."""


def check_domain(domain):
    if domain not in DOMAINS:
        raise BrightError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return domain


def reason_config(reasoning):
    """'gpt4' -> 'gpt4_reason' (the hub config holding GPT-4's reasoning as the query)."""
    return reasoning if reasoning.endswith("_reason") else f"{reasoning}_reason"


# ----------------------------------------------------------------------------------------------
# Files: a local directory or the hub, both laid out as <config>/<split>-00000-of-00001.parquet.


def cache_dir():
    """$MINIRANK_CACHE/bright, else ~/.cache/minirank/bright: downloads mirror the hub's layout."""
    from .hub import cache_dir as root

    return root() / "bright"


def _candidates(root, config, split):
    d = Path(root) / config
    return [d / f"{split}-00000-of-00001.parquet", d / f"{split}.parquet",
            d / f"{split}.jsonl.gz", d / f"{split}.jsonl"]


def local_files(root, config, split):
    """Files holding `config`/`split` under root (several parquet shards possible), or []."""
    d = Path(root) / config
    shards = sorted(d.glob(f"{glob_escape(split)}-*-of-*.parquet")) if d.is_dir() else []
    if shards:
        # all of them or none: an interrupted multi-shard download must not pass for the split
        n = int(re.search(r"-of-(\d+)\.parquet$", shards[0].name).group(1))
        want = [d / f"{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
        return want if all(p.is_file() for p in want) else []
    return [p for p in _candidates(root, config, split) if p.is_file()][:1]


def glob_escape(s):
    return re.sub(r"([*?\[])", r"[\1]", s)


def hub_url(config, split, shard="00000-of-00001", endpoint=None):
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{REPO_ID}/resolve/main/{config}/{split}-{shard}.parquet"


def _hub_shards(config, split, token):
    # Large splits can be stored as several parquet shards: ask the hub's tree API which exist.
    import requests

    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/datasets/{REPO_ID}/tree/main/{config}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(url, headers=headers, timeout=(10, 60))
        if r.status_code == 404:  # no such config at all
            return []
        r.raise_for_status()
        names = [Path(e["path"]).name for e in r.json() if isinstance(e, dict) and "path" in e]
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:
        raise BrightError(f"could not list {config}/ on the hub ({url}): {e}") from e
    pat = re.compile(rf"^{re.escape(split)}-(\d+-of-\d+)\.parquet$")
    return sorted(m.group(1) for m in map(pat.match, names) if m)


def fetch(config, split, data_dir=None):
    """Local paths of a config's split: from data_dir (never the network), else the cache, else
    downloaded from the hub into the cache (resumable; honours HF_ENDPOINT, HF_TOKEN)."""
    if data_dir is not None:
        found = local_files(data_dir, config, split)
        if not found:
            tried = ", ".join(str(p) for p in _candidates(data_dir, config, split))
            raise BrightError(f"no {config}/{split} data in {data_dir}: looked for {tried}")
        return found
    root = cache_dir()
    found = local_files(root, config, split)
    if found:
        return found
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        tried = ", ".join(str(p) for p in _candidates(root, config, split))
        raise BrightError(f"{config}/{split} is not cached (looked for {tried}) and HF_HUB_OFFLINE=1")
    from .hub import HubError, download_file

    token = (os.environ.get("HF_TOKEN") or "").strip() or None
    shards = ["00000-of-00001"]
    paths = []
    try:
        for i, shard in enumerate(shards):
            dest = root / config / f"{split}-{shard}.parquet"
            if dest.is_file():  # a shard finished by an earlier, interrupted call
                paths.append(dest)
                continue
            try:
                paths.append(download_file(hub_url(config, split, shard), dest, token, desc=f"{config}/{split}"))
            except HubError as e:
                if e.status != 404 or i > 0 or len(shards) > 1:
                    raise
                shards.extend(s for s in _hub_shards(config, split, token) if s != shard)
                if len(shards) == 1:
                    raise BrightError(f"{config}/{split} is not on the hub ({hub_url(config, split)}): "
                                      f"check the config and split names") from e
    except HubError as e:
        raise BrightError(str(e)) from e
    return paths


def read_rows(path, columns=None):
    """Rows (dicts) of a parquet, JSONL or JSONL.gz file."""
    path = Path(path)
    if not path.is_file():
        raise BrightError(f"file not found: {path} (absolute: {path.resolve()})")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=columns).to_pylist()
        except Exception as e:  # pyarrow raises several types; they all mean a bad/partial file
            raise BrightError(f"{path}: not a readable parquet file ({e})") from e
    rows = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BrightError(f"{path}:{lineno}: not a JSON object ({e})") from e
            if not isinstance(row, dict):
                raise BrightError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append({k: row.get(k) for k in columns} if columns else row)
    return rows


def _open_text(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def load_rows(config, split, data_dir=None, columns=None):
    rows = []
    for p in fetch(config, split, data_dir):
        rows.extend(read_rows(p, columns))
    return rows


# ----------------------------------------------------------------------------------------------
# Examples (queries with gold and excluded ids) and documents.


@dataclass
class Example:
    id: str
    query: str
    gold_ids: list
    excluded_ids: list = field(default_factory=list)
    gold_ids_long: list = field(default_factory=list)
    reasoning: str = ""
    gold_answer: str = ""


def _ids(value, where, name):
    # BRIGHT writes an empty list as ["N/A"]
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise BrightError(f"{where}: field {name!r} must be a list of strings, got {value!r:.80}")
    return [v for v in value if v != "N/A"]


def examples_from_rows(rows, source="examples"):
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{source}: row {i}"
        for name in ("id", "query", "gold_ids"):
            if row.get(name) is None:
                raise BrightError(f"{where}: missing field {name!r}")
        if not isinstance(row["query"], str):
            raise BrightError(f"{where}: field 'query' must be a string")
        out.append(Example(
            id=str(row["id"]), query=row["query"], gold_ids=_ids(row["gold_ids"], where, "gold_ids"),
            excluded_ids=_ids(row.get("excluded_ids"), where, "excluded_ids"),
            gold_ids_long=_ids(row.get("gold_ids_long"), where, "gold_ids_long"),
            reasoning=row.get("reasoning") or "", gold_answer=row.get("gold_answer") or ""))
    return out


def load_examples(source, reasoning=None, data_dir=None):
    """Examples of a domain (or of a file: parquet/JSONL/JSONL.gz). With reasoning='gpt4' the
    queries are the `gpt4_reason` config's (an LLM's reasoning instead of the question)."""
    if source in DOMAINS:
        config = reason_config(reasoning) if reasoning else "examples"
        return examples_from_rows(load_rows(config, source, data_dir), f"{config}/{source}")
    path = Path(source)
    if not path.exists():
        raise BrightError(f"examples not found: {source!r} is neither a file ({path.resolve()}) nor a "
                          f"domain ({', '.join(DOMAINS)})")
    return examples_from_rows(read_rows(path), str(path))


def load_documents(domain, long=False, data_dir=None):
    """(ids, texts) of a domain's corpus, in the hub's order."""
    config = "long_documents" if long else "documents"
    rows = load_rows(config, check_domain(domain), data_dir, columns=["id", "content"])
    return [str(r["id"]) for r in rows], [r["content"] or "" for r in rows]


def qrels_from_examples(examples, long=False):
    """{qid: {docid: 1}} from gold_ids (gold_ids_long with long=True), as BRIGHT evaluates."""
    return {e.id: {d: 1 for d in (e.gold_ids_long if long else e.gold_ids)} for e in examples}


def excluded_from_examples(examples):
    """{qid: set of docids} that must not appear in that query's ranking."""
    return {e.id: set(e.excluded_ids) for e in examples if e.excluded_ids}


def queries_from_examples(examples):
    return {e.id: e.query for e in examples}


# ----------------------------------------------------------------------------------------------
# Run and qrels files. TREC run: "qid Q0 docid rank score tag"; a docid may contain spaces, so it
# is everything between the 2nd field and the last three. JSON run: {qid: {docid: score}}.

_RUN_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(.+?)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
_QREL_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(.+?)\s+(\S+)\s*$")


def read_run(path):
    """{qid: {docid: score}} from a TREC or JSON run file (format auto-detected, .gz allowed)."""
    path = Path(path)
    if not path.is_file():
        raise BrightError(f"run file not found: {path} (absolute: {path.resolve()})")
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        return _json_run(text, path)
    run = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 6:
            qid, _, docid, rank, score, _ = parts
        else:
            m = _RUN_LINE.match(line)
            if not m:
                raise BrightError(f"{path}:{lineno}: malformed run line, expected 'qid Q0 docid rank score "
                                  f"tag' (6 fields or more), got {line.strip()!r:.120}")
            qid, _, docid, rank, score, _ = m.groups()
        try:
            int(rank)
            score = float(score)
        except ValueError:
            raise BrightError(f"{path}:{lineno}: malformed run line, rank must be an integer and score a "
                              f"number: {line.strip()!r:.120}") from None
        if math.isnan(score):
            raise BrightError(f"{path}:{lineno}: score is NaN")
        docs = run.setdefault(qid, {})
        if docid in docs:
            raise BrightError(f"{path}:{lineno}: document {docid!r} appears twice for query {qid!r}")
        docs[docid] = score
    return run


def _json_run(text, path):
    try:
        run = json.loads(text)
    except ValueError as e:
        raise BrightError(f"{path}: invalid JSON run ({e})") from e
    if not isinstance(run, dict):
        raise BrightError(f"{path}: a JSON run must be an object {{qid: {{docid: score}}}}")
    out = {}
    for qid, docs in run.items():
        if not isinstance(docs, dict):
            raise BrightError(f"{path}: query {qid!r}: expected an object {{docid: score}}")
        for docid, s in docs.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s:
                raise BrightError(f"{path}: query {qid!r}, document {docid!r}: score {s!r} is not a number")
        out[str(qid)] = {str(d): float(s) for d, s in docs.items()}
    return out


def _atomic_write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode("utf-8")
    with (gzip.open(tmp, "wb") if path.suffix == ".gz" else open(tmp, "wb")) as f:
        f.write(data)
    os.replace(tmp, path)  # a run file that exists is complete: resuming can trust it


def write_run(run, path, tag="minirank", fmt=None):
    """Write {qid: {docid: score}} as TREC (default) or JSON (fmt='json' or a .json name).
    TREC lines are in trec_eval order (score desc, docid desc) with ranks 1..n."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    fmt = fmt or ("json" if name.endswith(".json") else "trec")
    if fmt == "json":
        _atomic_write(path, json.dumps(run, ensure_ascii=False))
        return path
    if re.search(r"\s", tag):
        raise BrightError(f"run tag {tag!r} must not contain whitespace")
    lines = []
    for qid, docs in run.items():
        if re.search(r"\s", str(qid)) or not str(qid):
            raise BrightError(f"query id {qid!r} cannot be written to a TREC run (whitespace)")
        ranked = sorted(docs.items(), key=lambda x: (float(x[1]), x[0]), reverse=True)
        for r, (docid, s) in enumerate(ranked, 1):
            if docid != docid.strip() or "\n" in docid or not docid:
                raise BrightError(f"document id {docid!r} cannot be written to a TREC run")
            lines.append(f"{qid} Q0 {docid} {r} {float(s)!r} {tag}\n")
    _atomic_write(path, "".join(lines))
    return path


def read_qrels(path):
    """{qid: {docid: level}} from a TREC qrels file 'qid iter docid level' (docid may hold spaces)."""
    path = Path(path)
    if not path.is_file():
        raise BrightError(f"qrels file not found: {path} (absolute: {path.resolve()})")
    qrels = {}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _QREL_LINE.match(line)
            try:
                level = int(m.group(4)) if m else None
            except ValueError:
                level = None
            if level is None:
                raise BrightError(f"{path}:{lineno}: malformed qrels line, expected 'qid 0 docid level': "
                                  f"{line.strip()!r:.120}")
            qrels.setdefault(m.group(1), {})[m.group(3)] = level
    return qrels


def write_qrels(qrels, path):
    lines = [f"{q}\t0\t{d}\t{int(r)}\n" for q, docs in qrels.items() for d, r in docs.items()]
    _atomic_write(path, "".join(lines))
    return Path(path)


def evaluate_examples(run, examples, metrics=DEFAULT_METRICS, long=False):
    """BRIGHT's evaluation of a run: qrels from gold ids, excluded ids removed, mean over queries."""
    return evaluate(run, qrels_from_examples(examples, long), metrics, excluded_from_examples(examples))


# ----------------------------------------------------------------------------------------------
# BM25 first stage, one cached index per domain (and per short/long documents).


def bm25_index(domain, long=False, data_dir=None, progress=True, rebuild=False):
    path = cache_dir() / "bm25" / (check_domain(domain) + ("_long" if long else ""))
    index = None if rebuild else bm25.load_index(path)
    if index is None:
        ids, texts = load_documents(domain, long, data_dir)
        index = bm25.build_index(texts, ids, progress=progress)
        bm25.save_index(index, path)
    return index


def bm25_run(domain, reasoning=None, long=False, data_dir=None, k=1000, progress=True, examples=None):
    """BRIGHT's BM25 run of a domain: {qid: {docid: score}}, top k, excluded ids removed."""
    examples = examples if examples is not None else load_examples(check_domain(domain), reasoning, data_dir)
    index = bm25_index(domain, long, data_dir, progress)
    return bm25.search(index, queries_from_examples(examples), k, excluded_from_examples(examples), progress)


# ----------------------------------------------------------------------------------------------
# Report: one row per system, BRIGHT's 12 columns and their plain mean, values x100.


def report_rows(rows, metric="ndcg@10"):
    """{name: {domain: {metric: v} or v}} -> {name: {"domains": {d: v}, "average": v, ...}}."""
    out = {}
    for name, by_domain in rows.items():
        vals = {d: (v[canonical(metric)] if isinstance(v, dict) else v)
                for d, v in by_domain.items() if d in DOMAINS}
        vals = {d: vals[d] for d in DOMAINS if d in vals}
        out[name] = {"metric": canonical(metric), "domains": vals, "average": mean(vals.values()),
                     "n_domains": len(vals)}
    return out


def report(rows, metric="ndcg@10", digits=1):
    """Markdown table in the BRIGHT paper's layout. Missing domains show '–' and the average is then
    over the present ones, marked with '*'."""
    table = report_rows(rows, metric)
    fmt = lambda v: f"{100 * v:.{digits}f}"
    head = f"| {canonical(metric)} | " + " | ".join(LABELS) + " | Avg. |"
    lines = [head, "|" + "---|" * (len(DOMAINS) + 2)]
    for name, r in table.items():
        cells = [fmt(r["domains"][d]) if d in r["domains"] else "–" for d in DOMAINS]
        avg = "–" if not r["domains"] else fmt(r["average"]) + ("" if r["n_domains"] == len(DOMAINS) else "*")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI

RUN_SUFFIXES = (".trec", ".trec.gz", ".run", ".txt", ".json", ".json.gz")


def find_run(run_dir, domain):
    for suf in RUN_SUFFIXES:
        p = Path(run_dir) / f"{domain}{suf}"
        if p.is_file():
            return p
    return None


def _metrics_arg(s):
    names = [m for m in s.split(",") if m.strip()]
    for m in names:
        try:
            canonical(m)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    return tuple(names)


def _cmd_evaluate(args):
    examples = load_examples(args.examples, data_dir=args.data_dir) if args.examples else None
    qrels = read_qrels(args.qrels) if args.qrels else qrels_from_examples(examples, args.long)
    excluded = excluded_from_examples(examples) if examples else {}
    run = read_run(args.run)
    scored = per_query(run, qrels, args.metrics, excluded)
    missing = [q for q, docs in qrels.items() if docs and q not in run]
    if missing:
        print(f"note: {len(missing)} of {sum(1 for d in qrels.values() if d)} judged queries are absent from "
              f"the run and are not averaged (trec_eval semantics)", file=sys.stderr)
    result = evaluate(run, qrels, args.metrics, excluded)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:12s} {v:.4f}")
        print(f"{'queries':12s} {len(scored)}")


def _evaluate_dir(run_dir, data_dir, metrics, long):
    results = {}
    for d in DOMAINS:
        p = find_run(run_dir, d)
        if p is not None:
            results[d] = evaluate_examples(read_run(p), load_examples(d, data_dir=data_dir), metrics, long)
    if not results:
        raise BrightError(f"no run files in {run_dir}: expected <domain>{{{','.join(RUN_SUFFIXES)}}} "
                          f"for domains {', '.join(DOMAINS)}")
    return results


def _print_report(name, results, metrics, as_json):
    if as_json:
        print(json.dumps({canonical(m): report_rows({name: results}, m)[name] for m in metrics}))
    else:
        for m in metrics:
            print(report({name: results}, m))
            print()


def _cmd_report(args):
    results = _evaluate_dir(args.runs, args.data_dir, args.metrics, args.long)
    _print_report(args.name or Path(args.runs).name, results, args.metrics, args.json)


def _cmd_bm25(args):
    domains = DOMAINS if args.domain == "all" else (check_domain(args.domain),)
    out = Path(args.out)
    many = args.domain == "all"
    results = {}
    for d in domains:
        path = out / f"{d}.trec" if many else out
        examples = load_examples(d, args.reasoning, args.data_dir)
        if path.exists() and not args.force:
            print(f"{d}: {path} exists, skipping (--force to redo)", file=sys.stderr)
            run = read_run(path)
        else:
            run = bm25_run(d, args.reasoning, args.long, args.data_dir, args.k, not args.quiet, examples)
            write_run(run, path, tag="bm25" + (f"_{args.reasoning}" if args.reasoning else ""))
        results[d] = evaluate_examples(run, examples, args.metrics, args.long)
        print(f"{d}: " + "  ".join(f"{k} {v:.4f}" for k, v in results[d].items()), file=sys.stderr)
    name = "BM25" + (f" + {args.reasoning} reasoning" if args.reasoning else "")
    _print_report(name, results, args.metrics, args.json)


def _cmd_download(args):
    for d in (DOMAINS if args.domain == "all" else (check_domain(args.domain),)):
        for p in fetch(args.config, d, None):
            print(p)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirank.bright", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    metrics_help = "comma-separated: ndcg@k, recall@k, p@k, map, map@k, mrr, success@k"

    e = sub.add_parser("evaluate", help="metrics of one run file against a domain's examples or a qrels file")
    e.add_argument("--run", required=True, help="TREC or JSON run file (.gz allowed)")
    e.add_argument("--examples", help="a domain name or an examples file (parquet/JSONL/JSONL.gz)")
    e.add_argument("--qrels", help="TREC qrels instead of the examples' gold ids (excluded ids still "
                                   "come from --examples if given)")
    e.add_argument("--metrics", type=_metrics_arg, default=DEFAULT_METRICS, help=metrics_help)

    r = sub.add_parser("report", help="per-domain table of a directory of runs named <domain>.trec")
    r.add_argument("--runs", required=True, help="directory with <domain>.trec[.gz] or <domain>.json runs")
    r.add_argument("--name", help="row name (default: the directory's name)")
    r.add_argument("--metrics", type=_metrics_arg, default=("ndcg@10",), help=metrics_help)

    b = sub.add_parser("bm25", help="BRIGHT's BM25 first-stage run(s)")
    b.add_argument("--domain", required=True, help="a domain or 'all' (then --out is a directory)")
    b.add_argument("--reasoning", help="use the <NAME>_reason queries, e.g. gpt4")
    b.add_argument("--out", required=True, help="run file (or directory with --domain all)")
    b.add_argument("--k", type=int, default=1000, help="hits kept per query (default 1000)")
    b.add_argument("--force", action="store_true", help="recompute runs that already exist")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--metrics", type=_metrics_arg, default=("ndcg@10",), help=metrics_help)

    dl = sub.add_parser("download", help="fetch a config's parquet files into the cache")
    dl.add_argument("--config", default="examples",
                    help="examples, documents, long_documents or <model>_reason (default examples)")
    dl.add_argument("--domain", default="all")

    for p in (e, r, b):
        p.add_argument("--data-dir", help="local copy of the data (<config>/<domain>.jsonl.gz or "
                                          "<config>/<domain>-00000-of-00001.parquet); default: hub + cache")
        p.add_argument("--long", action="store_true", help="long documents: gold_ids_long")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    args = ap.parse_args(argv)
    if args.cmd == "evaluate" and not (args.examples or args.qrels):
        ap.error("evaluate needs --examples or --qrels")
    try:
        commands = {"evaluate": _cmd_evaluate, "report": _cmd_report, "bm25": _cmd_bm25, "download": _cmd_download}
        commands[args.cmd](args)
    except BrightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
