"""LoRA from scratch: y = x W^T + b + (alpha/r) · dropout(x) A^T B^T, with W frozen, A random, B zero.

A wrapped layer is still an nn.Linear with the same `.weight`/`.bias`, so the model's state dict keeps
the Hugging Face names (model.layers.0.self_attn.q_proj.weight) and only gains `...q_proj.lora_A` and
`...q_proj.lora_B`. Base weights therefore load and save as a plain copy, and the adapter's peft names
are one string rule away: base_model.model.<module>.lora_A.weight.

    cfg = PRESETS["interank"]                 # r 64, alpha 16, dropout 0.1 on q,k,v,o,gate (the paper's)
    params = add_lora(model, cfg, seed=0)     # base frozen; train only these
    with lora_disabled(model): ...            # the base model, bit for bit (GRPO's reference policy)
    save_adapter(model, "out/adapter", "HuggingFaceTB/SmolLM2-135M-Instruct")   # peft / vLLM layout
"""

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # module short names ("q_proj") or dotted suffixes ("self_attn.q_proj")
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (peft's use_rslora); read from peft configs

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


PRESETS = {
    # InteRank (arXiv 2504.03947): r 64, alpha 16, dropout 0.1 on attention projections and the MLP gate
    "interank": LoRAConfig(64, 16, 0.1, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")),
    # every linear layer of a block (what 2025 RL recipes use)
    "all": LoRAConfig(64, 16, 0.05, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    # GRPO's: every linear layer, a small rank, no dropout (dropout would make the trainer's policy
    # differ from the sampler's, and the ratio pi/pi_old would no longer start at 1)
    "rl": LoRAConfig(16, 32, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update. Shares (does not copy) the wrapped layer's weight and bias.

    lora_A/lora_B live in fp32 whatever the base dtype: they are what the optimizer updates, and
    bf16 master weights lose small updates. The update is cast to the output dtype at the end."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float, generator=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scale = r, scale
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=dev))
        # A as nn.Linear (and peft) initialise a weight: kaiming-uniform with a=sqrt(5) = U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # W already holds W + scale·B·A
        self.enabled = True
        self.train(base.training)  # a fresh module starts in training mode: dropout would fire in eval

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return y
        # (x A^T) B^T: two thin matmuls, never the [out, in] product
        u = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (u * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """scale · B · A in fp32, the [out, in] update a merge adds to W."""
        return self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, scale={self.scale:g}, merged={self.merged}"


def _targeted(name: str, targets) -> bool:
    if isinstance(targets, str):  # peft: a string target_modules is a regex over the full module name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def add_lora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None, targets=None) -> list[nn.Parameter]:
    """Wrap every targeted nn.Linear in place, freeze ALL base parameters, return the LoRA parameters.

    seed: draws A from its own generator (same seed -> same adapter on every DDP rank), leaving the
    global RNG untouched. targets: override cfg.targets (e.g. a peft regex)."""
    if has_lora(model):
        raise ValueError("model already has LoRA layers: merge_lora + strip_lora first, or load into them")
    targets = cfg.targets if targets is None else targets
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.model.embed_tokens.weight.device if hasattr(model, "model") else "cpu")
        gen.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _targeted(n, targets)]
    if not hits:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of the model")
    params = []
    for name, lin in hits:
        parent_name, _, leaf = name.rpartition(".")
        wrapped = LoRALinear(lin, cfg.r, cfg.scale, cfg.dropout, generator=gen)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    model.lora_config = cfg
    return params


def strip_lora(model: nn.Module) -> None:
    """Put plain nn.Linear layers back (keeps W as it is: merge first to keep the adapter's effect)."""
    for name, m in lora_modules(model).items():
        parent_name, _, leaf = name.rpartition(".")
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        lin.train(m.training)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lin)
    model.__dict__.pop("lora_config", None)


@contextmanager
def lora_disabled(model: nn.Module):
    """Adapter off: every wrapped layer computes exactly F.linear(x, W, b), i.e. the base model bit for bit."""
    mods = lora_modules(model).values()
    if any(m.merged for m in mods):
        raise ValueError("lora_disabled on a merged model: unmerge_lora first (W holds the adapter)")
    old = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, old):
            m.enabled = e


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        if not m.merged:
            m.weight += m.delta().to(m.weight.dtype)  # W += (alpha/r) B A
            m.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        if m.merged:
            m.weight -= m.delta().to(m.weight.dtype)
            m.merged = False


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (HF names) with every adapter folded in; the live model is untouched.
    Only the wrapped weights are new tensors; everything else is shared with the model."""
    sd = model.state_dict()
    for name, m in lora_modules(model).items():
        del sd[f"{name}.lora_A"], sd[f"{name}.lora_B"]
        if not m.merged:
            sd[f"{name}.weight"] = (m.weight.float() + m.delta()).to(m.weight.dtype)
    return sd


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter under peft's parameter names (what adapter_model.safetensors holds)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str, extra: dict | None = None) -> Path:
    """peft's layout (adapter_config.json + adapter_model.safetensors), written atomically: PeftModel.from_pretrained
    and vLLM's LoRA loader read it unchanged. extra: more keys for the config (peft ignores unknown ones)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers to save")
    cfg: LoRAConfig = model.lora_config
    # the exact module short names that were wrapped (peft matches list entries by suffix)
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
        **(extra or {}),
    }
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(peft_cfg, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[LoRAConfig, object]:
    """(LoRAConfig, target_modules as peft wrote it) from an adapter_config.json; anything we would
    silently get wrong (DoRA, per-layer ranks, trained biases, ...) is refused by name."""
    f = Path(adapter_dir) / CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {adapter_dir} (expected a peft LoRA adapter directory)")
    c = read_json(f, "a peft adapter config (a JSON object)")
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    unsupported = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "layers_to_transform": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    for k, ok in unsupported.items():
        if c.get(k) not in (ok, None, [], {}):
            raise ValueError(f"{f}: {k}={c[k]!r} is not supported by minirank's LoRA")
    try:
        targets = c["target_modules"]
        cfg = LoRAConfig(int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout", 0.0)),
                         tuple(targets) if isinstance(targets, list) else (targets,), bool(c.get("use_rslora", False)))
    except KeyError as e:
        raise ValueError(f"{f}: missing field {e.args[0]!r}") from None
    return cfg, (list(targets) if isinstance(targets, list) else targets)


def load_adapter(model: nn.Module, adapter_dir: str | Path, seed: int | None = None) -> LoRAConfig:
    """Load a LoRA adapter (ours or one peft made) onto `model`: wraps the layers its config targets
    and copies A and B in. Every adapter tensor must find its layer and every wrapped layer its tensors."""
    from safetensors.torch import load_file

    cfg, targets = read_adapter_config(adapter_dir)
    wf = Path(adapter_dir) / WEIGHTS
    if not wf.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {adapter_dir} (only safetensors adapters are supported)")
    tensors = load_file(str(wf))
    if not has_lora(model):
        add_lora(model, cfg, seed=seed, targets=targets)
    mods = lora_modules(model)
    wanted = {}
    for name, m in mods.items():
        for part in ("lora_A", "lora_B"):
            wanted[f"{PEFT_PREFIX}{name}.{part}.weight"] = (m, part)
    # peft may keep the adapter name in keys ("...lora_A.default.weight") in some versions: accept it
    found = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in tensors.items()}
    missing = sorted(set(wanted) - set(found))
    unexpected = sorted(set(found) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{wf} does not fit the model: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    with torch.no_grad():
        for k, (m, part) in wanted.items():
            p = getattr(m, part)
            if tuple(found[k].shape) != tuple(p.shape):
                raise ValueError(f"{wf}: {k} has shape {tuple(found[k].shape)}, the model needs {tuple(p.shape)}")
            p.copy_(found[k])
    for m in mods.values():
        m.scale = cfg.scale
    model.lora_config = cfg
    return cfg
