"""What the training stages (sft.py, grpo.py) share, so each stage keeps only what differs: the options
both take (TrainConfig), config from flags, the run directory and its settings guard, the model with its
LoRA, data records, the step loop with resume and per-rank RNG checkpoints, metrics, evaluation, export.

Run directory (scripts may rely on it):
    DIR/run.json                    settings, total_steps and provenance; written once the run really starts
    DIR/metrics.jsonl               one JSON line per step (evaluations: their own line at their step)
    DIR/curves.png                  loss / reward / validation curves (the [plot] extra)
    DIR/checkpoints/step-N/         trainable.safetensors, optimizer.safetensors + .json, rng.safetensors +
                                    rng.json (every rank's), state.json (written last; the dir is renamed in)
    DIR/final/                      HF model dir, LoRA merged, with the tokenizer and provenance.json
    DIR/adapter/                    the LoRA adapter in peft's layout, with provenance.json (LoRA runs only)
"""

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import files
from . import lora as lora_mod
from . import prompts as P
from .files import DataError, read_json


class UsageError(Exception):
    """Bad input (flags, files, settings): the stage prints one line and exits with status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in the step loop: main() prints this one line and exits with 130."""


# ---------------------------------------------------------------- options both stages take

def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


def required(help):
    return field(metadata={"help": help})


@dataclass
class TrainConfig:
    """One name and one meaning per option in every stage; a stage redeclares a field only to change
    its default. Bad values raise UsageError here, so a config built in Python is checked like flags."""
    model: str = required("base model: local HF dir, .gguf, pypi:PACKAGE or org/name[@rev]")
    data: str = required("training JSONL(.gz): query, document, label (0/1/2), explanation")
    out: str = required("run directory; rerunning the same command continues (or extends) the run in it")
    val: str | None = opt(None, "validation JSONL(.gz), same fields")
    val_limit: int = opt(64, "use the first N --val records (0: all)")
    format: str = opt("explain", "completion: explanation + label line, or the label line only (ablation)",
                      P.FORMATS)
    skip_bad: bool = opt(False, "skip (and count) bad records instead of stopping at the first")
    lora: str = opt("interank", "LoRA preset (see lora.PRESETS) or none = full fine-tuning",
                    (*lora_mod.PRESETS, "none"))
    lora_r: int | None = opt(None, "override the preset's rank")
    lora_alpha: float | None = opt(None, "override the preset's alpha")
    lora_dropout: float | None = opt(None, "override the preset's dropout")
    lora_targets: str | None = opt(None, "override the preset's modules, comma-separated")
    max_steps: int = opt(0, "optimizer steps in all")
    lr: float = opt(2e-4, "peak learning rate")
    schedule: str = opt("constant", "after warmup; a constant-lr run can be extended by raising --max-steps",
                        ("constant", "cosine"))
    warmup_steps: int = opt(0, "linear warmup steps")
    min_lr_ratio: float = opt(0.0, "cosine floor as a fraction of --lr")
    weight_decay: float = opt(0.0, "AdamW decoupled decay (never on norms/biases/embeddings)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "max gradient norm (0: off)")
    dtype: str = opt("auto", "auto: float32 on CPU, bfloat16 on GPU. bfloat16: LoRA keeps a bf16 base and fp32 "
                             "adapters; full fine-tuning keeps fp32 master weights and computes under bf16 autocast",
                     ("auto", "float32", "bfloat16"))
    device: str = opt("auto", "auto: cuda when available", ("auto", "cpu", "cuda"))
    seed: int = opt(0, "data order, sampling, dropout and adapter init")
    eval_every: int = opt(0, "validate every N steps (0: only at the end)")
    eval_first: bool = opt(True, "also validate before the first step (the starting point of the curves)")
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (0: all)")
    progress: bool = opt(True, "print one line per step")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]:
                raise UsageError(f"{flag(f.name)}: {getattr(self, f.name)!r} is not one of {list(f.metadata['choices'])}")
        overrides = [n for n in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets") if getattr(self, n) is not None]
        if self.lora == "none" and overrides:
            raise UsageError(f"--lora none (full fine-tuning) conflicts with {', '.join(map(flag, overrides))}")
        if self.lora_r is not None and self.lora_r < 1:
            raise UsageError(f"--lora-r {self.lora_r}: must be >= 1 (full fine-tuning is --lora none)")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        for n in ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_checkpoints", "val_limit", "grad_clip"):
            if getattr(self, n) < 0:
                raise UsageError(f"{flag(n)} {getattr(self, n)}: must be >= 0")
        if self.lr <= 0:
            raise UsageError(f"--lr {self.lr}: must be positive")

    def lora_config(self) -> lora_mod.LoRAConfig | None:
        if self.lora == "none":
            return None
        b = lora_mod.PRESETS[self.lora]
        pick = lambda v, d: d if v is None else v  # noqa: E731
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()) if self.lora_targets else b.targets
        return lora_mod.LoRAConfig(pick(self.lora_r, b.r), pick(self.lora_alpha, b.alpha),
                                   pick(self.lora_dropout, b.dropout), targets)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- config from flags

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2 from main(), not argparse's usage dump + sys.exit
        raise UsageError(message)


