"""The custom model against transformers' Qwen2ForCausalLM on the same weights, and the sec. 2.5 context extension.

Numerics: fp32 logits of both models are compared with a float64 evaluation of the custom model, each within a
rounding bound derived from the forward's size (tests/numerics.py: gamma(depth) |h| . |W|), not a tolerance read off
one machine; `make test-numerics` runs them again under ATEN_CPU_CAPABILITY=default."""

import copy
import json
import math

import pytest
import torch
from numerics import assert_within, logits_bound, logprob_bounds, forward_depth
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from model.checkpoint import load_causal_lm, save_causal_lm
from model.heads import ScalarHeadModel
from model.qwen import QwenConfig, QwenForCausalLM, dynamic_ntk_alpha, is_plain_causal, rope_inv_freq

pytestmark = pytest.mark.numerics


def hf_model(seed=0, **kw):
    base = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**base, **kw})
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # biases too, so the QKV bias path is exercised
            p.normal_(0, 0.2)
    return m


def pair(tmp_path, **kw):
    hf = hf_model(**kw)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_causal_lm(tmp_path / "hf")


class Reference64:
    """A float64 copy of a custom model: logits (B, T, V) and their fp32 rounding bound for the same call."""

    def __init__(self, model):
        self.cfg = model.config
        self.m = copy.deepcopy(model).double()

    @torch.no_grad()
    def __call__(self, ids, attention_mask=None, **kw):
        h = self.m.get_decoder()(ids, attention_mask=attention_mask, **kw)  # (B, T, H) float64
        key_len = ids.shape[1] if attention_mask is None else attention_mask.shape[1]
        return self.m.lm_head(h), logits_bound(self.cfg, key_len, h, self.m.lm_head.weight)


def logits(m, *a, **kw):
    with torch.no_grad():
        out = m(*a, **kw)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("heads,kv,tied,T", [(4, 4, False, 1), (4, 2, False, 7), (4, 1, True, 13), (8, 2, True, 33)])
def test_logits_equal_transformers(tmp_path, heads, kv, tied, T):
    hf, ours = pair(tmp_path, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                    hidden_size=16 * heads)
    ids = torch.randint(0, 257, (3, T))
    ref, bound = Reference64(ours)(ids)
    assert_within(ours(ids), ref, bound, "custom")
    assert_within(logits(hf, ids), ref, bound, "transformers")


