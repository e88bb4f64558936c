"""Hub download against a fake hub on 127.0.0.1. No test touches the internet."""

import hashlib
import json
import os
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import minirank.hub
from minirank.hub import HubError, cache_dir, download_file, get_token, parse_spec, snapshot_download


def _closed_port_url():
    # bind then close: nothing listens there, so connecting is refused at once
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A hub with commits and branches. Files are served at /{repo}/resolve/{branch or sha}/{file}
    (datasets under /datasets/{repo}/...), with the hub's headers: an LFS file (.safetensors,
    .parquet) has ETag = its sha256, a small file ETag = its git blob sha1; a redirected LFS file
    carries X-Linked-Etag / X-Linked-Size on the 302 and the CDN's own (md5) ETag on the 200.
    /api/{models,datasets}/{repo}/revision/{rev} and .../tree/{rev}/{path} answer like the hub's API."""

    def __init__(self):
        self.commits = {}       # sha -> {filename: bytes}
        self.refs = {}          # (repo key, branch) -> sha; the key of a dataset is "datasets/org/name"
        self.log = []           # (path, headers dict) of every request
        self.gated = {}         # repo key -> the token that grants access
        self.cut = {}           # filename -> send only this many bytes, then drop the connection (once)
        self.corrupt = {}       # filename -> bytes sent instead (the headers still describe the real file)
        self.ignore_range = False
        self.ignore_if_range = False  # a server that sends the range even when the ETag changed
        self.redirect = set()   # repo keys whose LFS files 302 to /cdn/..., as the hub does
        self.page_size = 1000   # tree API entries per page

    def add(self, repo_id, files, revision="main", repo_type="model"):
        """A new commit on `revision` (on top of its current files); returns its sha."""
        key = repo_id if repo_type == "model" else f"datasets/{repo_id}"
        parent = self.commits.get(self.refs.get((key, revision)), {})
        sha = hashlib.sha1(f"{key}@{revision}#{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = {**parent, **{n: d if isinstance(d, bytes) else d.encode() for n, d in files.items()}}
        self.refs[(key, revision)] = sha
        return sha

    def sha(self, key, rev):
        return rev if rev in self.commits else self.refs.get((key, rev))

    def requested(self):
        return [urllib.parse.unquote(p.split("/resolve/")[-1].split("/", 1)[1]) for p, _ in self.log
                if "/resolve/" in p]


def _handler(hub):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hub.log.append((self.path, dict(self.headers)))
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
            if parts[:1] == ["api"] and len(parts) >= 6:
                kind, org, name, what, rev, rest = parts[1], parts[2], parts[3], parts[4], parts[5], parts[6:]
                key = f"{org}/{name}" if kind == "models" else f"datasets/{org}/{name}"
                if not self._allowed(key):
                    return self._status(401, "GatedRepo")
                sha = hub.sha(key, rev)
                if sha is None:
                    return self._status(404, "RevisionNotFound")
                if what == "revision":
                    return self._json({"id": key, "sha": sha})
                return self._tree(key, sha, "/".join(rest).strip("/"), urllib.parse.parse_qs(url.query))
            if parts[:1] == ["cdn"]:
                # /cdn/{key}/{sha}/{file...}: the key has 2 or 3 segments
                n = 3 if parts[1] == "datasets" else 2
                key, sha, file = "/".join(parts[1:1 + n]), parts[1 + n], "/".join(parts[2 + n:])
                return self._file(key, sha, file, cdn=True)
            n = 3 if parts[:1] == ["datasets"] else 2
            if len(parts) > n + 2 and parts[n] == "resolve":
                key, rev, file = "/".join(parts[:n]), parts[n + 1], "/".join(parts[n + 2:])
                if not self._allowed(key):
                    return self._status(401, "GatedRepo")
                sha = hub.sha(key, rev)
                if sha is None:
                    return self._status(404, "RevisionNotFound")
                return self._file(key, sha, file)
            return self._status(404, "RepoNotFound")

        def _allowed(self, key):
            return key not in hub.gated or self.headers.get("Authorization") == f"Bearer {hub.gated[key]}"

        def _file(self, key, sha, file, cdn=False):
            data = hub.commits.get(sha, {}).get(file)
            if data is None:
                return self._status(404, "EntryNotFound")
            lfs = file.endswith((".safetensors", ".parquet"))
            etag = _sha256(data) if lfs else _git_sha1(data)
            if lfs and key in hub.redirect and not cdn:
                self.send_response(302)
                self.send_header("Location", f"/cdn/{key}/{sha}/{urllib.parse.quote(file)}")
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if cdn:
                etag = hashlib.md5(data).hexdigest()  # a CDN names the object its own way
            start, rng = 0, self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if if_range and if_range.strip('"') != etag and not hub.ignore_if_range:
                rng = None  # the file changed since the client's partial copy: send all of it
            if rng and not hub.ignore_range:
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.send_header("ETag", f'"{etag}"')
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = hub.corrupt.get(file, data)[start:]
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = hub.cut.pop(file, None)
            self.wfile.write(body[:cut] if cut is not None else body)
            self.wfile.flush()
            if cut is not None:  # promised Content-Length bytes but stop early: a dropped transfer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        def _tree(self, key, sha, path, query):
            files = hub.commits[sha]
            inside = sorted(f for f in files if not path or f.startswith(path + "/"))
            if not inside:
                return self._status(404, "EntryNotFound")
            entries, seen = [], set()
            for f in inside:
                rest = f[len(path) + 1 if path else 0:]
                head = rest.split("/")[0]
                child = f"{path}/{head}" if path else head
                if child not in seen:
                    seen.add(child)
                    entries.append({"type": "directory" if "/" in rest else "file", "path": child,
                                    **({} if "/" in rest else {"size": len(files[f])})})
            cursor = int(query.get("cursor", ["0"])[0])
            page = entries[cursor:cursor + hub.page_size]
            more = cursor + hub.page_size < len(entries)
            link = f'<{self.path.split("?")[0]}?cursor={cursor + hub.page_size}>; rel="next"' if more else None
            return self._json(page, link)

        def _json(self, obj, link=None):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if link:
                self.send_header("Link", link)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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
    h = FakeHub()
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


def test_token_and_endpoint_rules(monkeypatch):
    assert get_token() is None and get_token("  ") is None
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_old")
    assert get_token() == "hf_old"
    monkeypatch.setenv("HF_TOKEN", " hf_new\n")
    assert get_token() == "hf_new"  # the current name wins over the legacy one
    assert get_token("hf_explicit") == "hf_explicit"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local/")
    assert minirank.hub.endpoint() == "http://mirror.local"
    assert minirank.hub.endpoint("http://x/") == "http://x"
    monkeypatch.delenv("HF_ENDPOINT")
    assert minirank.hub.endpoint() == minirank.hub.DEFAULT_ENDPOINT == "https://huggingface.co"


def _snap(root, repo_id, sha):
    return root / "hub" / repo_id.replace("/", "--") / "snapshots" / sha


def test_sharded_snapshot_fetches_only_needed_files(hub, tmp_path):
    sha = hub.add("org/big", SHARDED)
    local = snapshot_download("org/big", endpoint=hub.url, cache=tmp_path / "c")
    assert local == _snap(tmp_path / "c", "org/big", sha)
    assert (tmp_path / "c" / "hub" / "org--big" / "refs" / "main").read_text().strip() == sha
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
    # main resolved once; every file fetched at that commit
    assert [p for p, _ in hub.log if p.startswith("/api/")] == ["/api/models/org/big/revision/main"]
    assert all(f"/resolve/{sha}/" in p for p, _ in hub.log if "/resolve/" in p)

    # everything is cached now: a second call works with the network gone
    n = len(hub.log)
    assert snapshot_download("org/big", endpoint=_closed_port_url(), cache=tmp_path / "c") == local
    assert len(hub.log) == n
    # and with the network up, one API call and no download
    assert snapshot_download("org/big", endpoint=hub.url, cache=tmp_path / "c") == local
    assert [p for p, _ in hub.log[n:]] == ["/api/models/org/big/revision/main"]


def test_single_file_and_missing_optionals(hub, monkeypatch):
    weights = os.urandom(4096)
    hub.add("org/small", {**BASE, "model.safetensors": weights})
    local = snapshot_download("org/small", endpoint=hub.url)
    assert (local / "model.safetensors").read_bytes() == weights
    assert not (local / "generation_config.json").exists()  # optional 404 skipped silently
    assert not list(local.glob("*.part*"))
    # offline re-run with a single-file checkpoint doesn't even ask for the index
    assert snapshot_download("org/small") == local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.log)
    assert snapshot_download("org/small", endpoint=hub.url) == local and len(hub.log) == n
    with pytest.raises(HubError, match="not cached.*HF_HUB_OFFLINE"):
        snapshot_download("org/other", endpoint=hub.url)


