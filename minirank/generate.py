"""Sampling with a static KV cache: prefill, then one token at a time, many prompts in flight.

The cache is one preallocated buffer per layer, [slots, n_kv, max_len, head_dim]. Each slot holds
one sequence contiguously from index 0, so a row's write index is its own length, its RoPE position
equals its cache index, and the decode mask is just `arange(S) <= pos[b]` — mixed prompt lengths
need no padding bookkeeping at all.

    prompt  --prefill (once per prompt, right-padded chunks)-->  K/V straight into its first slot
            --slot-to-slot copy for the other n-1 rows of a GRPO group (no recomputation)
    decode  --one token for every live slot per step-->  finished rows free their slot, the
              next waiting row takes it (continuous batching); with nothing waiting, the batch
              shrinks instead so finished rows cost nothing.

Reading order: `generate` sets up and loops refill -> compact -> decode over `_Slots`, the one object
holding the scheduling state; `_Slots.admit` is prefill -> fork -> first token; `_Rows` records
tokens and decides when a row is done. The KV cache is sized before it exists: slots are capped by
`kv_cache_bytes` (default: half the free CUDA memory, 4 GiB elsewhere).

Randomness is a pure function of (seed, row, step): each row draws its uniform from a counter-based
hash, so the samples of a row do not depend on batch_size, slot order or what else is in the batch
(up to the float noise of batched matmuls), and the sampler has no hidden state to capture in a
compiled graph.
"""

import warnings
from collections import deque
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """One entry per row, prompt-major: prompt 0's n samples first."""
    tokens: list[list[int]]  # new ids; the stop id / the token completing a stop string included
    logprobs: list[list[float]]  # log p(token) at temperature 1, no truncation (what GRPO needs)
    sample_logprobs: list[list[float]]  # log-prob under the distribution actually sampled (0 if greedy)
    finish_reasons: list[str]  # "stop" (stop id or stop string) or "length"
    texts: list[str] | None = None  # decoded tokens (a trailing stop id left out) when a tokenizer is given
    # with watch_ids: per step, the T=1 log-probs of those ids (the reranker reads its label distribution)
    watched: list[list[list[float]]] | None = None
    stats: dict = field(default_factory=dict)  # prefill_tokens, decode_steps, decode_rows, ...


class KVCache:
    """Per layer, k and v buffers [slots, n_kv, max_len, head_dim], allocated once."""

    def __init__(self, cfg, slots, max_len, dtype, device):
        self.slots, self.max_len = slots, max_len
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        if torch.device(device).type == "cuda":
            # CUDA graphs replay fixed addresses: tell the compiler these buffers never move
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    def move(self, dst: int, src: int, length: int):
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class _SlotView:
    """What the model's attention sees while decoding: write this step's k/v at each row's own
    position, hand back the first S entries of every row (the mask hides what a row must not see)."""

    def __init__(self, ks, vs, pos, S):
        self.ks, self.vs, self.pos, self.S = ks, vs, pos, S

    def update(self, i, k, v):
        B, n_kv, _, d = k.shape
        idx = self.pos.view(B, 1, 1, 1).expand(B, n_kv, 1, d)
        kb, vb = self.ks[i][:B], self.vs[i][:B]
        kb.scatter_(2, idx, k)
        vb.scatter_(2, idx, v)
        return kb[:, :, :self.S], vb[:, :, :self.S]


class _PrefillView:
    """Prefill-time cache: each row's k/v go straight into its slot, after the P shared-prefix entries
    already there. Attention runs over the chunk itself (P = 0: plain causal) or over prefix + chunk.
    Pads' k/v land past the row's length, where decoding overwrites them before any query may see them."""

    def __init__(self, cache, slots, P=0):
        self.cache, self.slots, self.P = cache, slots, P

    def update(self, i, k, v):
        P, T = self.P, k.shape[2]
        self.cache.k[i][self.slots, :, P:P + T] = k
        self.cache.v[i][self.slots, :, P:P + T] = v
        if not P:
            return k, v
        return self.cache.k[i][self.slots, :, :P + T], self.cache.v[i][self.slots, :, :P + T]


# ---- counter-based randomness: a 32-bit integer hash evaluated in int64 without overflow ----

_M32 = 0xFFFFFFFF