def test_explicit_head_dim(tmp_path):
    hf, ours = pair(tmp_path, head_dim=32)  # hidden 64 with 4 heads of 32: projections are not square
    ids = torch.randint(0, 257, (2, 9))
    ref, bound = Reference64(ours)(ids)
    assert_within(logits(ours, ids), ref, bound, "custom")
    assert_within(logits(hf, ids), ref, bound, "transformers")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_transformers_and_unpadded(tmp_path, side):
    """Each row of a padded batch, in both models, equals the same sequence alone (its float64 evaluation)."""
    hf, ours = pair(tmp_path)
    ref64 = Reference64(ours)
    lens = [11, 6, 1]
    T = max(lens)
    ids = torch.randint(0, 257, (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs = logits(hf, ids, attention_mask=mask, position_ids=pos)
    got = logits(ours, ids, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(got).all()
    real = mask.bool()
    for b, n in enumerate(lens):
        row = ids[b][real[b]][None]
        ref, bound = ref64(row)
        assert_within(got[b][real[b]], ref[0], bound[0], f"custom, padded row {b}")
        assert_within(theirs[b][real[b]], ref[0], bound[0], f"transformers, padded row {b}")
        assert_within(logits(ours, row)[0], ref[0], bound[0], f"custom, row {b} alone")


def test_default_position_ids_follow_left_padding(tmp_path):
    _, ours = pair(tmp_path)
    ids = torch.randint(0, 257, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    ref, bound = Reference64(ours)(ids)
    assert_within(logits(ours, padded, attention_mask=mask)[0, 3:], ref[0], bound[0], "left-padded")
    assert_within(logits(ours, ids)[0], ref[0], bound[0], "alone")


def kv_cache_logits(model, ids, mask, prompt_len):
    """Logits (B, T, V) from a prompt of prompt_len columns, then one token at a time on the KV cache."""
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], cache=cache)]
        for t in range(prompt_len, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    assert cache.length == ids.shape[1]
    return torch.cat(steps, 1)


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    _, ours = pair(tmp_path, num_key_value_heads=1)
    lens = [9, 5]
    T = max(lens)
    ids = torch.randint(0, 257, (2, T))
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1  # left padding, as batched generation uses
    full = logits(ours, ids, attention_mask=mask)
    inc = kv_cache_logits(ours, ids, mask, 3)  # a prompt of 3, then one at a time
    ref, bound = Reference64(ours)(ids, attention_mask=mask)
    real = mask.bool()
    assert_within(full[real], ref[real], bound[real], "full forward")
    assert_within(inc[real], ref[real], bound[real], "KV-cache decoding")


def test_is_plain_causal_decides_by_hand():
    """SDPA runs with is_causal (no mask) only where the mask would be plain causal over the whole row."""
    ones, pos = torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, 5)
    assert is_plain_causal(ones, pos, 0, 5)
    assert not is_plain_causal(torch.tensor([[0, 1, 1, 1, 1], [1] * 5]), pos, 0, 5)  # padding
    assert not is_plain_causal(ones, torch.tensor([[0, 1, 2, 0, 1]] * 2), 0, 5)  # packed documents
    assert is_plain_causal(torch.ones(2, 6, dtype=torch.long), pos[:, :1], 5, 1)  # one decoded token
    assert not is_plain_causal(torch.ones(2, 9, dtype=torch.long), pos[:, :4], 5, 4)  # a block after a cache


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_causal_and_masked_attention_paths_equal_float64(tmp_path, monkeypatch, kv):
    """An unpadded batch takes SDPA's is_causal path; the same batch through the boolean-mask path (forced), the
    final states at a few positions only (reward scores), and KV-cache decoding: each within the rounding bound of
    the float64 forward."""
    import model.qwen as qwen

    _, ours = pair(tmp_path, num_key_value_heads=kv)
    ids = torch.randint(0, 257, (3, 21))
    ref, bound = Reference64(ours)(ids)
    rows = torch.tensor([[20], [7], [0]])
    pos_ref, pos_bound = (x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1])) for x in (ref, bound))
    decoder, head = ours.get_decoder(), ours.get_output_embeddings()
    for path in ("causal", "masked"):
        if path == "masked":
            monkeypatch.setattr(qwen, "is_plain_causal", lambda *a: False)
        assert_within(logits(ours, ids), ref, bound, f"{path} path")
        with torch.no_grad():
            at = head(decoder(ids, positions=rows))  # (3, 1, V)
        assert_within(at, pos_ref, pos_bound, f"{path} path, final states at given positions")
        inc = kv_cache_logits(ours, ids, torch.ones_like(ids), 5)
        assert_within(inc, ref, bound, f"{path} path, KV-cache decoding")


def test_packed_documents_do_not_attend_across(tmp_path):
    _, ours = pair(tmp_path)
    ref64 = Reference64(ours)
    a, b = torch.randint(0, 257, (1, 6)), torch.randint(0, 257, (1, 4))
    packed = torch.cat([a, b], 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    got = logits(ours, packed, position_ids=pos)
    for name, doc, part in (("first", a, got[0, :6]), ("second", b, got[0, 6:])):
        ref, bound = ref64(doc)
        assert_within(part, ref[0], bound[0], f"{name} packed document")


def test_sliding_window_layers_equal_transformers(tmp_path):
    """transformers' Qwen2 sliding window (use_sliding_window): full attention below max_window_layers, the window
    from there up. Kept for Hugging Face configs; the report's scheme is layer_windows (below)."""
    hf, ours = pair(tmp_path, num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert [ours.config.window_for_layer(i) for i in range(3)] == [None, 4, 4]
    ids = torch.randint(0, 257, (2, 12))
    ref, bound = Reference64(ours)(ids)
    assert_within(logits(ours, ids), ref, bound, "custom")
    assert_within(logits(hf, ids), ref, bound, "transformers")
    no_window = logits(hf_model(num_hidden_layers=3), ids)
    assert ((no_window - ref).abs() / bound).max() > 100  # the window really changes something


def layer_masks(model, ids):
    """The boolean attention mask (T, S) each decoder layer receives for one row (None, SDPA's is_causal, as the
    causal mask it stands for)."""
    seen = {}
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, causal if args[3] is None else args[3][0, 0].clone()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(model.model.layers))]


