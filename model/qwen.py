"""A Qwen2-style decoder-only transformer in one readable file (Qwen technical report sec. 2.3 and 2.5).

Architecture (sec. 2.3): pre-norm RMSNorm, SwiGLU MLP, rotary position embeddings with inverse frequencies kept in
fp32, bias on the QKV projections only, grouped-query attention (CELLM's GQA configuration), untied input and output
embeddings by default. Parameter names equal Hugging Face's `Qwen2ForCausalLM`, so checkpoints map one to one.
Qwen3 dense (`model_type="qwen3"`, Hugging Face's `Qwen3ForCausalLM`) is the same network with two changes: no
bias on q/k/v, and an RMSNorm over each head's query and key (`q_norm`, `k_norm`, weight (hd,)) before rotary.

Inference-time context extension (sec. 2.5), all off by default:
- NTK-aware interpolation: a larger rotary base, base * factor^(d / (d - 2)).
- dynamic NTK: the same with factor chosen from the current length (Qwen-1's rule: alpha = 2^ceil(log2(len/L) + 1) - 1).
- LogN attention scaling: queries at position p > L are scaled by log_L(p), keeping attention entropy stable.
- layer-wise window attention: layers from `max_window_layers` on see only the last `sliding_window` keys
  (Hugging Face Qwen2 semantics, so such configs load unchanged).

Shapes: B batch, T query length, S key length (cache + T), H hidden, nh heads, nkv key/value heads, hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


MODEL_TYPES = ("qwen2", "qwen3")


@dataclass
class QwenConfig:
    model_type: str = "qwen2"
    """'qwen2' (bias on q/k/v) or 'qwen3' (no q/k/v bias; per-head RMSNorm on queries and keys before rotary)."""
    vocab_size: int = 151936
    """Rows of the embedding and output matrices (Qwen2 pads the 151,646 tokens to 151,936)."""
    hidden_size: int = 896
    """Width H of the residual stream."""
    intermediate_size: int = 4864
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 24
    """Number of decoder layers L."""
    num_attention_heads: int = 14
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads; num_attention_heads must be a multiple (grouped-query attention)."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 32768
    """Longest context the model is configured for."""
    rope_theta: float = 1000000.0
    """Rotary base."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (training only)."""
    hidden_dropout: float = 0.0
    """Dropout on each residual branch output (training only; Qwen2 has none, offered for small-data SFT)."""
    # Context extension (sec. 2.5); vLLM cannot reproduce these, so the vLLM engine refuses such a config.
    rope_train_len: int | None = None
    """Training context length L used by dynamic NTK and LogN; None means max_position_embeddings."""
    ntk_factor: float = 1.0
    """Static NTK-aware interpolation factor (1.0 = off)."""
    use_dynamic_ntk: bool = False
    """Choose the NTK factor from the current sequence length at every forward."""
    use_logn_attn: bool = False
    """Scale queries past position L by log_L(position)."""
    use_sliding_window: bool = False
    """Window attention on layers >= max_window_layers."""
    sliding_window: int | None = None
    """Window length in tokens when use_sliding_window is on."""
    max_window_layers: int = 0
    """Layers below this index keep full attention."""
    extra: dict = field(default_factory=dict)
    """Other config.json keys, carried through save/load unchanged (e.g. bos/eos ids)."""

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.use_sliding_window and not self.sliding_window:
            raise ValueError("use_sliding_window=True needs sliding_window > 0")

    @property
    def extends_context(self) -> bool:
        """True when a sec. 2.5 feature is on that Hugging Face Qwen2 and vLLM do not implement."""
        return self.ntk_factor != 1.0 or self.use_dynamic_ntk or self.use_logn_attn

    @property
    def qk_norm(self) -> bool:
        """Qwen3: RMSNorm over each head's query and key before rotary."""
        return self.model_type == "qwen3"

    def window_for_layer(self, i: int) -> int | None:
        return self.sliding_window if self.use_sliding_window and i >= self.max_window_layers else None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d.pop("extra"), **d}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 whatever the input dtype, as Qwen2 does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: QwenConfig, total_len: int) -> torch.Tensor:
    """Inverse frequencies (hd/2,) in fp32, with NTK-aware or dynamic NTK scaling applied to the base."""
    d = cfg.head_dim
    alpha = cfg.ntk_factor
    if cfg.use_dynamic_ntk:
        train_len = cfg.rope_train_len or cfg.max_position_embeddings
        context_value = math.log(total_len / train_len, 2) + 1
        alpha = max(2 ** math.ceil(context_value) - 1, 1) * alpha
    base = cfg.rope_theta * alpha ** (d / (d - 2)) if alpha != 1.0 else cfg.rope_theta
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, hd) for integer positions (B, T); the angles are computed in fp32."""
    angles = position_ids.float()[..., None] * inv_freq.to(position_ids.device)[None, None, :]  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, n, T, hd); rotate pairs (i, i + hd/2) as Hugging Face's rotate_half does."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys and values per layer, (B, nkv, S, hd) each, grown by concatenation during generation."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, i: int, k, v):
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], dim=2)
            v = torch.cat([self.values[i], v], dim=2)
        self.keys[i], self.values[i] = k, v
        return k, v

    def select(self, rows: torch.Tensor):
        """Keep only the given batch rows (finished sequences dropped by a generation loop)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = not cfg.qk_norm  # Qwen2: bias on q/k/v; Qwen3: none
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        # Qwen3: per-head RMSNorm of q and k (weights (hd,)); Identity (no parameters) for Qwen2.
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask, logn, cache: KVCache | None):
        B, T, _ = x.shape
        nh, nkv, hd = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, nh, hd)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, nkv, hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if logn is not None:
            q = q * logn[:, None, :, None]  # (B, 1, T, 1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.cfg.attention_dropout if self.training else 0.0,
            enable_gqa=nkv != nh)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, cos, sin, mask, logn, cache):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, logn, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def build_attention_mask(attention_mask, position_ids, past_len: int, T: int, window: int | None):
    """Boolean (B, 1, T, S) mask: True where query t may attend key s.

    Allowed: causal (by absolute index in the padded row), key not padding, inside the sliding window if any, and,
    without a cache, the same packed document (a document starts where position_ids is 0). A query row that would
    see nothing (a left-pad position) is allowed itself so SDPA returns finite values there; such rows are padding.
    """
    B, S = attention_mask.shape
    dev = attention_mask.device
    q_idx = torch.arange(past_len, past_len + T, device=dev)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=dev)[None, :]  # (1, S)
    allowed = (k_idx <= q_idx)[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)[None]
    if past_len == 0:
        doc = torch.cumsum((position_ids == 0).long(), dim=1)  # (B, T) document index per token
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    allowed = allowed | (q_idx == k_idx)[None]
    return allowed[:, None]


