"""Causal-LM building, LoRA and saving, shared by the trainers (align/sft.py, align/dpo.py, align/ppo.py).

Not an entry point: entry points import from here, never from each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base_model(c, path: str | None):
    """fp32 weights (mixed precision is autocast): the custom model from `path` or init_config, or transformers'."""
    if c.model_impl == "hf":
        return load_hf_causal_lm(path, attention_dropout=c.dropout)
    from model.checkpoint import config_from_hf, load_causal_lm
    from model.qwen import QwenForCausalLM

    drop = {"attention_dropout": c.dropout, "hidden_dropout": c.dropout}
    if path is not None:
        return load_causal_lm(path, **drop)
    import json

    qcfg = config_from_hf(json.loads(Path(c.init_config).read_text()), source=c.init_config)
    qcfg = dataclasses.replace(qcfg, **drop)
    return QwenForCausalLM(qcfg).init_weights(seed=c.seed)


def load_hf_causal_lm(path: str, **kwargs):
    """transformers' AutoModelForCausalLM in fp32, remembering the folder's generation_config.json so that
    save_model writes it back unchanged."""
    from transformers import AutoModelForCausalLM

    from model.checkpoint import read_generation_config

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    model.source_generation_config = read_generation_config(path)
    return model


def model_impl_of(path: str, impl: str = "auto") -> str:
    """'custom' or 'hf' for a causal-LM folder: impl 'auto' takes the custom model for the Qwen2 / Qwen3 configs it
    reproduces, transformers for everything else."""
    if impl != "auto":
        return impl
    import json

    from model.checkpoint import config_from_hf

    try:
        config_from_hf(json.loads((Path(path) / "config.json").read_text()))
        return "custom"
    except (ValueError, KeyError, TypeError):
        return "hf"


def load_causal_lm_any(path: str, impl: str = "auto"):
    """A causal-LM folder as the custom model or transformers' (model_impl_of), fp32, eval mode."""
    if model_impl_of(path, impl) == "hf":
        return load_hf_causal_lm(path).eval()
    from model.checkpoint import load_causal_lm

    return load_causal_lm(path)


def with_lora(base, r: int, alpha: float, targets: list[str], dropout: float, adapter_dir: Path | None):
    """`base` wrapped in a trainable LoRA adapter: a new one (rank r), or the one saved in `adapter_dir` (resume)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                           target_modules=list(targets), bias="none"))


def build_model(c, resume_dir: Path | None):
    """Full finetuning resumes from the checkpoint's HF folder; LoRA rebuilds the base and loads the adapter."""
    if c.lora_r == 0:
        model = build_base_model(c, str(resume_dir / "model") if resume_dir else c.model_path)
    else:
        model = with_lora(build_base_model(c, c.model_path), c.lora_r, c.lora_alpha, c.lora_target_modules,
                          c.lora_dropout, resume_dir / "model" if resume_dir else None)
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def save_model(model, path: Path, tokenizer, merge: bool = False) -> None:
    """HF folder: custom model via model.checkpoint, transformers via save_pretrained, LoRA as an adapter
    (or merged into the base weights for the final export when merge=True); the input folder's
    generation_config.json and tokenizer files are kept (model.checkpoint.write_generation_config,
    data.tokenizer.save_tokenizer). Written to a temporary folder that is
    renamed into place, so a crash never leaves a half-written folder under `path`."""
    from common.atomic import atomic_dir
    from data.tokenizer import save_tokenizer
    from model.checkpoint import save_causal_lm, write_generation_config
    from model.qwen import QwenForCausalLM

    if hasattr(model, "peft_config") and merge:
        base = model.get_base_model()  # under ZeRO-3 full_weights staged it LoRA-merged, layer by layer
        model = base if getattr(base, "staged_weights", None) is not None else model.merge_and_unload()
    if isinstance(model, QwenForCausalLM):
        save_causal_lm(model, path, tokenizer)
        return
    with atomic_dir(path) as tmp:  # transformers / peft write in place
        model.save_pretrained(str(tmp), safe_serialization=True)
        if getattr(model, "source_generation_config", None) is not None and not hasattr(model, "peft_config"):
            write_generation_config(model, tmp)  # the input folder's, byte for byte (not transformers' re-write)
        save_tokenizer(tokenizer, tmp)
