"""Read and write Hugging Face `Qwen2ForCausalLM` and `Qwen3ForCausalLM` checkpoint folders (config.json +
safetensors, sharded or not).

Weights are read with safetensors only: no pickle, no remote code. A config this model cannot reproduce, or a
checkpoint with missing or unexpected weights, fails at load with the offending fields or keys named.
Saved folders load in transformers (`AutoModelForCausalLM`) and vLLM; writes go to a temporary folder that is
renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.atomic import atomic_dir
from common.safestate import StreamedSafetensors
from model.qwen import MODEL_TYPES, QwenConfig, QwenForCausalLM

# config.json keys that map onto QwenConfig fields one to one.
_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
           "attention_dropout", "hidden_dropout", "rope_train_len", "ntk_factor", "use_dynamic_ntk", "use_logn_attn",
           "layer_windows", "extend_context_in_training", "use_sliding_window", "sliding_window", "max_window_layers"]
# Qwen3Config's defaults for keys a config.json may leave out, where they differ from QwenConfig's.
_HF_DEFAULTS = {"qwen3": {"head_dim": 128, "max_window_layers": 28}}
# Keys that transformers writes and that change nothing we compute.
_IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "initializer_range",
            "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "layer_types", "output_attentions",
            "output_hidden_states", "return_dict", "id2label", "label2id", "num_labels", "problem_type",
            "rope_scaling", "rope_parameters", "rope_theta", "hidden_act", "attention_bias"}


def config_from_hf(d: dict, source: str = "config.json") -> QwenConfig:
    """Build a QwenConfig from a Hugging Face Qwen2 or Qwen3 config dict; raise naming each field we cannot
    reproduce."""
    problems = []
    model_type = d.get("model_type", "qwen2")
    if model_type not in MODEL_TYPES:
        problems.append(f"model_type={model_type!r} (the custom model is {' or '.join(map(repr, MODEL_TYPES))}; "
                        "other architectures train with model_impl: hf)")
    if model_type == "qwen3" and d.get("attention_bias"):
        problems.append("attention_bias=True (Qwen3 models have no attention bias; vLLM's Qwen3 has none on o_proj)")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (SwiGLU needs 'silu')")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r} (use ntk_factor / use_dynamic_ntk instead)")
    d = {**_HF_DEFAULTS.get(model_type, {}), **d}
    layer_types = d.get("layer_types")
    if layer_types is not None:
        expected = ["sliding_attention" if d.get("use_sliding_window") and d.get("sliding_window")
                    and i >= d.get("max_window_layers", 0) else "full_attention"
                    for i in range(d["num_hidden_layers"])]
        if list(layer_types) != expected:
            problems.append(f"layer_types={layer_types} (only windows on layers >= max_window_layers)")
    if problems:
        raise ValueError(f"{source}: this model cannot reproduce: " + "; ".join(problems))
    kw = {k: d[k] for k in _FIELDS if k in d and d[k] is not None}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    extra = {k: v for k, v in d.items() if k not in _FIELDS and k not in _IGNORED}
    extra.update({k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if d.get(k) is not None})
    return QwenConfig(model_type=model_type, **kw, extra=extra)


def hf_architecture(cfg: QwenConfig, task: str = "ForCausalLM") -> str:
    """'Qwen2ForCausalLM', 'Qwen3ForSequenceClassification', ...: the transformers class of a saved folder."""
    return {"qwen2": "Qwen2", "qwen3": "Qwen3"}[cfg.model_type] + task


def config_to_hf(cfg: QwenConfig, dtype: torch.dtype = torch.float32, task: str = "ForCausalLM") -> dict:
    d = cfg.to_dict()
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    if not cfg.use_sliding_window:
        d["sliding_window"] = None
    for k in ("rope_train_len", "ntk_factor", "use_dynamic_ntk", "use_logn_attn", "layer_windows",
              "extend_context_in_training", "hidden_dropout"):
        if d[k] == QwenConfig.__dataclass_fields__[k].default:
            d.pop(k)  # keep config.json plain Qwen2/Qwen3 unless an extension is on
    if cfg.model_type == "qwen3":
        d["attention_bias"] = False
    # transformers_version, as save_pretrained writes it: without it transformers 5.x takes a folder holding a
    # config.json for a possible Mistral one and warns on every tokenizer load of "an incorrect regex pattern"
    # (transformers#42591), though a Qwen tokenizer is not affected.
    from importlib.metadata import version

    return {"architectures": [hf_architecture(cfg, task)], "hidden_act": "silu",
            "dtype": str(dtype).removeprefix("torch."), "initializer_range": 0.02, "use_cache": True, **d,
            "transformers_version": version("transformers")}


def read_config(path: str | os.PathLike) -> QwenConfig:
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    return config_from_hf(json.loads(f.read_text()), source=str(f))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, or the shards listed in model.safetensors.index.json."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (found {found}); "
                                "only safetensors weights are read")
    sd = {}
    for name in files:
        sd.update(load_file(str(path / name)))
    return sd


def check_keys(expected: set[str], got: set[str], source: str, optional: set[str] = frozenset()):
    missing, unexpected = sorted(expected - got - optional), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} unexpected {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")


def load_causal_lm(path, dtype: torch.dtype = torch.float32, **overrides) -> QwenForCausalLM:
    """Load a Qwen2ForCausalLM or Qwen3ForCausalLM folder into the custom model. `overrides` set QwenConfig fields
    (e.g. use_logn_attn)."""
    cfg = read_config(path)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    with torch.device("meta"):
        model = QwenForCausalLM(cfg)
    sd = read_state_dict(path)
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the embedding is the output layer
    check_keys(set(model.state_dict()) - optional, set(sd), str(path), optional)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.source_generation_config = read_generation_config(path)  # written back unchanged by save_causal_lm
    return model.eval()


def write_weights(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2 * 1024**3):
    """Write safetensors, sharded with an index file when larger than max_shard_bytes, one tensor at a time
    (common.safestate.StreamedSafetensors, the writer ZeRO-3 saves stream through)."""
    writer = StreamedSafetensors(folder, StreamedSafetensors.header_bound(sd), max_shard_bytes)
    for k, v in sd.items():
        writer.add(k, v)
    writer.close()


def save_weights(model, folder: Path, max_shard_bytes: int = 2 * 1024**3, drop=()) -> None:
    """`model`'s weights into `folder`: under ZeRO-3 the files common.loop.full_weights wrote bucket by bucket
    (`model.staged_weights`), hard-linked in; otherwise its state_dict without the keys in `drop` (write_weights).
    ZeRO-3 shards outside full_weights are refused, never written as empty tensors."""
    staged = getattr(model, "staged_weights", None)
    if staged is not None:
        for f in sorted(Path(staged).iterdir()):
            try:
                os.link(f, folder / f.name)  # the same file system: no copy, and the staging folder can go
            except OSError:
                shutil.copyfile(f, folder / f.name)
        return
    shards = [n for n, p in model.named_parameters() if p.numel() != getattr(p, "ds_numel", p.numel())]
    if shards:
        raise RuntimeError(f"{shards[0]} and {len(shards) - 1} more weights are DeepSpeed ZeRO-3 shards: save the "
                           "model inside common.loop.full_weights, which gathers them")
    sd = model.state_dict()
    for k in drop:
        sd.pop(k, None)
    write_weights(sd, folder, max_shard_bytes)


def save_causal_lm(model: QwenForCausalLM, path, tokenizer=None, max_shard_bytes: int = 2 * 1024**3):
    """Save as a Hugging Face Qwen2ForCausalLM / Qwen3ForCausalLM folder. With tied embeddings `lm_head.weight` is left
    out, as transformers does (the rollout weight sync sends it explicitly; see rollout/). generation_config.json is
    the one of the folder the model was loaded from, byte for byte (its temperature, top_p, EOS ids); a model built
    from a config gets a plain one. The tokenizer is written by data.tokenizer.save_tokenizer (the input's files
    when unchanged)."""
    from data.tokenizer import save_tokenizer

    with atomic_dir(path) as tmp:  # a half-written folder never replaces the old one
        dtype = next(model.parameters()).dtype
        save_weights(model, tmp, max_shard_bytes, drop=("lm_head.weight",) if model.config.tie_word_embeddings else ())
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2))
        write_generation_config(model, tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return Path(path)


GENERATION_CONFIG = "generation_config.json"


def read_generation_config(folder) -> str | None:
    """The text of a folder's generation_config.json, or None."""
    f = Path(folder) / GENERATION_CONFIG
    return f.read_text(encoding="utf-8") if f.is_file() else None


