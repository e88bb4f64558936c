"""LoRA against peft (test-only reference) over transformers' SmolLM2, and its own invariants."""

import json
import shutil

import pytest
import torch

import minirank
from minirank import lora
from minirank.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 504, 2156, 314, 4566, 30, 1359, 16, 5, 28, 253, 9145, 2],
                    [1, 4566, 30, 359, 17, 9, 1359, 30, 30, 24, 16, 5, 2]])
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, attention_bias=True, bos_token_id=1, eos_token_id=2)


def tiny():
    model = Transformer(ModelConfig.from_hf(TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_fresh_adapter_is_bit_identical_and_freezes_base():
    model = tiny()
    ids = IDS % 256
    before = model(ids)
    params = lora.add_lora(model, lora.PRESETS["interank"], seed=0)
    assert len(params) == 2 * 5 * 2  # A and B on q,k,v,o,gate of 2 layers
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)
    assert torch.equal(model(ids), before)
    # HF base names kept: a base checkpoint still loads as a plain copy
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in sd and "model.layers.0.self_attn.q_proj.bias" in sd
    assert "model.layers.0.self_attn.q_proj.lora_A" in sd
    # same seed -> same adapter (every DDP rank starts equal)
    other = tiny()
    lora.add_lora(other, lora.PRESETS["interank"], seed=0)
    assert torch.equal(other.model.layers[1].mlp.gate_proj.lora_A, model.model.layers[1].mlp.gate_proj.lora_A)


def test_merge_unmerge_disable():
    model = tiny()
    ids = IDS % 256
    base = model(ids)
    lora.add_lora(model, lora.LoRAConfig(8, 16, 0.0, ("q_proj", "v_proj", "down_proj")), seed=0)
    randomize_b(model)
    live = model(ids)
    assert (live - base).abs().max() > 1e-3  # the adapter does something
    with lora.lora_disabled(model):
        assert torch.equal(model(ids), base)
    # by hand: y = x W^T + b + (alpha/r) x A^T B^T on one layer
    m = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    expect = x @ m.weight.T + m.bias + 2.0 * (x @ m.lora_A.T @ m.lora_B.T)
    torch.testing.assert_close(m(x), expect, rtol=0, atol=1e-5)
    sd = lora.merged_state_dict(model)
    assert not any("lora" in k for k in sd)
    lora.merge_lora(model)
    merged = model(ids)
    assert (merged - live).abs().max() <= 1e-5
    plain = Transformer(model.config)
    plain.load_state_dict(sd)
    assert (plain.eval()(ids) - live).abs().max() <= 1e-5
    lora.unmerge_lora(model)
    assert (model(ids) - live).abs().max() <= 1e-5


def test_dropout_only_in_training():
    model = tiny()
    ids = IDS % 256
    lora.add_lora(model, lora.LoRAConfig(4, 8, 0.5, ("q_proj",)), seed=0)
    randomize_b(model)
    a, b = model(ids), model(ids)
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(ids), model(ids))


@pytest.fixture(scope="module")
def smol(smol_dir):
    model, tok = minirank.load(smol_dir)
    return model, tok


def test_our_adapter_in_peft(smol, smol_dir, tmp_path):
    model, _ = smol
    # shared fixture: wrap, test, then strip so other tests see the base
    lora.add_lora(model, lora.PRESETS["interank"], seed=3)
    try:
        randomize_b(model, seed=4)
        with torch.no_grad():
            ours = model(IDS)
        lora.save_adapter(model, tmp_path / "adapter", str(smol_dir))
        cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert cfg["r"] == 64 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
        assert sorted(cfg["target_modules"]) == ["gate_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    finally:
        lora.strip_lora(model)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, torch_dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = ref(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-4
    # and back: our loader reads our own adapter
    lora.load_adapter(model, tmp_path / "adapter")
    try:
        with torch.no_grad():
            assert torch.equal(model(IDS), ours)
    finally:
        lora.strip_lora(model)


def test_peft_adapter_in_minirank(smol, smol_dir, tmp_path):
    model, _ = smol
    ref = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, torch_dtype=torch.float32)
    pcfg = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "up_proj", "down_proj"],
                           task_type="CAUSAL_LM")
    ref = peft.get_peft_model(ref, pcfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / "peft")
    ref.eval()
    with torch.no_grad():
        theirs = ref(IDS).logits
    cfg = lora.load_adapter(model, tmp_path / "peft")
    try:
        assert (cfg.r, cfg.alpha) == (8, 32)
        with torch.no_grad():
            ours = model(IDS)
        assert (ours - theirs).abs().max() <= 1e-4
        with torch.no_grad(), lora.lora_disabled(model):
            assert (model(IDS) - ours).abs().max() > 1e-2  # the adapter really moved the logits
    finally:
        lora.strip_lora(model)
    # rsLoRA scaling is read from the config too
    c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert c["use_rslora"] is False


def test_bad_adapters(tmp_path):
    model = tiny()
    lora.add_lora(model, lora.LoRAConfig(4, 8, 0.0, ("q_proj",)), seed=0)
    lora.save_adapter(model, tmp_path / "a", "tiny")
    other = tiny()
    # an adapter for other modules: every missing tensor is named
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing.*k_proj"):
        lora.load_adapter(other, tmp_path / "b")
    cfg["target_modules"], cfg["use_dora"] = ["q_proj"], True
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        lora.load_adapter(tiny(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tiny(), tmp_path)
    with pytest.raises(ValueError, match="match no linear"):
        lora.add_lora(tiny(), lora.LoRAConfig(4, 8, 0.0, ("nope",)))