def _mul32(x, c):
    # (x * c) mod 2^32 for x < 2^32, split so no int64 product exceeds 2^48
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    # "lowbias32" (C. Wellons): a bijection on 32 bits with near-ideal avalanche
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_key(seed: int) -> int:
    return _hash32((seed & _M32) ^ _hash32((seed >> 32) & _M32))  # plain ints: the hash is the same code


def _uniform(key, rows, steps):
    """One uniform in [0, 1 - 2^-32] per (seed, row, step), float64. key: _seed_key(seed), a tensor
    (not a Python int, so a new seed does not recompile the decode step)."""
    h = _hash32(key ^ (rows & _M32))
    h = _hash32(h ^ (steps & _M32))
    return h.double() * 2.0 ** -32


def _nucleus_candidates(logp, top_p):
    """The most likely tokens, sorted, enough of them to hold every row's nucleus. A full sort of a
    50k-150k vocabulary costs as much as a decode step on a CPU, while a nucleus is almost always a
    few hundred tokens at most: try the top 256, widen x8 only for a batch where that is too little."""
    V = logp.shape[-1]
    k = V if torch.compiler.is_compiling() else min(V, 256)  # compiled: no data-dependent control flow
    while True:
        vals, idx = logp.topk(k, -1)  # sorted, descending
        if k == V or bool((vals.exp().cumsum(-1, dtype=torch.float64)[:, -1] >= top_p).all()):
            return vals, idx
        k = min(V, 8 * k)


def sample(logits, u, temperature=0.0, top_k=0, top_p=1.0):
    """logits [B, V] fp32 (unsampleable ids already -inf), u [B] uniforms ->
    (token [B], logprob at T=1 untruncated [B], logprob under the sampling distribution [B]).

    temperature -> top-k -> top-p (keep the smallest prefix of the sorted, top-k-renormalised
    distribution whose mass reaches top_p; never empty), then inverse-CDF sampling with u in float64.
    Few [B, V] temporaries on purpose: on a CPU each fresh one costs page faults, not just flops.
    """
    logp = torch.log_softmax(logits, -1)
    if temperature <= 0:
        tok = logits.argmax(-1, keepdim=True)
        return tok[:, 0], logp.gather(-1, tok)[:, 0], torch.zeros_like(logp[:, 0])
    V, idx = logits.shape[-1], None
    scores = logits if temperature == 1 else logits / temperature
    if 0 < top_k < V:
        scores, idx = scores.topk(top_k, -1)  # sorted, descending
        slogp = torch.log_softmax(scores, -1)
    else:
        slogp = logp if temperature == 1 else torch.log_softmax(scores, -1)
    if top_p < 1.0:
        if idx is None:
            slogp, idx = _nucleus_candidates(slogp, top_p)
        p = slogp.exp()
        drop = (p.cumsum(-1, dtype=torch.float64) - p) >= top_p  # mass before this token reaches top_p
        drop[:, 0] = False
        slogp = torch.log_softmax(slogp.masked_fill(drop, float("-inf")), -1)
    # probabilities in fp32 (the model's own precision), accumulated in fp64 so the tail keeps its mass
    cdf = slogp.exp().cumsum(-1, dtype=torch.float64)
    # first index whose cdf exceeds u*total: a token with zero mass can never be hit
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
    tok = j if idx is None else idx.gather(-1, j)
    return tok[:, 0], logp.gather(-1, tok)[:, 0], slogp.gather(-1, j)[:, 0]


def _logits(model, h):
    return model.head(h).float()  # over real tokens only: model.head leaves out padded embedding rows


def _sample_watch(logits, u, temperature, top_k, top_p, watch):
    res = sample(logits, u, temperature, top_k, top_p)
    if watch is None:
        return res
    return (*res, logits[:, watch] - logits.logsumexp(-1, keepdim=True))  # T=1 log-probs of watch ids


def decode_step(model, ks, vs, ids, pos, S, rows, steps, key, temperature, top_k, top_p, watch=None):
    """One token for each of B rows: feed ids [B] at positions pos [B], sample the next.
    All shapes depend only on (B, S), so this is what `compile=True` hands to torch.compile."""
    mask = (torch.arange(S, device=ids.device) <= pos[:, None])[:, None, None, :]
    h = model.hidden(ids[:, None], pos[:, None], mask, _SlotView(ks, vs, pos, S))
    return _sample_watch(_logits(model, h[:, 0]), _uniform(key, rows, steps), temperature, top_k, top_p, watch)


