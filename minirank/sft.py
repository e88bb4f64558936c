"""SFT: distil a teacher's explanations into the model (InteRank's first stage).

    python train.py sft --model SPEC --data train.jsonl [--val val.jsonl] --out DIR [options]

Each record {"query", "document", "explanation", "label"} becomes prompt ids (prompts.prompt_ids: the
model's chat template, date pinned) followed by target ids (prompts.completion_ids: explanation, label
line, end-of-turn). The loss is the mean negative log-likelihood of the target tokens, summed over the
whole optimizer step (all micro-batches, all processes) and divided once by the step's target-token
count, so accumulation and DDP give the update one big batch would. The LM head runs only at target
positions (model.token_logprobs, chunked and checkpointed), never over [tokens, vocab] for the batch.

Run directory: see minirank/training.py. Rerunning the same command resumes from the last checkpoint.
"""

import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import prompts
from . import training as T
from .training import UsageError, opt

NOT_SETTINGS = ("out", "max_steps", "epochs", "eval_every", "eval_first", "save_every", "keep_checkpoints", "val_limit",
                "val_max_new_tokens", "val_batch_size", "progress", "device")  # may change when a run resumes


@dataclass
class SFTConfig(T.TrainConfig):
    max_steps: int = opt(0, "optimizer steps in all (0: from --epochs)")
    epochs: float = opt(1.0, "passes over the data when --max-steps is 0 (fractions allowed)")
    grad_clip: float = opt(0.3, "max gradient norm (0: off; paper: 0.3)")
    max_len: int = opt(4096, "max tokens of prompt + target")
    truncate: str = opt("document", "an over-long example: shorten its document (never the target) or drop it",
                        ("document", "drop"))
    packing: bool = opt(False, "pack examples into rows of --batch-tokens (best-fit-decreasing, attention kept "
                               "inside each example)")
    batch_size: int = opt(16, "examples per optimizer step, all processes together")
    batch_tokens: int = opt(8192, "token budget of one micro-batch (padded rows x length, or one packed row)")
    micro_batch_size: int = opt(0, "max examples per micro-batch (0: only --batch-tokens limits)")
    gradient_checkpointing: bool = opt(True, "recompute each block's activations in the backward")
    val_max_new_tokens: int = opt(384, "generation length cap in validation")
    val_batch_size: int = opt(16, "generation slots in validation")

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be >= 1")
        for name in ("max_len", "batch_tokens"):
            if getattr(self, name) < 8:
                raise UsageError(f"{T.flag(name)} {getattr(self, name)} is too small")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UsageError("--epochs or --max-steps must be positive")


# ---------------------------------------------------------------- data

@dataclass
class Example:
    prompt: list[int]
    target: list[int]
    label: int

    def __len__(self):  # tokens fed to the model: the last target token is only predicted, never input
        return len(self.prompt) + len(self.target) - 1


def encode(tok, r, fmt: str, max_len: int, truncate: str) -> tuple[Example | None, str]:
    """One record -> Example; ('cut' | 'dropped' | 'ok'). Over-long: the document is shortened
    (prompts.prompt_ids' max_tokens) until prompt + target fit; the target is never touched. If even an
    empty document does not fit, the example is dropped."""
    target = prompts.completion_ids(tok, r.get("explanation", ""), r["label"], fmt)
    prompt = prompts.prompt_ids(tok, r["query"], r["document"], fmt)
    if len(prompt) + len(target) <= max_len:
        return Example(prompt, target, r["label"]), "ok"
    if truncate == "drop":
        return None, "dropped"
    try:
        prompt = prompts.prompt_ids(tok, r["query"], r["document"], fmt, max_tokens=max_len - len(target))
    except ValueError:
        return None, "dropped"
    return Example(prompt, target, r["label"]), "cut"


