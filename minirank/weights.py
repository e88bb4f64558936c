"""Weights in the Hugging Face format: load a model directory, save one that transformers loads unchanged.

Loading never holds a second full copy of the model: the module is built on the meta device (no
memory), then each tensor is read straight from the file into its final buffer and assigned. We
read safetensors with plain file reads rather than mmap, because mmapped pages count as resident
memory while the file is open and would double the peak during a load.
"""

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .files import write_json
from .model import ModelConfig, Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
# The header is parsed in full before anything is checked, so its size is capped first (the
# safetensors library caps it at 100 MB too; a 3B checkpoint's header is ~30 KB).
MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
    """A model directory or file that cannot be loaded; the message names the file and the problem."""


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no config.json in {path} (expected a Hugging Face model directory)")
    try:
        hf = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got a {type(hf).__name__}")
    try:
        return ModelConfig.from_hf(hf, source=str(f))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_header(file: Path) -> tuple[dict, int]:
    """The safetensors header {name: {dtype, shape, data_offsets}} and where the data starts.

    A checkpoint may come from anywhere, so every entry is checked before a byte of data is read:
    offsets inside the data area, in order, exactly numel * itemsize long and not overlapping
    another tensor. A read can then never land in the header or in a neighbour's bytes, and a
    truncated download fails here, by name, instead of as garbage weights."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{file}: not a safetensors file (header length {n} bytes, limit {MAX_HEADER_BYTES})")
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{file}: __metadata__ must be an object of strings, got {str(meta)[:100]}")
    data_start = 8 + n
    data_size = size - data_start
    spans = []
    for name, info in header.items():
        begin, end = _check_entry(file, name, info)
        if end > data_size:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} needs bytes up to {data_start + end}, "
                                  f"file has {size} (an interrupted download? delete it and download again)")
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{file}: tensor {name!r} overlaps tensor {prev!r} (corrupt or hostile header)")
    return header, data_start


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true would pass as 1


def _check_entry(file, name, info) -> tuple[int, int]:
    """(begin, end) of one header entry after checking its shape; CheckpointError names file and tensor."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected an object with dtype, shape, data_offsets, got {str(info)[:100]}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unsupported safetensors dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CheckpointError(f"{where}: bad data_offsets {offsets} (need 0 <= begin <= end)")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype} {shape} "
                              f"needs {nbytes}")
    return begin, end


STAGING_BYTES = 1 << 24  # converting dtype/device goes through one buffer this size, not a full copy


def read_tensor(f, info: dict, data_start: int, dtype=None, device="cpu", staging=None) -> torch.Tensor:
    """Read one tensor into a fresh buffer of `dtype` on `device` with plain reads (no mmap).

    When the file's dtype or device differs, the bytes pass through `staging` (a reusable uint8
    buffer) chunk by chunk: a full-size intermediate would double the peak for the largest tensor,
    and allocating one per tensor fragments the heap (RSS grew 1.4x on SmolLM2 that way)."""
    src = DTYPES[info["dtype"]]  # read_header checked dtype, shape and offsets
    out = torch.empty(info["shape"], dtype=dtype or src, device=device)
    f.seek(data_start + info["data_offsets"][0])
    flat = out.reshape(-1)

    def fill(t):
        mv = memoryview(t.view(torch.uint8).numpy())
        if f.readinto(mv) != len(mv):
            raise CheckpointError(f"{f.name}: file ended inside a tensor (changed while loading?)")

    if out.dtype == src and out.device.type == "cpu":
        fill(flat)  # straight into place
        return out
    if staging is None:
        staging = torch.empty(min(STAGING_BYTES, flat.numel() * src.itemsize), dtype=torch.uint8)
    step = max(1, len(staging) // src.itemsize)
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        buf = staging[:n * src.itemsize].view(src)
        fill(buf)
        flat[i:i + n].copy_(buf)  # converts dtype and/or moves to the device
    return out


def checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: invalid index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path / INDEX}: weight_map must be an object of tensor -> file name")
        bad = sorted(v for v in set(weight_map.values()) if Path(v).name != v or v in ("", ".", ".."))
        if bad:  # the index is input too: a shard is a file in this directory, nowhere else
            raise CheckpointError(f"{path / INDEX}: shard names must be plain file names, got {bad[:3]}")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX} names shards that are not in {path}: {missing}")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {path} (only safetensors checkpoints are supported)")


