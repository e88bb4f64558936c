"""The decoder: Llama 3.x, Qwen2/2.5 and Qwen3, configured from a Hugging Face config.json.

Parameter names are exactly the Hugging Face checkpoint names (model.layers.0.self_attn.q_proj.weight,
...), so loading a checkpoint is a plain state-dict copy and what we save loads in transformers/vLLM.
Numerics follow transformers on purpose (RoPE angles and RMSNorm in fp32, the same cast points), so
fp32 logits match it to ~1e-5 and bf16 logits match it as closely as two bf16 programs can.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclass
class ModelConfig:
    arch: str  # "llama", "qwen2" or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2 always; Llama and Qwen3 when the config says so)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    hf: dict = field(default_factory=dict, repr=False)  # the config.json we came from, saved back unchanged

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"minirank supports {sorted(ARCHITECTURES)} (model_type llama / qwen2 / qwen3)")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        try:
            n_heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            cfg = cls(
                arch=arch,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=n_heads,
                num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
                # Qwen3Config defaults head_dim to 128, not hidden // heads (Qwen3-0.6B: 1024 / 16 heads, 128)
                head_dim=hf.get("head_dim") or (128 if arch == "qwen3" else hidden // n_heads),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),  # transformers: Llama/Qwen2/Qwen3Config all default to 1e-6
                rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rope_scaling=_rope_scaling(hf),
                max_position_embeddings=hf.get("max_position_embeddings", 8192),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                attention_bias=True if arch == "qwen2" else hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False),
                qk_norm=arch == "qwen3",
                hf=dict(hf),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
        return cfg


def _rope_scaling(hf: dict) -> dict | None:
    # transformers 4.x writes "rope_scaling"; 5.x folds it into "rope_parameters". Accept both.
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"config.json: rope scaling type {kind!r} is not supported (only 'llama3')")
    return dict(rs)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1/3.2's frequency-dependent scaling.

    llama3 scaling leaves high frequencies alone, divides low frequencies (wavelength longer than
    original_max/low_freq_factor) by `factor`, and interpolates smoothly in between.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, T, head_dim] for per-row positions [B, T], computed in fp32."""
    angles = positions[..., None].float() * inv_freq  # [B, T, d/2]
    emb = torch.cat([angles, angles], dim=-1)  # rotate-half layout, the one HF checkpoints use
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [B, T, D]
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, cast back, then scale: the order transformers uses (matters in bf16)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        # Qwen2 has biases on q/k/v only; Llama's and Qwen3's attention_bias covers o_proj too
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b and cfg.arch != "qwen2")
        # Qwen3 normalises every head's q and k (one weight of head_dim, shared by all heads) before
        # RoPE: it bounds the attention logits, which is what lets it drop the qkv biases
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # the cache stores this step's k/v and hands back everything this row may attend to
            k, v = cache.update(self.layer_idx, k, v)
        if T == 1 and self.n_kv != self.n_heads:
            # one query position (decoding): the n_rep query heads sharing a kv head become n_rep
            # query rows of that head, so SDPA needs no GQA expansion (enable_gqa is 5-7x slower
            # here in bf16 on a CPU); query head h still meets kv head h // n_rep, as in HF
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv, -1, self.head_dim), k, v, attn_mask=mask)
            y = y.view(B, self.n_heads, 1, self.head_dim)
        elif mask is None:
            # no cache, no padding: plain causal attention (a fully masked row cannot happen)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=b)
        self.up_proj = nn.Linear(h, f, bias=b)
        self.down_proj = nn.Linear(f, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    def reset_parameters(self):
        # A model built on the meta device is about to receive its real weights; and normal_() on
        # meta would import PyTorch's Python meta kernels (~70 MB of RSS, once per process).
        if not self.weight.is_meta:
            super().reset_parameters()


class Decoder(nn.Module):
    """The body; named `model` inside Transformer so keys read model.layers.N...."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Causal LM. `model(ids)` -> logits [B, T, vocab]; `model.hidden(...)` + `model.head(h)` to pay
    for the LM head only at the positions a loss or a sample needs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        # tied checkpoints (Llama 3.2, SmolLM2, small Qwen2.5) have no lm_head tensor at all
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # ids >= this are never sampled (Qwen2.5's embedding has more rows than the tokenizer has tokens);
        # minirank.load sets it from the tokenizer
        self.n_tokens = cfg.vocab_size
        self.gradient_checkpointing = False

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def hidden(self, input_ids, positions=None, mask=None, cache=None):
        """Final-norm hidden states [B, T, hidden].

        positions: [B, T] absolute positions (default 0..T-1 for every row) — per-row, so left- or
          right-padded rows and cached decoding all get the right RoPE angles.
        mask: optional bool [B, 1, T, S] (True = may attend) for padding / cached decoding; None means
          plain causal over the T tokens given. Every query row must attend to at least one key:
          SDPA returns NaN for a fully masked row.
        cache: optional KV cache object with `update(layer_idx, k, v) -> (k_all, v_all)`.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        # recomputed per call (cheap, [head_dim/2] values): a buffer would be cast to bf16 by model.to()
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, x.device), positions, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.model.norm(x)

    def head(self, h):
        """Logits over the tokenizer's tokens [..., n_tokens]. Embedding rows past n_tokens (Qwen2.5
        pads 151,665 tokens to 151,936 rows) get no logit at all, so no caller — sampler, trainer,
        reranker — can sample them or spread probability mass over them: they agree by construction."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w[: self.n_tokens])

    def token_logprobs(self, h, targets, chunk: int = 1024):
        """log p(targets) [N] from hidden states h [N, hidden] (only the positions that carry a loss).

        The LM head and log-softmax run `chunk` rows at a time, in fp32. Under autograd each chunk is
        checkpointed: its [chunk, vocab] logits are freed after the forward and recomputed in the
        backward, so a 128k vocabulary never holds [N, vocab] fp32 for a whole batch. Same ops as the
        sampler (head -> float -> log_softmax), so sampler and trainer log-probs agree."""
        out = []
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i:i + chunk], targets[i:i + chunk]
            if torch.is_grad_enabled() and hc.requires_grad:
                out.append(checkpoint(self._chunk_logprobs, hc, tc, use_reentrant=False))
            else:
                out.append(self._chunk_logprobs(hc, tc))
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def _chunk_logprobs(self, h, targets):
        logp = torch.log_softmax(self.head(h).float(), dim=-1)
        return logp.gather(-1, targets[:, None])[:, 0]

    def forward(self, input_ids, positions=None, mask=None, cache=None):
        return self.head(self.hidden(input_ids, positions, mask, cache))