def banded(T, window):
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (k <= q) & ((q - k < window) if window else True)


def test_layer_windows_pin_which_layer_gets_which_window(tmp_path):
    """The report's layer-wise window attention (sec. 2.5): lower layers shorter windows, higher layers longer ones.
    layer_windows [2, 4, None]: layer 0 sees the last 2 keys, layer 1 the last 4, layer 2 all of them (eval); a
    training forward is the plain model unless extend_context_in_training."""
    _, ours = pair(tmp_path, num_hidden_layers=3)
    ours.config.layer_windows = [2, 4, None]
    ids = torch.randint(0, 257, (1, 8))
    got = layer_masks(ours.eval(), ids)
    for i, w in enumerate([2, 4, None]):
        assert torch.equal(got[i], banded(8, w)), f"layer {i}"
    assert all(torch.equal(m, banded(8, None)) for m in layer_masks(ours.train(), ids))
    ours.config.extend_context_in_training = True
    assert [torch.equal(m, banded(8, w)) for m, w in zip(layer_masks(ours.train(), ids), [2, 4, None])] == [True] * 3


def test_layer_windows_equal_transformers_per_layer_types(tmp_path):
    """Where the two configs mean the same thing: windows [4, 4, None] are transformers' layer_types
    [sliding, sliding, full] with sliding_window 4 (the report's direction, which max_window_layers cannot say)."""
    hf = hf_model(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    hf_model(num_hidden_layers=3).save_pretrained(tmp_path / "plain")  # same seed: same weights
    ours = load_causal_lm(tmp_path / "plain", layer_windows=[4, 4, None])
    ids = torch.randint(0, 257, (2, 12))
    ref, bound = Reference64(ours)(ids)
    assert_within(logits(ours, ids), ref, bound, "custom")
    assert_within(logits(hf, ids), ref, bound, "transformers")
    assert ((logits(hf_model(num_hidden_layers=3), ids) - ref).abs() / bound).max() > 100


def test_layer_windows_are_checked():
    kw = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"layer 1 has a shorter window than layer 0; the report's"):
        QwenConfig(**kw, layer_windows=[None, 4, 8])
    with pytest.raises(ValueError, match="layer_windows has 2 entries; expected one per layer"):
        QwenConfig(**kw, layer_windows=[4, 8])
    with pytest.raises(ValueError, match=r"layer_windows\[0\]=0"):
        QwenConfig(**kw, layer_windows=[0, 8, None])
    with pytest.raises(ValueError, match="two window schemes"):
        QwenConfig(**kw, layer_windows=[2, 4, 8], use_sliding_window=True, sliding_window=4)


def test_context_extension_fields_survive_save_and_load(tmp_path):
    cfg = QwenConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, layer_windows=[4, None], use_dynamic_ntk=True, use_logn_attn=True,
                     rope_train_len=8, extend_context_in_training=True)
    save_causal_lm(QwenForCausalLM(cfg).init_weights(seed=0), tmp_path / "m")
    again = load_causal_lm(tmp_path / "m").config
    assert (again.layer_windows, again.use_dynamic_ntk, again.use_logn_attn, again.rope_train_len,
            again.extend_context_in_training) == ([4, None], True, True, 8, True)


def test_rope_inv_freq_by_hand():
    """head_dim 4, theta 10000. Static factor 4: base = 10000 * 4^(4/2) = 160000; inv_freq = [1, 160000^-0.5].
    Dynamic factor 7 on a plain config: base 10000 * 7^2."""
    cfg = QwenConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0, ntk_factor=4.0)
    torch.testing.assert_close(rope_inv_freq(cfg), torch.tensor([1.0, 160000 ** -0.5]))
    plain = QwenConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0)
    torch.testing.assert_close(rope_inv_freq(plain, 7.0), torch.tensor([1.0, (10000 * 7 ** 2) ** -0.5]))


