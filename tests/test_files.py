"""minirank.files: runs, qrels and rows from files, gzip, pipes and stdin; atomic writes."""

import gzip
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minirank import files
from minirank.files import DataError, atomic_write, read_qrels, read_rows, read_run, write_qrels, write_run

REPO = Path(__file__).resolve().parents[1]
RUN = {"q1": {"doc a/b c.txt": 0.1 + 0.2, "d2": 1e-17, "d3": 1e-17, "d4": -3.0}, "q2": {}, "q3": {"x": 5}}


def test_run_round_trip(tmp_path):
    for name in ("r.trec", "r.trec.gz", "r.json", "r.json.gz"):
        write_run(RUN, tmp_path / name)
        back = read_run(tmp_path / name)
        want = {q: {d: float(s) for d, s in docs.items()} for q, docs in RUN.items()}
        if name.startswith("r.trec"):
            want.pop("q2")  # an empty ranking has no lines in a TREC file
        assert back == want
    lines = (tmp_path / "r.trec").read_text().splitlines()
    # trec_eval order: score desc, ties by docid desc; ranks from 1
    assert [ln.split()[2] for ln in lines[:4]] == ["doc", "d3", "d2", "d4"]
    assert lines[0] == "q1 Q0 doc a/b c.txt 1 0.30000000000000004 minirank"
    qrels = {"q1": {"a b": 2, "c": 0}}
    write_qrels(qrels, tmp_path / "q.txt")
    assert read_qrels(tmp_path / "q.txt") == qrels
    # gzip is recognised by content, not by name
    (tmp_path / "plain-name").write_bytes(gzip.compress((tmp_path / "r.trec").read_bytes()))
    assert read_run(tmp_path / "plain-name") == read_run(tmp_path / "r.trec")


def _feed(data):
    """A /dev/fd/N path reading from a pipe that a thread fills (what bash's <(...) hands a program)."""
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    return f"/dev/fd/{r}", r, t


@pytest.mark.parametrize("gz", [False, True])
def test_runs_qrels_and_rows_from_pipes(tmp_path, gz):
    write_run(RUN, tmp_path / "r.trec")
    run_bytes = (tmp_path / "r.trec").read_bytes()
    rows = b'{"id": "1", "query": "a"}\n{"id": "2", "query": "b"}\n'
    for data, reader, want in ((run_bytes, read_run, read_run(tmp_path / "r.trec")),
                               (b"q1 0 d 1\nq1 0 e f 0\n", read_qrels, {"q1": {"d": 1, "e f": 0}}),
                               (rows, read_rows, [{"id": "1", "query": "a"}, {"id": "2", "query": "b"}])):
        path, fd, t = _feed(gzip.compress(data) if gz else data)
        try:
            assert reader(path) == want
        finally:
            t.join()
            os.close(fd)


def test_run_from_stdin(tmp_path, monkeypatch):
    write_run(RUN, tmp_path / "r.trec")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress((tmp_path / "r.trec").read_bytes()))))
    assert read_run("-") == read_run(tmp_path / "r.trec")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"q1 Q0 d1 1 x t\n")))
    with pytest.raises(DataError, match=r"^-:1: malformed run line"):
        read_run("-")


def test_cli_evaluate_reads_process_substitution(tmp_path):
    """`python -m minirank.bright evaluate --run <(zcat run.gz)`: the run arrives as /dev/fd/63."""
    write_run({"q1": {"d1": 2.0, "d2": 1.0}, "q2": {"d3": 1.0}}, tmp_path / "run.trec.gz")
    write_qrels({"q1": {"d2": 1}, "q2": {"d3": 1}}, tmp_path / "qrels.txt")
    cmd = (f"{sys.executable} -m minirank.bright evaluate --run <(zcat {tmp_path}/run.trec.gz) "
           f"--qrels <(cat {tmp_path}/qrels.txt) --metrics p@1,mrr --json")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"p@1": 0.5, "mrr": 0.75}
    out = subprocess.run(["bash", "-c", f"zcat {tmp_path}/run.trec.gz | {sys.executable} -m minirank.bright evaluate "
                                        f"--run - --qrels {tmp_path}/qrels.txt --metrics p@1 --json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout) == {"p@1": 0.5}, out.stderr


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"run file not found: .*nope\.trec \(absolute: /"):
        read_run(tmp_path / "nope.trec")
    with pytest.raises(DataError, match=r"qrels file is a directory"):
        read_qrels(tmp_path)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"q1 Q0 d1 1 0.5 t\n" * 100)[:40])
    with pytest.raises(DataError, match=r"cut\.gz: not a readable gzip file"):
        read_run(tmp_path / "cut.gz")
    (tmp_path / "latin.jsonl").write_bytes(b'{"id": "1"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 text"):
        read_rows(tmp_path / "latin.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable parquet file"):
        read_rows(tmp_path / "x.parquet")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "run.trec"
    atomic_write(p, "old\n")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(p, "new\n")
    monkeypatch.undo()
    assert p.read_text() == "old\n" and sorted(x.name for x in tmp_path.iterdir()) == ["run.trec"]  # no temp left
    files.write_json(tmp_path / "s.json", {"a": [1, "é"]})
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8")) == {"a": [1, "é"]}
    atomic_write(tmp_path / "x.gz", "text")
    assert gzip.decompress((tmp_path / "x.gz").read_bytes()) == b"text"


def test_content_hash_and_file_stamps(tmp_path):
    assert files.content_hash({"a": 1, "b": [1, 2]}) == files.content_hash({"b": [1, 2], "a": 1})
    assert files.content_hash({"a": 1}) != files.content_hash({"a": 2})
    p = tmp_path / "f"
    p.write_text("x")
    before = files.file_stamps([p])
    p.write_text("xy")
    assert files.file_stamps([p]) != before and files.file_stamps([p])[0][0] == str(p.resolve())


def test_read_texts(tmp_path):
    p = tmp_path / "docs.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"id": 7, "title": "T", "text": "body"}\n{"id": "b", "content": "c"}\n'))
    assert files.read_texts(p, ("text", "content")) == {"7": "body", "b": "c"}  # first present field wins
    with pytest.raises(DataError, match=r"docs.jsonl.gz: row 2: expected fields 'id' and one of \('text',\)"):
        files.read_texts(p, ("text",))