def test_moved_branch_is_a_new_snapshot(hub):
    first = hub.add("org/m", {**BASE, "model.safetensors": b"v1"})
    old = snapshot_download("org/m", endpoint=hub.url)
    second = hub.add("org/m", {"model.safetensors": b"v2"})
    new = snapshot_download("org/m", endpoint=hub.url)
    assert old == _snap(cache_dir(), "org/m", first) and new == _snap(cache_dir(), "org/m", second)
    assert (old / "model.safetensors").read_bytes() == b"v1" and (new / "model.safetensors").read_bytes() == b"v2"
    # a pinned commit needs no API call and is served from its own snapshot
    n = len(hub.log)
    assert snapshot_download("org/m", revision=first, endpoint=hub.url) == old and len(hub.log) == n


def test_interrupted_transfer_resumes_with_range(hub, monkeypatch):
    # urllib3 drops the chunk that was being read when the connection breaks; small chunks
    # make sure some bytes reach the .part before the cut
    monkeypatch.setattr(minirank.hub, "CHUNK", 1024)
    weights = os.urandom(10_000)
    sha = hub.add("org/flaky", {**BASE, "model.safetensors": weights})
    hub.cut["model.safetensors"] = 4000
    with pytest.raises(HubError, match="resume"):
        snapshot_download("org/flaky", endpoint=hub.url)
    local = _snap(cache_dir(), "org/flaky", sha)
    assert not (local / "model.safetensors").exists()  # a partial file is never taken as complete
    assert not (local / ".complete").exists()
    assert not (local.parent.parent / "refs" / "main").exists()  # a ref names only complete snapshots
    have = (local / "model.safetensors.part").stat().st_size
    assert 0 < have <= 4000

    snapshot_download("org/flaky", endpoint=hub.url)
    last = [h for p, h in hub.log if p.endswith("/model.safetensors")][-1]
    assert last.get("Range") == f"bytes={have}-"
    assert last.get("If-Range") == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert (local / "model.safetensors").read_bytes() == weights
    assert not (local / "model.safetensors.part").exists() and not (local / "model.safetensors.part.etag").exists()


