"""The decoder and the weight files against transformers (test-only reference), fp32, max |Δ| ≤ 1e-4."""

import json

import pytest
import torch

import minirank
from minirank.model import ModelConfig, Transformer
from minirank.weights import CheckpointError, load_model, save_model

transformers = pytest.importorskip("transformers")

LLAMA32 = dict(  # Llama-3.2 in miniature: llama3 rope scaling, tied embeddings, GQA
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=128,
    intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
    # original context 128 so that positions up to 1024 fall deep into the rescaled range
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=128),
    bos_token_id=1, eos_token_id=2,
)
QWEN2 = dict(  # Qwen2 in miniature: q/k/v bias, untied head, more embedding rows than tokens
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=640, hidden_size=128,
    intermediate_size=320, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
    use_sliding_window=False, bos_token_id=1, eos_token_id=2,
)
QWEN3 = dict(  # Qwen3 in miniature: q/k norms, no qkv bias, head_dim 48 != hidden / heads = 32, untied
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=640, hidden_size=128, head_dim=48,
    intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=False,
    attention_bias=False, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
)
# tied, head_dim 64 > hidden / heads (as Qwen3-0.6B: 1024 / 16 heads, head_dim 128), and attention_bias,
# which for Qwen3 (as for Llama) puts a bias on o_proj too
QWEN3_TIED = {**QWEN3, "hidden_size": 96, "head_dim": 64, "num_attention_heads": 6, "num_key_value_heads": 3,
              "tie_word_embeddings": True, "attention_bias": True}
ARCH_CLASSES = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                "qwen3": ("Qwen3ForCausalLM", "Qwen3Config")}


def reference(hf: dict):
    cls, cfg_cls = (getattr(transformers, name) for name in ARCH_CLASSES[hf["model_type"]])
    ref = cls(cfg_cls(**hf)).eval()
    with torch.no_grad():  # HF initialises biases to 0: randomise them so they are actually tested
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def ours_from(ref, hf):
    model = Transformer(ModelConfig.from_hf(hf)).eval()
    sd = ref.state_dict()
    if hf["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("hf", [LLAMA32, QWEN2, QWEN3, QWEN3_TIED], ids=["llama3.2", "qwen2", "qwen3", "qwen3-tied"])
def test_logits_match_transformers(hf):
    ref = reference(hf)
    model = ours_from(ref, hf)
    ids = torch.randint(0, hf["vocab_size"], (2, 1024))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids)
    assert got.shape == (2, 1024, hf["vocab_size"])
    assert (got - want).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_is_applied():
    # Positions past the original context must differ with and without scaling, else the test above
    # would not show the scaled frequencies are right.
    from minirank.model import rope_inv_freq
    cfg = ModelConfig.from_hf(LLAMA32)
    plain = ModelConfig.from_hf({**LLAMA32, "rope_scaling": None})
    a, b = rope_inv_freq(cfg), rope_inv_freq(plain)
    assert (a < b).sum() > 0 and torch.equal(a[:2], b[:2])  # low frequencies scaled, highest untouched


def test_bf16_close_to_transformers():
    ref = reference(LLAMA32).to(torch.bfloat16)
    model = ours_from(ref, LLAMA32)
    ids = torch.randint(0, 512, (1, 256))
    with torch.no_grad():
        want, got = ref(ids).logits.float(), model(ids).float()
    assert got.dtype == torch.float32 and (got - want).abs().max().item() < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_real_model_logits(smol_dir):
    model, tok = minirank.load(smol_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.chat([{"role": "user", "content": "Why is the sky blue? Explain briefly."}])])
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("hf", [QWEN2, QWEN3, QWEN3_TIED], ids=["qwen2", "qwen3", "qwen3-tied"])
def test_save_loads_in_transformers(hf, tmp_path):
    ref = reference(hf)
    model = ours_from(ref, hf)
    save_model(model, tmp_path / "m", max_shard_bytes=200_000)  # forces several shards + index
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(back).__name__ == hf["architectures"][0]
    ids = torch.randint(0, 640, (1, 64))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids))
    again = load_model(tmp_path / "m")  # and our own loader reads it back: a round trip, bit for bit
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("hf", [QWEN3, QWEN3_TIED], ids=["qwen3", "qwen3-tied"])
def test_qwen3_greedy_generation_matches_transformers(hf):
    # the KV-cache path (prefill, then one token at a time) must apply q/k norms as the full forward does
    ref = reference(hf)
    with torch.no_grad():
        ref.lm_head.weight.mul_(8.0)  # sharp distributions: no near-ties for the two programs to split
    model = ours_from(ref, hf)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 640, (n,), generator=g).tolist() for n in (5, 23, 11)]
    out = minirank.generate(model, prompts, max_new_tokens=20, stop_ids=[], batch_size=2)
    for p, toks in zip(prompts, out.tokens):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert toks == want[0, len(p):].tolist()


@pytest.mark.parametrize("hf", [LLAMA32, QWEN3_TIED], ids=["llama3.2", "qwen3-tied"])
def test_transformers_sharded_checkpoint_loads(hf, tmp_path):
    ref = reference(hf)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="300KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    model = load_model(tmp_path / "hf")
    ids = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids).logits)


def test_load_in_bf16(tmp_path):
    model = ours_from(reference(LLAMA32), LLAMA32)
    save_model(model, tmp_path)
    m16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert torch.equal(m16.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


# --- bad input: one clear error each --------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    save_model(ours_from(reference(LLAMA32), LLAMA32), tmp_path)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json in"):
        load_model(tmp_path)


def test_unsupported_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPTNeoX"):
        load_model(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_model(saved)


def test_shape_mismatch_lists_every_problem(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(intermediate_size=300)
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    msg = str(e.value)
    assert "wrong shape (6)" in msg and "model.layers.0.mlp.up_proj.weight: file (256, 128) vs model (300, 128)" in msg


def test_missing_and_unexpected_keys(saved):
    from safetensors.torch import load_file, save_file
    sd = load_file(saved / "model.safetensors")
    sd["model.layers.0.self_attn.extra.weight"] = sd.pop("model.norm.weight")
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)missing \(1\): model.norm.weight.*unexpected \(1\): model.layers.0.self_attn.extra"):
        load_model(saved)


def test_unknown_spec():
    with pytest.raises(ValueError, match="unknown model spec 'not a spec'"):
        minirank.resolve("not a spec")


def test_save_real_model_with_tokenizer(smol_dir, tmp_path):
    model, tok = minirank.load(smol_dir, dtype=torch.bfloat16)
    minirank.save(model, tok, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ref.dtype == torch.bfloat16
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = tok.chat(msgs)
    assert list(ref_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)) == ids
    with torch.no_grad():
        assert torch.equal(ref(torch.tensor([ids])).logits, model(torch.tensor([ids])))
    again, tok2 = minirank.load(tmp_path, dtype=torch.bfloat16)
    assert tok2.chat(msgs) == ids and tok2.stop_ids == tok.stop_ids


def test_activation_checkpointing_gives_the_same_gradients():
    model = ours_from(reference(QWEN2), QWEN2).train()
    ids = torch.randint(0, 640, (2, 48))

    def grads():
        model.zero_grad()
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_config_defaults_equal_transformers(arch):
    # a config.json may leave fields out: each must then mean what it means to transformers
    import transformers

    hf = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)
    ref = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**hf)
    cfg = ModelConfig.from_hf(hf)
    rope_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings, cfg.head_dim) == (
        ref.rms_norm_eps, rope_theta, ref.tie_word_embeddings, head_dim)
