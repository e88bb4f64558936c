"""Hub download against a fake hub on 127.0.0.1. No test touches the internet."""

import json
import os
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import minirank.hub
from minirank.hub import HubError, cache_dir, download_file, parse_spec, snapshot_download


def _closed_port_url():
    # bind then close: nothing listens there, so connecting is refused at once
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


class FakeHub:
    """Serves root/{org}/{name}/{rev}/{file} at /{org}/{name}/resolve/{rev}/{file}, like the hub."""

    def __init__(self, root):
        self.root = root
        self.log = []          # (path, headers dict) of every request
        self.gated = {}        # repo_id -> the token that grants access
        self.cut = {}          # filename -> send only this many bytes, then drop the connection (once)
        self.ignore_range = False
        self.redirect = set()  # repo_ids whose files 302 to /cdn/..., as the hub does

    def add(self, repo_id, files, revision="main"):
        for name, data in files.items():
            p = self.root / repo_id / revision / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data if isinstance(data, bytes) else data.encode())

    def requested(self):
        return [urllib.parse.unquote(p.split("/resolve/")[-1].split("/", 1)[1]) for p, _ in self.log
                if "/resolve/" in p]


def _handler(hub):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hub.log.append((self.path, dict(self.headers)))
            parts = self.path.split("/")
            if len(parts) >= 6 and parts[0] == "" and parts[3] == "resolve":
                org, name, rev, file = parts[1], parts[2], parts[4], "/".join(parts[5:])
                repo = f"{org}/{name}"
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.gated[repo]}":
                    return self._status(401, "GatedRepo")
                if repo in hub.redirect:
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{org}/{name}/{rev}/{file}")
                    self.end_headers()
                    return
            elif len(parts) >= 6 and parts[1] == "cdn":
                org, name, rev, file = parts[2], parts[3], parts[4], "/".join(parts[5:])
            else:
                return self._status(404, "RepoNotFound")
            path = hub.root / org / name / urllib.parse.unquote(rev) / urllib.parse.unquote(file)
            if not path.is_file():
                return self._status(404, "EntryNotFound")
            data = path.read_bytes()
            start, rng = 0, self.headers.get("Range")
            if rng and not hub.ignore_range:
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = hub.cut.pop(path.name, None)
            self.wfile.write(body[:cut] if cut is not None else body)
            self.wfile.flush()
            if cut is not None:  # promised Content-Length bytes but stop early: a dropped transfer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        def _status(self, code, err):
            body = f"{code} {err}".encode()
            self.send_response(code)
            self.send_header("X-Error-Code", err)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return H


@pytest.fixture
def hub(tmp_path):
    h = FakeHub(tmp_path / "server")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
    h.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield h
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    # default endpoint is a dead local port, so a test that forgets `endpoint` fails fast
    # instead of reaching huggingface.co; the cache never lands in the real home dir
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "cache"))


BASE = {"config.json": '{"model_type": "qwen3"}', "tokenizer.json": "{}", "tokenizer_config.json": "{}"}
SHARD1, SHARD2 = os.urandom(3000), os.urandom(5000)
SHARDED = {
    **BASE,
    "generation_config.json": "{}",
    "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors"}}),
    "model-00001-of-00002.safetensors": SHARD1,
    "model-00002-of-00002.safetensors": SHARD2,
    "model.safetensors": b"should not be fetched when an index exists",
    "pytorch_model.bin": b"nope",
    "README.md": "# nope",
}