_compiled = {}


def _compiled_step(device_type):
    if device_type not in _compiled:
        # CUDA: CUDA graphs remove the per-kernel launch cost that dominates batch-1 decode
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[device_type]


def prefill(model, prompts, cache, slots, prefix_kv=None):
    """Run prompts right-padded as one batch, writing prompt b's K/V into cache slot slots[b];
    return the logits after each prompt's last token [B, V]. Right padding keeps every real
    token's position = its index, and plain causal attention never lets a real token see a pad.
    prefix_kv: per layer (k, v) [1, n_kv, P, d] of P tokens every prompt continues: copied into each
    slot first, the prompts then sit at positions P.. and attend to them (computed once, not B times)."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    dev = model.device
    slots = torch.tensor(slots, device=dev)
    positions = mask = None
    P = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
    if P:
        for i, (k, v) in enumerate(prefix_kv):
            cache.k[i][slots, :, :P] = k
            cache.v[i][slots, :, :P] = v
        positions = (P + torch.arange(T, device=dev)).expand(len(prompts), T)
        mask = (torch.arange(P + T, device=dev) <= positions[0, :, None])[None, None]  # the prefix, then causal
    h = model.hidden(ids.to(dev), positions, mask, _PrefillView(cache, slots, P))
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    return _logits(model, h[torch.arange(len(prompts), device=dev), last])  # the LM head only where needed


def _chunks(prompt_ids, lengths, budget):
    # longest first; a chunk grows while it stays within `budget` padded tokens and wastes < 20% on pads
    order = sorted(prompt_ids, key=lambda p: -lengths[p])
    chunk = []
    for p in order:
        if chunk and ((len(chunk) + 1) * lengths[chunk[0]] > budget
                      or sum(lengths[q] for q in chunk + [p]) < 0.8 * (len(chunk) + 1) * lengths[chunk[0]]):
            yield chunk
            chunk = []
        chunk.append(p)
    if chunk:
        yield chunk


def _to_host(res):
    """(tokens, logprobs, sample logprobs[, watched]) -> [(int, float, float, list | None)] per row."""
    tok, lp, slp = torch.stack([t.double() for t in res[:3]]).tolist()
    watched = res[3].tolist() if len(res) > 3 else [None] * len(tok)
    return [(int(t), a, b, w) for t, a, b, w in zip(tok, lp, slp, watched)]


def _default_stop_ids(model, tokenizer):
    for src in (model, tokenizer):
        ids = getattr(src, "stop_ids", None)
        if ids is not None:
            return list(ids)
    eos = model.config.hf.get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# ---- how many slots: the KV cache is allocated up front, so its size is bounded before it exists

KV_CACHE_BYTES = 4 * 2 ** 30  # default budget off-GPU
KV_CACHE_GPU_FRACTION = 0.5  # default budget on CUDA: this share of the memory free at call time


def default_kv_cache_bytes(device) -> int:
    """The KV-cache budget when none is given: half the CUDA memory still free (the weights are
    loaded by then; the other half is for activations and the [batch, vocab] logits), 4 GiB elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        # memory PyTorch keeps cached (e.g. the previous call's KV cache) is free for us too: without
        # it, every generate() in a training loop would see a smaller budget than the one before
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(KV_CACHE_GPU_FRACTION * (torch.cuda.mem_get_info(device)[0] + cached))
    return KV_CACHE_BYTES