def test_branch_moving_between_first_and_resumed_request(hub, monkeypatch):
    """main changes while a snapshot is half downloaded: the result is one commit's files, never a mix."""
    monkeypatch.setattr(minirank.hub, "CHUNK", 1024)
    v1, v2 = os.urandom(10_000), os.urandom(10_000)
    c1 = hub.add("org/moving", {**BASE, "model.safetensors": v1})
    hub.cut["model.safetensors"] = 4000
    with pytest.raises(HubError, match="resume"):
        snapshot_download("org/moving", endpoint=hub.url)
    c2 = hub.add("org/moving", {"config.json": '{"model_type": "llama"}', "model.safetensors": v2})
    n = len(hub.log)
    local = snapshot_download("org/moving", endpoint=hub.url)
    assert local == _snap(cache_dir(), "org/moving", c2)
    assert (local / "model.safetensors").read_bytes() == v2
    assert (local / "config.json").read_text() == '{"model_type": "llama"}'
    assert all(f"/resolve/{c2}/" in p for p, _ in hub.log[n:] if "/resolve/" in p)
    assert not any("Range" in h for p, h in hub.log[n:])  # c1's partial bytes never reach c2's file
    assert (local.parent.parent / "refs" / "main").read_text().strip() == c2
    assert not (_snap(cache_dir(), "org/moving", c1) / ".complete").exists()


