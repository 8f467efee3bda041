"""A scalar head on the Qwen backbone, for reward and value models (Qwen report sec. 3.2.1).

The head gives one value per position (B, T); which position is read (the reward end token for a reward model,
every response token for a value model) is the caller's choice, never guessed here. Saved folders are Hugging Face
`Qwen2ForSequenceClassification` checkpoints (`model.*` + `score.weight`, num_labels = 1), so they load in
transformers; loading from a plain causal-LM folder takes its backbone and starts a fresh head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.atomic import atomic_dir
from common.config import ConfigError
from model.checkpoint import check_keys, config_to_hf, read_config, read_state_dict, write_weights
from model.qwen import QwenConfig, QwenModel


class ScalarHeadModel(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def get_decoder(self) -> QwenModel:
        return self.model

    def gradient_checkpointing_enable(self, **_):
        self.model.gradient_checkpointing = True

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids)  # (B, T, H)
        return self.score(hidden).squeeze(-1).float()  # (B, T)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, head_seed: int = 0) -> "ScalarHeadModel":
        """From a saved scalar-head folder, or from a causal-LM folder (backbone only; new head ~ N(0, 1/(H+1)))."""
        cfg = read_config(path)
        with torch.device("meta"):
            m = cls(cfg)
        sd = read_state_dict(path)
        backbone = {k for k in m.state_dict() if k.startswith("model.")}
        if "score.weight" in sd:
            check_keys(backbone | {"score.weight"}, set(sd), str(path))
        else:
            check_keys(backbone, set(sd) - {"lm_head.weight"}, str(path))
            g = torch.Generator().manual_seed(head_seed)
            sd["score.weight"] = torch.randn(1, cfg.hidden_size, generator=g) / (cfg.hidden_size + 1) ** 0.5
        m.load_state_dict({k: sd[k].to(dtype) for k in backbone | {"score.weight"}}, strict=True, assign=True)
        return m.eval()

    def save_pretrained(self, path, tokenizer=None, extra_files: dict[str, dict] | None = None):
        """Write a Qwen2ForSequenceClassification folder; `extra_files` are JSON files saved beside it
        (e.g. the reward normalisation statistics PPO reads)."""
        with atomic_dir(path) as tmp:  # a half-written folder never replaces the old one
            dtype = next(self.parameters()).dtype
            write_weights(self.state_dict(), tmp)
            hf = config_to_hf(self.config, dtype, "Qwen2ForSequenceClassification")
            hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
            if hf.get("pad_token_id") is None:
                hf["pad_token_id"] = hf.get("eos_token_id")
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            for name, obj in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return Path(path)


def check_scalar_head_folder(path: str | Path, name: str = "reward_path") -> None:
    """Refuse a folder that is not a scalar-head model with its head saved: a reward model written by reward/train.py
    (or any Hugging Face `*ForSequenceClassification` folder with one label and a `score.weight`). A causal LM would
    load with a fresh random head (ScalarHeadModel.from_pretrained does that on purpose for PMP's start), and PPO
    would then train against noise."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name} {path}: no readable config.json ({e})") from None
    archs = cfg.get("architectures") or []
    keys = _weight_names(path)
    how = (f"train one with `python reward/train.py --config configs/reward_pmp.yaml --model_path {path}`, then "
           f"configs/reward_ft.yaml, and pass its final/ folder")
    if not any(a.endswith("ForSequenceClassification") for a in archs) or "score.weight" not in keys:
        kind = ", ".join(archs) or cfg.get("model_type", "unknown")
        raise ConfigError(f"{name} {path} is not a reward model ({kind}, no trained score head): PPO would read scores "
                         f"from a random head and train against noise; {how}")
    n_labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 1)
    if n_labels != 1:
        raise ConfigError(f"{name} {path}: a classifier with {n_labels} labels, not a reward model with one score; "
                         f"{how}")


def _weight_names(path: Path) -> set[str]:
    """Tensor names of a safetensors folder, from the headers only."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    names = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names
