"""A Qwen2-style decoder-only transformer in one readable file (Qwen technical report sec. 2.3 and 2.5).

Architecture (sec. 2.3): pre-norm RMSNorm, SwiGLU MLP, rotary position embeddings with inverse frequencies kept in
fp32, bias on the QKV projections only, grouped-query attention (CELLM's GQA configuration), untied input and output
embeddings by default. Parameter names equal Hugging Face's `Qwen2ForCausalLM`, so checkpoints map one to one.
Qwen3 dense (`model_type="qwen3"`, Hugging Face's `Qwen3ForCausalLM`) is the same network with two changes: no
bias on q/k/v, and an RMSNorm over each head's query and key (`q_norm`, `k_norm`, weight (hd,)) before rotary.

Context extension (sec. 2.5), all off by default. The report's three techniques are training-free: as in Qwen's
public implementation they act in eval mode only (decoding, scoring), and a training forward is the plain model,
unless `extend_context_in_training` is set.
- dynamic NTK-aware interpolation: the rotary base becomes base * alpha^(d / (d - 2)) with Qwen-1's factor
  alpha = 2^ceil(log2(n / L) + 1) - 1 (at least 1) for a sequence of n tokens and training length L. n is each
  sequence's own length (a padded row gets the factor it gets alone; a packed document its own), and with a KV cache
  the factor is fixed when the prompt is processed and kept for the whole decode, so new tokens use the same
  rotary base as the keys already cached (Qwen's rule). `ntk_lengths` sets n explicitly, e.g. to score a generated
  sequence exactly as cached decoding produced it.
- LogN attention scaling: queries at position p >= L are scaled by log_L(p + 1), keeping attention entropy stable.
- layer-wise window attention (`layer_windows`): one window per layer, shorter on lower layers and longer on higher
  ones, as the report describes (lower layers are more sensitive to context extension).
Always on when configured (model definitions, as in transformers):
- static NTK-aware interpolation (`ntk_factor`): base * factor^(d / (d - 2)).
- transformers' Qwen2 sliding window (`use_sliding_window`): layers from `max_window_layers` on see only the last
  `sliding_window` keys and the lower layers attend fully (the reverse of the report's scheme), so Hugging Face
  configs with a sliding window load and compute unchanged.

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
    """Static NTK-aware interpolation factor (1.0 = off); applies in training and eval."""
    use_dynamic_ntk: bool = False
    """Dynamic NTK: the rotary factor from each sequence's length, fixed at prefill for the decode (eval only)."""
    use_logn_attn: bool = False
    """Scale queries at positions p >= L by log_L(p + 1) (eval only)."""
    layer_windows: list | None = None
    """Attention window in tokens per layer, None = full attention; non-decreasing with depth, as the report's
    layer-wise window attention (shorter windows on lower layers). Eval only, like the other sec. 2.5 techniques."""
    extend_context_in_training: bool = False
    """Apply dynamic NTK, LogN and layer_windows in training mode too (Qwen applies them at inference only)."""
    use_sliding_window: bool = False
    """transformers' Qwen2 sliding window: window attention on layers >= max_window_layers, full attention below."""
    sliding_window: int | None = None
    """Window length in tokens when use_sliding_window is on."""
    max_window_layers: int = 0
    """Layers below this index keep full attention (transformers' Qwen2 semantics)."""
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
        if self.layer_windows is not None:
            self._check_layer_windows()

    def _check_layer_windows(self):
        w = list(self.layer_windows)
        if self.use_sliding_window:
            raise ValueError("layer_windows and use_sliding_window are two window schemes; set one of them")
        if len(w) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(w)} entries; expected one per layer "
                             f"(num_hidden_layers={self.num_hidden_layers})")
        bad = [(i, x) for i, x in enumerate(w) if x is not None and (isinstance(x, bool) or not isinstance(x, int)
                                                                   or x < 1)]
        if bad:
            raise ValueError(f"layer_windows[{bad[0][0]}]={bad[0][1]!r}: expected a positive number of tokens or "
                             "None (full attention)")
        longest = [math.inf if x is None else x for x in w]
        for i in range(1, len(w)):
            if longest[i] < longest[i - 1]:
                raise ValueError(f"layer_windows={w}: layer {i} has a shorter window than layer {i - 1}; the report's "
                                 "layer-wise window attention gives lower layers shorter windows, higher layers "
                                 "longer ones (None = full attention counts as longest)")
        self.layer_windows = w

    @property
    def train_len(self) -> int:
        """Training context length L of dynamic NTK and LogN."""
        return self.rope_train_len or self.max_position_embeddings

    @property
    def extends_context(self) -> bool:
        """True when a sec. 2.5 feature is on that Hugging Face Qwen2 and vLLM do not implement."""
        return (self.ntk_factor != 1.0 or self.use_dynamic_ntk or self.use_logn_attn
                or self.layer_windows is not None)

    @property
    def qk_norm(self) -> bool:
        """Qwen3: RMSNorm over each head's query and key before rotary."""
        return self.model_type == "qwen3"

    def window_for_layer(self, i: int, extend: bool = True) -> int | None:
        """Window of layer i in tokens, None for full attention; `extend` False (a training forward by default)
        leaves out the eval-only layer_windows."""
        if self.use_sliding_window and i >= self.max_window_layers:
            return self.sliding_window
        if self.layer_windows is not None and extend:
            return self.layer_windows[i]
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d.pop("extra"), **d}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 whatever the input dtype (float64 stays float64), as Qwen2 does.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def dynamic_ntk_alpha(lengths: torch.Tensor, train_len: int) -> torch.Tensor:
    """Qwen-1's dynamic NTK factor for sequences of `lengths` tokens (int tensor, any shape) -> float64 tensor:
    alpha = 2^ceil(log2(n / L) + 1) - 1, at least 1. Computed in integers: with m the smallest m >= 0 such that
    n <= L * 2^m, alpha = 2^(m + 1) - 1 (n <= L: 1; n <= 2L: 3; n <= 4L: 7)."""
    q = ((lengths.long() + train_len - 1) // train_len).clamp(min=1)  # ceil(n / L)
    m = torch.frexp((q - 1).double()).exponent  # bit length of q - 1 = ceil(log2 q)
    return torch.pow(2.0, (m + 1).double()) - 1


def rope_inv_freq(cfg: QwenConfig, alpha: float = 1.0) -> torch.Tensor:
    """Inverse frequencies (hd/2,) in fp32 for rotary base theta * (ntk_factor * alpha)^(d / (d - 2)); alpha is the
    dynamic NTK factor (1: none)."""
    d = cfg.head_dim
    a = cfg.ntk_factor * alpha
    base = cfg.rope_theta * a ** (d / (d - 2)) if a != 1.0 else cfg.rope_theta
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def rope_cos_sin(cfg: QwenConfig, position_ids: torch.Tensor, dtype: torch.dtype, alpha: torch.Tensor | None = None):
    """cos, sin of shape (B, T, hd) for integer positions (B, T); the angles are computed in fp32. alpha (B, T):
    each token's dynamic NTK factor (None: 1 everywhere)."""
    dev = position_ids.device
    if alpha is None:
        inv_freq = rope_inv_freq(cfg).to(dev)[None, None, :]  # (1, 1, hd/2)
    else:
        values, which = torch.unique(alpha, return_inverse=True)  # a few distinct factors
        table = torch.stack([rope_inv_freq(cfg, a) for a in values.tolist()]).to(dev)  # (n, hd/2)
        inv_freq = table[which.to(dev)]  # (B, T, hd/2)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def sequence_lengths(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the length of the sequence each token belongs to, 1 + the largest position id among the
    real tokens of its document (a document starts where position_ids is 0, as in packing). Padding does not count,
    so a padded row gets the length it has alone."""
    B, T = position_ids.shape
    doc = torch.cumsum((position_ids == 0).long(), dim=1)  # (B, T) document index per token
    last = torch.where(attention_mask.bool(), position_ids, torch.zeros_like(position_ids))
    longest = torch.zeros(B, T + 1, dtype=position_ids.dtype, device=position_ids.device)
    longest = longest.scatter_reduce(1, doc, last, reduce="amax")  # (B, T + 1) largest position per document
    return longest.gather(1, doc) + 1


def apply_rope(x, cos, sin):
    """x (B, n, T, hd); rotate pairs (i, i + hd/2) as Hugging Face's rotate_half does."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys and values per layer, (B, nkv, S, hd) each, grown by concatenation during generation; and each row's
    dynamic NTK factor (B,), fixed when the prompt is processed (None: dynamic NTK was off then)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.ntk_alpha: torch.Tensor | None = None

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
        if self.ntk_alpha is not None:
            self.ntk_alpha = self.ntk_alpha[rows.to(self.ntk_alpha.device)]


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

    def forward(self, x, cos, sin, mask, logn, cache: KVCache | None, rows=None):
        """x (B, T, H) -> (B, T, H); with `rows` (B, n) only those positions query: -> (B, n, H) (keys and values
        still come from all T positions)."""
        B, T, _ = x.shape
        nh, nkv, hd = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        xq = x if rows is None else _take(x, rows)  # (B, Tq, H)
        Tq = xq.shape[1]
        q = self.q_norm(self.q_proj(xq).view(B, Tq, nh, hd)).transpose(1, 2)  # (B, nh, Tq, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, nkv, hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        if rows is None:
            q = apply_rope(q, cos, sin)
        else:
            q = apply_rope(q, _take(cos, rows), _take(sin, rows))
            logn = None if logn is None else logn.gather(1, rows)
            if mask is None:  # plain causal: query at position r sees keys 0..r
                mask = (torch.arange(T, device=x.device) <= rows[:, :, None])[:, None]  # (B, 1, n, T)
            else:
                mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        k = apply_rope(k, cos, sin)
        if logn is not None:
            q = q * logn[:, None, :, None]  # (B, 1, Tq, 1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        # mask None: no padding, no packing, no window (QwenModel.forward): is_causal when queries and keys
        # coincide, none at all for one decoded token; SDPA's CPU flash kernel then skips the masked blocks.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.cfg.attention_dropout if self.training else 0.0,
            is_causal=mask is None and Tq > 1, enable_gqa=nkv != nh)  # (B, nh, Tq, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, nh * hd))