class QwenModel(nn.Module):
    """Embeddings, decoder layers and final norm; returns hidden states (B, T, H)."""

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T = x.shape[:2]
        past = 0 if cache is None else cache.length
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if position_ids is None:
            # Count real tokens so left padding does not shift positions.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        cfg = self.cfg
        cos, sin = rope_cos_sin(rope_inv_freq(cfg, past + T), position_ids, x.dtype)
        logn = None
        if cfg.use_logn_attn:
            L = cfg.rope_train_len or cfg.max_position_embeddings
            logn = (torch.log(position_ids.float() + 1) / math.log(L)).clamp(min=1.0).to(x.dtype)  # (B, T)
        masks = {}
        for i, layer in enumerate(self.layers):
            w = cfg.window_for_layer(i)
            if w not in masks:
                masks[w] = build_attention_mask(attention_mask, position_ids, past, T, w)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks[w], logn, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[w], logn, cache)
        return self.norm(x)


class QwenForCausalLM(nn.Module):
    """Backbone + output layer. `forward` returns logits (B, T, V); training code should instead take hidden
    states from `get_decoder()` and use `model.logprobs.token_logprobs`, which never holds (B, T, V) in fp32."""

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_decoder(self) -> QwenModel:
        return self.model

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def gradient_checkpointing_enable(self, **_):
        self.model.gradient_checkpointing = True

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))  # (B, T, V)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Normal(0, std) for matrices, zeros for biases, ones for norms (Qwen2's initializer_range)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self
