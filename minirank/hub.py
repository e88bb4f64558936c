"""
Download a model from the Hugging Face hub with plain `requests`.

We fetch only what minirank needs (config, tokenizer, safetensors weights) instead of
a whole repo snapshot, so a repo that also ships .bin/.gguf/onnx copies costs nothing
extra. Every file streams into `<name>.part` and is renamed into place only once it is
complete, so a file that exists in the cache is always whole; an interrupted transfer
resumes from the .part with an HTTP Range request.

Layout: $MINIRANK_CACHE (default ~/.cache/minirank)/hub/{org}--{name}/{revision}/{file}
"""

import json
import os
import re
import urllib.parse
from pathlib import Path

import requests
from tqdm import tqdm

DEFAULT_ENDPOINT = "https://huggingface.co"
# a dropped connection loses the chunk being read (urllib3 discards it), so keep chunks modest
CHUNK = 1 << 20
TIMEOUT = (10, 60)  # (connect, read) seconds: fail fast when offline, tolerate a slow CDN

REQUIRED = ["config.json", "tokenizer.json", "tokenizer_config.json"]
OPTIONAL = ["generation_config.json", "special_tokens_map.json"]
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
DONE = ".complete"  # lists a finished snapshot's files, so a re-run needs no network at all

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


class HubError(RuntimeError):
    """Every user-facing download failure. `status` is the HTTP status when there was one."""

    def __init__(self, msg: str, status: int | None = None):
        super().__init__(msg)
        self.status = status


def cache_dir() -> Path:
    env = os.environ.get("MINIRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minirank"


def parse_spec(spec: str) -> tuple[str, str]:
    """'org/name' or 'org/name@revision' -> (repo_id, revision)."""
    repo_id, at, revision = spec.strip().partition("@")
    if not _REPO_RE.match(repo_id) or (at and not revision) or re.search(r"\s", revision):
        raise HubError(f"bad model spec {spec!r}: expected 'org/name' or 'org/name@revision'")
    return repo_id, revision or "main"


def _raise_for_status(r, url, token):
    """Map HTTP failures to messages that say what went wrong and how to fix it."""
    if r.status_code < 400:
        return
    code = r.headers.get("X-Error-Code", "")  # the hub says e.g. GatedRepo, RepoNotFound
    detail = f" ({code})" if code else ""
    if r.status_code in (401, 403):
        page = url.split("/resolve/")[0]
        raise HubError(
            f"HTTP {r.status_code}{detail} for {url}: the model is gated or private (or does not exist). "
            f"If it is gated, open {page} while logged in and accept its license, then create a token "
            f"at https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...`."
            + (" A token was sent, so it lacks access to this repo." if token else " No token was sent."),
            r.status_code)
    if r.status_code == 404:
        raise HubError(f"HTTP 404{detail}: not found: {url} (check the repo id, revision and file name)", 404)
    raise HubError(f"HTTP {r.status_code}{detail} from {url}", r.status_code)


def _total_from_content_range(value):
    # "bytes 100-199/200" or "bytes */200" -> 200 (None when the size is unknown, "*")
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m or m.group(2) == "*":
        return None
    return int(m.group(2))


def download_file(url: str, dest: Path, token: str | None = None, desc: str | None = None) -> Path:
    """Stream url to dest via dest.part, resuming an existing .part. Returns dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # identity encoding: Range offsets and Content-Length must be counted in raw file bytes
    headers = {"Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    have = part.stat().st_size if part.exists() else 0
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        # requests follows the hub's redirect to its CDN and drops Authorization when the
        # host changes, which is exactly what the hub wants (the CDN URL is pre-signed)
        r = requests.get(url, headers=headers, stream=True, timeout=TIMEOUT)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise HubError(f"no network: could not reach {url} ({type(e).__name__}). Offline? "
                       f"Set HF_ENDPOINT to a reachable mirror or pass a local model dir instead.") from e
    with r:
        if r.status_code == 416 and have:
            # our Range starts at/after the end: the .part may already hold the whole file
            total = _total_from_content_range(r.headers.get("Content-Range"))
            if total == have:
                os.replace(part, dest)
                return dest
            part.unlink()  # larger than the file, or size unknown: don't trust it, start over
            return download_file(url, dest, token, desc)
        _raise_for_status(r, url, token)
        if r.status_code == 206:
            start = re.match(r"bytes\s+(\d+)-", r.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:  # a range we did not ask for: restart
                part.unlink()
                return download_file(url, dest, token, desc)
            total = _total_from_content_range(r.headers["Content-Range"])
            if total is None and r.headers.get("Content-Length") is not None:
                total = have + int(r.headers["Content-Length"])
        else:
            have = 0  # the server ignored Range (plain 200): the body is the whole file again
            length = r.headers.get("Content-Length")
            total = int(length) if length is not None else None
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
    size = part.stat().st_size
    if total is not None and size != total:
        # never rename a short file into place: it would be taken as complete next time
        raise HubError(f"download of {url} is incomplete ({size} of {total} bytes, kept in {part}); "
                       f"run again to resume")
    os.replace(part, dest)  # atomic on the same filesystem: dest is either absent or whole
    return dest


def _get_token(token):
    token = token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return token.strip() if token and token.strip() else None


def snapshot_download(repo_id: str, revision: str = "main", cache: Path | None = None,
                      endpoint: str | None = None, token: str | None = None) -> Path:
    """Fetch config, tokenizer and safetensors weights of repo_id@revision; return the local dir.
    Files already in the cache are not fetched again, so a second call works offline.
    (A moving revision like 'main' is therefore pinned at first download; pass a commit
    hash as revision for exact reproducibility.)"""
    if not _REPO_RE.match(repo_id):
        raise HubError(f"bad repo id {repo_id!r}: expected 'org/name'")
    if revision.strip(".") == "":  # '', '.', '..' would escape the cache layout
        raise HubError(f"bad revision {revision!r} for {repo_id}")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = _get_token(token)
    # a revision like 'refs/pr/1' must stay a single directory level and a single URL segment
    local = Path(cache or cache_dir()) / "hub" / repo_id.replace("/", "--") / revision.replace("/", "--")
    rev_q = urllib.parse.quote(revision, safe="")
    done = local / DONE
    if done.exists() and all((local / f).exists() for f in done.read_text().splitlines()):
        return local  # without this, re-asking for absent optional files would need the network

    got = []

    def fetch(filename, optional=False):
        dest = local / filename
        got.append(filename)
        if dest.exists():  # only complete files ever get this name (see download_file)
            return dest
        url = f"{endpoint}/{repo_id}/resolve/{rev_q}/{urllib.parse.quote(filename)}"
        try:
            return download_file(url, dest, token, desc=f"{repo_id} {filename}")
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
        except (ValueError, KeyError, AttributeError) as e:
            raise HubError(f"malformed {index}: expected a JSON object with a 'weight_map'; "
                           f"delete it to re-download") from e
        for shard in shards:
            p = Path(shard)
            if p.is_absolute() or ".." in p.parts:  # the index is remote input: stay inside `local`
                raise HubError(f"refusing shard path {shard!r} from {repo_id}@{revision} index")
            fetch(shard)
    tmp = done.with_name(DONE + ".part")
    tmp.write_text("\n".join(got) + "\n")
    os.replace(tmp, done)
    return local