def _take(x, rows):
    """x (B, T, ...) at positions rows (B, n) -> (B, n, ...)."""
    return x.gather(1, rows.reshape(*rows.shape, *[1] * (x.dim() - 2)).expand(*rows.shape, *x.shape[2:]))


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

    def forward(self, x, cos, sin, mask, logn, cache, rows=None):
        """(B, T, H) -> (B, T, H), or (B, n, H) at positions `rows` (B, n) only (see QwenModel.forward)."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, logn, cache, rows)
        x = (x if rows is None else _take(x, rows)) + self.dropout(a)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def is_plain_causal(attention_mask, position_ids, past_len: int, T: int) -> bool:
    """True when the mask build_attention_mask would give is plain causal attention over the whole row, so SDPA
    can run with is_causal (or, for one decoded token, no mask): no padding, no packed documents (a position id 0
    after the first token), and either no cache or a single new token."""
    if past_len > 0 and T > 1:
        return False  # is_causal aligns the query block to the first key, not the last
    if not bool(attention_mask.bool().all()):
        return False
    return past_len > 0 or T < 2 or not bool((position_ids[:, 1:] == 0).any())


def build_attention_mask(attention_mask, position_ids, past_len: int, T: int, window: int | None,
                         branch_ids=None):
    """Boolean (B, 1, T, S) mask: True where query t may attend key s.

    Allowed: causal (by absolute index in the padded row), key not padding, inside the sliding window if any, and,
    without a cache, the same packed document (a document starts where position_ids is 0). With branch_ids (B, T)
    (no cache): a key of branch 0 (a shared prefix) or of the query's own branch; so a row prefix | reply A | reply
    B with branches 0 | 1 | 2 runs the prefix once and each reply sees the prefix and itself, as two sequences would.
    A query row that would see nothing (a left-pad position) is allowed itself so SDPA returns finite values there;
    such rows are padding.
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
    if branch_ids is not None:
        allowed = allowed & ((branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None]))
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

    def shares_prefixes(self) -> bool:
        """Whether a forward in the current mode (train/eval) can take branch_ids: no sliding window and no dynamic
        NTK in effect (both depend on a token's index in the row or on the row's length, not on its position)."""
        extend = not self.training or self.cfg.extend_context_in_training
        return all(self.cfg.window_for_layer(i, extend) is None for i in range(len(self.layers))) and \
            not (self.cfg.use_dynamic_ntk and extend)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                inputs_embeds=None, ntk_lengths: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                branch_ids: torch.Tensor | None = None):
        """Hidden states (B, T, H). attention_mask (B, past + T), position_ids (B, T) (default: counted over the
        real tokens). ntk_lengths (B,): the sequence length that sets each row's dynamic NTK factor, instead of the
        rule (each sequence's own length; with a cache, the factor fixed at prefill).
        positions (B, n) (indices into T): return the final hidden states there only, (B, n, H). The last layer
        then computes queries, attention output and MLP at those n positions instead of all T (its keys and values
        still come from every token), and the final norm runs on n rows: a reward model reads one position per
        sequence, so most of the last layer's work and activations go. Values equal the full forward's there.
        branch_ids (B, T): several continuations of one prefix in a row (build_attention_mask); position_ids must
        then be given (each continuation counts on from the prefix). Needs shares_prefixes() and no cache."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T = x.shape[:2]
        past = 0 if cache is None else cache.length
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if position_ids is None:
            # Count real tokens so left padding does not shift positions.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        cfg = self.cfg
        extend = not self.training or cfg.extend_context_in_training  # sec. 2.5 techniques: eval only by default
        alpha = self._ntk_alpha(attention_mask[:, past:], position_ids, cache, ntk_lengths) \
            if cfg.use_dynamic_ntk and extend else None  # (B, T)
        cos, sin = rope_cos_sin(cfg, position_ids, x.dtype, alpha)
        logn = None
        if cfg.use_logn_attn and extend:
            logn = (torch.log(position_ids.float() + 1) / math.log(cfg.train_len)).clamp(min=1.0).to(x.dtype)  # (B, T)
        if positions is not None and cache is not None:
            raise ValueError("positions (final hidden states at some positions only) cannot be used with a KV cache")
        # no padding, packing or window: no mask at all, SDPA runs causal (None below) - faster, no (B, T, S) mask
        if branch_ids is not None and (cache is not None or not self.shares_prefixes()):
            raise ValueError("branch_ids (continuations of a shared prefix in one row) cannot be used with a KV cache, "
                             "a sliding window or dynamic NTK")
        plain = branch_ids is None and is_plain_causal(attention_mask, position_ids, past, T)
        masks = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            w = cfg.window_for_layer(i, extend)
            if w is not None and w >= past + T:
                w = None  # a window longer than the row cuts nothing
            if w not in masks:
                masks[w] = None if plain and w is None else build_attention_mask(attention_mask, position_ids, past,
                                                                                  T, w, branch_ids)
            rows = positions if i == last else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks[w], logn, cache, rows,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[w], logn, cache, rows)
        if positions is not None and not self.layers:
            x = _take(x, positions)
        return self.norm(x)

    def _ntk_alpha(self, mask, position_ids, cache: KVCache | None, ntk_lengths) -> torch.Tensor | None:
        """Each token's dynamic NTK factor (B, T); stored in the cache at prefill, read from it while decoding."""
        B, T = position_ids.shape
        if ntk_lengths is not None:
            alpha = dynamic_ntk_alpha(torch.as_tensor(ntk_lengths, device=position_ids.device), self.cfg.train_len)
            alpha = alpha.reshape(B, 1).expand(B, T)
        elif cache is not None and cache.length > 0:
            return None if cache.ntk_alpha is None else cache.ntk_alpha[:, None].expand(B, T)
        else:
            alpha = dynamic_ntk_alpha(sequence_lengths(mask, position_ids), self.cfg.train_len)
        if cache is not None and cache.length == 0:
            cache.ntk_alpha = alpha[:, -1].clone()  # the factor of the sequence the decode continues
        return alpha


class QwenForCausalLM(nn.Module):
    """Backbone + output layer. `forward` returns logits (B, T, V); training code should instead take hidden
    states from `get_decoder()` and use `model.logprobs.token_logprobs`, which never holds (B, T, V) in fp32."""

    streams_weights = True  # saved by model.checkpoint.save_weights: ZeRO-3 streams it (common.loop.full_weights)

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

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                ntk_lengths: torch.Tensor | None = None):
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache, ntk_lengths=ntk_lengths))

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