def load_examples(path, tok, cfg: SFTConfig, log=print) -> tuple[list[Example], list[dict]]:
    """(examples, records) of a data file; over-long examples cut or dropped, and counted."""
    records = [r for _, r in T.read_records(path, cfg.format, cfg.skip_bad, log)]
    counts = {"ok": 0, "cut": 0, "dropped": 0}
    out = []
    for r in records:
        ex, how = encode(tok, r, cfg.format, cfg.max_len, cfg.truncate)
        counts[how] += 1
        if ex is not None:
            out.append(ex)
    note = f"{path}: {len(out)} examples"
    if counts["cut"] or counts["dropped"]:
        note += f"; longer than --max-len {cfg.max_len}: {counts['cut']} documents cut, {counts['dropped']} dropped"
    log(note)
    if not out:
        raise UsageError(f"{path}: nothing to train on: all {len(records)} examples are longer than --max-len "
                         f"{cfg.max_len} (--truncate {cfg.truncate} dropped {counts['dropped']})")
    return out, records


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


@torch.no_grad()
def evaluate(model, tok, val: list[Example], cfg: SFTConfig, device, amp) -> dict:
    """Completion loss and greedy label evaluation (training.evaluate_labels) on the validation examples."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for mb in micro_batches(val, cfg.batch_tokens, cfg.packing, cfg.micro_batch_size):
        with amp:
            logp = target_logprobs(model, to_device(mb, device))
        total, n = total - logp.sum().item(), n + logp.numel()
    model.train(was)
    return {"val_loss": total / n, **T.evaluate_labels(model, tok, [ex.prompt for ex in val], [ex.label for ex in val],
                                                        cfg.val_max_new_tokens, cfg.val_batch_size)}


# ---------------------------------------------------------------- the run

PANELS = [("loss", ("loss", "val_loss")), ("validation", T.VALIDATION)]


def main(argv=None) -> int:
    return T.main(SFTConfig, run, argv, "train.py sft", __doc__.split("\n\n")[0])


def run(cfg: SFTConfig) -> int:
    r = T.open_run(cfg)
    if cfg.batch_size % r.world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the process count ({r.world})")
    model, tok, amp, base_name = T.load_model(cfg, r.device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    train, records = load_examples(cfg.data, tok, cfg, r.log)
    val = load_examples(cfg.val, tok, cfg, r.log)[0][:cfg.val_limit or None] if cfg.val else []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = T.make_optimizer(model.named_parameters(), cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                 cfg.adam_eps)
    total = cfg.max_steps or math.ceil(cfg.epochs * len(train) / cfg.batch_size)
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    prov = T.begin(r, settings, total, records, model, optimizer)
    r.log(f"{sum(p.numel() for p in params):,} trainable parameters; {total} steps of {cfg.batch_size} examples; "
          f"{r.world} process(es) on {r.device}")

    def step_fn(step):
        t0 = time.perf_counter()
        batch = [train[i] for i in step_examples(len(train), step, cfg.batch_size, cfg.seed)]
        n_targets = sum(len(ex.target) for ex in batch)  # the whole step's count: every rank knows the batch
        mine = sorted(batch, key=len, reverse=True)[r.rank::r.world]  # longest-first deal: balanced shares
        mbs = [to_device(mb, r.device) for mb in micro_batches(mine, cfg.batch_tokens, cfg.packing, cfg.micro_batch_size)]
        lr = T.lr_at(step, cfg.lr, cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio)
        m = train_step(model, params, optimizer, mbs, n_targets, lr, cfg, amp)
        tokens = sum(len(ex) for ex in batch)
        return {**m, "lr": lr, "tokens": tokens, "targets": n_targets, "tok_s": tokens / (time.perf_counter() - t0),
                "epoch": (step + 1) * cfg.batch_size / len(train)}

    evaluate_fn = lambda step: evaluate(model, tok, val, cfg, r.device, amp) if val else {}  # noqa: E731
    if T.complete(r, PANELS):
        return 0
    T.loop(r, step_fn, evaluate_fn, model, optimizer, show=("loss", "lr", "tok_s"))
    return T.finish(r, model, tok, base_name, prov, PANELS)


if __name__ == "__main__":
    sys.exit(main())