def write_generation_config(model, folder: Path):
    """The loaded folder's generation_config.json unchanged (model.source_generation_config), else a plain one."""
    text = getattr(model, "source_generation_config", None)
    if text is None:
        cfg = getattr(model, "config", model)
        eos = cfg.extra.get("eos_token_id") if isinstance(cfg, QwenConfig) else getattr(cfg, "eos_token_id", None)
        gen = {"do_sample": True, "top_p": 0.9} | ({"eos_token_id": eos} if eos is not None else {})
        text = json.dumps(gen, indent=2)
    (Path(folder) / GENERATION_CONFIG).write_text(text, encoding="utf-8")


def generation_eos_ids(folder) -> list[int]:
    """The EOS ids a model folder stops generating at: generation_config.json's eos_token_id (an int or a list, e.g.
    Qwen2.5-Instruct's [151645, 151643]), else config.json's; [] when neither has one."""
    for name in (GENERATION_CONFIG, "config.json"):
        f = Path(folder) / name
        if f.is_file():
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return [int(x) for x in (eos if isinstance(eos, list) else [eos])]
    return []


def generation_sampling(folder) -> dict:
    """temperature / top_p of a folder's generation_config.json (do_sample false: greedy, temperature 0); {} if
    it sets neither."""
    text = read_generation_config(folder)
    gen = json.loads(text) if text else {}
    if gen.get("do_sample") is False:
        return {"temperature": 0.0, "top_p": 1.0}
    return {k: float(gen[k]) for k in ("temperature", "top_p") if gen.get(k) is not None}