def test_dynamic_ntk_alpha_by_hand():
    """Qwen's rule alpha = 2^ceil(log2(n / L) + 1) - 1, at least 1. L = 8: n <= 8 -> 1; 9..16 -> 3 (12: log2 1.5 + 1
    = 1.58 -> 2 -> 3); 17..32 -> 7 (20: log2 2.5 + 1 = 2.32 -> 3 -> 7); 33..64 -> 15; 65 -> 31. And against the
    formula in floating point for n up to 300 and three training lengths."""
    n = torch.tensor([1, 8, 9, 12, 16, 17, 20, 32, 33, 64, 65])
    assert dynamic_ntk_alpha(n, 8).tolist() == [1, 1, 3, 3, 3, 7, 7, 7, 15, 15, 31]
    for L in (5, 7, 8):
        want = [max(2 ** math.ceil(math.log2(k / L) + 1) - 1, 1) for k in range(1, 301)]
        assert dynamic_ntk_alpha(torch.arange(1, 301), L).tolist() == want


def test_logn_and_dynamic_ntk_only_act_past_training_length(tmp_path):
    hf, ours = pair(tmp_path)
    ext = load_causal_lm(tmp_path / "hf", use_logn_attn=True, use_dynamic_ntk=True, rope_train_len=8)
    ids = torch.randint(0, 257, (1, 16))
    ref, bound = Reference64(ours)(ids)  # the plain model
    # Dynamic NTK changes the base for the whole 16-token sequence; over the first 8 alone nothing changes.
    assert_within(logits(ext, ids[:, :8]), ref[:, :8], bound[:, :8], "extended model, 8 tokens")
    assert_within(logits(hf, ids[:, :8]), ref[:, :8], bound[:, :8], "transformers, 8 tokens")
    assert ((logits(ext, ids) - ref).abs() / bound).max() > 100


def test_logn_scale_by_hand(tmp_path):
    """LogN alone (no NTK), L = 4: the query at position p (0-based) is scaled by max(1, ln(p+1)/ln 4).
    For p = 7: ln 8 / ln 4 = 1.5. Scaling q by 1.5 equals scaling the attention logits by 1.5."""
    _, ours = pair(tmp_path, num_hidden_layers=1)
    ext = load_causal_lm(tmp_path / "hf", use_logn_attn=True, rope_train_len=4)
    ids = torch.randint(0, 257, (1, 8))
    ref, bound = Reference64(ext)(ids)
    assert_within(logits(ours, ids[:, :4]), ref[:, :4], bound[:, :4], "first 4 positions")
    # Do the same by hand: scale q_proj by 1.5 for the last position only -> compare the last logits.
    with torch.no_grad():
        q = ours.model.layers[0].self_attn.q_proj
        q.weight.mul_(math.log(8) / math.log(4))
        q.bias.mul_(math.log(8) / math.log(4))
    assert_within(logits(ours, ids)[0, -1], ref[0, -1], bound[0, -1], "query scaled by hand")


def extended(tmp_path, **kw):
    """The pair's weights with dynamic NTK and LogN on, training length L = 8."""
    hf_model().save_pretrained(tmp_path / "plain")
    return load_causal_lm(tmp_path / "plain", use_dynamic_ntk=True, use_logn_attn=True, rope_train_len=8, **kw)


def test_dynamic_ntk_padded_row_equals_the_row_alone(tmp_path):
    """The factor comes from each sequence's own length: a 6-token row padded to 20 keeps factor 1 (not 7), left or
    right padded; each document of a packed row gets its own factor. Every row equals the sequence run alone."""
    ext = extended(tmp_path)
    ref64 = Reference64(ext)
    lens = [20, 6, 12]
    ids = torch.randint(0, 257, (3, 20))
    for side in ("left", "right"):
        mask = torch.zeros(3, 20, dtype=torch.long)
        for b, n in enumerate(lens):
            mask[b, 20 - n:] = 1 if side == "left" else 0
            mask[b, :n] = 1 if side == "right" else mask[b, :n]
        got = logits(ext, ids, attention_mask=mask)
        for b in range(3):
            row = ids[b][mask[b].bool()][None]
            ref, bound = ref64(row)
            assert_within(got[b][mask[b].bool()], ref[0], bound[0], f"{side}-padded row {b}")
    a, b = ids[:1, :12], ids[1:2, :6]
    packed = logits(ext, torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(12), torch.arange(6)])[None])
    for name, doc, part in (("first", a, packed[0, :12]), ("second", b, packed[0, 12:])):
        ref, bound = ref64(doc)
        assert_within(part, ref[0], bound[0], f"{name} packed document")


