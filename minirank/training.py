"""What the training stages (sft.py, grpo.py) share: config from flags, distributed setup, the optimizer
and its schedule, atomic checkpoints, metrics, export. Plain functions; each stage writes its own loop.

Checkpoint layout (scripts may rely on it):
    DIR/run.json                    the settings the run was started with (a rerun must match them)
    DIR/metrics.jsonl               one JSON line per step
    DIR/checkpoints/step-N/         trainable.safetensors, optimizer.safetensors + optimizer.json,
                                    rng.safetensors, state.json (written last; the dir is renamed into place)
    DIR/final/                      HF model dir, LoRA merged, with the tokenizer
    DIR/adapter/                    the LoRA adapter in peft's layout (LoRA runs only)
"""

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import types
import typing
from pathlib import Path

import torch
import torch.distributed as dist

from . import lora as lora_mod
from .files import DataError, check_settings, read_json


class UsageError(Exception):
    """Bad input (flags, files, settings): the stage prints one line and exits with status 2."""


# ---------------------------------------------------------------- config from a dataclass

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2 from main(), not argparse's usage dump + sys.exit
        raise UsageError(message)


def _field_type(tp):
    """(python type, is_optional) for the annotations configs use: str, int, float, bool, X | None."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def parse_config(cls, argv, prog: str, description: str = ""):
    """argparse from a dataclass: one --flag-name per field (help from field metadata, default shown),
    bools as --x/--no-x, choices from metadata["choices"]; --config FILE.json supplies values first and
    flags given on the command line override them. Fields without a default are required."""
    hints = typing.get_type_hints(cls)
    p = _Parser(prog=prog, description=description)
    p.add_argument("--config", metavar="FILE.json", help="read option values from a JSON object (flags override it)")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        tp, optional = _field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = f.metadata.get("help", "")
        text = (text + " " if text else "") + ("(default: %(default)s)" if has_default else "(required)")
        kw = dict(dest=f.name, help=text)
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]  # shown as {a,b}
        else:
            kw["metavar"] = f.metadata.get("metavar", tp.__name__.upper())
        p.add_argument(flag, type=tp, default=default if has_default else None, **kw)
    args = p.parse_args(argv)
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            file_values = read_json(path, "a JSON object of option values")
        except DataError as e:
            raise UsageError(f"--config: {e}") from None
        names = {f.name for f in fields}
        for k, v in file_values.items():
            key = k.replace("-", "_")
            if key not in names:
                raise UsageError(f"--config {path}: unknown option {k!r}")
            values[key] = v
    given = _flags_given(argv)
    for f in fields:
        if f.name in given or f.name not in values:
            values[f.name] = getattr(args, f.name)
    for f in fields:
        tp, _ = _field_type(hints[f.name])
        v, flag = values[f.name], "--" + f.name.replace("_", "-")
        if v is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsageError(f"{flag} is required")
            continue
        # values from a JSON file: check them as argparse checks a flag
        if tp is bool:
            if not isinstance(v, bool):
                raise UsageError(f"{flag}: expected true or false, got {v!r}")
        else:
            try:
                if tp is int and isinstance(v, float) and not v.is_integer():
                    raise ValueError
                values[f.name] = tp(v)
            except (TypeError, ValueError):
                raise UsageError(f"{flag}: invalid {tp.__name__} value {v!r}") from None
        if "choices" in f.metadata and values[f.name] not in f.metadata["choices"]:
            raise UsageError(f"{flag}: {v!r} is not one of {list(f.metadata['choices'])}")
    return cls(**values)


def _flags_given(argv) -> set[str]:
    out = set()
    for a in argv or []:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0]
            name = name[3:] if name.startswith("no-") else name
            out.add(name.replace("-", "_"))
    return out


# ---------------------------------------------------------------- distributed

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process, gloo on CPU. A plain `python` run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def all_reduce_grads(params, bucket_elems: int = 1 << 25) -> None:
    """Sum every gradient over the processes, a bucket of flattened grads per collective (DDP's
    all-reduce, written out: the loss is already normalised by the global token count, so a sum is right)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    i = 0
    while i < len(grads):
        j, n = i, 0
        while j < len(grads) and (n == 0 or n + grads[j].numel() <= bucket_elems) and grads[j].dtype == grads[i].dtype:
            n += grads[j].numel()
            j += 1
        flat = torch.cat([g.reshape(-1) for g in grads[i:j]])
        dist.all_reduce(flat)
        for g, v in zip(grads[i:j], flat.split([g.numel() for g in grads[i:j]])):
            g.copy_(v.view_as(g))
        i = j


# ---------------------------------------------------------------- run directory

