"""GRPO, written out: sample a group of completions per prompt, reward them, push the policy towards
the completions that beat their group's mean.

    python train.py grpo --model SPEC [--adapter SFT_RUN/adapter] --data train.jsonl --out DIR [options]

One step, in the order of this file:

    rewards    r_i = sum of reward functions (format, exact label, ...)               each logged separately
    advantage  A_i = r_i - mean_group(r)   [ / std_group(r) | / std_batch(r) | nothing ]
    objective  for every completion token t of row i, with ratio rho = pi_theta / pi_old (per token):

        l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)  +  beta * KL_it
        KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (k3: unbiased, always >= 0)

        loss = sum_it l_it * m_it / N    with N = tokens in the batch (token), or
               mean_i (sum_t l_it m_it / |o_i|) (sequence), or  sum_it l_it m_it / (B * max_new_tokens) (constant)

    rollout    minirank.generate: each prompt prefilled once, G rows forked from its KV cache
    update     mu optimizer steps on the rollout batch; pi_old = the sampler's log-probs
    loop       training.loop: evaluation, checkpoints, resume

m_it masks padding and (with --overlong mask) completions cut by --max-new-tokens. `loss_weights` turns
the aggregation into one weight per token over the WHOLE batch, so splitting the batch into groups for
backward (gradient accumulation) or across ranks (DDP) changes nothing.

With one update per rollout (mu = 1) pi_old is pi_theta itself: rho = 1, nothing is clipped, and the
loss value is ~0 while its gradient, sum A_i grad log pi(o_i), is not — log the grad norm, not the loss.
pi_old comes from the sampler, which is this same model code: the logged `logprob_gap` (sampler vs
trainer, measured for free by the first update's forward) is ~1e-6 in fp32, so no importance-sampling
correction is needed; a sampler of other code (vLLM) would need one.

The trainer runs the prompt once per group too: the prompt's K/V (with autograd) are computed once and
shared by the G completion rows (`group_logprobs`), so training costs prompt + G x completion tokens
instead of G x (prompt + completion). The LM head runs only at completion positions (token_logprobs).

Reference policy (beta > 0): the same weights with the LoRA adapter switched off. Starting from an SFT
adapter, that adapter is merged into the base weights first and a fresh adapter is trained on top, so
"adapter off" is the SFT policy; there is never a second model in memory.
"""

import importlib
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import lora
from . import prompts as P
from . import training as T
from .generate import generate
from .training import UsageError, opt

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


