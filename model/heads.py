"""A scalar head on a causal-LM backbone, for reward and value models (Qwen report sec. 3.2.1).

The head gives one value per position (B, T), or (B, n) at the positions the caller asks for; which position is read
(the reward end token for a reward model, every response token for a value model) is the caller's choice, never
guessed here. Two implementations with the
same interface (forward, get_decoder, get_input_embeddings, resize_embeddings, save_pretrained, fresh_head):
- `ScalarHeadModel`: the custom Qwen2/Qwen3 backbone (model/qwen.py). Saved folders are Hugging Face
  `Qwen2ForSequenceClassification` / `Qwen3ForSequenceClassification` checkpoints (`model.*` + `score.weight`,
  num_labels = 1), so they load in transformers.
- `HFScalarHeadModel` (model_impl hf): any transformers backbone that has a `*ForSequenceClassification` class
  with a `score` layer (Llama, Mistral, GPT-2, GPT-NeoX, Gemma, Phi, Qwen, ...). Saved folders are that class's.
Loading from a plain causal-LM folder takes its backbone and starts a fresh head, N(0, 1/(H+1)) from `head_seed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.atomic import atomic_dir
from common.config import ConfigError
from model.checkpoint import check_keys, config_to_hf, read_config, read_state_dict, save_weights
from model.qwen import MODEL_TYPES, QwenConfig, QwenModel


def fresh_head_weight(shape, head_seed: int) -> torch.Tensor:
    """The initial score weight (1, H) ~ N(0, 1/(H+1)): scores start near 0 with unit-scale hidden states."""
    g = torch.Generator().manual_seed(head_seed)
    return torch.randn(shape, generator=g) / (shape[-1] + 1) ** 0.5


def resized_embedding(old: nn.Embedding, n: int) -> nn.Embedding:
    """A copy of `old` with n rows: the first min(n, V) rows kept, new rows set to the mean of the old ones."""
    new = nn.Embedding(n, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    k = min(n, old.num_embeddings)
    with torch.no_grad():
        new.weight[:k] = old.weight[:k]
        new.weight[k:] = old.weight.float().mean(0).to(old.weight.dtype)
    return new


class ScalarHeadModel(nn.Module):
    streams_weights = True  # saved by model.checkpoint.save_weights: ZeRO-3 streams it (common.loop.full_weights)

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.fresh_head = False  # True when from_pretrained started a new head on a causal-LM folder

    def get_decoder(self) -> QwenModel:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def resize_embeddings(self, n: int) -> None:
        """n embedding rows (new rows = mean of the old ones); config.vocab_size follows, so the saved folder loads."""
        self.model.embed_tokens = resized_embedding(self.model.embed_tokens, n)
        self.config.vocab_size = n

    def gradient_checkpointing_enable(self, **_):
        self.model.gradient_checkpointing = True

    def forward(self, input_ids, attention_mask=None, position_ids=None, positions=None, branch_ids=None):
        """Values (B, T) at every position, or (B, n) at `positions` (B, n) only: then the backbone's last layer,
        the final norm and the head run on those n positions alone (QwenModel.forward), the reward model's case.
        branch_ids (B, T): replies that share their prompt in one row (QwenModel.forward, reward.model)."""
        hidden = self.model(input_ids, attention_mask, position_ids, positions=positions,
                            branch_ids=branch_ids)  # (B, T or n, H)
        return self.score(hidden).squeeze(-1).float()  # (B, T) or (B, n)

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
            sd["score.weight"] = fresh_head_weight((1, cfg.hidden_size), head_seed)
            m.fresh_head = True
        m.load_state_dict({k: sd[k].to(dtype) for k in backbone | {"score.weight"}}, strict=True, assign=True)
        return m.eval()

    def save_pretrained(self, path, tokenizer=None, extra_files: dict[str, dict] | None = None):
        """Write a Qwen2ForSequenceClassification (Qwen3...) folder; `extra_files` are JSON files saved beside it
        (e.g. the reward normalisation statistics PPO reads)."""
        with atomic_dir(path) as tmp:  # a half-written folder never replaces the old one
            dtype = next(self.parameters()).dtype
            save_weights(self, tmp)  # under ZeRO-3 the files common.loop.full_weights streamed
            hf = config_to_hf(self.config, dtype, "ForSequenceClassification")
            hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
            if hf.get("pad_token_id") is None:
                hf["pad_token_id"] = hf.get("eos_token_id")
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            for name, obj in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2))
            if tokenizer is not None:
                from data.tokenizer import save_tokenizer

                save_tokenizer(tokenizer, tmp)
        return Path(path)


class HFScalarHeadModel(nn.Module):
    """The scalar head on any transformers backbone (model_impl hf). `net` is transformers'
    AutoModelForSequenceClassification with num_labels = 1 (e.g. LlamaForSequenceClassification); we run its
    backbone (`net.base_model`) and apply its `score` layer at every position. transformers' own pooling (at the last
    non-pad token) is not used: the caller reads the position it means."""

    def __init__(self, net):
        super().__init__()
        if not isinstance(getattr(net, "score", None), nn.Linear) or net.score.out_features != 1:
            raise ValueError(f"{type(net).__name__}: expected a `score` Linear(H, 1) head (num_labels = 1)")
        self.net = net
        self.config = net.config
        self.fresh_head = False

    def get_decoder(self) -> nn.Module:
        return self.net.base_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.net.get_input_embeddings()

    def resize_embeddings(self, n: int) -> None:
        old = self.get_input_embeddings()
        self.net.set_input_embeddings(resized_embedding(old, n))
        self.net.config.vocab_size = n  # what transformers' resize_token_embeddings records
        if hasattr(self.net.config, "get_text_config"):
            self.net.config.get_text_config().vocab_size = n

    def gradient_checkpointing_enable(self, **_):
        self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids, attention_mask=None, position_ids=None, positions=None):
        """Values (B, T), or (B, n) at `positions` (B, n) only (the head runs there; the backbone runs in full)."""
        out = self.net.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        if positions is not None:
            hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, n, H)
        return self.net.score(hidden).squeeze(-1).float()  # (B, T) or (B, n)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, head_seed: int = 0) -> "HFScalarHeadModel":
        """From a saved `*ForSequenceClassification` folder, or from a causal-LM folder (backbone only, new head)."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is expected; we set that head below
        try:
            net, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=1, dtype=dtype, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(level)
        m = cls(net)
        if any(k.split(".")[0] == "score" for k in info["missing_keys"]):
            with torch.no_grad():
                net.score.weight.copy_(fresh_head_weight(tuple(net.score.weight.shape), head_seed))
                if net.score.bias is not None:
                    net.score.bias.zero_()
            m.fresh_head = True
        return m.eval()

    def save_pretrained(self, path, tokenizer=None, extra_files: dict[str, dict] | None = None):
        """Write the `*ForSequenceClassification` folder (pad_token_id set, so transformers can batch it)."""
        cfg = self.net.config
        if cfg.pad_token_id is None and cfg.eos_token_id is not None:
            cfg.pad_token_id = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
        with atomic_dir(path) as tmp:
            self.net.save_pretrained(str(tmp))
            for name, obj in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2))
            if tokenizer is not None:
                from data.tokenizer import save_tokenizer

                save_tokenizer(tokenizer, tmp)
        return Path(path)


def folder_impl(path) -> str:
    """'custom' for a Qwen2/Qwen3 folder (config.json model_type), 'hf' for any other architecture."""
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    return "custom" if json.loads(f.read_text()).get("model_type", "qwen2") in MODEL_TYPES else "hf"


def load_scalar_head(path, impl: str = "auto", dtype: torch.dtype = torch.float32, head_seed: int = 0):
    """A ScalarHeadModel (impl 'custom') or HFScalarHeadModel ('hf'); 'auto' picks by the folder's model_type."""
    if impl == "auto":
        impl = folder_impl(path)
    if impl not in ("custom", "hf"):
        raise ValueError(f"model_impl must be 'custom', 'hf' or 'auto', got {impl!r}")
    cls = ScalarHeadModel if impl == "custom" else HFScalarHeadModel
    return cls.from_pretrained(path, dtype=dtype, head_seed=head_seed)


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
