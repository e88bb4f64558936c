"""BRIGHT: the benchmark's data (examples with gold and excluded ids, documents), its BM25 first
stage, the per-domain report, and a CLI.

    python -m minirank.bright evaluate --run RUN --examples biology [--json]     # RUN may be <(zcat x.gz) or -
    python -m minirank.bright bm25 --domain biology [--reasoning gpt4] --out runs/bm25/biology.trec
    python -m minirank.bright report --runs runs/bm25 [--json]
    python -m minirank.bright download --config documents --domain all [--refresh]

Data come from the hub (xlangai/BRIGHT parquet files, fetched through minirank.hub into
$MINIRANK_CACHE/bright/<commit>/ in the hub's layout) or from a local directory laid out the same way,
where `examples`-like configs may also be JSONL or JSONL.gz (e.g. ../shared/bright/examples/biology.jsonl.gz).
The hub's `main` is resolved to a commit once, at first use, and every file then comes from that
commit (recorded in $MINIRANK_CACHE/bright/refs/main; `download --refresh` moves it to today's main),
so examples, documents and a cached BM25 index never mix two versions of the dataset.
Run and qrels files are read and written by minirank.files; metrics follow trec_eval (metrics.py);
BM25 follows BRIGHT's gensim/pyserini baseline (bm25.py).
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import bm25, files, hub
from .files import DataError, read_qrels, read_rows, read_run, write_run
from .metrics import DEFAULT_METRICS, average, canonical, evaluate, mean, per_query

DOMAINS = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
           "sustainable_living", "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems")
DOMAIN_HEADS = ("Bio.", "Earth.", "Econ.", "Psy.", "Rob.", "Stack.", "Sus.", "Leet.", "Pony", "AoPS",
                "TheoQ.", "TheoT.")  # column heads of the BRIGHT paper's tables, in DOMAINS order
REPO_ID = "xlangai/BRIGHT"
_SHA = re.compile(r"^[0-9a-f]{40}$")


class BrightError(DataError):
    """Unknown domain, missing data, hub failure; like every DataError, the CLI prints it without a traceback."""


def check_domain(domain):
    if domain not in DOMAINS:
        raise BrightError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return domain


def reason_config(reasoning):
    """'gpt4' -> 'gpt4_reason' (the hub config holding GPT-4's reasoning as the query)."""
    return reasoning if reasoning.endswith("_reason") else f"{reasoning}_reason"


# ----------------------------------------------------------------------------------------------
# Where the files are: a local directory, or the hub at one pinned commit (cached). Both are laid
# out as <config>/<split>-00000-of-00001.parquet (large splits: several -0000i-of-0000n shards).


def _cache():
    return hub.cache_dir() / "bright"


def _candidates(root, config, split):
    d = Path(root) / config
    return [d / f"{split}-00000-of-00001.parquet", d / f"{split}.parquet",
            d / f"{split}.jsonl.gz", d / f"{split}.jsonl"]


def _glob_escape(s):
    return re.sub(r"([*?\[])", r"[\1]", s)


def local_files(root, config, split):
    """Files holding `config`/`split` under root (several parquet shards possible), or []."""
    d = Path(root) / config
    shards = sorted(d.glob(f"{_glob_escape(split)}-*-of-*.parquet")) if d.is_dir() else []
    if shards:
        # all of them or none: an interrupted multi-shard download must not pass for the split
        n = int(re.search(r"-of-(\d+)\.parquet$", shards[0].name).group(1))
        want = [d / f"{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
        return want if all(p.is_file() for p in want) else []
    return [p for p in _candidates(root, config, split) if p.is_file()][:1]


def hub_revision(refresh=False):
    """The commit of xlangai/BRIGHT that every hub read uses: resolved from `main` once, at first use
    (or on refresh), and recorded in the cache, so a job never mixes files of two commits and a
    cached split is read again without the network."""
    ref = _cache() / "refs" / "main"
    if ref.is_file() and not refresh:
        sha = ref.read_text().strip()
        if _SHA.match(sha):
            return sha
    if hub.offline():
        raise BrightError(f"no BRIGHT commit recorded in {ref} and HF_HUB_OFFLINE=1: "
                          f"run once online, or pass a local copy with --data-dir")
    try:
        sha = hub.resolve_revision(REPO_ID, "main", repo_type="dataset")
    except hub.HubError as e:
        raise BrightError(f"could not resolve {REPO_ID}@main to a commit: {e}") from e
    files.atomic_write(ref, sha + "\n")
    return sha


def fetch(config, split, data_dir=None):
    """Local paths of a config's split: from data_dir (never the network), else the cache at the
    pinned commit, else downloaded into it through minirank.hub (resumable; HF_ENDPOINT, HF_TOKEN)."""
    if data_dir is not None:
        found = local_files(data_dir, config, split)
        if not found:
            tried = ", ".join(str(p) for p in _candidates(data_dir, config, split))
            raise BrightError(f"no {config}/{split} data in {data_dir}: looked for {tried}")
        return found
    sha = hub_revision()
    root = _cache() / sha
    found = local_files(root, config, split)
    if found:
        return found
    if hub.offline():
        tried = ", ".join(str(p) for p in _candidates(root, config, split))
        raise BrightError(f"{config}/{split} is not cached (looked for {tried}) and HF_HUB_OFFLINE=1")
    get = lambda name: hub.fetch_file(REPO_ID, f"{config}/{name}", root / config / name, revision=sha,
                                      repo_type="dataset", desc=f"{config}/{split}")
    try:
        single = f"{split}-00000-of-00001.parquet"
        if not (root / config).is_dir() or not any((root / config).glob(f"{_glob_escape(split)}-*-of-*.parquet")):
            try:
                return [get(single)]
            except hub.HubError as e:
                if e.status != 404:
                    raise
        # large splits are stored as several shards: ask the hub which exist (at the same commit)
        pat = re.compile(rf"^{re.escape(split)}-\d+-of-\d+\.parquet$")
        names = sorted(n for n in (Path(p).name for p in hub.list_files(REPO_ID, config, revision=sha,
                                                                        repo_type="dataset")) if pat.match(n))
        if not names:
            raise BrightError(f"{config}/{split} is not on the hub ({REPO_ID}@{sha[:12]}): "
                              f"check the config and split names")
        return [root / config / n if (root / config / n).is_file() else get(n) for n in names]
    except hub.HubError as e:
        raise BrightError(str(e)) from e


def _read_all(paths, columns=None):
    rows = []
    for p in paths:
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


def examples_config(reasoning=None):
    return reason_config(reasoning) if reasoning else "examples"


def documents_config(long=False):
    return "long_documents" if long else "documents"


def load_examples(source, reasoning=None, data_dir=None):
    """Examples of a domain (or of a file: parquet/JSONL/JSONL.gz, a pipe, '-'). With reasoning='gpt4'
    the queries are the `gpt4_reason` config's (an LLM's reasoning instead of the question)."""
    if source in DOMAINS:
        config = examples_config(reasoning)
        return examples_from_rows(_read_all(fetch(config, source, data_dir)), f"{config}/{source}")
    path = Path(source)
    if source != "-" and not path.exists():
        raise BrightError(f"examples not found: {source!r} is neither a file ({path.resolve()}) nor a "
                          f"domain ({', '.join(DOMAINS)})")
    return examples_from_rows(read_rows(path if source != "-" else "-"), str(path))


def documents_from_files(paths):
    """(ids, texts) of documents files (rows with id and content), in file order."""
    rows = _read_all(paths, columns=["id", "content"])
    return [str(r["id"]) for r in rows], [r["content"] or "" for r in rows]


def load_documents(domain, long=False, data_dir=None):
    """(ids, texts) of a domain's corpus, in the hub's order."""
    return documents_from_files(fetch(documents_config(long), check_domain(domain), data_dir))


def qrels_from_examples(examples, long=False):
    """{qid: {docid: 1}} from gold_ids (gold_ids_long with long=True), as BRIGHT evaluates."""
    return {e.id: {d: 1 for d in (e.gold_ids_long if long else e.gold_ids)} for e in examples}


def excluded_from_examples(examples):
    """{qid: set of docids} that must not appear in that query's ranking."""
    return {e.id: set(e.excluded_ids) for e in examples if e.excluded_ids}


def queries_from_examples(examples):
    return {e.id: e.query for e in examples}


def evaluate_examples(run, examples, metrics=DEFAULT_METRICS, long=False):
    """BRIGHT's evaluation of a run: qrels from gold ids, excluded ids removed, mean over queries."""
    return evaluate(run, qrels_from_examples(examples, long), metrics, excluded_from_examples(examples))


# ----------------------------------------------------------------------------------------------
# Contamination: which BRIGHT domains a text collection overlaps. BRIGHT's StackExchange queries are
# posts (title on the first line, then the body, sometimes lightly edited) and its gold answers are
# those posts' answers. A query matches when its title equals a BRIGHT query's first line or most of
# its 8-word shingles occur in BRIGHT's queries; a document matches when most of its shingles occur
# in BRIGHT's gold answers. The same test drops questions in `train.py data` and flags training data.

_SHINGLE = 8


def normalise(text: str) -> list[str]:
    """Lower-cased alphanumeric words (markup, punctuation and spacing differences vanish)."""
    return re.findall(r"[^\W_]+", text.lower())


def _shingles(words):
    return {hash(" ".join(words[i:i + _SHINGLE])) for i in range(max(0, len(words) - _SHINGLE + 1))}


def _mostly_in(sh, seen):
    return len(sh) >= 3 and len(sh & seen) >= 0.5 * len(sh)


def default_dir() -> str | None:
    """Where BRIGHT's examples are looked for: $MINIRANK_BRIGHT, else ../shared/bright next to the
    repository, else the hub cache's pinned commit (None: no copy on this machine)."""
    env = os.environ.get("MINIRANK_BRIGHT")
    if env:
        return env
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "bright"
    if (shared / "examples").is_dir():
        return str(shared)
    ref = _cache() / "refs" / "main"
    sha = ref.read_text().strip() if ref.is_file() else ""
    return str(_cache() / sha) if _SHA.match(sha) and (_cache() / sha / "examples").is_dir() else None


class BrightFilter:
    """Per domain: the first lines and shingles of BRIGHT's queries, the shingles of its gold answers.
    `filter(title, body)` is True for a question that is (or nearly is) a BRIGHT query."""

    def __init__(self, bright_dir: str | Path):
        root = Path(bright_dir)
        found = {d: local_files(root, "examples", d) for d in DOMAINS}
        # files named after no domain (a hand-made examples dir) still count, under their own name
        named = {p for ps in found.values() for p in ps}
        for p in sorted((root / "examples").glob("*.jsonl*")) if (root / "examples").is_dir() else []:
            if p not in named:
                found[p.name.split(".")[0]] = [p]
        found = {d: ps for d, ps in found.items() if ps}
        if not found:
            raise BrightError(f"{root / 'examples'}: no BRIGHT examples (<domain>.jsonl.gz or parquet) to check against")
        self.source, self.n_queries = str(root), 0
        self.titles, self.queries, self.answers = {}, {}, {}
        for domain, paths in found.items():
            titles, queries, answers = set(), set(), set()
            for fp in paths:
                for n, row in enumerate(read_rows(fp, columns=["query", "gold_answer"]), 1):  # DataError names file:line
                    q = row["query"]
                    if not isinstance(q, str):
                        raise BrightError(f"{fp}: row {n}: not a BRIGHT example (no 'query' text)")
                    self.n_queries += 1
                    first = normalise(q.strip().split("\n", 1)[0])
                    if len(first) >= 3:
                        titles.add(" ".join(first))
                    queries |= _shingles(normalise(q))
                    if isinstance(row["gold_answer"], str) and row["gold_answer"] != "N/A":
                        answers |= _shingles(normalise(row["gold_answer"]))
            self.titles[domain], self.queries[domain], self.answers[domain] = titles, queries, answers

    def query_domains(self, title: str, body: str) -> list[str]:
        t, sh = " ".join(normalise(title)), _shingles(normalise(body))
        return [d for d in self.titles
                if (len(t.split()) >= 3 and t in self.titles[d]) or _mostly_in(sh, self.queries[d])]

    def document_domains(self, text: str) -> list[str]:
        sh = _shingles(normalise(text))
        return [d for d in self.answers if _mostly_in(sh, self.answers[d])]

    def __call__(self, title: str, body: str) -> bool:
        return bool(self.query_domains(title, body))


def data_overlap(pairs, bright_dir=None) -> dict:
    """How many (query, document) pairs touch each BRIGHT domain (query a BRIGHT query, or document a
    BRIGHT gold answer). {"checked": False, ...} when no BRIGHT copy is found to check against."""
    bright_dir = bright_dir or default_dir()
    if bright_dir is None:
        return {"checked": False, "source": None, "overlap": {}}
    f, overlap = BrightFilter(bright_dir), {}
    for query, document in pairs:
        for d in set(f.query_domains(query.strip().split("\n", 1)[0], query)) | set(f.document_domains(document)):
            overlap[d] = overlap.get(d, 0) + 1
    return {"checked": True, "source": f.source, "overlap": dict(sorted(overlap.items()))}


# ----------------------------------------------------------------------------------------------
# BM25 first stage, one cached index per domain (and per short/long documents), valid only for
# the exact files it was built from: a new hub commit or an edited local copy rebuilds it.


def bm25_index(domain, long=False, data_dir=None, progress=True, rebuild=False):
    paths = fetch(documents_config(long), check_domain(domain), data_dir)
    source = files.file_stamps(paths)  # hub files live under their commit, so this names the commit too
    path = _cache() / "bm25" / (domain + ("_long" if long else ""))
    index = None if rebuild else bm25.load_index(path, source=source)
    if index is None:
        ids, texts = documents_from_files(paths)
        index = bm25.build_index(texts, ids, progress=progress)
        bm25.save_index(index, path, source=source)
    return index


def bm25_run(domain, reasoning=None, long=False, data_dir=None, k=1000, progress=True, examples=None):
    """BRIGHT's BM25 run of a domain: {qid: {docid: score}}, top k, excluded ids removed."""
    examples = examples if examples is not None else load_examples(check_domain(domain), reasoning, data_dir)
    index = bm25_index(domain, long, data_dir, progress)
    return bm25.search(index, queries_from_examples(examples), k, excluded_from_examples(examples), progress)


def bm25_settings(domain, reasoning=None, long=False, data_dir=None, k=1000):
    """Everything a BM25 run depends on, the input files included (see files.file_stamps)."""
    return {"domain": check_domain(domain), "reasoning": reasoning, "long": long, "k": k,
            "bm25": bm25.INDEX_VERSION,
            "examples": files.file_stamps(fetch(examples_config(reasoning), domain, data_dir)),
            "documents": files.file_stamps(fetch(documents_config(long), domain, data_dir))}


def settings_path(run_path):
    """The sidecar that records how a run file was made: <run>.settings.json."""
    run_path = Path(run_path)
    return run_path.with_name(run_path.name + ".settings.json")


def reusable_run(run_path, settings):
    """The run at run_path if its sidecar says it was made with these settings and the file is the
    one the sidecar describes (same content hash); else None with the reason."""
    run_path, side = Path(run_path), settings_path(run_path)
    if not run_path.is_file():
        return None, "absent"
    try:
        recorded = json.loads(side.read_text())
    except (OSError, ValueError):
        return None, f"no readable {side.name}: settings unknown"
    if not isinstance(recorded, dict):
        return None, f"{side.name} is not a JSON object"
    if recorded.get("run_sha256") != files.sha256_file(run_path):
        return None, "the run file changed since it was written"
    diff = [k for k in files.changed_settings(recorded, settings) if k != "run_sha256"]
    if diff:
        return None, f"made with other settings ({', '.join(diff)})"
    return read_run(run_path), ""


def write_bm25_run(run, run_path, settings, tag):
    """The run, then its sidecar (written last: a sidecar always describes a complete run file)."""
    write_run(run, run_path, tag=tag)
    files.write_json(settings_path(run_path), {**settings, "run_sha256": files.sha256_file(run_path)})


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
    head = f"| {canonical(metric)} | " + " | ".join(DOMAIN_HEADS) + " | Avg. |"
    lines = [head, "|" + "---|" * (len(DOMAINS) + 2)]
    for name, r in table.items():
        cells = [fmt(r["domains"][d]) if d in r["domains"] else "–" for d in DOMAINS]
        avg = "–" if not r["domains"] else fmt(r["average"]) + ("" if r["n_domains"] == len(DOMAINS) else "*")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


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
    result = average(scored, args.metrics)  # = evaluate(), without scoring every query twice
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:12s} {v:.4f}")
        print(f"{'queries':12s} {len(scored)}")


def _evaluate_dir(run_dir, data_dir, metrics, long):
    results = {}
    for d in DOMAINS:
        p = files.find_run(run_dir, d)
        if p is not None:
            results[d] = evaluate_examples(read_run(p), load_examples(d, data_dir=data_dir), metrics, long)
    if not results:
        raise BrightError(f"no run files in {run_dir}: expected <domain>{{{','.join(files.RUN_SUFFIXES)}}} "
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
        settings = bm25_settings(d, args.reasoning, args.long, args.data_dir, args.k)
        run, why = (None, "--force") if args.force else reusable_run(path, settings)
        if run is not None:
            print(f"{d}: {path} was made with these settings, reusing it (--force to redo)", file=sys.stderr)
        else:
            if why != "absent":
                print(f"{d}: recomputing {path}: {why}", file=sys.stderr)
            run = bm25_run(d, args.reasoning, args.long, args.data_dir, args.k, not args.quiet, examples)
            write_bm25_run(run, path, settings, tag="bm25" + (f"_{args.reasoning}" if args.reasoning else ""))
        results[d] = evaluate_examples(run, examples, args.metrics, args.long)
        print(f"{d}: " + "  ".join(f"{k} {v:.4f}" for k, v in results[d].items()), file=sys.stderr)
    name = "BM25" + (f" + {args.reasoning} reasoning" if args.reasoning else "")
    _print_report(name, results, args.metrics, args.json)


def _cmd_download(args):
    if args.refresh:
        print(f"{REPO_ID} pinned at {hub_revision(refresh=True)}", file=sys.stderr)
    for d in (DOMAINS if args.domain == "all" else (check_domain(args.domain),)):
        for p in fetch(args.config, d, None):
            print(p)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirank.bright", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    metrics_help = "comma-separated: ndcg@k, recall@k, p@k, map, map@k, mrr, success@k"

    e = sub.add_parser("evaluate", help="metrics of one run file against a domain's examples or a qrels file")
    e.add_argument("--run", required=True, help="TREC or JSON run file (.gz allowed; a pipe or - for stdin too)")
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
    b.add_argument("--out", required=True, help="run file (or directory with --domain all); its settings "
                                                "go beside it in <run>.settings.json")
    b.add_argument("--k", type=int, default=1000, help="hits kept per query (default 1000)")
    b.add_argument("--force", action="store_true", help="recompute runs even when made with the same settings")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--metrics", type=_metrics_arg, default=("ndcg@10",), help=metrics_help)

    dl = sub.add_parser("download", help="fetch a config's parquet files into the cache")
    dl.add_argument("--config", default="examples",
                    help="examples, documents, long_documents or <model>_reason (default examples)")
    dl.add_argument("--domain", default="all")
    dl.add_argument("--refresh", action="store_true", help="pin the cache to the hub's current main first")

    for p in (e, r, b):
        p.add_argument("--data-dir", help="local copy of the data (<config>/<domain>.jsonl.gz or "
                                          "<config>/<domain>-00000-of-00001.parquet); default: hub + cache")
        p.add_argument("--long", action="store_true", help="long documents: gold_ids_long")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    args = ap.parse_args(argv)
    if args.cmd == "evaluate" and not (args.examples or args.qrels):
        ap.error("evaluate needs --examples or --qrels")
    if args.cmd == "bm25" and args.k < 1:
        ap.error("--k must be at least 1")
    try:
        commands = {"evaluate": _cmd_evaluate, "report": _cmd_report, "bm25": _cmd_bm25, "download": _cmd_download}
        commands[args.cmd](args)
    except DataError as exc:  # BrightError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
