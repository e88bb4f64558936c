"""BRIGHT data, runs, evaluation, report and CLI: on the real offline slice and on a fake local hub."""

import gzip
import json
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minirank import bright, hub as hub_api
from minirank.bright import (DOMAINS, BrightError, Example, evaluate_examples, excluded_from_examples,
                             load_documents, load_examples, main, qrels_from_examples, report)
from minirank.files import DataError, read_qrels, read_run
from minirank.metrics import evaluate

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "bright"
needs_shared = pytest.mark.skipif(not (SHARED / "examples").is_dir(),
                                  reason=f"BRIGHT offline slice absent (looked in {SHARED})")
REASONIR = SHARED / "runs" / "reasonir_gpt4cot_top100"
# ../shared/bright/README.md: nDCG@10 x100 of the ReasonIR runs, BRIGHT's domain order
REASONIR_NDCG10 = [43.5, 43.0, 32.7, 39.6, 20.8, 31.0, 27.3, 31.7, 19.6, 7.4, 33.9, 36.7]
N_QUERIES = [103, 116, 103, 101, 101, 117, 108, 142, 112, 111, 194, 76]  # METHOD.md §3


# ---------------------------------------------------------------------------------------------
# The real offline slice


@needs_shared
def test_reasonir_runs_reproduce_published_numbers():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    ours = {}
    for d in DOMAINS:
        examples = load_examples(d, data_dir=SHARED)
        run = read_run(REASONIR / f"{d}.trec.gz")
        ours[d] = evaluate_examples(run, examples, ("ndcg@10",))["ndcg@10"]
        # the same number from trec_eval itself (excluded ids are already absent from these runs)
        qrels = qrels_from_examples(examples)
        ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
        assert ours[d] == pytest.approx(sum(r["ndcg_cut_10"] for r in ref.values()) / len(ref), abs=1e-9)
    assert [round(100 * ours[d], 1) for d in DOMAINS] == REASONIR_NDCG10
    avg = 100 * sum(ours.values()) / 12
    assert avg == pytest.approx(30.59, abs=0.01)
    table = report({"ReasonIR": ours})
    assert table.splitlines()[0].startswith("| ndcg@10 | Bio. | Earth. |")
    assert table.splitlines()[2] == "| ReasonIR | " + " | ".join(f"{v:.1f}" for v in REASONIR_NDCG10) + " | 30.6 |"


@needs_shared
def test_examples_qrels_and_exclusions():
    for d, n in zip(DOMAINS, N_QUERIES):
        examples = load_examples(d, data_dir=SHARED)
        assert len(examples) == n and len({e.id for e in examples}) == n
        # qrels built from gold_ids equal the anserini qrels files
        assert qrels_from_examples(examples) == read_qrels(SHARED / "qrels" / f"{d}.txt")
        excluded = excluded_from_examples(examples)
        assert bool(excluded) == (d in ("leetcode", "aops", "theoremqa_questions"))
        assert all("N/A" not in ids for ids in excluded.values())
        assert all(not (set(e.gold_ids) & set(e.excluded_ids)) for e in examples)
    e = load_examples("leetcode", data_dir=SHARED)[0]
    assert e.gold_ids == ["leetcode/leetcode_11.txt", "leetcode/leetcode_238.txt", "leetcode/leetcode_407.txt"]
    assert e.gold_ids_long == [] and "leetcode/leetcode_85.txt" in e.excluded_ids


@needs_shared
def test_run_docids_with_spaces():
    run = read_run(REASONIR / "stackoverflow.trec.gz")
    with gzip.open(REASONIR / "stackoverflow.trec.gz", "rt") as f:
        lines = f.read().splitlines()
    spaced = [ln for ln in lines if len(ln.split()) > 6]
    assert spaced and sum(len(v) for v in run.values()) == len(lines)
    qid, _, *mid, rank, score, tag = spaced[0].split()
    assert run[qid][" ".join(mid)] == float(score)
    assert "pytorch_torch_tensor_functions/Memory Management_2_0.txt" in run["4"]


