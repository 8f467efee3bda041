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
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attention_dropout=c.dropout)
    from model.checkpoint import config_from_hf, load_causal_lm
    from model.qwen import QwenForCausalLM

    drop = {"attention_dropout": c.dropout, "hidden_dropout": c.dropout}
    if path is not None:
        return load_causal_lm(path, **drop)
    import json

    qcfg = config_from_hf(json.loads(Path(c.init_config).read_text()), source=c.init_config)
    qcfg = dataclasses.replace(qcfg, **drop)
    return QwenForCausalLM(qcfg).init_weights(seed=c.seed)


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
    (or merged into the base weights for the final export when merge=True). Written to a temporary folder that is
    renamed into place, so a crash never leaves a half-written folder under `path`."""
    from common.atomic import atomic_dir
    from model.checkpoint import save_causal_lm
    from model.qwen import QwenForCausalLM

    if hasattr(model, "peft_config") and merge:
        model = model.merge_and_unload()
    if isinstance(model, QwenForCausalLM):
        save_causal_lm(model, path, tokenizer)
        return
    with atomic_dir(path) as tmp:  # transformers / peft write in place
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
