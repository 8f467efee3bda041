"""The vLLM engine refuses, at start-up and before vLLM is imported, every config it cannot run; the message names the
field and points to the built-in engine. Fast: no engine is started (tests/test_vllm.py has the real-engine tests)."""

import pytest
import torch

from model.checkpoint import save_causal_lm
from model.qwen import QwenConfig, QwenForCausalLM
from rollout import make_engine


def folder(tmp_path, **over):
    cfg = QwenConfig(**{**dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64), **over})
    save_causal_lm(QwenForCausalLM(cfg).init_weights(seed=0), tmp_path / "m")
    return tmp_path / "m"


def test_explicit_head_dim_other_than_hidden_over_heads_is_refused(tmp_path):
    """hidden 64, 2 heads, head_dim 64: transformers and the custom model run it; vLLM's Qwen2 would take 32 and
    fail inside its weight loader."""
    with pytest.raises(ValueError, match=r"config.json: vLLM cannot reproduce this model \(head_dim=64: vLLM's Qwen2 "
                                         r"ignores head_dim and uses hidden_size / num_attention_heads = 64 / 2 = 32\)"
                                         r".*make_engine\('builtin'"):
        make_engine("vllm", model_dir=folder(tmp_path, head_dim=64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head-size list is vLLM-CPU's")
def test_head_size_the_cpu_backend_lacks_is_refused(tmp_path):
    """hidden 32 over 2 heads: head size 16, which vLLM-CPU's attention does not implement."""
    with pytest.raises(ValueError, match=r"head_dim=16 \(hidden_size 32 / num_attention_heads 2\): vLLM's CPU attention "
                                         r"supports head sizes \[32, 64, .*make_engine\('builtin'"):
        make_engine("vllm", model_dir=folder(tmp_path, hidden_size=32))


def test_layer_windows_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"vLLM cannot reproduce this model \(layer_windows=\[16, None\]"):
        make_engine("vllm", model_dir=folder(tmp_path, layer_windows=[16, None]))
