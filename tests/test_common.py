"""Run infrastructure: config parsing, atomic writes, checkpoints, metrics, NaN guard, LR schedule."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir, atomic_write_json
from common.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint_state, rng_state,
                               save_checkpoint, set_rng_state)
from common.config import ConfigError, cfg, config_help, parse_config, save_config
from common.guard import NonFiniteLossError, check_finite
from common.metrics import MetricsLogger, plot_metrics, read_jsonl
from common.optim import SparseEmbeddingGrad, build_adamw, constant_with_warmup, warmup_cosine


@dataclass
class ToyConfig:
    model_path: str = cfg("m", "model folder")
    lr: float = cfg(1e-5, "peak learning rate")
    steps: int = cfg(10, "optimizer steps")
    bf16: bool = cfg(False, "use bf16")
    betas: tuple[float, float] = cfg((0.9, 0.95), "AdamW betas")
    max_len: Optional[int] = cfg(None, "truncate to this many tokens")
    files: list[str] = cfg([], "data files")

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be > 0, got {self.steps}")


def test_parse_config_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3.0e-6\nsteps: 5\nbetas: [0.8, 0.9]\nfiles: [a.jsonl, b.jsonl]\n")
    c = parse_config(ToyConfig, ["--config", str(path), "--steps", "7", "--bf16", "true", "--max_len=32"])
    assert (c.lr, c.steps, c.bf16, c.betas, c.max_len, c.files) == (3e-6, 7, True, (0.8, 0.9), 32, ["a.jsonl", "b.jsonl"])
    c = parse_config(ToyConfig, ["--betas", "0.5,0.6", "--max_len", "none", "--files", "x,y"])
    assert (c.betas, c.max_len, c.files, c.steps) == ((0.5, 0.6), None, ["x", "y"], 10)
    c = parse_config(ToyConfig, ["--config", str(path), "--files", "x", "--files", "y,z"])  # repeated list flag
    assert c.files == ["x", "y", "z"]


def test_parse_config_errors_name_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1e-5\nlearning_rate: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'learning_rate'"):
        parse_config(ToyConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match="unknown flag --stepz"):
        parse_config(ToyConfig, ["--stepz", "3"])
    with pytest.raises(ConfigError, match="steps: expected int"):
        parse_config(ToyConfig, ["--steps", "2.5"])
    with pytest.raises(ConfigError, match="expected a bool"):
        parse_config(ToyConfig, ["--bf16", "maybe"])
    with pytest.raises(ConfigError, match="expected 2 values"):
        parse_config(ToyConfig, ["--betas", "0.9"])
    with pytest.raises(ConfigError, match="steps must be > 0"):  # validate() runs, nothing rewritten
        parse_config(ToyConfig, ["--steps", "0"])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(ToyConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--lr (float, default 1e-05): peak learning rate" in out
    assert "--max_len (Optional[int], default None)" in out
    assert out.count("\n  --") == 7 and out == config_help(ToyConfig) + "\n"


def test_save_config_round_trips(tmp_path):
    c = parse_config(ToyConfig, ["--lr", "2e-5", "--betas", "0.1,0.2"])
    save_config(c, tmp_path / "resolved.yaml")
    assert parse_config(ToyConfig, ["--config", str(tmp_path / "resolved.yaml")]) == c


def test_atomic_dir_leaves_old_dir_when_body_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dirs left behind
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def _tiny_linear_run():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(4, 3)).pow(2).mean()  # consumes torch RNG, so RNG restore matters
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def test_checkpoint_resume_is_exact_and_keeps_last_good(tmp_path):
    model, opt, sched = _tiny_linear_run()
    save = lambda d: (d.mkdir(), save_file(model.state_dict(), d / "w.safetensors"))  # noqa: E731
    for _ in range(2):
        _step(model, opt, sched)
    random.random(), np.random.rand()
    ck = save_checkpoint(tmp_path, 2, save, opt, sched, {"step": 2, "epoch": 0}, [rng_state()])
    expected = [_step(model, opt, sched) for _ in range(3)] + [random.random(), float(np.random.rand())]

    model2, opt2, sched2 = _tiny_linear_run()
    state = load_checkpoint_state(latest_checkpoint(tmp_path))
    model2.load_state_dict(load_file(ck / "model" / "w.safetensors"))
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    set_rng_state(state["rng_states"][0])
    got = [_step(model2, opt2, sched2) for _ in range(3)] + [random.random(), float(np.random.rand())]
    assert got == expected and state["train_state"] == {"step": 2, "epoch": 0}

    # a failing save leaves the previous checkpoint as latest; a later good save prunes the old one
    def bad_save(d):
        raise OSError("disk full")
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, bad_save, opt, sched, {"step": 3}, [rng_state()])
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    save_checkpoint(tmp_path, 4, save, opt, sched, {"step": 4}, [rng_state()])
    assert [d.name for d in list_checkpoints(tmp_path)] == ["step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_check_finite_names_step_and_loss():
    check_finite(3, {"loss": 1.5, "aux": torch.tensor(0.0)})
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss 'nll' is nan.*kept at ck/step-5"):
        check_finite(7, {"loss": 1.0, "nll": torch.tensor(float("nan"))}, last_checkpoint="ck/step-5")
    with pytest.raises(NonFiniteLossError, match="is inf"):
        check_finite(1, {"loss": float("inf")})


def test_metrics_jsonl_tensorboard_png_and_resume_truncation(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(1, 6):
        log.log(s, {"loss": torch.tensor(1.0 / s, dtype=torch.float64), "lr": 0.1})
    log.close()
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    log = MetricsLogger(tmp_path, resume_step=3)  # the run resumed from step 3 drops steps 4 and 5
    log.log(4, {"loss": 9.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")][-2:] == [(3, 1 / 3), (4, 9.0)]
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png", ["loss", "lr"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no finite values for metric 'acc'"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png", ["acc"])


def test_warmup_cosine_by_hand():
    """warmup 2, total 6, min 0.1: steps 0,1 -> 1/2, 2/2; step 2 -> cos(0) -> 1; step 4 -> progress 1/2 ->
    0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55; step 6 and later -> 0.1."""
    got = [warmup_cosine(s, 2, 6, 0.1) for s in (0, 1, 2, 4, 6, 9)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert [constant_with_warmup(s, 2) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert warmup_cosine(3, 0, 6, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_build_adamw_skips_decay_on_1d_params():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_adamw(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    shapes = [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups]
    assert shapes == [[(4, 3)], [(4,), (4,), (4,)]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0] and opt.defaults["betas"] == (0.9, 0.95)


def test_sparse_embedding_grad_equals_dense_adamw():
    """Embedding + linear, 3 AdamW steps of 2 accumulated micro batches with clipping: the sparse-gradient path
    (rows touched only, densified into a reused buffer whose old rows are zeroed) gives the same weights as the
    dense backward. Step 2 touches rows step 1 did not, and vice versa, so a buffer that kept stale rows fails."""
    def run(sparse: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        emb, head = torch.nn.Embedding(50, 4), torch.nn.Linear(4, 1)
        params = list(emb.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=True)
        helper = SparseEmbeddingGrad(emb) if sparse else None
        batches = [[[1, 2, 2], [3, 4, 1]], [[10, 11, 12], [10, 13, 14]], [[1, 20, 21], [2, 2, 2]]]
        for step in batches:
            for ids in step:
                head(emb(torch.tensor([ids]))).pow(2).sum().backward()
            if helper:
                assert emb.weight.grad.is_sparse
                helper.densify()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step(), opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in params]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
