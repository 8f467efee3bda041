"""The custom model against transformers' Qwen2ForCausalLM on the same weights (max abs diff <= 1e-5 in fp32)."""

import json
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from model.checkpoint import load_causal_lm, save_causal_lm
from model.heads import ScalarHeadModel
from model.qwen import QwenConfig, QwenForCausalLM, rope_inv_freq

TOL = 1e-5


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


@pytest.mark.parametrize("heads,kv,tied,T", [(4, 4, False, 1), (4, 2, False, 7), (4, 1, True, 13), (8, 2, True, 33)])
def test_logits_equal_transformers(tmp_path, heads, kv, tied, T):
    hf, ours = pair(tmp_path, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                    hidden_size=16 * heads)
    ids = torch.randint(0, 257, (3, T))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= TOL


def test_explicit_head_dim(tmp_path):
    hf, ours = pair(tmp_path, head_dim=32)  # hidden 64 with 4 heads of 32: projections are not square
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_transformers_and_unpadded(tmp_path, side):
    hf, ours = pair(tmp_path)
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
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
        assert torch.isfinite(got).all()
        real = mask.bool()
        assert (ref[real] - got[real]).abs().max().item() <= TOL
        for b, n in enumerate(lens):  # and each row equals the same sequence alone, without padding
            row = ids[b][real[b]][None]
            assert (ours(row)[0] - got[b][real[b]]).abs().max().item() <= TOL


def test_default_position_ids_follow_left_padding(tmp_path):
    _, ours = pair(tmp_path)
    ids = torch.randint(0, 257, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert (ours(padded, attention_mask=mask)[0, 3:] - ours(ids)[0]).abs().max().item() <= TOL


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    _, ours = pair(tmp_path, num_key_value_heads=1)
    lens = [9, 5]
    T = max(lens)
    ids = torch.randint(0, 257, (2, T))
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1  # left padding, as batched generation uses
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache()
        steps = [ours(ids[:, :3], attention_mask=mask[:, :3], cache=cache)]  # a prompt of 3, then one at a time
        for t in range(3, T):
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
        inc = torch.cat(steps, 1)
    real = mask.bool()
    assert cache.length == T
    assert (full[real] - inc[real]).abs().max().item() <= TOL


def test_packed_documents_do_not_attend_across(tmp_path):
    _, ours = pair(tmp_path)
    a, b = torch.randint(0, 257, (1, 6)), torch.randint(0, 257, (1, 4))
    packed = torch.cat([a, b], 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    with torch.no_grad():
        got = ours(packed, position_ids=pos)
        assert (got[0, :6] - ours(a)[0]).abs().max().item() <= TOL
        assert (got[0, 6:] - ours(b)[0]).abs().max().item() <= TOL


def test_sliding_window_layers_equal_transformers(tmp_path):
    hf, ours = pair(tmp_path, num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert ours.config.window_for_layer(0) is None and ours.config.window_for_layer(1) == 4
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= TOL
        no_window = hf_model(num_hidden_layers=3)(ids).logits
        assert (no_window - ours(ids)).abs().max().item() > 1e-3  # the window really changes something


def test_ntk_inv_freq_by_hand():
    """head_dim 4, theta 10000, factor 4: base = 10000 * 4^(4/2) = 160000; inv_freq = [1, 160000^-0.5]."""
    cfg = QwenConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0, ntk_factor=4.0)
    torch.testing.assert_close(rope_inv_freq(cfg, 10), torch.tensor([1.0, 160000 ** -0.5]))


def test_dynamic_ntk_by_hand():
    """L = 8. Length 8: log2(1)+1 = 1 -> alpha 1 (no change). Length 20: log2(2.5)+1 = 2.32 -> ceil 3 -> alpha 7."""
    cfg = QwenConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0,
                     use_dynamic_ntk=True, rope_train_len=8)
    plain = QwenConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, rope_theta=10000.0)
    torch.testing.assert_close(rope_inv_freq(cfg, 8), rope_inv_freq(plain, 8))
    torch.testing.assert_close(rope_inv_freq(cfg, 20), torch.tensor([1.0, (10000 * 7 ** 2) ** -0.5]))


def test_logn_and_dynamic_ntk_only_act_past_training_length(tmp_path):
    hf, _ = pair(tmp_path)
    ext = load_causal_lm(tmp_path / "hf", use_logn_attn=True, use_dynamic_ntk=True, rope_train_len=8)
    ids = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        ref, got = hf(ids).logits, ext(ids)
        # Dynamic NTK changes the base for the whole 16-token sequence; over the first 8 alone nothing changes.
        assert (hf(ids[:, :8]).logits - ext(ids[:, :8])).abs().max().item() <= TOL
        assert (ref - got).abs().max().item() > 1e-3


def test_logn_scale_by_hand(tmp_path):
    """LogN alone (no NTK), L = 4: the query at position p (0-based) is scaled by max(1, ln(p+1)/ln 4).
    For p = 7: ln 8 / ln 4 = 1.5. Scaling q by 1.5 equals scaling the attention logits by 1.5."""
    _, ours = pair(tmp_path, num_hidden_layers=1)
    ext = load_causal_lm(tmp_path / "hf", use_logn_attn=True, rope_train_len=4)
    ids = torch.randint(0, 257, (1, 8))
    with torch.no_grad():
        assert (ours(ids[:, :4]) - ext(ids[:, :4])).abs().max().item() <= TOL
        # Do the same by hand: scale q_proj by 1.5 for the last position only -> compare the last logits.
        q = ours.model.layers[0].self_attn.q_proj
        q.weight.mul_(math.log(8) / math.log(4))
        q.bias.mul_(math.log(8) / math.log(4))
        assert (ours(ids)[0, -1] - ext(ids)[0, -1]).abs().max().item() <= TOL


def test_save_loads_in_transformers(tmp_path):
    cfg = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ours = QwenForCausalLM(cfg).init_weights(seed=1).eval()
    save_causal_lm(ours, tmp_path / "out", max_shard_bytes=50_000)  # forces several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= TOL
        again = load_causal_lm(tmp_path / "out")
        assert (again(ids) - ours(ids)).abs().max().item() <= 1e-6
    assert again.lm_head.weight is again.model.embed_tokens.weight


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
        assert (again(ids) - values).abs().max().item() <= 1e-6
        seq = Qwen2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        # transformers pools at the last non-pad token; with no padding that is our last position.
        assert (seq(ids).logits[:, 0] - values[:, -1]).abs().max().item() <= TOL


def test_convert_cli_both_ways(tmp_path, capsys):
    from model.convert import main
    hf_model().save_pretrained(tmp_path / "hf")
    main([str(tmp_path / "hf"), str(tmp_path / "ext"), "--to", "custom", "--set", "use_logn_attn=true",
          "--set", "rope_train_len=64"])
    cfg = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert cfg["use_logn_attn"] is True and cfg["rope_train_len"] == 64 and cfg["model_type"] == "qwen2"
    with pytest.raises(SystemExit, match="context extension is on"):
        main([str(tmp_path / "ext"), str(tmp_path / "back"), "--to", "hf"])
    main([str(tmp_path / "hf"), str(tmp_path / "plain"), "--to", "hf", "--check"])
    assert "transformers reproduces it" in capsys.readouterr().out
    assert "use_logn_attn" not in json.loads((tmp_path / "plain" / "config.json").read_text())
