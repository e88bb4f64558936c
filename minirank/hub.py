"""
Download from the Hugging Face hub with plain `requests`: the one HTTP path of minirank.

Every hub call in the project goes through here, so there is one token rule (`get_token`), one
endpoint rule (`endpoint`) and one cache root (`cache_dir`).

    resolve_revision("org/name")                        # branch/tag -> commit sha (one API call)
    list_files("xlangai/BRIGHT", "long_documents")      # tree API, paths relative to the repo root
    fetch_file("xlangai/BRIGHT", "examples/pony-00000-of-00001.parquet", dest, revision=sha)
    snapshot_download("org/name")                       # config + tokenizer + safetensors of a model

A file streams into `<name>.part` and is renamed into place only once it is complete and verified
(sha256 when the hub gives one, else its size), so a file that exists under its final name is always
whole. An interrupted transfer resumes from the .part with `Range`, guarded by `If-Range` with the
ETag stored beside it in `<name>.part.etag`: if the file changed meanwhile the server sends it whole
(200) and we start again from byte 0, so a resumed file never mixes two versions.

A model snapshot resolves its revision to a commit once and downloads every file at that commit, so
a branch that moves in the middle of a download cannot mix files of two commits either. Layout:

    $MINIRANK_CACHE (default ~/.cache/minirank)/hub/{org}--{name}/
        refs/{revision}          the commit the branch/tag pointed at when last resolved
        snapshots/{commit}/      config.json, tokenizer.json, ..., .complete
"""

import json
import os
import re
import sys
import urllib.parse
from pathlib import Path

import requests
from tqdm import tqdm

from .files import atomic_write, sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
# a dropped connection loses the chunk being read (urllib3 discards it), so keep chunks modest
CHUNK = 1 << 20
TIMEOUT = (10, 60)  # (connect, read) seconds: fail fast when offline, tolerate a slow CDN

REQUIRED = ["config.json", "tokenizer.json", "tokenizer_config.json"]
OPTIONAL = ["generation_config.json", "special_tokens_map.json"]
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
DONE = ".complete"  # lists a finished snapshot's files, so a re-run needs no download at all

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REPO_TYPES = ("model", "dataset")


class HubError(RuntimeError):
    """Every user-facing download failure. `status` is the HTTP status when there was one."""

    def __init__(self, msg: str, status: int | None = None):
        super().__init__(msg)
        self.status = status


class NoNetwork(HubError):
    """The hub could not be reached at all (a cached snapshot may still serve)."""


# ---------------------------------------------------------------------------------------------
# the three settings: token, endpoint, cache root

def get_token(token: str | None = None) -> str | None:
    """The explicit token, else $HF_TOKEN, else $HUGGING_FACE_HUB_TOKEN (the older name); None if unset."""
    for t in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if t and t.strip():
            return t.strip()
    return None


def endpoint(endpoint: str | None = None) -> str:
    """The explicit endpoint, else $HF_ENDPOINT (a mirror), else huggingface.co; no trailing '/'."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


_endpoint = endpoint  # the functions below take an `endpoint` argument that shadows this name


def cache_dir() -> Path:
    """$MINIRANK_CACHE, else ~/.cache/minirank: the root of every download and conversion."""
    env = os.environ.get("MINIRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minirank"


def offline() -> bool:
    """HF_HUB_OFFLINE=1: never touch the network, serve only what is cached."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def parse_spec(spec: str) -> tuple[str, str]:
    """'org/name' or 'org/name@revision' -> (repo_id, revision)."""
    repo_id, at, revision = spec.strip().partition("@")
    if not _REPO_RE.match(repo_id) or (at and not revision) or re.search(r"\s", revision):
        raise HubError(f"bad model spec {spec!r}: expected 'org/name' or 'org/name@revision'")
    return repo_id, revision or "main"


def _check_repo(repo_id, repo_type):
    if not _REPO_RE.match(repo_id or ""):
        raise HubError(f"bad repo id {repo_id!r}: expected 'org/name'")
    if repo_type not in REPO_TYPES:
        raise HubError(f"bad repo_type {repo_type!r}: expected one of {REPO_TYPES}")


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")  # 'refs/pr/1' stays one URL segment


def _page(repo_id, repo_type, base):
    return f"{base}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def _api(repo_id, repo_type, base):
    return f"{base}/api/{repo_type}s/{repo_id}"


# ---------------------------------------------------------------------------------------------
# HTTP

