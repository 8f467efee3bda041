"""Start-up checks that need no model: every entry point runs them before it loads one, so a mistake in a path, a
folder or a vocabulary fails in seconds with one `config error: ...` paragraph (common.run.run_main prints it),
not minutes later inside a model loader. Data files are checked by data.datasets.check_records.

    check_output_dir(c.output_dir)
    cfg = check_model_folder(c.model_path, "model_path")   # config.json as a dict
    check_vocab(tokenizer, c.model_path, "model_path")     # after the tokenizer is loaded, before the model
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import ConfigError

# Files one of which holds a transformers model's weights (a single file, or the index of a sharded one).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_output_dir(path: str | Path, field: str = "output_dir") -> None:
    """The output folder must be a folder or creatable: neither it nor a folder above it may be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field} {path} is a file, not a folder; give a folder path (it is created if missing)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{field} {path}: {parent} is a file, not a folder")
            break


def check_model_folder(path: str | Path | None, field: str, made_by: str | None = None) -> dict:
    """A transformers model folder: it exists, is a folder, has a readable config.json and a weights file.
    Returns config.json as a dict. `made_by` names the command that writes such a folder (said when it is
    missing)."""
    if not path:
        raise ConfigError(f"{field} is not set: give the model folder")
    path = Path(path)
    how = f"; create it with `{made_by}` or pass --{field} FOLDER" if made_by else ""
    if not path.exists():
        raise ConfigError(f"{field} {path}: no such folder{how}")
    if not path.is_dir():
        raise ConfigError(f"{field} {path} is a file; give the folder a model was saved in (save_pretrained)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{field} {path}: no config.json, so not a transformers model folder (a model saved with "
                          f"save_pretrained holds config.json and its weights){how}")
    cfg = check_config_file(cfg_file, field)
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ConfigError(f"{field} {path}: config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}): the save "
                          f"did not finish, or this is a tokenizer or adapter folder")
    return cfg


def check_config_file(path: str | Path, field: str) -> dict:
    """A config.json file given by path (e.g. init_config for a randomly initialised model): readable JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field} {path}: no such file" + (" (a folder: give its config.json)" if path.is_dir()
                                                               else ""))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{field} {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{field} {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{field} {path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def check_trainer_start(c) -> None:
    """The start of every trainer's phase 0 (SFT, DPO, KTO): output_dir, then the model folder, or init_config when
    no model_path is given."""
    check_output_dir(c.output_dir)
    if c.model_path is not None:
        check_model_folder(c.model_path, "model_path")
    else:
        check_config_file(c.init_config, "init_config")


def config_vocab(cfg: dict) -> int | None:
    """vocab_size of a config.json dict (or of its text_config, for multimodal configs); None if it has none."""
    for d in (cfg, cfg.get("text_config") or {}):
        if isinstance(d, dict) and isinstance(d.get("vocab_size"), int):
            return d["vocab_size"]
    return None


def check_vocab(tokenizer, folder: str | Path, field: str, tokenizer_name: str | None = None) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows (read from config.json, no model
    loaded): its top ids would index past the embedding (an IndexError mid-run, or garbage on a GPU)."""
    f = Path(folder) if Path(folder).suffix == ".json" else Path(folder) / "config.json"
    try:
        vocab = config_vocab(json.loads(f.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return  # check_model_folder reports an unreadable config
    if vocab is not None and len(tokenizer) > vocab:
        name = f"tokenizer {tokenizer_name!r}" if tokenizer_name else "the tokenizer"
        raise ConfigError(f"{name} has {len(tokenizer)} tokens but {field} {folder} has vocab_size {vocab} "
                          f"(config.json): token ids >= {vocab} have no embedding row. Use the tokenizer the model "
                          f"was trained with (the one saved in its folder)")