def _field_type(tp):
    """(python type, is_optional) for the annotations configs use: str, int, float, bool, X | None."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return [a for a in typing.get_args(tp) if a is not type(None)][0], True
    return tp, False


def parse_config(cls, argv, prog: str, description: str = ""):
    """argparse from a config dataclass: one --flag-name per field (help from field metadata, with the
    default or "(required)"), bools as --x/--no-x, choices from metadata. --config FILE.json supplies
    values as flags placed first, so argparse checks them and every flag on the command line, abbreviated
    or not, overrides them."""
    hints = typing.get_type_hints(cls)
    p = _Parser(prog=prog, description=description)
    p.add_argument("--config", metavar="FILE.json", help="read option values from a JSON object (flags override it)")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        tp, _ = _field_type(hints[f.name])
        req = f.default is dataclasses.MISSING
        text = f.metadata.get("help", "") + (" (required)" if req else f" (default: {f.default})")
        kw = dict(dest=f.name, default=None if req else f.default, help=text.strip().replace("%", "%%"))
        if tp is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif "choices" in f.metadata:
            p.add_argument(flag(f.name), type=tp, choices=f.metadata["choices"], **kw)
        else:
            p.add_argument(flag(f.name), type=tp, metavar=tp.__name__.upper(), **kw)
    argv = [str(a) for a in argv]
    path = p.parse_known_args(argv)[0].config
    args = vars(p.parse_args(_config_flags(Path(path), fields, hints) + argv if path else argv))
    for f in fields:
        if f.default is dataclasses.MISSING and args[f.name] is None:
            raise UsageError(f"{flag(f.name)} is required")
    return cls(**{f.name: args[f.name] for f in fields})


def _config_flags(path: Path, fields, hints) -> list[str]:
    """--config FILE.json as the flags it stands for."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = read_json(path, "a JSON object of option values")
    except DataError as e:
        raise UsageError(f"--config: {e}") from None
    types_ = {f.name: _field_type(hints[f.name])[0] for f in fields}
    out = []
    for k, v in values.items():
        name = k.replace("-", "_")
        if name not in types_:
            raise UsageError(f"--config {path}: unknown option {k!r}")
        if types_[name] is bool:
            if not isinstance(v, bool):
                raise UsageError(f"{flag(name)}: expected true or false, got {v!r}")
            out.append(flag(name) if v else "--no-" + flag(name)[2:])
        elif v is not None:  # null: the default
            out += [flag(name), str(v)]
    return out


