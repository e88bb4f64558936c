"""BRIGHT data, runs, evaluation, report and CLI: on the real offline slice and on a fake local hub."""

import gzip
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minirank import bright
from minirank.bright import (DOMAINS, BrightError, Example, evaluate_examples, excluded_from_examples,
                             load_documents, load_examples, main, qrels_from_examples, read_qrels, read_run,
                             report, write_qrels, write_run)
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


def test_run_round_trip(tmp_path):
    run = {"q1": {"doc a/b c.txt": 0.1 + 0.2, "d2": 1e-17, "d3": 1e-17, "d4": -3.0}, "q2": {}, "q3": {"x": 5}}
    for name in ("r.trec", "r.trec.gz", "r.json", "r.json.gz"):
        write_run(run, tmp_path / name)
        back = read_run(tmp_path / name)
        want = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
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


def test_bad_input_messages(tmp_path):
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 0.5 tag\n\nq1 Q0 d2 1 0.4\n")
    with pytest.raises(BrightError, match=r"bad\.trec:3: malformed run line"):
        read_run(bad)
    bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 x high tag\n")
    with pytest.raises(BrightError, match=r"bad\.trec:2: malformed run line"):
        read_run(bad)
    bad.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n")
    with pytest.raises(BrightError, match=r"bad\.trec:2: document 'd1' appears twice"):
        read_run(bad)
    bad.write_text('{"q1": {"d1": "high"}}')
    with pytest.raises(BrightError, match=r"query 'q1', document 'd1'"):
        read_run(bad)
    (tmp_path / "bad.qrels").write_text("q1 0 d1 1\nq1 0 d2 yes\n")
    with pytest.raises(BrightError, match=r"bad\.qrels:2: malformed qrels line"):
        read_qrels(tmp_path / "bad.qrels")
    with pytest.raises(BrightError, match=r"run file not found: .*nope\.trec \(absolute: /"):
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
    with pytest.raises(BrightError, match=r"ex\.jsonl:2: not a JSON object"):
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


def test_report_layout():
    rows = {"sys": {d: {"ndcg@10": (i + 1) / 100} for i, d in enumerate(DOMAINS)},
            "partial": {"biology": 0.5, "pony": 0.25}}
    lines = report(rows).splitlines()
    assert lines[0] == "| ndcg@10 | " + " | ".join(bright.LABELS) + " | Avg. |"
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


class FakeHub(BaseHTTPRequestHandler):
    files = {}      # url path -> bytes
    requests = []   # (path, headers)

    def do_GET(self):
        FakeHub.requests.append((self.path, dict(self.headers)))
        data = FakeHub.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
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


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = "/datasets/xlangai/BRIGHT/resolve/main"
    FakeHub.requests = []
    FakeHub.files = {}
    for d in DOMAINS:
        docs = DOCS.get(d, [(f"{d}/x.txt", f"{d} text about light"), (f"{d}/y.txt", "other words")])
        examples = EXAMPLES.get(d, [{"query": "light", "reasoning": "", "id": "0", "excluded_ids": ["N/A"],
                                     "gold_ids": [f"{d}/x.txt"], "gold_ids_long": ["N/A"], "gold_answer": "N/A"}])
        FakeHub.files[f"{base}/documents/{d}-00000-of-00001.parquet"] = parquet_bytes(
            [{"id": i, "content": c} for i, c in docs])
        FakeHub.files[f"{base}/examples/{d}-00000-of-00001.parquet"] = parquet_bytes(examples)
        reasoned = [dict(e, query=e["query"] + " moths insects moon") for e in examples]
        FakeHub.files[f"{base}/gpt4_reason/{d}-00000-of-00001.parquet"] = parquet_bytes(reasoned)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield base
    server.shutdown()
    server.server_close()