def test_cached_greedy_decoding_equals_uncached_under_the_prefill_rule(tmp_path):
    """Dynamic NTK + LogN, L = 8: prompts of 12 and 5 tokens (factor 3 and 1 at prefill), 24 greedy tokens each on
    the built-in engine's KV cache, past lengths 16 and 32 where a recomputed factor would change. Each row equals
    the uncached forward of the same sequence with its prompt's factor (ntk_lengths): the same greedy tokens, the
    engine's log-probs within the rounding bound. Without ntk_lengths the whole sequence's factor applies and the
    logits differ: the factor is fixed at prefill, as in Qwen's implementation."""
    from rollout import BuiltinEngine, SamplingParams

    ext = extended(tmp_path)
    ref64 = Reference64(ext)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 257, (12,)).tolist(), torch.randint(1, 257, (5,)).tolist()]
    out = BuiltinEngine(ext).generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=24))
    for p, r, lp in zip(prompts, out.response_ids, out.sampler_logprobs):
        assert len(r) == 24
        seq, P, n_prompt = torch.tensor([p + r]), len(p), torch.tensor([len(p)])
        ref, bound = ref64(seq, ntk_lengths=n_prompt)
        ref, bound = ref[0, P - 1:-1], bound[0, P - 1:-1]  # (R, V): the logits before each response token
        top2 = ref.topk(2, dim=-1)
        assert top2.indices[:, 0].tolist() == r  # the engine's tokens are the float64 greedy tokens
        assert ((top2.values[:, 0] - top2.values[:, 1]) > 2 * bound.max(-1).values).all()  # and no near-tie
        got = logits(ext, seq, ntk_lengths=n_prompt)[0, P - 1:-1]
        assert_within(got, ref, bound, "uncached forward with the prompt's factor")
        assert got.argmax(-1).tolist() == r
        with torch.no_grad():
            h64 = ref64.m.get_decoder()(seq, ntk_lengths=n_prompt)[0, P - 1:-1]
        lp_ref, lp_bound = logprob_bounds(h64, ref64.m.lm_head.weight, torch.tensor(r), torch.ones(len(r)),
                                          depth=forward_depth(ext.config, P + len(r)))
        assert_within(torch.tensor(lp), lp_ref["logp"], lp_bound["logp"], "engine log-probs (KV cache)")
        whole = logits(ext, seq)[0, P - 1:-1]  # the factor of all P + 24 tokens
        assert ((whole - ref).abs() / bound).max() > 100
    stats = BuiltinEngine(ext).greedy_check(ext, prompts, max_tokens=24)  # the uncached check uses the same rule
    assert stats["tokens_compared"] == 48 and stats["ties"] == 0


def test_training_mode_is_the_plain_model_unless_configured(tmp_path):
    """Dynamic NTK, LogN and layer_windows are inference-time techniques: a training forward (dropout 0) equals the
    plain model; with extend_context_in_training it equals the eval forward instead."""
    _, plain = pair(tmp_path)
    ext = extended(tmp_path, layer_windows=[4, None])
    ids = torch.randint(0, 257, (2, 20))
    plain_logits = logits(plain, ids)
    assert torch.equal(logits(ext.train(), ids), plain_logits)
    eval_logits = logits(ext.eval(), ids)
    ref, bound = Reference64(plain)(ids)
    assert ((eval_logits - ref).abs() / bound).max() > 100
    ext.config.extend_context_in_training = True
    assert torch.equal(logits(ext.train(), ids), eval_logits)