def main(cls, run, argv, prog: str, description: str) -> int:
    """A stage's command line: bad input is one line and status 2, Ctrl-C one line and 130."""
    from .hub import HubError
    try:
        return run(parse_config(cls, sys.argv[1:] if argv is None else argv, prog, description))
    except (UsageError, DataError, HubError) as e:
        print(f"{prog}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step: nothing was recorded yet
        print(f"{prog}: interrupted before training started", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- distributed

def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process, gloo on CPU. A plain `python` run is rank 0 of 1."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    cuda = device != "cpu" and torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_grads(params, bucket_elems: int = 1 << 25) -> None:
    """Sum every gradient over the processes, a bucket of flattened grads per collective (DDP's
    all-reduce, written out: the loss is already normalised by the global token count, so a sum is right)."""
    if not _ddp():
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


def gather(obj) -> list:
    """Every rank's obj, in rank order (one process: [obj])."""
    if not _ddp():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, *args):
    """Run fn on rank 0 only; a UsageError there is raised on every rank (no rank left at a barrier)."""
    err = None
    if not _ddp() or dist.get_rank() == 0:
        try:
            fn(*args)
        except (UsageError, DataError) as e:
            err = str(e)
    err = gather(err)[0]
    if err:
        raise UsageError(err)


# ---------------------------------------------------------------- data records

def read_records(path, fmt: str = "label", skip_bad: bool = False, log=print) -> list[tuple[str, dict]]:
    """[(file:line, record)] of a JSONL(.gz) file: query, document, label in {0,1,2}, and an explanation
    when fmt is 'explain'. A bad record stops with its file:line unless skip_bad (then it is counted)."""
    good, bad = [], 0
    with files.open_input(path, "data file") as f:
        try:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    good.append((f"{path}:{n}", check_record(raw.decode("utf-8"), fmt)))
                except ValueError as e:
                    if not skip_bad:
                        raise UsageError(f"{path}:{n}: {e} (or pass --skip-bad)") from None
                    bad += 1
        except (OSError, EOFError) as e:
            raise UsageError(f"{path}: not a readable gzip file ({e})") from None
    if bad:
        log(f"{path}: {bad} bad records skipped")
    if not good:
        raise UsageError(f"{path}: no records")
    return good


def check_record(line: str, fmt: str) -> dict:
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:  # e.lineno would count inside the record, not the file
        raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(r, dict):
        raise ValueError("expected a JSON object")
    for k in ("query", "document") + (("explanation",) if fmt == "explain" else ()):
        if not isinstance(r.get(k), str):
            raise ValueError(f"field {k!r} is missing or not a string")
        if not r[k].strip():
            raise ValueError(f"field {k!r} is empty")
    if isinstance(r.get("label"), bool) or r.get("label") not in P.LABELS:
        raise ValueError(f"field 'label' must be one of {list(P.LABELS)}, got {r.get('label')!r}")
    return r


def file_record(path) -> dict:
    p = Path(path)
    return {"path": str(p.resolve()), "size": p.stat().st_size, "sha256": files.sha256_file(p)}


# ---------------------------------------------------------------- provenance: what a model was trained on

PROVENANCE = "provenance.json"


def provenance(cfg, records: list[dict]) -> dict:
    """The data files (hashes), their BRIGHT overlap per domain, whether `train.py data` excluded BRIGHT,
    merged with the provenance of the model or adapter this run starts from."""
    from .bright import data_overlap
    own = {"data": [file_record(cfg.data)], "bright": data_overlap((r["query"], r["document"]) for r in records),
           "exclude_bright": _excluded_bright(Path(cfg.data).parent)}
    for start in (getattr(cfg, "adapter", None), cfg.model):
        f = Path(start) / PROVENANCE if start else None
        if f is not None and f.is_file():
            own = merge_provenance(read_json(f, "a provenance record"), own)
    return own


def _excluded_bright(data_dir: Path) -> bool | None:
    """True/False when train.py data's records in data_dir say whether --exclude-bright was used."""
    for name in ("settings.json", "stats.json", "summary.json"):
        f = data_dir / name
        try:
            rec = read_json(f) if f.is_file() else {}
        except DataError:
            continue
        if "exclude_bright" in rec:
            return bool(rec["exclude_bright"])  # a BRIGHT dir (the filter's source), or true, or null/false
    return None


def merge_provenance(a: dict, b: dict) -> dict:
    """A model trained on a's data, then on b's: union of the files, summed overlap."""
    overlap = dict(a["bright"]["overlap"])
    for d, n in b["bright"]["overlap"].items():
        overlap[d] = overlap.get(d, 0) + n
    ex = [a["exclude_bright"], b["exclude_bright"]]
    return {"data": a["data"] + [d for d in b["data"] if d not in a["data"]],
            "bright": {"checked": a["bright"]["checked"] and b["bright"]["checked"],
                       "source": a["bright"]["source"] or b["bright"]["source"], "overlap": dict(sorted(overlap.items()))},
            "exclude_bright": None if None in ex else all(ex)}


# ---------------------------------------------------------------- the model

def load_model(cfg, device, adapter: str | None = None):
    """(model, tok, amp, base_name): the base model (an --adapter merged into it, so it becomes the
    base and the reference policy), then a fresh LoRA from cfg, or every weight trainable (--lora none)."""
    import minirank
    from .hub import HubError

    lcfg = cfg.lora_config()
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    # LoRA: a frozen bf16 base is exact enough (the fp32 adapters take the updates). Full fine-tuning keeps
    # fp32 master weights and computes under bf16 autocast: in bf16 weights most small updates vanish.
    try:
        model, tok = minirank.load(cfg.model, dtype=torch.bfloat16 if bf16 and lcfg else torch.float32, device=device)
    except (ValueError, OSError, HubError) as e:
        raise UsageError(f"--model {cfg.model}: {e}".splitlines()[0]) from None
    base_name = cfg.model
    if adapter:
        try:
            lora_mod.load_adapter(model, adapter)
        except (ValueError, OSError) as e:
            raise UsageError(f"--adapter {adapter}: {e}".splitlines()[0]) from None
        lora_mod.merge_lora(model)  # W <- W + (alpha/r) B A: the adapter's policy, now plain weights
        lora_mod.strip_lora(model)
        final = Path(adapter).parent / "final"
        base_name = str(final) if final.is_dir() else f"{cfg.model} (merged with {adapter})"
    if lcfg:
        try:
            lora_mod.add_lora(model, lcfg, seed=cfg.seed)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e}") from None
    else:
        model.requires_grad_(True)
    model.train()
    # autocast only for the trainer's passes of fp32 master weights; a bf16 LoRA base computes in bf16 as it
    # is. Sampling never autocasts (generate's KV cache takes the weights' dtype): with LoRA the sampler and
    # the trainer are then the same computation, with full fine-tuning the sampler runs the fp32 masters.
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not lcfg else nullcontext()
    return model, tok, amp, base_name