@pytest.mark.parametrize("server_honours_if_range", [True, False])
@pytest.mark.parametrize("redirect", [False, True])
def test_resume_of_a_changed_file_starts_over(hub, tmp_path, monkeypatch, server_honours_if_range, redirect):
    """The same URL (a branch) serves another file on the resumed request: If-Range makes the server
    send it whole; a server that ignores If-Range is caught by the hub's file id and restarted."""
    monkeypatch.setattr(minirank.hub, "CHUNK", 1024)
    v1, v2 = os.urandom(10_000), os.urandom(12_000)
    hub.add("org/x", {"w.safetensors": v1})
    if redirect:
        hub.redirect.add("org/x")
    hub.ignore_if_range = not server_honours_if_range
    hub.cut["w.safetensors"] = 4000
    dest = tmp_path / "w.safetensors"
    url = f"{hub.url}/org/x/resolve/main/w.safetensors"
    with pytest.raises(HubError, match="resume"):
        download_file(url, dest)
    assert (tmp_path / "w.safetensors.part.etag").exists()
    hub.add("org/x", {"w.safetensors": v2})
    n = len(hub.log)
    download_file(url, dest)
    assert dest.read_bytes() == v2
    sent = [h for p, h in hub.log[n:]][0]
    assert "Range" in sent and sent["If-Range"].strip('"') == (
        hashlib.md5(v1).hexdigest() if redirect else hashlib.sha256(v1).hexdigest())  # the serving host's ETag


def test_sha256_and_size_are_verified(hub, tmp_path):
    good = os.urandom(5000)
    hub.add("org/x", {"w.safetensors": good, "config.json": "{}"})
    hub.redirect.add("org/x")
    hub.corrupt["w.safetensors"] = bytes(5000)  # right size, wrong bytes
    with pytest.raises(HubError, match="corrupt: sha256"):
        download_file(f"{hub.url}/org/x/resolve/main/w.safetensors", tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())  # nothing kept: the next run starts clean
    hub.corrupt["w.safetensors"] = good[:4000]  # the CDN says 4000 bytes, the hub said 5000
    with pytest.raises(HubError, match="4000 bytes, the hub says 5000"):
        download_file(f"{hub.url}/org/x/resolve/main/w.safetensors", tmp_path / "w.safetensors")
    hub.corrupt.clear()
    assert download_file(f"{hub.url}/org/x/resolve/main/w.safetensors", tmp_path / "w").read_bytes() == good


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
    hub.add("org/x", {"a.json": "{}"})
    url = f"{hub.url}/org/x/resolve/main/nothing.json"
    with pytest.raises(HubError) as e:
        download_file(url, tmp_path / "nothing.json")
    assert "404" in str(e.value) and url in str(e.value) and e.value.status == 404
    with pytest.raises(HubError, match="404.*org/missing/revision/main"):  # missing repo: its revision 404s
        snapshot_download("org/missing", endpoint=hub.url)
    hub.add("org/nocfg", {"tokenizer.json": "{}"})
    with pytest.raises(HubError, match="404.*config.json"):  # a required file 404s
        snapshot_download("org/nocfg", endpoint=hub.url)


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
    assert f"open {hub.url}/org/gated " in msg  # points at the model page
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
    sha = hub.add("org/m", {**BASE, "model.safetensors": b"abc"})
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "elsewhere"))
    local = snapshot_download("org/m")
    assert local == _snap(tmp_path / "elsewhere", "org/m", sha)
    assert (local / "model.safetensors").read_bytes() == b"abc"
    assert all(p.startswith((f"/org/m/resolve/{sha}/", "/api/models/org/m/")) for p, _ in hub.log)


