"""--report_to: metrics.jsonl always, and the rows given to accelerate's trackers. wandb runs in offline mode (no
network): its run file (run-<id>.wandb, LevelDB-log framed protobuf records) is read back and must hold the same
rows as metrics.jsonl, the run's config and the run id as the wandb run id."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from common.config import ConfigError
from common.metrics import parse_report_to

TINY = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
        "tie_word_embeddings": True}


def wandb_records(path: Path):
    """The protobuf records of an offline wandb run file: a 7-byte header (':W&B', magic, version), then LevelDB log
    blocks of 32 KiB, each chunk a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def test_unknown_or_missing_tracker_is_a_config_error():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("TensorBoard, wandb,wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown tracker 'wandbb'"):
        parse_report_to("tensorboard,wandbb")


def item_key(item) -> str:
    """A wandb record item's name: `key`, or (wandb >= 0.2x) the `nested_key` path joined with '/'."""
    return item.key or "/".join(item.nested_key)


def test_sft_reports_its_metrics_to_wandb_offline(tmp_path, small_tok, monkeypatch):
    pytest.importorskip("wandb")
    import align.sft
    from model.checkpoint import config_from_hf, save_causal_lm
    from model.qwen import QwenForCausalLM

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_causal_lm(QwenForCausalLM(config_from_hf(TINY)).init_weights(seed=0), tmp_path / "model", small_tok)
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("apple", "pear", "plum", "fig")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    align.sft.main(["--model_path", str(tmp_path / "model"), "--train_files", str(tmp_path / "sft.jsonl"),
                    "--output_dir", str(out), "--seq_len", "64", "--micro_batch_size_per_rank", "2",
                    "--grad_accum_steps", "1", "--warmup_steps", "0", "--max_steps", "2", "--lr", "1e-3",
                    "--report_to", "tensorboard,wandb"])
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "tb").is_dir()
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, list((out / "wandb").rglob("*"))
    history, config, runs = {}, {}, []  # history: wandb step -> the values logged at it
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            values = {item_key(i): json.loads(i.value_json) for i in rec.history.item}
            if "_step" in values:
                history.setdefault(values["_step"], {}).update(
                    {k: v for k, v in values.items() if not k.startswith("_")})
        elif kind == "config":
            config.update({item_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            runs.append((rec.run.run_id, rec.run.project, rec.run.display_name))
    assert runs[0] == (run_id, "qwen-align", f"sft-{run_id}")
    assert config["lr"] == 1e-3 and config["max_steps"] == 2
    floats = [(r["step"], {k: v for k, v in r.items() if isinstance(v, float)}) for r in jsonl]
    assert [s for s, v in floats if "loss" in v] == [1, 2]
    for step, want in floats:
        assert {k: history[step][k] for k in want} == pytest.approx(want, rel=1e-12), step
    assert os.environ["WANDB_MODE"] == "offline"