# ---------------------------------------------------------------- optimizer and schedule

def _no_decay(name: str, p) -> bool:
    # norms, biases and embeddings keep their scale: decaying them only hurts (and a tied embedding
    # is the LM head too). LoRA A/B and every other matrix decay.
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name or "embed" in name


def make_optimizer(params_named, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW (decoupled weight decay) with two groups: decayed matrices, undecayed norms/biases/embeddings."""
    params_named = [(n, p) for n, p in params_named if p.requires_grad]
    decay = [p for n, p in params_named if not _no_decay(n, p)]
    rest = [p for n, p in params_named if _no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_at(step: int, cfg_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          min_ratio: float = 0.0) -> float:
    """lr for 0-based `step`: linear warmup over warmup_steps, then constant or cosine down to min_ratio·lr
    at the last step."""
    if step < warmup_steps:
        return cfg_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return cfg_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return cfg_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- checkpoints

STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> tuple[dict, dict]:
    """This process's RNG states: torch CPU, this process's own CUDA device, python, numpy."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()  # the current device only: each rank owns one
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np
        st = np.random.get_state()
        meta["numpy"] = [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]
    except ImportError:
        pass
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    if "numpy" in meta:
        import numpy as np
        a, keys, pos, has_g, cached = meta["numpy"]
        np.random.set_state((a, np.array(keys, dtype=np.uint32), pos, has_g, cached))


def save_checkpoint(out, step: int, model, optimizer, state: dict, keep: int | None = None) -> Path | None:
    """DIR/checkpoints/step-N/, atomically (a temp dir renamed into place once complete, so a kill leaves
    a temp dir that resume ignores, never a half step-N). Every rank calls it: each rank's RNG states and
    `state` (its data position, ...) are gathered; rank 0 writes them with the trainable weights and the
    optimizer (the lr schedule is a function of the step). keep: only the newest `keep` survive."""
    from safetensors.torch import save_file

    ranks = gather((_rng_state(), state))
    if _ddp() and dist.get_rank() != 0:
        return None
    ck = Path(out) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final, tmp = ck / f"step-{step}", ck / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    osd = optimizer.state_dict()
    opt_tensors, opt_state = {}, {}
    for idx, st in osd["state"].items():
        opt_state[str(idx)] = {k: v for k, v in st.items() if not torch.is_tensor(v)}
        opt_tensors.update({f"{idx}.{k}": v.contiguous().cpu() for k, v in st.items() if torch.is_tensor(v)})
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": osd["param_groups"], "state": opt_state}))
    save_file({f"{r}.{k}": t for r, ((ts, _), _) in enumerate(ranks) for k, t in ts.items()}, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps([meta for (_, meta), _ in ranks]))
    (tmp / "state.json").write_text(json.dumps({"step": step, "ranks": [s for _, s in ranks]}))  # last: complete
    if final.exists():  # a rerun reached the same step again: replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(out) -> list[Path]:
    ck = Path(out) / "checkpoints"
    found = [(int(m.group(1)), p) for p in (ck.iterdir() if ck.is_dir() else ())
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(path, model, optimizer, rank: int = 0) -> dict:
    """Restore trainable weights, optimizer and this rank's RNG states; returns {"step", **this rank's state}."""
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
    state = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, t in load_file(str(path / "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = {k.split(".", 1)[1]: t for k, t in load_file(str(path / "rng.safetensors")).items() if k.startswith(f"{rank}.")}
    _set_rng_state(rng, json.loads((path / "rng.json").read_text())[rank])
    st = json.loads((path / "state.json").read_text())
    return {"step": st["step"], **st["ranks"][rank]}


# ---------------------------------------------------------------- metrics and curves

class MetricsLog:
    """DIR/metrics.jsonl, one JSON object per call, flushed at once (a kill loses nothing logged)."""

    def __init__(self, out, enabled: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Resuming from `step` (0: no checkpoint, a fresh start): drop lines of steps the killed run
        logged past its last checkpoint."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [line for line in self.path.read_text().splitlines()
                if step and line.strip() and json.loads(line)["step"] <= step]
        files.atomic_write(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, **metrics) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []


VALIDATION = ("val_accuracy", "val_parse_rate", "val_auc", "val_ndcg10", "first_stage_ndcg10")


def plot_curves(out, panels, rows=None, name="curves.png") -> Path | None:
    """DIR/curves.png: one panel per (title, metric keys) that has data ('reward_*' matches a prefix);
    every other logged number stays in metrics.jsonl. Without matplotlib, one line says how to get it.
    rows: the points to draw ({"step": n, key: value} dicts), by default the run's metrics.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print(f"{out}/{name} not drawn: matplotlib is missing (pip install 'minirank[plot]'; a rerun of the "
              f"same command draws it)")
        return None
    rows = MetricsLog(out).read() if rows is None else rows
    logged = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"))
    found = [(t, [k for k in logged if k in keys or any(p.endswith("*") and k.startswith(p[:-1]) for p in keys)])
             for t, keys in panels]
    found = [(t, ks) for t, ks in found if ks]
    if not found:
        return None
    fig, axes = plt.subplots(1, len(found), figsize=(5 * len(found), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], found):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(out) / name
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- greedy label evaluation

@torch.no_grad()
def evaluate_labels(model, tok, prompts: list[list[int]], labels: list[int], max_new_tokens: int, batch_size: int,
                    reward=None) -> dict:
    """Greedy completions of held-out prompts: label accuracy, parse rate, mean length; and, from the
    label-token distribution at the label position (what the reranker scores with), the mean probability
    of the reference label and the AUC of the expected label (relevant above irrelevant).
    reward(i, text, tokens, finish_reason) -> float adds the mean reward."""
    from .generate import generate
    from .rerank import label_distribution, label_token_ids

    was = model.training
    model.eval()
    label_ids = label_token_ids(tok)
    out = generate(model, prompts, temperature=0.0, max_new_tokens=max_new_tokens, stop_strings=[P.STOP],
                   tokenizer=tok, batch_size=batch_size, watch_ids=label_ids)
    model.train(was)
    n = len(prompts)
    said = [P.parse_label(t) for t in out.texts]
    m = dict(val_accuracy=sum(a == b for a, b in zip(said, labels)) / n, val_parse_rate=sum(a is not None for a in said) / n,
             val_len_mean=sum(len(t) for t in out.tokens) / n, val_n=n)
    if reward is not None:
        m["val_reward"] = sum(reward(i, *x) for i, x in enumerate(zip(out.texts, out.tokens, out.finish_reasons))) / n
    p_ref, score = [], []
    for toks, w, y in zip(out.tokens, out.watched, labels):
        p = label_distribution(toks, w, tok, label_ids)  # None: the completion wrote no label
        p_ref.append(p[P.LABELS.index(y)] if p else 0.0)
        score.append(sum(lab * q for lab, q in zip(P.LABELS, p)) if p else None)  # = the expected label
    m["val_p_label"] = sum(p_ref) / n
    pos = [s for s, y in zip(score, labels) if y == max(P.LABELS) and s is not None]
    neg = [s for s, y in zip(score, labels) if y == min(P.LABELS) and s is not None]
    if pos and neg:  # P(relevant scored above irrelevant), ties count half
        m["val_auc"] = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    return m


# ---------------------------------------------------------------- the run: directory, resume, loop, export

@dataclass
class Run:
    """One stage's run as both stages drive it: where, which process, how far."""
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    metrics: MetricsLog
    start: int = 0  # the step resumed from
    total: int = 0
    state: dict = field(default_factory=dict)  # this rank's state from the checkpoint resumed

    def log(self, *a, **k):
        if self.rank == 0:
            print(*a, **k, flush=True)


def open_run(cfg: TrainConfig) -> Run:
    """Join the processes, seed this rank, check --out can hold this run (nothing is written yet)."""
    rank, world, device = init_distributed(cfg.device)
    out = Path(cfg.out)

    def check():
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a directory")
        if out.is_dir() and any(out.iterdir()) and not (out / "run.json").is_file():
            raise UsageError(f"--out {out} exists and is not a training run directory; use a new --out")
    on_rank0(check)
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks, as across the examples they see
    random.seed(cfg.seed + rank)
    return Run(cfg, out, rank, world, device, MetricsLog(out, enabled=rank == 0))


def begin(run: Run, settings: dict, total: int, records: list[dict], model, optimizer) -> dict:
    """The run really starts: record its settings and provenance in run.json (a rerun must match them;
    only the total may grow, and only on a constant schedule), then resume from the last checkpoint.
    Returns the provenance."""
    cfg = run.cfg
    settings = json.loads(json.dumps({**settings, "world_size": run.world, "prompt": P.prompt_hash(cfg.format),
                                      "files": [{k: v for k, v in file_record(p).items() if k != "path"}
                                                for p in (cfg.data, cfg.val) if p]}))
    recorded = {}

    def record():
        f = run.out / "run.json"
        if not f.is_file():
            run.out.mkdir(parents=True, exist_ok=True)
            recorded.update(settings, total_steps=total, provenance=provenance(cfg, records))
            files.write_json(f, recorded)
            return
        files.check_settings(f, settings, write=False, ignore=("total_steps", "provenance"))
        recorded.update(read_json(f))
        if recorded["total_steps"] != total:
            last = latest_checkpoint(run.out)
            if cfg.schedule != "constant":
                raise UsageError(f"{run.out} was started for {recorded['total_steps']} steps on a {cfg.schedule} "
                                 f"schedule, whose lr depends on the total: it cannot become {total}; use a new --out")
            if last is not None and int(last.name[5:]) > total:
                raise UsageError(f"{run.out} already has a checkpoint at {last.name}, past the {total} steps asked")
            recorded["total_steps"] = total
            files.write_json(f, recorded)
    on_rank0(record)
    run.total = total
    if (ck := latest_checkpoint(run.out)) is not None:
        run.state = load_checkpoint(ck, model, optimizer, run.rank)
        run.start = run.state["step"]
        run.log(f"resumed from {ck} (step {run.start} of {total})")
    run.metrics.truncate_after(run.start)
    return gather(recorded.get("provenance"))[0]


def loop(run: Run, step_fn, evaluate, model, optimizer, show=(), state=lambda: {}) -> None:
    """The step loop both stages share: step_fn(step) -> metrics; evaluate(step) -> metrics (rank 0,
    at the start with --eval-first, every --eval-every steps and at the end); checkpoints every
    --save-every steps and at the end. Ctrl-C: Interrupted naming the step (the checkpoints stay)."""
    cfg, step = run.cfg, run.start
    try:
        if step == 0 and cfg.eval_first:
            _evaluate(run, evaluate, 0)
        for step in range(run.start, run.total):
            m = step_fn(step)
            run.metrics.log(step + 1, **m)
            if cfg.progress:
                run.log(f"step {step + 1}/{run.total} " + " ".join(f"{k} {m[k]:.4g}" for k in show if m.get(k) is not None))
            done = step + 1 == run.total
            if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                _evaluate(run, evaluate, step + 1)
            if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(run.out, step + 1, model, optimizer, state(), keep=cfg.keep_checkpoints or None)
            if run.world > 1:
                dist.barrier()  # the others wait for rank 0's evaluation / checkpoint
    except KeyboardInterrupt:
        last = latest_checkpoint(run.out)
        raise Interrupted(f"interrupted at step {step}" + (f" (last checkpoint: {last.name})" if last else "")
                          + "; rerun the same command to resume") from None


def _evaluate(run: Run, evaluate, step: int) -> None:
    if run.rank == 0 and (m := evaluate(step)):
        run.metrics.log(step, **m)
        run.log(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in m.items()))


def complete(run: Run, panels) -> bool:
    """A rerun of a finished run: nothing to do but draw the curves if they are missing."""
    if run.start < run.total or not (run.out / "final").is_dir():
        return False
    run.log(f"{run.out}: run already complete ({run.total} steps; raise --max-steps to extend it)")
    if run.rank == 0 and not (run.out / "curves.png").is_file():
        plot_curves(run.out, panels)
    return True


def finish(run: Run, model, tok, base_model: str, prov: dict, panels) -> int:
    """Export (rank 0), draw the curves, leave the process group."""
    if run.rank == 0:
        model.eval()
        final = export(model, tok, run.out, base_model, prov)
        plot_curves(run.out, panels)
        run.log(f"wrote {final}" + (f" and {run.out / 'adapter'}" if lora_mod.has_lora(model) else ""))
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def export(model, tok, out, base_model: str, prov: dict | None = None) -> Path:
    """DIR/final: an HF model dir with any LoRA merged, plus the tokenizer (loads in transformers, vLLM
    and minirank.load); DIR/adapter: the adapter in peft's layout (LoRA runs only). Both carry
    provenance.json (the adapter's config too). Atomic per dir."""
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
    if prov is not None:
        files.write_json(tmp / PROVENANCE, prov)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if lora_mod.has_lora(model):
        adapter = lora_mod.save_adapter(model, out / "adapter", base_model,
                                        extra={"minirank_provenance": prov} if prov is not None else None)
        if prov is not None:
            files.write_json(adapter / PROVENANCE, prov)
    return final

