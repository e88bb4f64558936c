"""The project's data files: rows (JSONL, JSONL.gz, parquet), TREC/JSON runs, TREC qrels, atomic writes.

Every reader takes a path, a pipe (`<(zcat run.gz)` gives /dev/fd/N) or `-` (stdin), and gunzips
by content, not by name. Every writer goes through `atomic_write`: a file that exists is complete,
so a resumed job can trust what it finds. Bad input raises `DataError` naming the file and line.

TREC run line: "qid Q0 docid rank score tag"; a docid may contain spaces (BRIGHT's stackoverflow
ids do), so it is everything between the 2nd field and the last three. JSON run: {qid: {docid: score}}.
TREC qrels line: "qid iter docid level".
"""

import gzip
import hashlib
import io
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

GZIP_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"
RUN_SUFFIXES = (".trec", ".trec.gz", ".run", ".txt", ".json", ".json.gz")


class DataError(ValueError):
    """A missing or malformed data file; command lines print the message without a traceback."""


# ----------------------------------------------------------------------------------------------
# Reading: files, pipes, stdin


def _where(path):
    return "stdin" if str(path) == "-" else f"{path} (absolute: {Path(path).resolve()})"


@contextmanager
def open_input(path, what="file"):
    """A seekable binary stream of path, '-' (stdin) or a pipe, gunzipped when it is gzip.

    A pipe can be read only once, so it is read into memory (runs and qrels are small); a regular
    file is streamed. Content decides gzip, not the name: `<(zcat run.gz)` and `run.gz` both work."""
    try:
        if str(path) == "-":
            f = io.BytesIO(sys.stdin.buffer.read())
        else:
            f = open(path, "rb")
            if not f.seekable():  # FIFO, /dev/fd/N, character device
                with f:
                    f = io.BytesIO(f.read())
    except FileNotFoundError:
        raise DataError(f"{what} not found: {_where(path)}") from None
    except IsADirectoryError:
        raise DataError(f"{what} is a directory, not a file: {_where(path)}") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    with f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


def read_text(path, what="file"):
    """The whole text of a file, pipe or '-' (UTF-8, gunzipped when gzip)."""
    with open_input(path, what) as f:
        try:
            return f.read().decode("utf-8")
        except (OSError, EOFError) as e:  # gzip: truncated or corrupt
            raise DataError(f"{path}: not a readable gzip file ({e})") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e


def read_rows(path, columns=None):
    """Rows (dicts) of a parquet, JSONL or JSONL.gz file (or pipe, or '-'); `columns` keeps only those."""
    with open_input(path) as f:
        if f.read(4) == PARQUET_MAGIC or str(path).endswith(".parquet"):
            f.seek(0)
            import pyarrow.parquet as pq

            try:
                return pq.read_table(f, columns=columns).to_pylist()
            except Exception as e:  # pyarrow raises several types; they all mean a bad/partial file
                raise DataError(f"{path}: not a readable parquet file ({e})") from e
        f.seek(0)
        rows = []
        try:
            for lineno, raw in enumerate(f, 1):  # bytes lines, decoded one by one: errors name their line
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
                if not line.strip():
                    continue
                row = _json_object(line, f"{path}:{lineno}")
                rows.append({k: row.get(k) for k in columns} if columns else row)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from e
    return rows


def read_texts(path, text_fields=("text",)):
    """{id: text} of a rows file (as read_rows reads it) whose rows have an `id` and a string in one
    of `text_fields` (the first present wins): queries or documents for a reranker."""
    out = {}
    for n, row in enumerate(read_rows(path), 1):
        field = next((k for k in text_fields if isinstance(row.get(k), str)), None)
        if "id" not in row or field is None:
            raise DataError(f"{path}: row {n}: expected fields 'id' and one of {tuple(text_fields)}")
        out[str(row["id"])] = row[field]
    return out


# ----------------------------------------------------------------------------------------------
# Runs and qrels

_RUN_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(.+?)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
_QREL_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(.+?)\s+(\S+)\s*$")


def read_run(path):
    """{qid: {docid: score}} from a TREC or JSON run (format by content; gzip, pipes and '-' too)."""
    text = read_text(path, "run file")
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
                raise DataError(f"{path}:{lineno}: malformed run line, expected 'qid Q0 docid rank score "
                                f"tag' (6 fields or more), got {line.strip()!r:.120}")
            qid, _, docid, rank, score, _ = m.groups()
        try:
            int(rank)
            score = float(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: malformed run line, rank must be an integer and score a "
                            f"number: {line.strip()!r:.120}") from None
        if math.isnan(score):
            raise DataError(f"{path}:{lineno}: score is NaN")
        docs = run.setdefault(qid, {})
        if docid in docs:
            raise DataError(f"{path}:{lineno}: document {docid!r} appears twice for query {qid!r}")
        docs[docid] = score
    return run


def _json_object(text, where, expect="a JSON object"):
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DataError(f"{where}: not {expect} ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected {expect}, got {type(obj).__name__}")
    return obj


