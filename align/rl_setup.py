"""The RL entry point's phase 0 and loading (align/ppo.py runs them in `setup`): start-up checks that need no
model, what the run will not do, tokenizers, data, the four models and the rollout engine. Not an entry point; `c`
is an align.ppo.PPOConfig.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.models import with_lora
from align.rl import CRITIC_FREE, check_policy_context
from common.config import ConfigError

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


def check_start(c) -> None:
    """Phase 0, before the accelerator and any model: output_dir, the model folders (the reward and value folders
    must hold a trained score head), every data file (read and validated once; load_data takes the result), and
    for engine vllm the policy's shape (refused before vLLM is imported). A mistake here fails in seconds."""
    from common.preflight import check_model_folder, check_output_dir
    from data.datasets import check_records
    from model.heads import check_scalar_head_folder

    check_output_dir(c.output_dir)
    check_model_folder(c.policy_path, "policy_path", made_by="accelerate launch align/sft.py --config "
                                                             "configs/sft.yaml (the demo: make demo)")
    if c.reward_path is not None:
        check_model_folder(c.reward_path, "reward_path", made_by="accelerate launch reward/train.py --config "
                                                                 "configs/reward_pmp.yaml, then configs/reward_ft.yaml")
        check_scalar_head_folder(c.reward_path, "reward_path")
    if c.value_path is not None:
        check_model_folder(c.value_path, "value_path")
        check_scalar_head_folder(c.value_path, "value_path")
    for files, kind in ((c.prompt_files, "prompt"), (c.pretrain_files if c.ptx_on else [], "text"),
                        (c.heldout_files, "text")):
        for f in files:
            check_records(f, kind=kind)
    if c.model_impl == "custom":  # the sec. 2.5 context extension is the custom model's (config.json keys)
        try:
            check_policy_context(c.policy_path, c.max_prompt_len + c.max_new_tokens)
        except ConfigError:
            raise
        except ValueError as e:  # a config the custom model cannot read (another architecture)
            raise ConfigError(f"policy_path {c.policy_path}: {e}; for another transformers causal LM (Llama, ...) "
                              f"use --model_impl hf") from None
    if c.engine == "vllm":
        from model.checkpoint import read_config
        from rollout.vllm_engine import CPU_HEAD_SIZES, refuse_unsupported

        try:
            refuse_unsupported(read_config(c.policy_path), f"policy_path {c.policy_path}",
                               None if torch.cuda.is_available() else CPU_HEAD_SIZES)
        except ValueError as e:  # UnsupportedConfig, or a config the custom model cannot read
            raise ConfigError(f"--engine vllm: {e}".replace("make_engine('builtin', model=policy)",
                                                             "--engine builtin")) from None


def start_notes(c, n_ptx: int, n_heldout: int) -> list[str]:
    """What this run will not do, said at start: no ptx term, no alignment tax, a policy that never trains."""
    notes = []
    if c.ptx_coef > 0 and not c.pretrain_files:
        notes.append("no pretraining text (pretrain_files): PPO-ptx off")
    if not n_heldout:
        notes.append("no held-out text (heldout_files): no alignment tax is measured")
    if c.advantage == "gae" and c.max_steps <= c.value_warmup_steps:
        notes.append(f"warning: max_steps ({c.max_steps}) <= value_warmup_steps ({c.value_warmup_steps}): every "
                     f"step trains only the value model, so the policy will not train and final/ will equal "
                     f"policy_path; lower value_warmup_steps or raise max_steps")
    return notes


def folder_tokenizer(name: str | None, folder: str):
    """The tokenizer named in the config ('qwen2', 'small', 'demo' or a folder), else the one saved beside the model
    (the folder is the source of truth), with its chat format decided (data.template.chat_format)."""
    from data.template import chat_format
    from data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(name or folder)
        chat_format(tok)
        return tok
    except ValueError as e:
        raise ConfigError(f"{e}: pass --tokenizer / --reward_tokenizer") from None


def tokenizers_match(c, tok, rtok) -> bool:
    """A reward model reading the policy's ids with another vocabulary scores garbage
    (docs/PITFALLS.md#tokenizer-mismatch)."""
    from data.tokenizer import tokenizer_fingerprint

    same = tokenizer_fingerprint(tok) == tokenizer_fingerprint(rtok)
    if not same and c.tokenizer_mismatch == "refuse":
        raise ConfigError(f"the policy tokenizer ({c.policy_path}) and the reward tokenizer ({c.reward_path}) differ; "
                          f"use models trained with the same tokenizer, or --tokenizer_mismatch retokenize to score "
                          f"the decoded text with the reward tokenizer")
    return same