@needs_shared
def test_cli_evaluate_json_subprocess():
    out = subprocess.run([sys.executable, "-m", "minirank.bright", "evaluate", "--run",
                          str(REASONIR / "biology.trec.gz"), "--examples", "biology", "--data-dir", str(SHARED),
                          "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert round(100 * result["ndcg@10"], 1) == 43.5
    assert all(0.0 <= v <= 1.0 for v in result.values())


@needs_shared
def test_cli_evaluate_and_report(capsys):
    assert main(["evaluate", "--run", str(REASONIR / "aops.trec.gz"), "--examples", "aops",
                 "--data-dir", str(SHARED), "--metrics", "ndcg@10,recall@100,mrr"]) == 0
    out = capsys.readouterr().out
    assert "ndcg@10      0.0737" in out and "queries      111" in out
    # a TREC qrels file instead of the examples' gold ids
    assert main(["evaluate", "--run", str(REASONIR / "pony.trec.gz"), "--qrels", str(SHARED / "qrels" / "pony.txt"),
                 "--json"]) == 0
    assert round(100 * json.loads(capsys.readouterr().out)["ndcg@10"], 1) == 19.6
    assert main(["report", "--runs", str(REASONIR), "--data-dir", str(SHARED), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["ndcg@10"]
    assert got["n_domains"] == 12 and round(100 * got["average"], 2) == pytest.approx(30.59, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Runs and qrels files


def test_bad_input_messages(tmp_path):
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 0.5 tag\n\nq1 Q0 d2 1 0.4\n")
    with pytest.raises(DataError, match=r"bad\.trec:3: malformed run line"):
        read_run(bad)
    bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 x high tag\n")
    with pytest.raises(DataError, match=r"bad\.trec:2: malformed run line"):
        read_run(bad)
    bad.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n")
    with pytest.raises(DataError, match=r"bad\.trec:2: document 'd1' appears twice"):
        read_run(bad)
    bad.write_text('{"q1": {"d1": "high"}}')
    with pytest.raises(DataError, match=r"query 'q1', document 'd1'"):
        read_run(bad)
    (tmp_path / "bad.qrels").write_text("q1 0 d1 1\nq1 0 d2 yes\n")
    with pytest.raises(DataError, match=r"bad\.qrels:2: malformed qrels line"):
        read_qrels(tmp_path / "bad.qrels")
    with pytest.raises(DataError, match=r"run file not found: .*nope\.trec \(absolute: /"):
        read_run(tmp_path / "nope.trec")
    with pytest.raises(BrightError, match=r"unknown domain 'biologie'; valid domains: biology, earth_science"):
        load_documents("biologie")
    with pytest.raises(BrightError, match=r"no examples/pony data in .*: looked for .*examples/pony-00000-of-00001"
                                          r"\.parquet, .*examples/pony\.jsonl\.gz"):
        load_examples("pony", data_dir=tmp_path)
    (tmp_path / "ex.jsonl").write_text('{"id": "1", "query": "q", "gold_ids": ["a"]}\n{"id": "2", "query": "q"}\n')
    with pytest.raises(BrightError, match=r"ex\.jsonl: row 2: missing field 'gold_ids'"):
        load_examples(str(tmp_path / "ex.jsonl"))
    (tmp_path / "ex.jsonl").write_text('{"id": "1", "query": "q", "gold_ids": ["a"]}\nnot json\n')
    with pytest.raises(DataError, match=r"ex\.jsonl:2: not a JSON object"):
        load_examples(str(tmp_path / "ex.jsonl"))


def test_cli_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "r.trec").write_text("q1 Q0 d1 1 0.5\n")
    (tmp_path / "ex.jsonl").write_text('{"id": "q1", "query": "x", "gold_ids": ["d1"]}\n')
    assert main(["evaluate", "--run", str(tmp_path / "r.trec"), "--examples", str(tmp_path / "ex.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "r.trec:1: malformed run line" in err and "Traceback" not in err
    assert main(["bm25", "--domain", "chemistry", "--out", str(tmp_path / "x")]) == 2
    assert "valid domains: biology" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", "x", "--examples", "y", "--metrics", "bleu@3"])


def test_one_name_one_meaning():
    """bright.py is about BRIGHT: file I/O lives in minirank.files, hub settings in minirank.hub, and
    LABELS means the relevance labels (prompts.py) only."""
    for name in ("LABELS", "DEFAULT_ENDPOINT", "cache_dir", "hub_url", "_atomic_write", "_open_text", "RUN_SUFFIXES"):
        assert not hasattr(bright, name), name
    assert issubclass(BrightError, DataError) and not issubclass(DataError, BrightError)
    assert len(bright.DOMAIN_HEADS) == len(DOMAINS)


def test_report_layout():
    rows = {"sys": {d: {"ndcg@10": (i + 1) / 100} for i, d in enumerate(DOMAINS)},
            "partial": {"biology": 0.5, "pony": 0.25}}
    lines = report(rows).splitlines()
    assert lines[0] == "| ndcg@10 | " + " | ".join(bright.DOMAIN_HEADS) + " | Avg. |"
    assert lines[2] == "| sys | " + " | ".join(f"{i:.1f}" for i in range(1, 13)) + " | 6.5 |"
    assert lines[3].startswith("| partial | 50.0 | – |") and lines[3].endswith("| 25.0 | – | – | – | 37.5* |")


# ---------------------------------------------------------------------------------------------
# Hub download (a fake hub on 127.0.0.1) and the BM25 runs built from it

DOCS = {
    "biology": [("bio/a.txt", "Moths are attracted to light sources at night."),
                ("bio/b.txt", "Photosynthesis converts light into chemical energy in plants."),
                ("bio/c d.txt", "Insects navigate by the moon; artificial light confuses them."),
                ("bio/e.txt", "Unrelated text about rocks.")],
}
EXAMPLES = {
    "biology": [{"query": "Why are insects attracted to light?", "reasoning": "", "id": "0",
                 "excluded_ids": ["N/A"], "gold_ids": ["bio/c d.txt", "bio/a.txt"], "gold_ids_long": ["N/A"],
                 "gold_answer": "N/A"},
                {"query": "How do plants use light?", "reasoning": "", "id": "1", "excluded_ids": ["bio/b.txt"],
                 "gold_ids": ["bio/e.txt"], "gold_ids_long": ["N/A"], "gold_answer": "N/A"}],
}


def parquet_bytes(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


SHA1, SHA2 = "1" * 40, "2" * 40
API = "/api/datasets/xlangai/BRIGHT"


class FakeHub(BaseHTTPRequestHandler):
    """The hub's dataset endpoints for xlangai/BRIGHT: /api/.../revision/<rev> -> {"sha"},
    /api/.../tree/<rev>/<dir> -> [{"type", "path"}], /datasets/xlangai/BRIGHT/resolve/<rev>/<path>
    (Range honoured). A branch name is resolved through `refs`; files live per commit."""
    commits = {}    # sha -> {repo path: bytes}
    refs = {}       # branch -> sha
    requests = []   # (path, headers)

    def do_GET(self):
        FakeHub.requests.append((self.path, dict(self.headers)))
        path = urllib.parse.unquote(self.path)
        m = re.match(rf"^{API}/revision/([^/]+)$", path)
        if m and m.group(1) in FakeHub.refs:
            return self._send(json.dumps({"sha": FakeHub.refs[m.group(1)]}).encode())
        m = re.match(rf"^{API}/tree/([^/]+)/(.+)$", path)
        if m and FakeHub.refs.get(m.group(1), m.group(1)) in FakeHub.commits:
            tree = FakeHub.commits[FakeHub.refs.get(m.group(1), m.group(1))]
            listing = [{"type": "file", "path": p} for p in tree if p.rsplit("/", 1)[0] == m.group(2)]
            return self._send(json.dumps(listing).encode()) if listing else self._send(None)
        m = re.match(r"^/datasets/xlangai/BRIGHT/resolve/([^/]+)/(.+)$", path)
        data = None
        if m:
            data = FakeHub.commits.get(FakeHub.refs.get(m.group(1), m.group(1)), {}).get(m.group(2))
        self._send(data, self.headers.get("Range"))

    def _send(self, data, rng=None):
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


def bright_files(suffix=""):
    files = {}
    for d in DOMAINS:
        docs = DOCS.get(d, [(f"{d}/x.txt", f"{d} text about light"), (f"{d}/y.txt", "other words")])
        docs = [(i, c + suffix) for i, c in docs]
        examples = EXAMPLES.get(d, [{"query": "light", "reasoning": "", "id": "0", "excluded_ids": ["N/A"],
                                     "gold_ids": [f"{d}/x.txt"], "gold_ids_long": ["N/A"], "gold_answer": "N/A"}])
        files[f"documents/{d}-00000-of-00001.parquet"] = parquet_bytes([{"id": i, "content": c} for i, c in docs])
        files[f"examples/{d}-00000-of-00001.parquet"] = parquet_bytes(examples)
        reasoned = [dict(e, query=e["query"] + " moths insects moon") for e in examples]
        files[f"gpt4_reason/{d}-00000-of-00001.parquet"] = parquet_bytes(reasoned)
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    FakeHub.requests = []
    FakeHub.commits = {SHA1: bright_files()}
    FakeHub.refs = {"main": SHA1}
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "cache"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield f"/datasets/xlangai/BRIGHT/resolve/{SHA1}"
    server.shutdown()
    server.server_close()


def test_hub_download_cache_token_and_resume(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_test")  # the older name counts too (minirank.hub)
    examples = load_examples("biology")
    assert [e.id for e in examples] == ["0", "1"] and examples[0].gold_ids == ["bio/c d.txt", "bio/a.txt"]
    assert examples[0].excluded_ids == [] and examples[1].excluded_ids == ["bio/b.txt"]
    # main is resolved to a commit first, and the file is fetched at that commit
    assert [p for p, _ in FakeHub.requests] == [f"{API}/revision/main", f"{hub}/examples/biology-00000-of-00001.parquet"]
    assert all(h.get("Authorization") == "Bearer hf_test" for _, h in FakeHub.requests)
    # one cache root (minirank.hub's), one directory per commit
    cached = hub_api.cache_dir() / "bright" / SHA1 / "examples" / "biology-00000-of-00001.parquet"
    assert cached.read_bytes() == FakeHub.commits[SHA1]["examples/biology-00000-of-00001.parquet"]
    n = len(FakeHub.requests)
    assert load_examples("biology") == examples and len(FakeHub.requests) == n  # from the cache
    # the cache doubles as an offline data dir
    assert load_examples("biology", data_dir=tmp_path / "cache" / "bright" / SHA1) == examples
    # an interrupted download resumes from its .part with a Range request
    part = cached.parent.parent / "documents" / "biology-00000-of-00001.parquet.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(FakeHub.commits[SHA1]["documents/biology-00000-of-00001.parquet"][:100])
    ids, texts = load_documents("biology")
    assert ids == [i for i, _ in DOCS["biology"]] and texts[0].startswith("Moths")
    assert FakeHub.requests[-1][1].get("Range") == "bytes=100-"
    # offline and not cached: says where it looked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BrightError, match=r"long_documents/pony is not cached \(looked for .*long_documents/pony-"):
        load_documents("pony", long=True)


def test_hub_revision_is_pinned_until_refresh(hub, tmp_path, capsys):
    """main moving on the hub between two reads must not mix the dataset's versions: every file of
    the cache comes from the commit main had at first use, until `download --refresh`."""
    load_examples("biology")
    FakeHub.commits[SHA2] = bright_files(suffix=" (revised)")
    FakeHub.refs["main"] = SHA2
    n = len(FakeHub.requests)
    ids, texts = load_documents("biology")  # not cached yet: fetched at the pinned commit, not at SHA2
    assert not texts[0].endswith("(revised)")
    assert [p for p, _ in FakeHub.requests[n:]] == [f"{hub}/documents/biology-00000-of-00001.parquet"]
    assert main(["download", "--config", "documents", "--domain", "biology", "--refresh"]) == 0
    assert f"/{SHA2}/documents/biology-00000-of-00001.parquet" in capsys.readouterr().out
    assert load_documents("biology")[1][0].endswith("(revised)")
    assert bright.hub_revision() == SHA2


def test_hub_missing_split_and_shards(hub):
    with pytest.raises(BrightError, match="long_documents/biology is not on the hub"):
        load_documents("biology", long=True)
    # a split stored as several shards: found through the hub's tree API, at the pinned commit
    rows = [{"id": f"d{i}", "content": f"text {i}"} for i in range(4)]
    FakeHub.commits[SHA1]["long_documents/pony-00000-of-00002.parquet"] = parquet_bytes(rows[:3])
    FakeHub.commits[SHA1]["long_documents/pony-00001-of-00002.parquet"] = parquet_bytes(rows[3:])
    assert load_documents("pony", long=True) == ([r["id"] for r in rows], [r["content"] for r in rows])
    assert f"{API}/tree/{SHA1}/long_documents" in [p for p, _ in FakeHub.requests]
    # an incomplete set of shards is not taken for the split: the missing one is fetched
    cached = hub_api.cache_dir() / "bright" / SHA1 / "long_documents"
    (cached / "pony-00001-of-00002.parquet").unlink()
    n = len(FakeHub.requests)
    assert load_documents("pony", long=True)[0] == [r["id"] for r in rows]
    assert [p for p, _ in FakeHub.requests[n:]][-1] == f"{hub}/long_documents/pony-00001-of-00002.parquet"


def test_bm25_runs_from_hub(hub, tmp_path, capsys):
    run = bright.bm25_run("biology", progress=False)
    # query 1 excludes bio/b.txt, the only document about plants
    assert "bio/b.txt" not in run["1"] and len(run["1"]) == 3
    assert list(run["0"])[0] in ("bio/a.txt", "bio/c d.txt") and len(run["0"]) == 4
    assert (tmp_path / "cache" / "bright" / "bm25" / "biology" / "meta.json").is_file()
    reasoned = bright.bm25_run("biology", reasoning="gpt4", progress=False)
    assert reasoned["0"]["bio/c d.txt"] > run["0"]["bio/c d.txt"]  # 'moon' and 'insects' added
    # CLI over all domains: one run file (and its settings) per domain, then the report
    out = tmp_path / "runs"
    assert main(["bm25", "--domain", "all", "--out", str(out), "--quiet", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["ndcg@10"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{d}.trec{s}" for d in DOMAINS for s in ("", ".settings.json"))
    assert first["n_domains"] == 12 and first["domains"]["pony"] == 1.0
    assert read_run(out / "biology.trec") == run  # scores survive the text file exactly
    # a second call reuses what was made with the same settings, and only that
    (out / "pony.trec").write_text("0 Q0 pony/y.txt 1 1.0 fake\n")  # edited by hand: not what the sidecar says
    assert main(["bm25", "--domain", "all", "--out", str(out), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert "biology.trec was made with these settings, reusing it" in captured.err
    assert "recomputing" in captured.err and "pony.trec: the run file changed" in captured.err
    assert json.loads(captured.out)["ndcg@10"]["domains"]["pony"] == 1.0
    assert main(["download", "--config", "gpt4_reason", "--domain", "pony"]) == 0
    assert capsys.readouterr().out.strip().endswith("gpt4_reason/pony-00000-of-00001.parquet")
    single = tmp_path / "bio.trec"
    assert main(["bm25", "--domain", "biology", "--reasoning", "gpt4", "--out", str(single), "--quiet"]) == 0
    assert read_run(single) == reasoned
    assert "BM25 + gpt4 reasoning" in capsys.readouterr().out


def test_bm25_run_file_reused_only_with_same_settings(hub, tmp_path, capsys):
    out = tmp_path / "bio.trec"
    base = ["bm25", "--domain", "biology", "--out", str(out), "--quiet", "--json"]
    assert main(base) == 0
    plain = read_run(out)
    capsys.readouterr()
    # another --reasoning, --k, or data source must not pass off the existing file as its result
    assert main(base + ["--reasoning", "gpt4"]) == 0
    assert "made with other settings (examples, reasoning)" in capsys.readouterr().err
    assert read_run(out) == bright.bm25_run("biology", reasoning="gpt4", progress=False)
    assert main(base + ["--reasoning", "gpt4", "--k", "2"]) == 0
    assert "made with other settings (k)" in capsys.readouterr().err
    assert all(len(docs) <= 2 for docs in read_run(out).values())
    # a local copy of the data is another source, even with the same bytes
    local = tmp_path / "local"
    for name, data in FakeHub.commits[SHA1].items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    assert main(base + ["--data-dir", str(local)]) == 0
    assert "made with other settings (documents, examples, k, reasoning)" in capsys.readouterr().err
    assert read_run(out) == plain
    assert main(base + ["--data-dir", str(local)]) == 0
    assert "reusing it" in capsys.readouterr().err
    # the local documents edited: the run is redone and the cached index is rebuilt from the new text
    (local / "documents" / "biology-00000-of-00001.parquet").write_bytes(parquet_bytes(
        [{"id": "bio/a.txt", "content": "rocks"}, {"id": "bio/e.txt", "content": "insects attracted to light"}]))
    assert main(base + ["--data-dir", str(local)]) == 0
    assert "made with other settings (documents)" in capsys.readouterr().err
    assert list(read_run(out)["0"]) == ["bio/e.txt", "bio/a.txt"]
    # a run file without its settings: unknown provenance, redone
    bright.settings_path(out).unlink()
    assert main(base + ["--data-dir", str(local)]) == 0
    assert "no readable bio.trec.settings.json" in capsys.readouterr().err


def test_evaluate_examples_object_api():
    examples = [Example(id="q", query="x", gold_ids=["a"], excluded_ids=["z"])]
    run = {"q": {"z": 5.0, "a": 2.0, "b": 1.0}}
    assert evaluate_examples(run, examples, ("p@1", "ndcg@10"))["p@1"] == 1.0
    assert evaluate(run, qrels_from_examples(examples), ("p@1",)) == {"p@1": 0.0}