def kv_bytes_per_slot(cfg, max_len: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one sequence of max_len tokens."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * max_len * dtype.itemsize


def _slot_count(cfg, rows, batch_size, max_len, dtype, budget):
    per_slot = kv_bytes_per_slot(cfg, max_len, dtype)
    if per_slot > budget:
        raise ValueError(
            f"generate: one sequence of up to {max_len} tokens needs {per_slot / 2 ** 20:.1f} MiB of KV cache "
            f"({cfg.num_hidden_layers} layers x k,v x {cfg.num_key_value_heads} kv heads x {cfg.head_dim} x "
            f"{dtype}), more than kv_cache_bytes={budget} ({budget / 2 ** 20:.1f} MiB): raise kv_cache_bytes "
            f"or use shorter prompts / fewer max_new_tokens")
    slots = min(batch_size or rows, rows, budget // per_slot)
    if batch_size and slots < min(batch_size, rows):  # asked for explicitly: say why it is not granted
        warnings.warn(f"generate: batch_size={batch_size} capped to {slots} slots by kv_cache_bytes={budget} "
                      f"({per_slot / 2 ** 20:.1f} MiB of KV cache per slot)", stacklevel=3)
    return slots


# ---- the rows: what each has produced, and when it is done

class _Rows:
    """Every row's output so far (an unfinished `Generation`) and the rule that ends a row."""

    def __init__(self, R, max_new_tokens, stops, stop_strings, decode, watch):
        self.out = Generation([[] for _ in range(R)], [[] for _ in range(R)], [[] for _ in range(R)],
                              ["length"] * R, watched=[[] for _ in range(R)] if watch else None,
                              stats=dict(prefill_tokens=0, decode_steps=0, decode_rows=0))
        self.max_new_tokens, self.stops, self.stop_strings, self.decode = max_new_tokens, stops, stop_strings, decode
        # a stop string can only have been completed within its last few tokens: decode just that window
        self.window = 2 * max((len(s) for s in stop_strings), default=0) + 8

    def push(self, r, tok, lp, slp, w) -> bool:
        """Record row r's next token; True once the row is finished."""
        o = self.out
        o.tokens[r].append(tok), o.logprobs[r].append(lp), o.sample_logprobs[r].append(slp)
        if o.watched is not None:
            o.watched[r].append(w)
        if tok in self.stops:
            o.finish_reasons[r] = "stop"
            return True
        if self.stop_strings:
            text = self.decode(o.tokens[r][-self.window:])
            if any(s in text for s in self.stop_strings):
                o.finish_reasons[r] = "stop"
                return True
        return len(o.tokens[r]) >= self.max_new_tokens


# ---- the slots: prefill -> fork -> decode -> refill, with all scheduling state in one place

class _Slots:
    """The decode batch. Row r is sample r % n of prompt r // n.

    slot_row[s]  the row decoding in slot s (-1: idle)
    pos[s]       its sequence length so far = where its next token's K/V go = that token's position
    cur[s]       the token it feeds next
    B            slots in the decode batch: all while rows wait, then only live ones (compaction)
    waiting      rows without a slot yet, prompt-major, so a GRPO group arrives together
    saved        prompt -> (K, V, last logits), kept while some of its rows still wait for a slot
    left         prompt -> how many of its rows are not admitted yet
    """

    def __init__(self, model, prompts, n, rows: _Rows, cache: KVCache, key, sampling: dict,
                 prefill_tokens: int, admit_min: int, prefix_kv=None):
        self.model, self.prompts, self.n, self.rows, self.cache = model, prompts, n, rows, cache
        self.key, self.sampling = key, sampling  # sampling: temperature, top_k, top_p, watch
        self.prefill_tokens, self.admit_min, self.prefix_kv = prefill_tokens, admit_min, prefix_kv
        self.new = [len(p) for p in prompts]  # tokens a prefill computes
        P = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        self.lengths = [P + m for m in self.new]  # tokens in the cache after it
        self.stats = rows.out.stats
        slots = cache.slots
        self.slot_row, self.pos, self.cur, self.B = [-1] * slots, [0] * slots, [0] * slots, slots
        self.waiting = deque(range(len(prompts) * n))
        self.saved, self.left = {}, {}

    def live(self) -> list[int]:
        return [s for s in range(self.B) if self.slot_row[s] >= 0]

    def refill(self):
        """Give free slots to waiting rows. A prefill reads every weight once, like a decode step, so
        on a CPU prefilling several prompts together is much cheaper than one by one; a slot idling a
        few steps costs little (a decode step's price hardly depends on the batch)."""
        while self.waiting and 0 < (free := self.slot_row[:self.B].count(-1)) and (
                free >= min(self.admit_min, len(self.waiting)) or free == self.B):
            self.admit()  # loops: a row can finish on its very first token and free its slot again

    def admit(self):
        """Waiting rows take the free slots: prefill their new prompts, fork each prompt's K/V to
        the rest of its rows, sample every admitted row's first token."""
        free = [s for s in range(self.B) if self.slot_row[s] < 0]
        take = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        by_prompt = {}  # prompt -> the slots its admitted rows get
        for r, s in zip(take, free):
            by_prompt.setdefault(r // self.n, []).append(s)
        first = self.prefill([p for p in by_prompt if p not in self.saved], by_prompt)
        for p, ss in by_prompt.items():
            first[p] = self.fork(p, ss, first.get(p))
        self.first_tokens(take, free, first)

    def prefill(self, new, by_prompt) -> dict:
        """Prefill prompts `new` in chunks of at most `prefill_tokens` padded tokens, each into the first
        slot it was given -> {prompt: logits after its last token}."""
        first = {}
        for chunk in _chunks(new, self.new, self.prefill_tokens):
            logits = prefill(self.model, [self.prompts[p] for p in chunk], self.cache, [by_prompt[p][0] for p in chunk],
                             self.prefix_kv)
            first.update(zip(chunk, logits))
            self.left.update((p, self.n) for p in chunk)
            self.stats["prefill_tokens"] += sum(self.new[p] for p in chunk)
        return first

    def fork(self, p, slots, logits):
        """Copy prompt p's K/V into the slots of its other rows: the rest of a GRPO group reuses one
        prefill, no recomputation. Returns the logits after the prompt's last token."""
        L, cache, admitted = self.lengths[p], self.cache, len(slots)
        if p in self.saved:  # a group admitted in pieces: its K/V were kept aside
            k, v, logits = self.saved[p]
        else:  # the first slot holds the fresh prefill
            k = [c[slots[0], :, :L] for c in cache.k]
            v = [c[slots[0], :, :L] for c in cache.v]
            slots = slots[1:]
        for s in slots:
            for i in range(len(k)):
                cache.k[i][s, :, :L] = k[i]
                cache.v[i][s, :, :L] = v[i]
        self.left[p] -= admitted
        if self.left[p] and p not in self.saved:  # more rows than free slots: keep the prompt's K/V
            self.saved[p] = ([t.clone() for t in k], [t.clone() for t in v], logits)
        elif not self.left[p]:
            self.saved.pop(p, None)
            del self.left[p]
        return logits

    def first_tokens(self, take, free, first):
        """Each admitted row's first new token comes from its prompt's last logits (step 0)."""
        rows = torch.tensor(take, device=self.model.device)
        logits = torch.stack([first[r // self.n] for r in take])
        res = _sample_watch(logits, _uniform(self.key, rows, torch.zeros_like(rows)), **self.sampling)
        for r, s, (tok, lp, slp, w) in zip(take, free, _to_host(res)):
            if not self.rows.push(r, tok, lp, slp, w):
                self.slot_row[s], self.pos[s], self.cur[s] = r, self.lengths[r // self.n], tok

    def compact(self):
        """With nothing left to admit, move live rows to the front so the batch is only live rows
        (finished rows then cost nothing)."""
        live = self.live()
        if self.waiting or len(live) == self.B:
            return
        holes = [s for s in range(len(live)) if self.slot_row[s] < 0]
        for dst, src in zip(holes, [s for s in live if s >= len(live)]):
            self.cache.move(dst, src, self.pos[src])
            self.slot_row[dst], self.pos[dst], self.cur[dst] = self.slot_row[src], self.pos[src], self.cur[src]
            self.slot_row[src] = -1
        self.B = len(live)

    def decode(self, step_fn, fixed_shape: bool):
        """One token for every slot of the batch; a finished row frees its slot."""
        B, dev = self.B, self.model.device
        if fixed_shape:
            S = self.cache.max_len  # compiled: one shape forever, a single graph to capture
        else:
            # eager: attend over the longest live row only (rounded to 8), not the whole cache
            S = min(self.cache.max_len, -(-(max(self.pos[:B]) + 1) // 8) * 8)
        rows = [max(self.slot_row[s], 0) for s in range(B)]
        steps = [len(self.rows.out.tokens[r]) for r in rows]
        res = step_fn(self.model, self.cache.k, self.cache.v, torch.tensor(self.cur[:B], device=dev),
                      torch.tensor(self.pos[:B], device=dev), S, torch.tensor(rows, device=dev),
                      torch.tensor(steps, device=dev), self.key, **self.sampling)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += B
        for s, (tok, lp, slp, w) in enumerate(_to_host(res)):
            r = self.slot_row[s]
            if r < 0:
                continue  # an idle slot computed garbage at position 0 (compiled: fixed batch)
            if self.rows.push(r, tok, lp, slp, w):
                self.slot_row[s], self.pos[s], self.cur[s] = -1, 0, 0
            else:
                self.pos[s] += 1
                self.cur[s] = tok


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop_ids=None,
             seed=None, n=1, batch_size=None, stop_strings=None, tokenizer=None, compile=False,
             prefill_tokens=2048, admit_min=1, watch_ids=None, kv_cache_bytes=None, prefix=None):
    """Sample `n` completions of each prompt (lists of token ids); see `Generation` for the result.

    stop_ids: None -> the model's own eos/end-of-turn ids (model.stop_ids, else tokenizer.stop_ids,
      else config eos_token_id); [] -> never stop early. stop_strings need `tokenizer` (anything with
      .decode(ids), or a callable ids -> str). batch_size: decode slots (default: all rows at once);
      more rows than slots stream through them. seed: same seed -> same samples (None: drawn from
      torch's global RNG). compile: torch.compile the decode step (CUDA graphs on GPU); it then runs
      at a fixed batch and attends over the whole cache so shapes never change.
    kv_cache_bytes: the KV cache's budget; slots are capped at budget // bytes per slot (see
      `default_kv_cache_bytes`: half the free CUDA memory, 4 GiB elsewhere). Raises ValueError when
      a single sequence does not fit. out.stats["slots"] says how many slots were used.
    prefill_tokens: padded-token budget of one prefill batch. admit_min: refill only once this many
      slots are free (prefills then share one pass over the weights; 1 = refill at once).
    watch_ids: token ids whose T=1 log-probs are recorded at every step (out.watched).
    prefix: ids that every prompt continues (the prompt is prefix + prompts[i]): prefilled once,
      its K/V copied into each row's slot (the reranker's instructions + question, shared by every
      candidate document). Same results as passing the whole prompts, up to float noise.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if n < 1 or max_new_tokens < 0:
        raise ValueError("need n >= 1 and max_new_tokens >= 0")
    stops = set(_default_stop_ids(model, tokenizer) if stop_ids is None else stop_ids)
    decode = getattr(tokenizer, "decode", None) or (tokenizer if callable(tokenizer) else None)
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a tokenizer (or a decode function) to see text")
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())
    R, dev = len(prompts) * n, model.device
    rows = _Rows(R, max_new_tokens, stops, list(stop_strings or []), decode, watch_ids is not None)
    out = rows.out
    if R == 0 or max_new_tokens == 0:
        out.texts = [""] * R if decode else None
        return out

    P = len(prefix or [])
    max_len = -(-(P + max(len(p) for p in prompts) + max_new_tokens) // 64) * 64
    budget = default_kv_cache_bytes(dev) if kv_cache_bytes is None else kv_cache_bytes
    slots = _slot_count(model.config, R, batch_size, max_len, model.dtype, budget)
    out.stats["slots"] = slots
    cache = KVCache(model.config, slots, max_len, model.dtype, dev)
    prefix_kv = None
    if P:  # the shared prefix, prefilled once into a one-slot cache of its own
        pc = KVCache(model.config, 1, P, model.dtype, dev)
        prefill(model, [list(prefix)], pc, [0])
        prefix_kv = list(zip(pc.k, pc.v))
        out.stats["prefill_tokens"] += P
    watch = None if watch_ids is None else torch.tensor(list(watch_ids), dtype=torch.long, device=dev)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, watch=watch)
    batch = _Slots(model, prompts, n, rows, cache, torch.tensor(_seed_key(seed), device=dev), sampling,
                   prefill_tokens, admit_min, prefix_kv)
    step_fn = _compiled_step(dev.type) if compile else decode_step
    while True:
        batch.refill()
        if not batch.live():
            break
        if not compile:  # compiled: the batch keeps one shape
            batch.compact()
        batch.decode(step_fn, fixed_shape=compile)

    if decode is not None:
        out.texts = [decode(t[:-1] if t and t[-1] in stops else t) for t in out.tokens]
    return out