def test_revision_with_slash_and_redirect(hub):
    sha = hub.add("org/pr", {**BASE, "model.safetensors": b"pr-weights"}, revision="refs/pr/1")
    hub.redirect.add("org/pr")
    local = snapshot_download("org/pr", revision="refs/pr/1", endpoint=hub.url)
    assert local.name == sha and (local.parent.parent / "refs" / "refs--pr--1").read_text().strip() == sha
    assert (local / "model.safetensors").read_bytes() == b"pr-weights"
    assert hub.log[0][0] == "/api/models/org/pr/revision/refs%2Fpr%2F1"
    assert any(p.startswith("/cdn/") for p, _ in hub.log)


def test_no_network(tmp_path):
    with pytest.raises(HubError, match="no network.*HF_ENDPOINT"):
        snapshot_download("org/m", cache=tmp_path)  # HF_ENDPOINT is a closed port (see _isolate)
    with pytest.raises(HubError, match="no network"):
        download_file(_closed_port_url() + "/org/m/resolve/main/config.json", tmp_path / "config.json")
    with pytest.raises(HubError, match="no network"):
        minirank.hub.resolve_revision("org/m")


# ---------------------------------------------------------------------------------------------
# the small public API other modules (BRIGHT) call

def test_dataset_api_resolve_list_fetch(hub, tmp_path, monkeypatch):
    files = {f"long_documents/pony-0000{i}-of-00003.parquet": os.urandom(300 + i) for i in range(3)}
    files["long_documents/sub/x.parquet"] = b"deeper"
    files["examples/pony-00000-of-00001.parquet"] = b"ex"
    sha = hub.add("xlangai/BRIGHT", files, repo_type="dataset")
    hub.add("xlangai/BRIGHT", {"examples/pony-00000-of-00001.parquet": b"moved"}, repo_type="dataset")
    hub.gated["datasets/xlangai/BRIGHT"] = "hf_t"
    monkeypatch.setenv("HF_TOKEN", "hf_t")
    hub.page_size = 2  # the listing comes in pages

    from minirank.hub import fetch_file, list_files, resolve_revision
    assert resolve_revision("xlangai/BRIGHT", "main", "dataset", endpoint=hub.url) != sha
    assert resolve_revision("xlangai/BRIGHT", sha, "dataset", endpoint=hub.url) == sha  # a sha is kept
    assert list_files("xlangai/BRIGHT", "long_documents", sha, endpoint=hub.url) == sorted(
        f for f in files if f.count("/") == 1 and f.startswith("long_documents/"))
    assert list_files("xlangai/BRIGHT", "nothing_here", sha, endpoint=hub.url) == []
    assert list_files("xlangai/BRIGHT", "", sha, endpoint=hub.url) == []  # only folders at the root
    name = "examples/pony-00000-of-00001.parquet"
    assert fetch_file("xlangai/BRIGHT", name, tmp_path / "a.parquet", sha, endpoint=hub.url).read_bytes() == b"ex"
    assert fetch_file("xlangai/BRIGHT", name, tmp_path / "b.parquet", endpoint=hub.url).read_bytes() == b"moved"
    assert hub.log[-1][0] == f"/datasets/xlangai/BRIGHT/resolve/main/{name}"
    assert all(h.get("Authorization") == "Bearer hf_t" for _, h in hub.log)
    with pytest.raises(HubError) as e:
        fetch_file("xlangai/BRIGHT", "examples/absent.parquet", tmp_path / "c", sha, endpoint=hub.url)
    assert e.value.status == 404
    with pytest.raises(HubError, match="refusing"):
        fetch_file("xlangai/BRIGHT", "../etc/passwd", tmp_path / "d", sha, endpoint=hub.url)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="401.*No token was sent"):
        list_files("xlangai/BRIGHT", "long_documents", sha, endpoint=hub.url)