def resolve_rewards(spec: str) -> dict:
    """'exact,format,mypkg.rewards.fn' -> {name: function}."""
    out = {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in REWARDS:
            out[name] = REWARDS[name]
            continue
        mod, _, attr = name.rpartition(".")
        if not mod:
            raise UsageError(f"--reward {name!r}: not one of {list(REWARDS)} and not a dotted path module.function")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--reward {name!r}: cannot import it ({e})") from None
        if not callable(fn):
            raise UsageError(f"--reward {name!r} is not callable")
        out[name] = fn
    if not out:
        raise UsageError("--reward names no reward function")
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


def clipped_objective(logp, old_logp, adv, weights, clip_low=0.2, clip_high=0.28, beta=0.0, ref_logp=None):
    """The GRPO loss of a (micro-)batch and its statistics.

    logp [B, T]: log pi_theta of the completion tokens (with grad); old_logp [B, T]: log pi_old (no grad);
    adv [B]; weights [B, T] from loss_weights (0 on padding and masked rows); ref_logp [B, T] when beta > 0."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)  # pessimistic bound: no gain from moving pi too far
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


def group_logprobs(model, prompt: list[int], completions: list[list[int]], temperature: float = 1.0):
    """log pi_T(completion tokens | prompt) for the G completions of one prompt -> (logp [G, T], mask [G, T]),
    pi_T = softmax(logits / T): the distribution the sampler drew from, as TRL scores it.

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
    # the LM head is linear without bias, so head(h) / T = head(h / T)
    lp = model.token_logprobs(h[valid] / temperature, comp[valid])  # LM head at completion positions only, fp32
    out = torch.zeros(G, T, dtype=torch.float32, device=dev)
    return out.masked_scatter(valid, lp), valid


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Group:
    record: dict
    prompt: list[int]
    completions: list[list[int]]
    sampler_logprobs: list[list[float]]  # log pi_T of each sampled token, as the sampler drew it
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


def record_prompts(tok, records: list[dict], cfg) -> list[list[int]]:
    """The records' prompts, documents cut to --max-prompt-len as SFT cut its own (see `fitting`)."""
    return [P.prompt_ids(tok, r["query"], r["document"], cfg.format, cfg.max_prompt_len or None) for r in records]


def rollout(model, tok, records: list[dict], cfg, reward_fns: dict, seed: int) -> list[Group]:
    """G samples of each record's prompt, scored. generate() prefills each prompt once and forks its
    K/V into the G rows; rows stream through --rollout-batch slots (continuous batching)."""
    prompts = record_prompts(tok, records, cfg)
    G = cfg.group_size
    was_training = model.training
    model.eval()
    out = generate(model, prompts, n=G, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                   stop_strings=[P.STOP], tokenizer=tok, seed=seed, batch_size=cfg.rollout_batch)
    model.train(was_training)
    groups = []
    for i, (rec, p) in enumerate(zip(records, prompts)):
        rows = slice(i * G, (i + 1) * G)
        g = Group(rec, p, out.tokens[rows], out.sample_logprobs[rows], out.texts[rows], out.finish_reasons[rows])
        groups.append(score_group(g, reward_fns, cfg))
    return groups


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


# ----------------------------------------------------------------------------------------------
# one GRPO update


def _pad(rows: list[list[float]], T: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), T, dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def batch_advantages(groups: list[Group], scale: str, reduce=None) -> torch.Tensor:
    """[P, G] advantages; under DDP a 'batch' std comes from every rank's rewards (all-reduced sums)."""
    rewards = torch.stack([g.rewards for g in groups])
    if scale != "batch" or reduce is None:
        return group_advantages(rewards, scale)
    n = reduce(torch.tensor(float(rewards.numel())))
    s1, s2 = reduce(rewards.sum()), reduce((rewards ** 2).sum())
    std = ((s2 - s1 ** 2 / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
    return (rewards - rewards.mean(1, keepdim=True)) / (std + 1e-4)


def batch_weights(groups: list[Group], cfg, device, reduce=None) -> torch.Tensor:
    """Loss weight of every completion token [P*G, T]: padding out; truncated rows out with --overlong mask."""
    G, T = cfg.group_size, max(len(c) for g in groups for c in g.completions)
    mask = torch.zeros(len(groups) * G, T, device=device)
    for gi, g in enumerate(groups):
        for j, (c, f) in enumerate(zip(g.completions, g.finish_reasons)):
            if not (f == "length" and cfg.overlong == "mask"):
                mask[gi * G + j, :len(c)] = 1
    return loss_weights(mask, cfg.loss_agg, cfg.max_new_tokens, reduce)


def grpo_update(model, groups: list[Group], opt, params, cfg, reduce=None, all_reduce_grads=None, amp=None) -> dict:
    """Advantages, then `updates_per_rollout` optimizer steps on this rollout batch. Returns stats.
    reduce / all_reduce_grads: DDP hooks (sum over ranks); None on one process."""
    dev, G, amp = model.device, cfg.group_size, amp or nullcontext()
    adv = batch_advantages(groups, cfg.scale_rewards, reduce).to(dev)
    weights = batch_weights(groups, cfg, dev, reduce)
    acc = dict(gap=0.0, gap_n=0, n_tokens=0.0, fwd_tokens=0, loss=0.0)
    for mu in range(cfg.updates_per_rollout):
        opt.zero_grad(set_to_none=True)
        for gi, g in enumerate(groups):
            w = weights[gi * G:(gi + 1) * G, :max(len(c) for c in g.completions)]
            if cfg.beta == 0 and not bool((adv[gi] != 0).any() and (w > 0).any()):
                continue  # zero advantage and no KL: this group's loss and gradient are exactly 0
            with amp:
                lp, valid = group_logprobs(model, g.prompt, g.completions, cfg.temperature)
            old = _pad(g.sampler_logprobs, lp.shape[1], dev)
            if mu == 0:  # the first update's forward IS the current policy: the gap comes for free
                acc["gap"] += float((lp.detach() - old).abs()[valid].sum())
                acc["gap_n"] += int(valid.sum())
            ref = None
            if cfg.beta > 0:
                with torch.no_grad(), lora.lora_disabled(model), amp:
                    ref, _ = group_logprobs(model, g.prompt, g.completions, cfg.temperature)
            loss, st = clipped_objective(lp, old, adv[gi], w, cfg.clip_low, cfg.clip_high, cfg.beta, ref)
            loss.backward()
            n = float(st.pop("n_tokens"))
            for k, v in st.items():  # token-weighted sums, averaged below
                acc[k] = acc.get(k, 0.0) + float(v) * n
            acc["n_tokens"] += n
            acc["fwd_tokens"] += int(valid.sum())
            acc["loss"] += float(loss.detach())
        if all_reduce_grads is not None:
            for p in params:  # a rank whose groups all had zero advantage still joins every collective
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_grads()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
    n = max(acc["n_tokens"], 1.0)
    stats = {k: acc[k] / n for k in ("clip_low", "clip_high", "ratio_mean", "kl") if k in acc}
    stats.update(grad_norm=float(gn), loss=acc["loss"] / cfg.updates_per_rollout, adv_abs_mean=float(adv.abs().mean()),
                 trained_tokens=acc["fwd_tokens"],  # completion tokens through the trainer, all mu passes
                 logprob_gap=acc["gap"] / acc["gap_n"] if acc["gap_n"] else None)  # None: no row was trained
    return stats


def rollout_stats(groups: list[Group]) -> dict:
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
# the loop: rollouts -> update -> logs, with training.py's run directory, checkpoints and evaluation

PANELS = [("reward", ("reward_mean", "reward_*", "val_reward")), ("validation", T.VALIDATION)]
NOT_SETTINGS = ("out", "max_steps", "eval_every", "eval_first", "save_every", "keep_checkpoints", "val_limit", "progress",
                "device", "eval_rerank", "eval_rerank_top_k")  # may change when a run resumes


def fitting(records: list[dict], tok, cfg, path, log) -> list[dict]:
    """With --max-prompt-len, the records whose question alone is longer are dropped, as SFT drops them."""
    if not cfg.max_prompt_len:
        return records
    keep = [r for r in records if len(P.prompt_ids(tok, r["query"], "", cfg.format)) <= cfg.max_prompt_len]
    if len(keep) < len(records):
        log(f"{path}: {len(records) - len(keep)} of {len(records)} records dropped: their question alone is longer "
            f"than --max-prompt-len {cfg.max_prompt_len}")
    return keep


def run(cfg: "GRPOConfig") -> int:
    r = T.open_run(cfg)
    records = [rec for _, rec in T.read_records(cfg.data, "label", cfg.skip_bad, r.log)]
    val = [rec for _, rec in T.read_records(cfg.val, "label", cfg.skip_bad, r.log)] if cfg.val else []
    rr = load_rerank_set(cfg.eval_rerank) if cfg.eval_rerank else None
    reward_fns = resolve_rewards(cfg.reward)
    model, tok, amp, base_name = T.load_model(cfg, r.device, cfg.adapter)
    train = rank_shard(fitting(records, tok, cfg, cfg.data, r.log), r.rank, r.world, cfg.prompts_per_step)
    if not train:
        raise UsageError(f"{cfg.data}: {len(records)} records leave rank {r.rank} of {r.world} no block of "
                         f"--prompts-per-step {cfg.prompts_per_step}")
    val = fitting(val, tok, cfg, cfg.val, r.log)[:cfg.val_limit or None]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(model.named_parameters(), cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                           cfg.adam_eps)
    prov = T.begin(r, {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}, cfg.max_steps, records, model, opt)
    r.log(f"{sum(p.numel() for p in params):,} trainable parameters; {cfg.max_steps} steps of {cfg.prompts_per_step} "
          f"prompts x G={cfg.group_size} on {r.world} process(es), {r.device}")
    ddp = dict(reduce=_all_reduce, all_reduce_grads=lambda: T.all_reduce_grads(params)) if r.world > 1 else {}
    pos = r.state.get("pos", 0)

    def step_fn(step):
        nonlocal pos
        t0 = time.perf_counter()
        groups, pos, extra = sample_step(model, tok, train, cfg, reward_fns, step, pos, r.rank)
        t1 = time.perf_counter()
        lr = T.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        st = grpo_update(model, groups, opt, params, cfg, amp=amp, **ddp)
        t2 = time.perf_counter()
        gen_tokens = sum(len(c) for g in groups for c in g.completions)
        return {**rollout_stats(groups), **st, **extra, "lr": lr, "sample_s": t1 - t0, "train_s": t2 - t1,
                "sample_tok_s": gen_tokens / (t1 - t0), "train_tok_s": st["trained_tokens"] / (t2 - t1)}

    def evaluate(step):
        m = evaluate_labels(model, tok, val, cfg, reward_fns) if val else {}
        if rr is not None:
            m.update(evaluate_rerank(model, tok, rr, cfg, r.out / "eval_rerank.jsonl"))
        return m

    if T.complete(r, PANELS):
        return 0
    T.loop(r, step_fn, evaluate, model, opt, state=lambda: {"pos": pos},
           show=("reward_mean", "accuracy", "zero_std_sampled", "len_mean", "grad_norm", "sample_s", "train_s"))
    return T.finish(r, model, tok, base_name, prov, PANELS)


def _all_reduce(x):  # sum over ranks (normalisers, reward moments)
    x = x.clone()
    T.dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate_labels(model, tok, records: list[dict], cfg, reward_fns: dict) -> dict:
    """training.evaluate_labels on held-out records (greedy, --max-new-tokens), with the mean reward."""
    prompts = record_prompts(tok, records, cfg)
    reward = lambda i, text, toks, fin: sum(float(fn(Sample(text, toks, fin, records[i]), cfg))  # noqa: E731
                                            for fn in reward_fns.values())
    return T.evaluate_labels(model, tok, prompts, [r["label"] for r in records], cfg.max_new_tokens,
                             cfg.rollout_batch, reward)


def load_rerank_set(path: str) -> dict:
    """rerank.py's inputs from one dir (queries.jsonl, docs.jsonl, run.trec, qrels.txt); 'demo' = demo/."""
    from .files import read_qrels, read_run, read_texts
    d = Path(__file__).resolve().parent.parent / "demo" if path == "demo" else Path(path)
    names = dict(queries="queries.jsonl", docs="docs.jsonl", run="run.trec", qrels="qrels.txt")
    missing = [n for n in names.values() if not (d / n).is_file()]
    if missing:
        raise UsageError(f"--eval-rerank {path}: missing {missing}")
    return dict(queries=read_texts(d / names["queries"], ("query", "text")),
                docs=read_texts(d / names["docs"], ("text", "content")),
                run=read_run(d / names["run"]), qrels=read_qrels(d / names["qrels"]))


@torch.no_grad()
def evaluate_rerank(model, tok, rr: dict, cfg, out_jsonl: Path) -> dict:
    """nDCG@10 of reranking the --eval-rerank set with the current policy (greedy, like rerank.py)."""
    from .metrics import evaluate
    from .rerank import rerank_run
    was = model.training
    model.eval()
    if out_jsonl.exists():
        out_jsonl.unlink()  # a fresh judgement of every query: the policy changed since last time
    run_ = rerank_run(model, tok, rr["queries"], rr["docs"], rr["run"], out_jsonl, top_k=cfg.eval_rerank_top_k,
                      fmt=cfg.format, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.rollout_batch)
    model.train(was)
    return dict(val_ndcg10=evaluate(run_, rr["qrels"], ["ndcg@10"])["ndcg@10"],
                first_stage_ndcg10=evaluate(rr["run"], rr["qrels"], ["ndcg@10"])["ndcg@10"])


# ----------------------------------------------------------------------------------------------
# configuration: `train.py grpo --help` is generated from it (training.parse_config); the options both
# stages take are in training.TrainConfig


@dataclass
class GRPOConfig(T.TrainConfig):
    data: str = T.required("training JSONL(.gz): query, document, label (0/1/2); an explanation is not needed")
    adapter: str | None = opt(None, "SFT LoRA adapter dir (peft layout): merged into the base; it becomes the "
                                    "reference policy and a fresh adapter is trained on top")
    # defaults = the recipe bench/grpo_learn.py measured best (README, GRPO "Measured")
    lora: str = opt("rl", "LoRA preset (rl: r 16, alpha 32, no dropout, every linear layer) or none = full "
                          "fine-tuning", (*lora.PRESETS, "none"))
    max_steps: int = opt(200, "GRPO steps: each samples --prompts-per-step x --group-size completions and takes "
                              "--updates-per-rollout optimizer steps on them")
    lr: float = opt(2e-4, "peak learning rate (measured best for LoRA r 16 from an SFT adapter)")
    adam_beta2: float = opt(0.99, "AdamW beta2")
    eval_every: int = opt(25, "validate every N steps (0: only at the end)")
    save_every: int = opt(50, "checkpoint every N steps (0: only at the end)")
    # rollouts
    group_size: int = opt(8, "G: completions sampled per prompt (8-16 in 2025 practice)")
    prompts_per_step: int = opt(8, "prompts (groups) per step, per rank")
    max_new_tokens: int = opt(512, "completion budget (also in validation); longer ones are cut (see --overlong)")
    max_prompt_len: int = opt(0, "cut each document until its prompt fits in N tokens, as `sft --max-len` cut SFT's; "
                                 "a record whose question alone is longer is dropped, as SFT drops it (0: no cut)")
    temperature: float = opt(1.0, "sampling temperature; the ratio's pi_old and pi_theta are the tempered "
                                  "distribution too (as in TRL)")
    rollout_batch: int = opt(64, "decode slots of the sampler (continuous batching)")
    shuffle: bool = opt(True, "a fresh random order each epoch; --no-shuffle reads the file in order, for steps "
                              "you composed yourself (bench/grpo_learn.py pairs each question's documents)")
    filter_groups: bool = opt(False, "DAPO dynamic sampling: resample until the step has --prompts-per-step "
                                     "groups whose rewards are not all equal")
    filter_max_tries: int = opt(3, "extra sampling rounds --filter-groups may take per step")
    overlong: str = opt("keep", "truncated completions: keep (trained like any other; measured better than "
                                "mask), mask (no loss) or penalty (reward -= --overlong-penalty)",
                        ("keep", "mask", "penalty"))
    overlong_penalty: float = opt(1.0, "reward subtracted from a truncated completion with --overlong penalty")
    # rewards
    reward: str = opt("exact,format", "comma-separated reward functions: exact, format, length, or a dotted "
                                      "path module.function taking (sample, cfg) -> float")
    reward_exact: float = opt(1.0, "exact reward: the stated label equals the reference")
    reward_partial: float = opt(0.5, "exact reward: the stated label is off by one")
    reward_wrong: float = opt(0.0, "exact reward: off by two, or no label")
    reward_format: float = opt(0.2, "format reward: a parseable label line and a proper stop")
    length_penalty: float = opt(0.1, "length reward: -length_penalty * tokens / max_new_tokens")
    # objective
    scale_rewards: str = opt("group", "advantage scaling: group std (GRPO paper, TRL), batch std, or none "
                                      "(Dr. GRPO)", ("group", "batch", "none"))
    loss_agg: str = opt("token", "loss aggregation: token (DAPO: all tokens of the batch), sequence (GRPO paper: "
                                 "per-completion mean), constant (Dr. GRPO: / (rows * max_new_tokens))",
                        ("token", "sequence", "constant"))
    clip_low: float = opt(0.2, "epsilon_low: ratio clipped below at 1 - clip_low")
    clip_high: float = opt(0.28, "epsilon_high: ratio clipped above at 1 + clip_high (DAPO clip-higher)")
    beta: float = opt(0.0, "KL coefficient to the reference policy (k3 estimator); 0 = no KL, no reference pass")
    updates_per_rollout: int = opt(1, "mu: optimizer steps on each rollout batch")
    eval_rerank: str | None = opt(None, "dir with queries.jsonl, docs.jsonl, run.trec, qrels.txt (rerank.py's "
                                        "inputs; 'demo' = the bundled demo): nDCG@10 of reranking at each eval")
    eval_rerank_top_k: int = opt(10, "documents reranked per query in --eval-rerank")

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise UsageError("--group-size must be >= 2 (advantages are relative to the group)")
        for name in ("prompts_per_step", "max_new_tokens", "updates_per_rollout", "max_steps", "rollout_batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"{T.flag(name)} must be >= 1")
        if self.temperature <= 0:
            raise UsageError(f"--temperature {self.temperature}: must be > 0 (GRPO samples)")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise UsageError("need 0 <= --clip-low < 1 and --clip-high >= 0")
        if self.beta > 0 and self.lora == "none":
            raise UsageError("--beta > 0 needs LoRA: the reference is the adapter switched off, never a second model")
        resolve_rewards(self.reward)


def main(argv=None) -> int:
    return T.main(GRPOConfig, run, argv, "train.py grpo", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