def prepare_out_dir(out, settings: dict, resume: bool) -> Path:
    """Create DIR, or accept it if it holds a run with the same settings (a rerun continues it).
    Refuses a dir with other settings, and --resume of a dir that holds no run."""
    out = Path(out)
    run = out / "run.json"
    settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists) so comparisons are exact
    if run.is_file():
        try:
            check_settings(run, settings, write=False)
        except DataError as e:
            raise UsageError(str(e)) from None
        return out
    if resume:
        raise UsageError(f"--resume: {out} holds no run to resume (no {run.name})")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not a training run directory; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = run.with_name("run.json.tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run)
    return out


# ---------------------------------------------------------------- optimizer and schedule

def _no_decay(name: str, p) -> bool:
    # norms, biases and embeddings keep their scale: decaying them only hurts (and a tied embedding
    # is the LM head too). LoRA A/B and every other matrix decay.
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name or "embed" in name


def make_optimizer(params_named, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                   **kwargs) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) with two groups: decayed matrices, undecayed norms/biases/embeddings."""
    params_named = [(n, p) for n, p in params_named if p.requires_grad]
    decay = [p for n, p in params_named if not _no_decay(n, p)]
    rest = [p for n, p in params_named if _no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def lr_at(step: int, cfg_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          min_ratio: float = 0.0) -> float:
    """lr for 0-based `step`: linear warmup over warmup_steps, then constant or cosine down to min_ratio·lr
    at the last step."""
    if step < warmup_steps:
        return cfg_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return cfg_lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return cfg_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- checkpoints

STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _rng_tensors() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np
        st = np.random.get_state()
        meta["numpy"] = [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]
    except ImportError:
        pass
    return tensors, meta


def _set_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    if "numpy" in meta:
        import numpy as np
        a, keys, pos, has_g, cached = meta["numpy"]
        np.random.set_state((a, np.array(keys, dtype=np.uint32), pos, has_g, cached))


def save_checkpoint(out, step: int, model, optimizer, state: dict, keep: int | None = None) -> Path:
    """DIR/checkpoints/step-N/, atomically: everything goes into a temp dir that is renamed into place
    only once complete, so a kill mid-write leaves a temp dir that resume ignores, never a half step-N.

    Holds the trainable weights, the optimizer (tensors as safetensors, the rest as JSON; the schedule is
    a pure function of the step, so the step is the scheduler's state), the RNG states, and `state`
    (the caller's JSON: step, data position, ...). keep: delete all but the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    ck = Path(out) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final = ck / f"step-{step}"
    tmp = ck / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, str(tmp / "trainable.safetensors"))
    osd = optimizer.state_dict()
    opt_tensors, opt_state = {}, {}
    for idx, st in osd["state"].items():
        opt_state[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                opt_tensors[f"{idx}.{k}"] = v.contiguous().cpu()
            else:
                opt_state[str(idx)][k] = v
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": osd["param_groups"], "state": opt_state}))
    rng_t, rng_meta = _rng_tensors()
    save_file(rng_t, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps(rng_meta))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))  # last: marks completeness
    if final.exists():  # a rerun reached the same step again: replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(out) -> list[Path]:
    ck = Path(out) / "checkpoints"
    if not ck.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ck.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore trainable weights, optimizer and RNG states from a checkpoint dir; returns its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise UsageError(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    meta = json.loads((path / "optimizer.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, t in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _set_rng(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------- metrics

class MetricsLog:
    """DIR/metrics.jsonl, one JSON object per call, flushed at once (a kill loses nothing logged)."""

    def __init__(self, out, enabled: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Resuming from `step`: drop lines of steps the killed run logged past its last checkpoint,
        so the file stays one line per step."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()] if self.path.is_file() else []


def plot_curves(out) -> Path | None:
    """DIR/curves.png: every numeric metric against the step, one panel each (matplotlib, optional extra
    `plot`; without it, nothing is drawn)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = MetricsLog(out).read()
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and k not in keys]
    if not keys:
        return None
    n = len(keys)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.5 * cols, 3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    png = Path(out) / "curves.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- export

def export(model, tok, out, base_model: str) -> Path:
    """DIR/final: an HF model dir with any LoRA merged, plus the tokenizer (loads in transformers, vLLM
    and minirank.load); DIR/adapter: the adapter in peft's layout (LoRA runs only). Atomic per dir."""
    from .model import Transformer
    from .weights import save_model

    out = Path(out)
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(lora_mod.merged_state_dict(model), assign=True)  # shares all unmerged tensors
    plain.n_tokens = model.n_tokens
    final, tmp = out / "final", out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(plain, tmp, generation_config=getattr(model, "generation_config", None) or None)
    tok.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if lora_mod.has_lora(model):
        lora_mod.save_adapter(model, out / "adapter", base_model)
    return final