def test_parse_spec():
    assert parse_spec("org/name") == ("org/name", "main")
    assert parse_spec("Qwen/Qwen3-0.6B@abc123") == ("Qwen/Qwen3-0.6B", "abc123")
    assert parse_spec("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for bad in ["name", "org/name/extra", "org/", "/name", "org/name@", "org name/x", ""]:
        with pytest.raises(HubError, match="org/name"):
            parse_spec(bad)


def test_cache_dir(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("MINIRANK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "minirank"


def test_sharded_snapshot_fetches_only_needed_files(hub, tmp_path):
    hub.add("org/big", SHARDED)
    local = snapshot_download("org/big", endpoint=hub.url, cache=tmp_path / "c")
    assert local == tmp_path / "c" / "hub" / "org--big" / "main"
    got = sorted(p.name for p in local.iterdir())
    assert got == sorted([".complete", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                          "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors"])
    assert (local / "model-00001-of-00002.safetensors").read_bytes() == SHARD1
    assert (local / "model-00002-of-00002.safetensors").read_bytes() == SHARD2
    asked = hub.requested()
    for never in ("pytorch_model.bin", "README.md", "model.safetensors"):
        assert never not in asked
    assert asked.count("model-00001-of-00002.safetensors") == 1  # shards de-duplicated

    # everything is cached now: a second call works with the network gone
    n = len(hub.log)
    assert snapshot_download("org/big", endpoint=_closed_port_url(), cache=tmp_path / "c") == local
    assert len(hub.log) == n


def test_single_file_and_missing_optionals(hub):
    weights = os.urandom(4096)
    hub.add("org/small", {**BASE, "model.safetensors": weights})
    local = snapshot_download("org/small", endpoint=hub.url)
    assert (local / "model.safetensors").read_bytes() == weights
    assert not (local / "generation_config.json").exists()  # optional 404 skipped silently
    assert not list(local.glob("*.part"))
    # offline re-run with a single-file checkpoint doesn't even ask for the index
    assert snapshot_download("org/small") == local


def test_interrupted_transfer_resumes_with_range(hub, monkeypatch):
    # urllib3 drops the chunk that was being read when the connection breaks; small chunks
    # make sure some bytes reach the .part before the cut
    monkeypatch.setattr(minirank.hub, "CHUNK", 1024)
    weights = os.urandom(10_000)
    hub.add("org/flaky", {**BASE, "model.safetensors": weights})
    hub.cut["model.safetensors"] = 4000
    with pytest.raises(HubError, match="resume"):
        snapshot_download("org/flaky", endpoint=hub.url)
    local = cache_dir() / "hub" / "org--flaky" / "main"
    assert not (local / "model.safetensors").exists()  # a partial file is never taken as complete
    assert not (local / ".complete").exists()
    have = (local / "model.safetensors.part").stat().st_size
    assert 0 < have <= 4000

    snapshot_download("org/flaky", endpoint=hub.url)
    last = [h for p, h in hub.log if p.endswith("/model.safetensors")][-1]
    assert last.get("Range") == f"bytes={have}-"
    assert (local / "model.safetensors").read_bytes() == weights
    assert not (local / "model.safetensors.part").exists()


def test_server_ignoring_range_restarts(hub, tmp_path):
    hub.add("org/x", {"f.bin": b"0123456789"})
    hub.ignore_range = True
    dest = tmp_path / "d" / "f.bin"
    dest.parent.mkdir()
    (tmp_path / "d" / "f.bin.part").write_bytes(b"XXXX")  # stale partial from elsewhere
    download_file(f"{hub.url}/org/x/resolve/main/f.bin", dest)
    assert hub.log[-1][1].get("Range") == "bytes=4-"
    assert dest.read_bytes() == b"0123456789"  # 200 -> body written from the start, not appended


def test_complete_part_gets_416_and_is_kept(hub, tmp_path):
    hub.add("org/x", {"f.bin": b"0123456789"})
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"0123456789")
    download_file(f"{hub.url}/org/x/resolve/main/f.bin", dest)
    assert dest.read_bytes() == b"0123456789" and not (tmp_path / "f.bin.part").exists()


def test_404_is_clear(hub, tmp_path):
    url = f"{hub.url}/org/x/resolve/main/nothing.json"
    with pytest.raises(HubError) as e:
        download_file(url, tmp_path / "nothing.json")
    assert "404" in str(e.value) and url in str(e.value) and e.value.status == 404
    with pytest.raises(HubError, match="404.*config.json"):  # missing repo: a required file 404s
        snapshot_download("org/missing", endpoint=hub.url)


def test_no_safetensors(hub):
    hub.add("org/old", {**BASE, "pytorch_model.bin": b"pickle"})
    with pytest.raises(HubError, match="no model.safetensors or model.safetensors.index.json in org/old@main"
                                       ".*only safetensors"):
        snapshot_download("org/old", endpoint=hub.url)


def test_gated_repo_401_then_token(hub, monkeypatch):
    hub.add("org/gated", {**BASE, "model.safetensors": b"w" * 100})
    hub.gated["org/gated"] = "hf_secret"
    with pytest.raises(HubError) as e:
        snapshot_download("org/gated", endpoint=hub.url)
    msg = str(e.value)
    assert "401" in msg and "gated" in msg and "HF_TOKEN" in msg and "accept" in msg
    assert f"{hub.url}/org/gated " in msg  # points at the model page
    assert "No token was sent" in msg

    with pytest.raises(HubError, match="lacks access"):
        snapshot_download("org/gated", endpoint=hub.url, token="hf_wrong")

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    local = snapshot_download("org/gated", endpoint=hub.url)
    assert (local / "model.safetensors").read_bytes() == b"w" * 100
    assert hub.log[-1][1]["Authorization"] == "Bearer hf_secret"


def test_legacy_token_env(hub, monkeypatch):
    hub.add("org/gated", {**BASE, "model.safetensors": b"w"})
    hub.gated["org/gated"] = "hf_old"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_old")
    snapshot_download("org/gated", endpoint=hub.url)


def test_hf_endpoint_and_minirank_cache_env(hub, monkeypatch, tmp_path):
    hub.add("org/m", {**BASE, "model.safetensors": b"abc"})
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "elsewhere"))
    local = snapshot_download("org/m")
    assert local == tmp_path / "elsewhere" / "hub" / "org--m" / "main"
    assert (local / "model.safetensors").read_bytes() == b"abc"
    assert all(p.startswith("/org/m/resolve/main/") for p, _ in hub.log)


def test_revision_with_slash_and_redirect(hub):
    hub.add("org/pr", {**BASE, "model.safetensors": b"pr-weights"}, revision="refs/pr/1")
    hub.redirect.add("org/pr")
    local = snapshot_download("org/pr", revision="refs/pr/1", endpoint=hub.url)
    assert local.name == "refs--pr--1"
    assert (local / "model.safetensors").read_bytes() == b"pr-weights"
    assert any(p == "/org/pr/resolve/refs%2Fpr%2F1/config.json" for p, _ in hub.log)
    assert any(p.startswith("/cdn/") for p, _ in hub.log)


def test_no_network(tmp_path):
    with pytest.raises(HubError, match="no network.*HF_ENDPOINT"):
        snapshot_download("org/m", cache=tmp_path)  # HF_ENDPOINT is a closed port (see _isolate)
    with pytest.raises(HubError, match="no network"):
        download_file(_closed_port_url() + "/org/m/resolve/main/config.json", tmp_path / "config.json")