def load_data(c, tok):
    from data.datasets import build_prompt_examples, build_text_examples, load_records

    prompts, reports = [], []
    for f in c.prompt_files:
        ex, report = build_prompt_examples(load_records(f, kind="prompt")[0], tok, c.max_prompt_len)
        prompts += ex
        reports.append(f"{f}: {report.summary()}")
    text = lambda files: [r for f in files for r in build_text_examples(  # noqa: E731
        load_records(f, kind="text")[0], tok, c.ptx_seq_len)]
    ptx = text(c.pretrain_files) if c.ptx_on else []
    heldout = text(c.heldout_files)[:c.heldout_rows] if c.heldout_files else []
    if c.ptx_on and len(ptx) < c.ptx_rows:
        raise ConfigError(f"{', '.join(c.pretrain_files)}: {len(ptx)} rows of {c.ptx_seq_len} tokens, fewer than "
                          f"ptx_rows ({c.ptx_rows}) per step: lower ptx_rows or ptx_seq_len, or add text")
    return prompts, ptx, heldout, "\n".join(reports)


def load_models(c, resume_dir: Path | None, device):
    """policy (trainable), reference (frozen copy of SFT; None with LoRA: the policy with its adapter disabled),
    reward (frozen; None without reward_path), value (trainable, from the RM; None for critic-free advantages). The
    policy is the custom model (Qwen2/Qwen3) or, with model_impl hf, transformers' causal LM; the reward and value
    models are the custom scalar head on a Qwen2/Qwen3 folder, transformers' on any other."""
    from align.models import load_causal_lm_any
    from model.heads import load_scalar_head

    load_causal_lm = lambda path: load_causal_lm_any(path, c.model_impl)  # noqa: E731

    if c.lora_r:  # no LoRA dropout: the sampled and the trained log-probs come from the same function
        policy = with_lora(load_causal_lm(c.policy_path), c.lora_r, c.lora_alpha, c.lora_target_modules, 0.0,
                           resume_dir / "model" if resume_dir else None)
        policy, ref = policy.to(device).train(), None
    else:
        policy = load_causal_lm(str(resume_dir / "model") if resume_dir else c.policy_path).to(device).train()
        ref = load_causal_lm(c.policy_path).to(device).eval().requires_grad_(False)
    reward = None if c.reward_path is None else load_scalar_head(c.reward_path).to(device).eval().requires_grad_(False)
    if c.advantage in CRITIC_FREE:
        return policy, ref, reward, None
    value_dir = resume_dir / "value" if resume_dir else (c.value_path or c.reward_path)
    value = load_scalar_head(str(value_dir)).to(device).train()
    return policy, ref, reward, value


def build_engine(c, policy, pad_id: int, stage: int = 0):
    """rollout.make_engine; vLLM is imported only for engine 'vllm' (it loads the SFT folder, then gets synced).
    Under ZeRO-3 the built-in engine samples from its own whole copy of the policy (as vLLM does), loaded from the
    SFT folder and synced from the shards one size-capped bucket at a time (rollout/sync.py), in the dtype DeepSpeed
    trains in (bf16 under --precision bf16: half the memory, and the policy's own rounding of the weights)."""
    from rollout import make_engine

    if c.engine == "builtin" and stage == 3:
        from common.loop import resolve_precision
        from model.checkpoint import load_causal_lm
        from rollout.builtin import ShardedSyncEngine

        dtype = torch.bfloat16 if resolve_precision(c.precision) == "bf16" else torch.float32
        return ShardedSyncEngine(load_causal_lm(c.policy_path, dtype).eval().requires_grad_(False), pad_id=pad_id)
    if c.engine == "builtin":
        return make_engine("builtin", policy, pad_id=pad_id)
    return make_engine("vllm", policy, c.policy_path, max_model_len=c.max_prompt_len + c.max_new_tokens,
                       seed=c.seed)


def use_true_reward(c) -> bool:
    if c.true_reward is not None:
        return c.true_reward
    return all(Path(f).resolve().parent == DEMO_DIR for f in c.prompt_files)