def test_save_loads_in_transformers(tmp_path):
    cfg = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ours = QwenForCausalLM(cfg).init_weights(seed=1).eval()
    save_causal_lm(ours, tmp_path / "out", max_shard_bytes=50_000)  # forces several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (2, 10))
    ref, bound = Reference64(ours)(ids)
    assert_within(logits(hf, ids), ref, bound, "transformers")
    again = load_causal_lm(tmp_path / "out")
    assert_within(logits(again, ids), ref, bound, "reloaded")  # same weights (other memory: not bitwise)
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_streamed_weights_save_like_the_state_dict_and_load_in_transformers(tmp_path):
    """The ZeRO-3 save path without DeepSpeed: the weights written one tensor at a time by StreamedSafetensors
    (several files: header space reserved, index written at the end) into the staging folder that
    common.loop.full_weights makes; save_causal_lm links them in. Same tensors as the plain save, bit for bit, and
    transformers loads the folder. A model whose weights are still ZeRO-3 shards is refused, never saved empty."""
    from common.safestate import StreamedSafetensors
    from model.checkpoint import read_state_dict

    cfg = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ours = QwenForCausalLM(cfg).init_weights(seed=1).eval()
    save_causal_lm(ours, tmp_path / "plain")
    stage = tmp_path / ".weights-x"
    stage.mkdir()
    names = [n for n, _ in ours.named_parameters(remove_duplicate=False)]
    writer = StreamedSafetensors(stage, StreamedSafetensors.header_bound(names), max_shard_bytes=40_000)
    for n, p in ours.named_parameters(remove_duplicate=False):
        if n != "lm_head.weight":  # tied: left out, as transformers saves it
            writer.add(n, p)
    assert len(writer.close()) > 3
    ours.staged_weights = stage
    save_causal_lm(ours, tmp_path / "out")
    a, b = read_state_dict(tmp_path / "plain"), read_state_dict(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (2, 10))
    ref, bound = Reference64(ours)(ids)
    assert_within(logits(hf, ids), ref, bound, "transformers")
    ours.staged_weights = None
    ours.model.layers[1].mlp.up_proj.weight.ds_numel = 128 * 64 * 2  # what a ZeRO-3 shard carries: the whole size
    with pytest.raises(RuntimeError, match=r"model.layers.1.mlp.up_proj.weight and 0 more .*ZeRO-3 shards"):
        save_causal_lm(ours, tmp_path / "shard")
    assert not (tmp_path / "shard").exists()


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model().save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.9.extra.weight"] = torch.zeros(1)
    save_file(sd, str(f))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*unexpected "
                                         r"\['model.layers.9.extra.weight'\]"):
        load_causal_lm(tmp_path / "m")


def test_config_we_cannot_reproduce_is_refused(tmp_path):
    hf_model().save_pretrained(tmp_path / "m")
    p = tmp_path / "m" / "config.json"
    d = json.loads(p.read_text())
    d["hidden_act"] = "gelu"
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"hidden_act='gelu'.*rope_type='yarn'"):
        load_causal_lm(tmp_path / "m")


def test_pickle_weights_are_not_read(tmp_path):
    hf_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_causal_lm(tmp_path / "m")


def test_scalar_head_from_lm_and_in_transformers(tmp_path):
    hf_model(pad_token_id=0).save_pretrained(tmp_path / "lm")
    rm = ScalarHeadModel.from_pretrained(tmp_path / "lm")
    ids = torch.randint(1, 257, (2, 7))
    with torch.no_grad():
        values = rm(ids)  # (B, T)
        assert values.shape == (2, 7)
        rm.save_pretrained(tmp_path / "rm")
        again = ScalarHeadModel.from_pretrained(tmp_path / "rm")
        seq = Qwen2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        m64 = copy.deepcopy(rm).double()
        h = m64.model(ids)  # (B, T, H)
        ref, bound = m64.score(h)[..., 0], logits_bound(rm.config, 7, h, m64.score.weight)[..., 0]
        assert_within(values, ref, bound, "custom")
        assert_within(again(ids), ref, bound, "reloaded")
        # transformers pools at the last non-pad token; with no padding that is our last position.
        assert_within(seq(ids).logits[:, 0], ref[:, -1], bound[:, -1], "transformers")


def test_convert_cli_both_ways(tmp_path, capsys):
    from model.convert import main
    hf_model().save_pretrained(tmp_path / "hf")
    main([str(tmp_path / "hf"), str(tmp_path / "ext"), "--to", "custom", "--set", "use_logn_attn=true",
          "--set", "rope_train_len=64"])
    cfg = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert cfg["use_logn_attn"] is True and cfg["rope_train_len"] == 64 and cfg["model_type"] == "qwen2"
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "ext"), str(tmp_path / "back"), "--to", "hf"])
    assert exit_info.value.code == 2 and "config error: " in (err := capsys.readouterr().err)
    assert "context extension is on" in err
    main([str(tmp_path / "hf"), str(tmp_path / "plain"), "--to", "hf", "--check"])
    assert "transformers reproduces it" in capsys.readouterr().out
    assert "use_logn_attn" not in json.loads((tmp_path / "plain" / "config.json").read_text())