def load_model(path: str | Path, dtype=torch.float32, device="cpu") -> Transformer:
    """Build a Transformer from a Hugging Face directory, weights in `dtype` on `device`."""
    path = Path(path)
    cfg = load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    files = checkpoint_files(path)
    headers = {file: read_header(file) for file in files}
    found = {k: (file, info) for file, (header, _) in headers.items() for k, info in header.items()}
    # Extras that are safe to ignore: a saved copy of a tied head, and old rotary buffers.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if k not in ignorable and not k.endswith("rotary_emb.inv_freq"))
    shapes = sorted(f"{k}: file {tuple(found[k][1]['shape'])} vs model {expected[k]}"
                    for k in set(expected) & set(found) if tuple(found[k][1]["shape"]) != expected[k])
    if missing or unexpected or shapes:
        lines = [f"checkpoint {path} does not match its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise CheckpointError("\n".join(lines))

    staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)  # one buffer for every conversion
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(found[k][0], []).append(k)
    for file, names in by_file.items():
        header, data_start = headers[file]
        with open(file, "rb") as f:
            for name in names:
                t = read_tensor(f, header[name], data_start, dtype, device, staging)
                module_name, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(module_name), leaf, nn.Parameter(t))
    model.eval()
    return model


def save_model(model: Transformer, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
               generation_config: dict | None = None) -> Path:
    """Write config.json, generation_config.json and safetensors (sharded with an index past
    max_shard_bytes), in the model's current dtype, the way transformers' save_pretrained does.

    Saving over an earlier checkpoint is atomic: the new files are written into a sibling staging
    directory, the old directory's other files (tokenizer, anything of the user's) are hard-linked
    in beside them, and the staging directory then replaces the old one. A crash while writing
    leaves the previous checkpoint untouched and loadable."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save into {out}: it is a file, not a directory")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n

    cfg = model.config
    hf = dict(cfg.hf)
    dtype_name = str(model.dtype).removeprefix("torch.")
    hf.update(torch_dtype=dtype_name, dtype=dtype_name, tie_word_embeddings=cfg.tie_word_embeddings)
    gen = generation_config or {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}

    staging = staging_dir(out)
    try:
        if len(shards) == 1:
            _write_shard(shards[0], staging / SINGLE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(shard, staging / name)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            write_json(staging / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        write_json(staging / "config.json", hf, indent=2)
        write_json(staging / "generation_config.json", gen, indent=2)
        ordinary_permissions(staging)
        # keep what else lives in out (tokenizer files, notes): everything but the weights of an
        # earlier save, so a stale shard can never shadow the new ones
        if out.is_dir():
            for p in out.iterdir():
                ours = p.name == INDEX or (p.name.startswith("model") and p.name.endswith(".safetensors"))
                if not ours and not (staging / p.name).exists():
                    _link_tree(p, staging / p.name)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_shard(tensors: dict, file: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    _fsync(file)  # on disk before the directory swap makes it the checkpoint


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror src at dst with hard links (no copy of the bytes; copies where links are impossible)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


# ---------------------------------------------------------------------------------------------
# atomic files and directories (gguf.py's conversions use these too)

def staging_dir(final: Path) -> Path:
    """An empty sibling of `final` to build its replacement in (same filesystem: renames are atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def ordinary_permissions(staging: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; give what we wrote the umask's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [staging, *staging.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def publish(staging: Path, final: Path) -> None:
    """Move a finished staging dir to `final`, replacing what was there, never leaving it half-written.

    Two renames (old aside, new in): a crash between them, the only window, leaves the old
    directory whole as .<name>.old-<pid> beside it."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