def _raise_for_status(r, url, token, page=None):
    """Map HTTP failures to messages that say what went wrong and how to fix it."""
    if r.status_code < 400:
        return
    code = r.headers.get("X-Error-Code", "")  # the hub says e.g. GatedRepo, RepoNotFound
    detail = f" ({code})" if code else ""
    if r.status_code in (401, 403):
        page = page or url.split("/resolve/")[0]
        raise HubError(
            f"HTTP {r.status_code}{detail} for {url}: the repo is gated or private (or does not exist). "
            f"If it is gated, open {page} while logged in and accept its license, then create a token "
            f"at https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...`."
            + (" A token was sent, so it lacks access to this repo." if token else " No token was sent."),
            r.status_code)
    if r.status_code == 404:
        raise HubError(f"HTTP 404{detail}: not found: {url} (check the repo id, revision and file name)", 404)
    raise HubError(f"HTTP {r.status_code}{detail} from {url}", r.status_code)


def _get(url, token, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        # requests follows the hub's redirect to its CDN and drops Authorization when the
        # host changes, which is exactly what the hub wants (the CDN URL is pre-signed)
        return requests.get(url, headers=headers, timeout=TIMEOUT, **kw)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise NoNetwork(f"no network: could not reach {url} ({type(e).__name__}). Offline? "
                        f"Set HF_ENDPOINT to a reachable mirror or pass a local model dir instead.") from e


def _get_json(url, token, page):
    with _get(url, token) as r:
        _raise_for_status(r, url, token, page)
        try:
            nxt = r.links.get("next", {}).get("url")
            return r.json(), urllib.parse.urljoin(url, nxt) if nxt else None
        except ValueError:
            raise HubError(f"{url} answered with something that is not JSON") from None


def resolve_revision(repo_id: str, revision: str = "main", repo_type: str = "model",
                     token: str | None = None, endpoint: str | None = None) -> str:
    """The commit sha a branch or tag points at now (a 40-hex sha is returned as is, offline)."""
    _check_repo(repo_id, repo_type)
    if _COMMIT_RE.match(revision):
        return revision
    base, token = _endpoint(endpoint), get_token(token)
    url = f"{_api(repo_id, repo_type, base)}/revision/{_q(revision)}"
    info, _ = _get_json(url, token, _page(repo_id, repo_type, base))
    sha = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(sha, str) or not _COMMIT_RE.match(sha):
        raise HubError(f"{url}: expected a JSON object with a 40-hex 'sha', got {str(info)[:200]}")
    return sha


def list_files(repo_id: str, path: str = "", revision: str = "main", repo_type: str = "dataset",
               token: str | None = None, endpoint: str | None = None) -> list[str]:
    """Files directly inside `path` of the repo at `revision` (tree API), as paths relative to the
    repo root; [] when the path (or repo, or revision) does not exist."""
    _check_repo(repo_id, repo_type)
    base, token = _endpoint(endpoint), get_token(token)
    tail = "/" + urllib.parse.quote(path.strip("/")) if path.strip("/") else ""
    url = f"{_api(repo_id, repo_type, base)}/tree/{_q(revision)}{tail}"
    files = []
    while url:  # large folders come in pages linked by `Link: <...>; rel="next"`
        try:
            entries, url = _get_json(url, token, _page(repo_id, repo_type, base))
        except HubError as e:
            if e.status == 404:
                return []
            raise
        if not isinstance(entries, list):
            raise HubError(f"tree listing of {repo_id}/{path} is not a JSON list: {str(entries)[:200]}")
        files += [e["path"] for e in entries
                  if isinstance(e, dict) and isinstance(e.get("path"), str) and e.get("type", "file") == "file"]
    return files


# ---------------------------------------------------------------------------------------------
# one file: resumable, If-Range, verified, atomic

def _etag(value):
    # 'W/"abc"' or '"abc"' -> 'abc' (None when absent)
    return value.removeprefix("W/").strip('"') if value else None


def _identity(r):
    """(file id, size) as the hub states them. For LFS files its redirect carries X-Linked-Etag (the
    sha256) and X-Linked-Size; a small file served directly has ETag = its git blob sha1."""
    first = (r.history or [r])[0]
    ident = next((_etag(h.headers.get("X-Linked-Etag")) for h in [*r.history, r]
                  if h.headers.get("X-Linked-Etag")), None) or _etag(first.headers.get("ETag"))
    size = next((h.headers["X-Linked-Size"] for h in [*r.history, r] if h.headers.get("X-Linked-Size")), None)
    return ident, int(size) if size and size.isdigit() else None


def _total_from_content_range(value):
    # "bytes 100-199/200" or "bytes */200" -> 200 (None when the size is unknown, "*")
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m or m.group(2) == "*":
        return None
    return int(m.group(2))


def _drop(*paths):
    for p in paths:
        p.unlink(missing_ok=True)


def download_file(url: str, dest: Path, token: str | None = None, desc: str | None = None,
                  _restarted: bool = False) -> Path:
    """Stream url to dest via dest.part, resuming an existing .part of the same file. Returns dest.

    The .part's validators live in dest.part.etag: {"etag": what the serving host called the file
    (sent back as If-Range), "id": what the hub called it (sha256 or git sha1)}."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta_file = dest.with_name(dest.name + ".part.etag")
    # identity encoding: Range offsets and Content-Length must be counted in raw file bytes
    headers = {"Accept-Encoding": "identity"}
    have = part.stat().st_size if part.exists() else 0
    try:
        meta = json.loads(meta_file.read_text()) if have and meta_file.exists() else {}
        meta = meta if isinstance(meta, dict) else {}
    except (ValueError, OSError):
        meta = {}
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("etag"):
            # the server sends the requested range only if the file still has this ETag, else all of it
            headers["If-Range"] = f'"{meta["etag"]}"'
    r = _get(url, token, headers=headers, stream=True)
    with r:
        ident, size = _identity(r)
        if (have and r.status_code in (206, 416) and meta.get("id") and ident and ident != meta["id"]
                and not _restarted):
            # a server that ignored If-Range (or a CDN whose ETag differs from the hub's) would
            # append another version's bytes: the hub's own name for the file decides
            _drop(part, meta_file)
            r.close()
            return download_file(url, dest, token, desc, _restarted=True)
        if r.status_code == 416 and have:
            # our Range starts at/after the end: the .part may already hold the whole file
            if _total_from_content_range(r.headers.get("Content-Range")) == have:
                return _finish(part, meta_file, dest, url, meta.get("id") or ident, size)
            _drop(part, meta_file)  # larger than the file, or size unknown: don't trust it, start over
            r.close()
            return download_file(url, dest, token, desc, _restarted)
        _raise_for_status(r, url, token)
        if r.status_code == 206:
            start = re.match(r"bytes\s+(\d+)-", r.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:  # a range we did not ask for: restart
                _drop(part, meta_file)
                r.close()
                return download_file(url, dest, token, desc, _restarted)
            total = _total_from_content_range(r.headers["Content-Range"])
            if total is None and r.headers.get("Content-Length") is not None:
                total = have + int(r.headers["Content-Length"])
        else:
            # 200: the whole file again, because it changed (If-Range) or the server ignores Range
            have = 0
            length = r.headers.get("Content-Length")
            total = int(length) if length is not None else None
            # validators first, bytes second: a .part on disk always has its own .etag (or none)
            _drop(meta_file)
            meta = {"etag": _etag(r.headers.get("ETag")), "id": ident}
            if meta["etag"] or ident:
                atomic_write(meta_file, json.dumps(meta))  # never a torn validator beside the .part
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=desc or dest.name, disable=None, leave=False) as bar:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (requests.RequestException, OSError) as e:
            raise HubError(f"download of {url} was interrupted ({type(e).__name__}: {e}); "
                           f"{part.stat().st_size if part.exists() else 0} bytes kept in {part}, "
                           f"run again to resume") from e
    got = part.stat().st_size
    if total is not None and got != total:
        # never rename a short file into place: it would be taken as complete next time
        raise HubError(f"download of {url} is incomplete ({got} of {total} bytes, kept in {part}); "
                       f"run again to resume")
    return _finish(part, meta_file, dest, url, meta.get("id") or ident, size or total)


def _finish(part, meta_file, dest, url, ident, size):
    """Verify the complete .part (sha256 when the hub named the file by one, else its size) and
    rename it into place (atomic on one filesystem: dest is either absent or whole and right)."""
    got = part.stat().st_size
    if size is not None and got != size:
        _drop(part, meta_file)
        raise HubError(f"download of {url} has {got} bytes, the hub says {size}; deleted, run again")
    if ident and _SHA256_RE.match(ident):
        got_sha = sha256_file(part)
        if got_sha != ident:
            _drop(part, meta_file)
            raise HubError(f"download of {url} is corrupt: sha256 {got_sha}, the hub says {ident}; "
                           f"deleted, run again")
    os.replace(part, dest)
    _drop(meta_file)
    return dest


def fetch_file(repo_id: str, filename: str, dest: Path, revision: str = "main", repo_type: str = "dataset",
               token: str | None = None, endpoint: str | None = None, desc: str | None = None) -> Path:
    """Download repo_id/filename at `revision` (a commit sha, or a branch resolved by the hub) to dest,
    replacing dest; resumable, verified, atomic. HubError(status=404) when the file is absent."""
    _check_repo(repo_id, repo_type)
    p = Path(filename)
    if not filename or p.is_absolute() or ".." in p.parts:
        raise HubError(f"refusing file name {filename!r} in {repo_id}")
    base = _endpoint(endpoint)
    url = f"{_page(repo_id, repo_type, base)}/resolve/{_q(revision)}/{urllib.parse.quote(filename)}"
    return download_file(url, dest, get_token(token), desc=desc or f"{repo_id} {filename}")


# ---------------------------------------------------------------------------------------------
# a model snapshot

def _complete(local: Path) -> bool:
    done = local / DONE
    return done.is_file() and all((local / f).is_file() for f in done.read_text().splitlines())


def snapshot_download(repo_id: str, revision: str = "main", cache: Path | None = None,
                      endpoint: str | None = None, token: str | None = None) -> Path:
    """Fetch config, tokenizer and safetensors weights of repo_id@revision; return the local dir.

    A branch or tag is resolved to its commit first (one small API call), so a branch that moved
    since the last call is noticed and fetched anew. Without a network (or with HF_HUB_OFFLINE=1)
    the snapshot the branch last pointed at is used when it is complete."""
    _check_repo(repo_id, "model")
    if revision.strip(".") == "" or re.search(r"\s", revision):
        raise HubError(f"bad revision {revision!r} for {repo_id}")
    repo_dir = Path(cache or cache_dir()) / "hub" / repo_id.replace("/", "--")
    ref = repo_dir / "refs" / revision.replace("/", "--")  # 'refs/pr/1' stays one file
    cached = ref.read_text().strip() if ref.is_file() else None
    if _COMMIT_RE.match(revision):
        commit = revision
    elif offline():
        if not (cached and _complete(repo_dir / "snapshots" / cached)):
            raise HubError(f"{repo_id}@{revision} is not cached (looked in {repo_dir}) and HF_HUB_OFFLINE=1")
        return repo_dir / "snapshots" / cached
    else:
        try:
            commit = resolve_revision(repo_id, revision, "model", token, endpoint)
        except NoNetwork:
            if cached and _complete(repo_dir / "snapshots" / cached):
                return repo_dir / "snapshots" / cached  # offline: the last known commit will do
            raise
    local = repo_dir / "snapshots" / commit
    if not _complete(local):
        print(f"downloading {repo_id}@{commit[:12]} into {local} (once)", file=sys.stderr, flush=True)
        _download_snapshot(repo_id, commit, local, _endpoint(endpoint), get_token(token), revision)
    if commit != revision and cached != commit:
        atomic_write(ref, commit + "\n")  # last: a ref only ever names a complete snapshot
    return local


def _download_snapshot(repo_id, commit, local, base, token, revision):
    got = []

    def fetch(filename, optional=False):
        dest = local / filename
        got.append(filename)
        if dest.exists():  # only complete files ever get this name (see download_file)
            return dest
        try:
            return fetch_file(repo_id, filename, dest, commit, "model", token, base)
        except HubError as e:
            if optional and e.status == 404:
                got.pop()
                return None
            raise

    for name in REQUIRED:
        fetch(name)
    for name in OPTIONAL:
        fetch(name, optional=True)

    # weights: the sharded index first (it names every shard), else a single file
    if (local / SINGLE).exists() and not (local / INDEX).exists():
        fetch(SINGLE)  # cached from an earlier, interrupted snapshot: don't ask for the index again
    elif (index := fetch(INDEX, optional=True)) is None:
        if fetch(SINGLE, optional=True) is None:
            raise HubError(f"no {SINGLE} or {INDEX} in {repo_id}@{revision} — only safetensors "
                           f"checkpoints are supported")
    else:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise HubError(f"malformed {index}: expected a JSON object with a 'weight_map'; "
                           f"delete it to re-download") from e
        for shard in shards:
            p = Path(shard) if isinstance(shard, str) else None
            if p is None or p.is_absolute() or ".." in p.parts:  # the index is remote input: stay inside
                raise HubError(f"refusing shard path {shard!r} from {repo_id}@{revision} index")
            fetch(shard)
    atomic_write(local / DONE, "\n".join(got) + "\n")