def read_json(path, expect="a JSON object"):
    """The JSON object in a file (settings, configs, sidecars); DataError naming the file when it is
    missing, not JSON, or JSON of another shape (a list where an object belongs)."""
    return _json_object(read_text(path), path, expect)


def _json_run(text, path):
    run = _json_object(text, path, "a JSON run {qid: {docid: score}}")
    out = {}
    for qid, docs in run.items():
        if not isinstance(docs, dict):
            raise DataError(f"{path}: query {qid!r}: expected an object {{docid: score}}")
        for docid, s in docs.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s:
                raise DataError(f"{path}: query {qid!r}, document {docid!r}: score {s!r} is not a number")
        out[str(qid)] = {str(d): float(s) for d, s in docs.items()}
    return out


def write_run(run, path, tag="minirank", fmt=None):
    """Write {qid: {docid: score}} as TREC (default) or JSON (fmt='json' or a .json name), atomically.
    TREC lines are in trec_eval order (score desc, docid desc) with ranks 1..n."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    fmt = fmt or ("json" if name.endswith(".json") else "trec")
    if fmt == "json":
        atomic_write(path, json.dumps(run, ensure_ascii=False))
        return path
    if re.search(r"\s", tag):
        raise DataError(f"run tag {tag!r} must not contain whitespace")
    lines = []
    for qid, docs in run.items():
        if re.search(r"\s", str(qid)) or not str(qid):
            raise DataError(f"query id {qid!r} cannot be written to a TREC run (whitespace)")
        ranked = sorted(docs.items(), key=lambda x: (float(x[1]), x[0]), reverse=True)
        for r, (docid, s) in enumerate(ranked, 1):
            if docid != docid.strip() or "\n" in docid or not docid:
                raise DataError(f"document id {docid!r} cannot be written to a TREC run")
            lines.append(f"{qid} Q0 {docid} {r} {float(s)!r} {tag}\n")
    atomic_write(path, "".join(lines))
    return path


def read_qrels(path):
    """{qid: {docid: level}} from a TREC qrels file 'qid iter docid level' (docid may hold spaces)."""
    qrels = {}
    for lineno, line in enumerate(read_text(path, "qrels file").splitlines(), 1):
        if not line.strip():
            continue
        m = _QREL_LINE.match(line)
        try:
            level = int(m.group(4)) if m else None
        except ValueError:
            level = None
        if level is None:
            raise DataError(f"{path}:{lineno}: malformed qrels line, expected 'qid 0 docid level': "
                            f"{line.strip()!r:.120}")
        qrels.setdefault(m.group(1), {})[m.group(3)] = level
    return qrels


def write_qrels(qrels, path):
    atomic_write(path, "".join(f"{q}\t0\t{d}\t{int(r)}\n" for q, docs in qrels.items() for d, r in docs.items()))
    return Path(path)


def find_run(run_dir, name):
    """run_dir/<name><suffix> for the first of RUN_SUFFIXES that exists, else None."""
    for suf in RUN_SUFFIXES:
        p = Path(run_dir) / f"{name}{suf}"
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------------------------
# Writing and fingerprints


def atomic_write(path, data):
    """Write str/bytes to path (gzip-compressed when it ends in .gz) so that path is either the old
    file or the whole new one, never a partial write: write a unique temp file beside it, flush it
    to disk, then rename over (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as raw:
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                    f.write(data)
            else:
                raw.write(data)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj, indent=1):
    """atomic_write of obj as JSON (UTF-8, trailing newline)."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def content_hash(obj):
    """sha256 (hex) of a JSON-able value in canonical form: equal data, equal hash, whatever its
    source file's format, key order or compression."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def changed_settings(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between a job's recorded settings and today's (missing on one side
    counts)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_settings(path, settings: dict, write: bool = True, ignore=()) -> None:
    """The guard of every resumable job (data generation, reranking, training): continuing is only sound
    with the same settings, so a settings file (path) that records others -- or is no JSON object -- is a
    DataError naming what differs, old -> new. With write, the settings are recorded when none are yet.
    ignore: keys the file holds beside the settings (not compared)."""
    path = Path(path)
    if path.is_file():
        old = read_json(path, "a job's settings (a JSON object)")
        diff = [k for k in changed_settings(old, settings) if k not in ignore]
        if diff:
            def short(v):
                v = repr(v)
                return v if len(v) <= 60 else v[:57] + "..."
            shown = ", ".join(f"{k}: {short(old.get(k))} -> {short(settings.get(k))}" for k in diff[:4])
            raise DataError(f"{path.parent} holds a job with other settings: {', '.join(diff)} differ ({shown}"
                            f"{', ...' if len(diff) > 4 else ''}); use another --out, or rerun with the same "
                            f"settings to continue it")
    elif write:
        write_json(path, settings)


def file_stamps(paths):
    """[(absolute path, size, mtime_ns)] of files: a cheap identity of their contents (a file that
    is replaced or edited gets a new size or mtime)."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def sha256_file(path, chunk=1 << 20):
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
