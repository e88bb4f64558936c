"""Weights in the Hugging Face format: load a model directory, save one that transformers loads unchanged.

Loading never holds a second full copy of the model: the module is built on the meta device (no
memory), then each tensor is read straight from the file into its final buffer and assigned. We
read safetensors with plain file reads rather than mmap, because mmapped pages count as resident
memory while the file is open and would double the peak during a load.
"""

import json
import os
import struct
from pathlib import Path

import torch
import torch.nn as nn

from .model import ModelConfig, Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
    try:
        return ModelConfig.from_hf(hf, source=str(f))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_header(file: Path) -> tuple[dict, int]:
    """The safetensors header {name: {dtype, shape, data_offsets}} and where the data starts.

    Checks the header against the file size, so a truncated download fails here, by name,
    instead of as garbage weights or a crash deep inside a read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{file}: truncated: tensors need {data_start + end} bytes, file has {size} "
                              f"(an interrupted download? delete it and download again)")
    return header, data_start


STAGING_BYTES = 1 << 24  # converting dtype/device goes through one buffer this size, not a full copy


def read_tensor(f, info: dict, data_start: int, dtype=None, device="cpu", staging=None) -> torch.Tensor:
    """Read one tensor into a fresh buffer of `dtype` on `device` with plain reads (no mmap).

    When the file's dtype or device differs, the bytes pass through `staging` (a reusable uint8
    buffer) chunk by chunk: a full-size intermediate would double the peak for the largest tensor,
    and allocating one per tensor fragments the heap (RSS grew 1.4x on SmolLM2 that way)."""
    if info["dtype"] not in DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {info['dtype']}")
    src = DTYPES[info["dtype"]]
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
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX}: invalid index ({e!r})") from None
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
    max_shard_bytes), in the model's current dtype, the way transformers' save_pretrained does."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    # remove weights of an earlier save so a stale file can never shadow the new ones
    for old in list(out.glob("model*.safetensors")) + [out / INDEX]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        _write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})

    cfg = model.config
    hf = dict(cfg.hf)
    dtype_name = str(model.dtype).removeprefix("torch.")
    hf.update(torch_dtype=dtype_name, dtype=dtype_name, tie_word_embeddings=cfg.tie_word_embeddings)
    _write_json(out / "config.json", hf)
    gen = generation_config or {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
    _write_json(out / "generation_config.json", gen)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