def test_hub_download_cache_token_and_resume(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    examples = load_examples("biology")
    assert [e.id for e in examples] == ["0", "1"] and examples[0].gold_ids == ["bio/c d.txt", "bio/a.txt"]
    assert examples[0].excluded_ids == [] and examples[1].excluded_ids == ["bio/b.txt"]
    path, headers = FakeHub.requests[-1]
    assert path == f"{hub}/examples/biology-00000-of-00001.parquet"
    assert headers.get("Authorization") == "Bearer hf_test"
    cached = tmp_path / "cache" / "bright" / "examples" / "biology-00000-of-00001.parquet"
    assert cached.read_bytes() == FakeHub.files[path]
    n = len(FakeHub.requests)
    assert load_examples("biology") == examples and len(FakeHub.requests) == n  # from the cache
    # the cache doubles as an offline data dir
    assert load_examples("biology", data_dir=tmp_path / "cache" / "bright") == examples
    # an interrupted download resumes from its .part with a Range request
    url = f"{hub}/documents/biology-00000-of-00001.parquet"
    part = tmp_path / "cache" / "bright" / "documents" / "biology-00000-of-00001.parquet.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(FakeHub.files[url][:100])
    ids, texts = load_documents("biology")
    assert ids == [i for i, _ in DOCS["biology"]] and texts[0].startswith("Moths")
    assert FakeHub.requests[-1][1].get("Range") == "bytes=100-"
    # offline and not cached: says where it looked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BrightError, match=r"long_documents/pony is not cached \(looked for .*long_documents/pony-"):
        load_documents("pony", long=True)


def test_hub_missing_split_and_shards(hub):
    with pytest.raises(BrightError, match="long_documents/biology is not on the hub"):
        load_documents("biology", long=True)
    # a split stored as several shards: found through the hub's tree API
    rows = [{"id": f"d{i}", "content": f"text {i}"} for i in range(4)]
    FakeHub.files[f"{hub}/long_documents/pony-00000-of-00002.parquet"] = parquet_bytes(rows[:3])
    FakeHub.files[f"{hub}/long_documents/pony-00001-of-00002.parquet"] = parquet_bytes(rows[3:])
    FakeHub.files["/api/datasets/xlangai/BRIGHT/tree/main/long_documents"] = json.dumps(
        [{"type": "file", "path": f"long_documents/pony-0000{i}-of-00002.parquet"} for i in range(2)]).encode()
    assert load_documents("pony", long=True) == ([r["id"] for r in rows], [r["content"] for r in rows])
    # an incomplete set of shards is not taken for the split: the missing one is fetched
    cached = Path(bright.cache_dir()) / "long_documents"
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
    # CLI over all domains: one run file per domain, then the report; a second call resumes
    out = tmp_path / "runs"
    assert main(["bm25", "--domain", "all", "--out", str(out), "--quiet", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["ndcg@10"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{d}.trec" for d in DOMAINS)
    assert first["n_domains"] == 12 and first["domains"]["pony"] == 1.0
    assert read_run(out / "biology.trec") == run  # scores survive the text file exactly
    (out / "pony.trec").write_text("0 Q0 pony/y.txt 1 1.0 fake\n")
    assert main(["bm25", "--domain", "all", "--out", str(out), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert "pony.trec exists, skipping" in captured.err
    assert json.loads(captured.out)["ndcg@10"]["domains"]["pony"] == 0.0
    assert main(["download", "--config", "gpt4_reason", "--domain", "pony"]) == 0
    assert capsys.readouterr().out.strip().endswith("gpt4_reason/pony-00000-of-00001.parquet")
    single = tmp_path / "bio.trec"
    assert main(["bm25", "--domain", "biology", "--reasoning", "gpt4", "--out", str(single), "--quiet"]) == 0
    assert read_run(single) == reasoned
    assert "BM25 + gpt4 reasoning" in capsys.readouterr().out


def test_evaluate_examples_object_api():
    examples = [Example(id="q", query="x", gold_ids=["a"], excluded_ids=["z"])]
    run = {"q": {"z": 5.0, "a": 2.0, "b": 1.0}}
    assert evaluate_examples(run, examples, ("p@1", "ndcg@10"))["p@1"] == 1.0
    assert evaluate(run, qrels_from_examples(examples), ("p@1",)) == {"p@1": 0.0}
