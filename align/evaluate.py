"""Compare policies on held-out prompts: reward-model score, KL from the reference, reply length, your own rules.

    python -m align.evaluate --policy SFT=runs/sft/final --policy DPO=runs/dpo/final --reference runs/sft/final \
        --reward runs/rm/final --prompts my_prompts.jsonl [--reward_funcs my_rules:polite] [--heldout text.jsonl]

Every policy samples `n` replies per held-out prompt with the same seed (temperature 1, top-p 1: the policy's own
distribution, so that the KL estimate below is unbiased), rendered with the policy folder's chat template and stopped
at its generation config's EOS ids. Per policy:
- RM score (with --reward): the reward model read at its <|reward|> token, normalised with the model's saved
  statistics (reward_stats.json);
- KL(policy || reference) per reply: the mean over replies of sum_t (log pi - log pi_ref) on the sampled tokens
  (k1); the reference defaults to the first --policy;
- reply tokens and the share of replies that end with an EOS;
- one column per --reward_funcs function (your checkable rule: function(messages, reply_text) -> float);
- with --heldout: LM loss on held-out pretraining text; the alignment tax is its rise over the reference
  (Ouyang et al. 2022); without it no alignment tax is measured (said at start);
- the demo's rule (`data.demo_reward.true_reward`) only on the demo's prompts (data/demo/) or with --demo_reward.
The tokenizer is the reference folder's (every policy must use the same vocabulary). No field defaults to the demo's
files. Mistakes (a missing folder or file, a broken record) fail before any model loads, in one paragraph, exit 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from common.config import ConfigError, InputError, cfg, parse_config, user_errors

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


@dataclass
class EvalConfig:
    policy: list[str] = cfg([], "NAME=FOLDER of a causal-LM checkpoint (or just FOLDER); repeat for each policy",
                            required=True)
    reference: str = cfg("", "reference policy folder (the SFT model): KL and alignment tax are measured from it; "
                             "empty = the first --policy")
    reward: str = cfg("", "reward-model folder (reward/train.py's final/): RM score, normalised with its "
                          "reward_stats.json; empty = no RM score")
    reward_funcs: list[str] = cfg([], "your own rules, module:function or path/file.py:function (as PPO's "
                                      "reward_funcs), each called as function(messages, reply_text) -> float; one "
                                      "column each")
    demo_reward: Optional[bool] = cfg(None, "the demo's rule data.demo_reward.true_reward; None = only when the "
                                            "prompts file is the demo's (data/demo/)")
    prompts: str = cfg("", "held-out prompts (records with a 'prompt', or conversations: their last reply is "
                           "dropped)", required=True)
    heldout: str = cfg("", "held-out pretraining text ({'text'}) for the LM loss and alignment tax; empty = none")
    tokenizer: Optional[str] = cfg(None, "None = the reference folder's own; or 'qwen2', 'small', 'demo' or a folder")
    model_impl: str = cfg("auto", "'auto' (the custom model for Qwen2/Qwen3 folders, transformers for others), "
                                  "'custom' or 'hf'")
    n: int = cfg(2, "replies sampled per prompt")
    max_prompts: int = cfg(200, "evaluate on at most this many prompts")
    max_prompt_len: int = cfg(512, "prompts longer than this (tokens) keep their last tokens")
    max_new_tokens: int = cfg(64, "reply length limit")
    seq_len: int = cfg(256, "row length of the held-out text")
    heldout_rows: int = cfg(64, "rows of held-out text for the LM loss")
    seed: int = cfg(0, "sampling seed (the same for every policy)")
    out: str = cfg("runs/eval", "folder for eval.json and eval.md")

    def validate(self):
        if any(p.startswith("=") or p.endswith("=") for p in self.policy):
            raise ConfigError(f"--policy takes NAME=FOLDER or FOLDER, got {self.policy}")
        if self.n < 1 or self.max_new_tokens < 1 or self.max_prompts < 1 or self.max_prompt_len < 1:
            raise ConfigError("n, max_new_tokens, max_prompts and max_prompt_len must be >= 1")
        if self.model_impl not in ("auto", "custom", "hf"):
            raise ConfigError(f"model_impl must be auto, custom or hf, got {self.model_impl!r}")


def policies(c: EvalConfig) -> list[tuple[str, str]]:
    """(name, folder) of each --policy: NAME=FOLDER, or FOLDER named by its path."""
    return [tuple(p.split("=", 1)) if "=" in p else (p, p) for p in c.policy]


def use_demo_reward(c: EvalConfig) -> bool:
    if c.demo_reward is not None:
        return c.demo_reward
    return Path(c.prompts).resolve().parent == DEMO_DIR


def sample(model, prompt_ids, c: EvalConfig, pad_id: int, stop: list[int]):
    from rollout.base import SamplingParams
    from rollout.builtin import BuiltinEngine

    params = SamplingParams(n=c.n, temperature=1.0, top_p=1.0, max_tokens=c.max_new_tokens, stop_token_ids=stop,
                            seed=c.seed)
    return BuiltinEngine(model, pad_id=pad_id).generate(prompt_ids, params)


def sequence_kl(policy, reference, ro, pad_id: int) -> torch.Tensor:
    """(N,) sum over response tokens of log pi - log pi_ref on the sampled tokens."""
    from align.experience import response_logprobs, rollout_tensors

    batch = rollout_tensors(ro.prompt_ids, ro.response_ids, pad_id)
    with torch.no_grad():
        lp = response_logprobs(policy, batch, 1.0, 256)
        lr = response_logprobs(reference, batch, 1.0, 256)
    return ((lp - lr) * batch["mask"]).sum(-1)  # (N,)


def rm_scores(rm, stats, tok, rtok, ro, messages) -> torch.Tensor:
    """(N,) reward-model scores at <|reward|>, normalised with the model's statistics when it has them."""
    from align.experience import reward_sequences
    from data.tokenizer import tokenizer_fingerprint
    from reward.model import pad_sequences, reward_token_id, score

    same = tokenizer_fingerprint(tok) == tokenizer_fingerprint(rtok)
    seqs = reward_sequences(ro.prompt_ids, ro.response_ids, messages, tok, rtok, same)
    pad = rtok.pad_token_id if rtok.pad_token_id is not None else rtok.eos_token_id
    out = []
    with torch.no_grad():
        for s in range(0, len(seqs), 32):
            ids, mask = pad_sequences(seqs[s:s + 32], pad)
            out.append(score(rm, ids, mask, reward_token_id(rtok)))
    r = torch.cat(out)
    return (r - stats["mean"]) / stats["std"] if stats else r


def check_start(c: EvalConfig) -> None:
    """Before any model loads: the output folder, every model folder and the data files (read and validated once)."""
    from common.preflight import check_model_folder, check_output_dir
    from data.datasets import check_records

    check_output_dir(c.out, "--out")
    folders = [(f"--policy {name}", path) for name, path in policies(c)]
    folders += [(f"--{f}", getattr(c, f)) for f in ("reference", "reward") if getattr(c, f)]
    for name, path in folders:
        check_model_folder(path, name)
    check_records(c.prompts, kind="prompt")
    if c.heldout:
        check_records(c.heldout, kind="text")
    else:
        print("[eval] no held-out text (--heldout): no alignment tax is measured", flush=True)


def load_inputs(c: EvalConfig):
    """Tokenizer (the reference folder's unless named), prompts, held-out rows; every policy's tokenizer checked."""
    from data.datasets import build_prompt_examples, build_text_examples, load_records
    from data.template import load_chat_tokenizer
    from data.tokenizer import load_tokenizer, tokenizer_fingerprint

    reference = c.reference or policies(c)[0][1]
    tok = load_chat_tokenizer(c.tokenizer, reference, "eval")
    if c.tokenizer is None:
        for name, path in policies(c):
            if (Path(path) / "tokenizer.json").is_file() and \
                    tokenizer_fingerprint(load_tokenizer(path)) != tokenizer_fingerprint(tok):
                raise ConfigError(f"policy {name} ({path}) has another tokenizer than the reference {reference}; "
                                  f"compare policies trained from the same model")
    try:
        records, _ = load_records(c.prompts, kind="prompt")
        prompts, report = build_prompt_examples(records[:c.max_prompts], tok, c.max_prompt_len, truncation="truncate")
        heldout = []
        if c.heldout:
            heldout = build_text_examples(load_records(c.heldout, kind="text")[0], tok, c.seq_len)[:c.heldout_rows]
    except ValueError as e:  # a record the chat template cannot render (files were checked by check_start)
        if isinstance(e, (ConfigError, InputError)):
            raise
        raise InputError(f"{c.prompts}: {e}") from None
    print(f"[eval] {c.prompts}: {report.summary()}", flush=True)
    return reference, tok, prompts, heldout


def evaluate(c: EvalConfig) -> dict:
    from align.experience import heldout_loss, stop_ids
    from align.models import load_causal_lm_any
    from align.rl import call_reward_funcs, load_reward_func
    from model.checkpoint import generation_eos_ids
    from reward.model import load_reward_model, load_tokenizer

    check_start(c)
    funcs = [load_reward_func(spec) for spec in c.reward_funcs]  # PPO's loader: one line naming a broken spec
    short = [getattr(fn, "__name__", spec) for spec, fn in funcs]  # a column per function: its name, unless shared
    funcs = [(n if short.count(n) == 1 else spec, fn) for n, (spec, fn) in zip(short, funcs)]
    if use_demo_reward(c):
        from data.demo_reward import true_reward

        funcs = [("true_reward", true_reward)] + funcs
    torch.manual_seed(c.seed)
    ref_path, tok, prompts, heldout = load_inputs(c)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rm = rtok = stats = None
    if c.reward:
        stats_file = Path(c.reward) / "reward_stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else None
        rm, rtok = load_reward_model(c.reward).eval(), load_tokenizer(c.reward)
    reference = load_causal_lm_any(ref_path, c.model_impl)
    ref_loss = heldout_loss(reference, heldout, pad, 256) if heldout else None
    results = {}
    for name, path in policies(c):
        policy = load_causal_lm_any(path, c.model_impl)
        stop = stop_ids(tok, None, generation_eos_ids(path))
        ro = sample(policy, [p["prompt_ids"] for p in prompts], c, pad, stop)
        msgs = [prompts[i]["messages"] for i in ro.prompt_index]
        texts = [tok.decode([t for t in r if t not in stop], skip_special_tokens=True) for r in ro.response_ids]
        _, values = call_reward_funcs(funcs, [1.0] * len(funcs), msgs, texts, ro.prompt_index)
        r = {fname: sum(v) / len(v) for fname, v in values.items()}
        if rm is not None:
            r["rm_score"] = rm_scores(rm, stats, tok, rtok, ro, msgs).mean().item()
        r["kl"] = sequence_kl(policy, reference, ro, pad).mean().item()
        if heldout:
            r["heldout_lm_loss"] = heldout_loss(policy, heldout, pad, 256)
            r["alignment_tax"] = r["heldout_lm_loss"] - ref_loss
        r |= {"reply_tokens": sum(len(x) for x in ro.response_ids) / len(ro.response_ids),
              "eos_rate": sum(f == "stop" for f in ro.finish_reason) / len(ro.finish_reason),
              "example": {"prompt": msgs[0][-1]["content"], "reply": texts[0]}}
        results[name] = r
        shown = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float))
        print(f"[eval] {name}: {shown}", flush=True)
    return {"policies": results, "reference": ref_path, "reference_heldout_lm_loss": ref_loss,
            "prompts": len(prompts), "n": c.n, "reward_funcs": [n for n, _ in funcs]}


COLUMNS = {"true_reward": ("true reward (max 2.5)", "{:.3f}"), "rm_score": ("RM score (normalised)", "{:+.3f}"),
           "kl": ("KL from SFT (nats/reply)", "{:.2f}"), "heldout_lm_loss": ("held-out LM loss", "{:.4f}"),
           "alignment_tax": ("alignment tax", "{:+.4f}"), "reply_tokens": ("reply tokens", "{:.1f}"),
           "eos_rate": ("ends with EOS", "{:.0%}")}


def format_table(res: dict) -> str:
    """One row per policy; the columns it measured (the demo's table when every one is there)."""
    rows = list(res["policies"].values())
    keys = [k for k in COLUMNS if k == "true_reward" and k in rows[0]]
    keys += [k for k in res.get("reward_funcs", []) if k != "true_reward"]
    keys += [k for k in COLUMNS if k != "true_reward" and k in rows[0]]
    head = [COLUMNS.get(k, (k, ""))[0] for k in keys]
    lines = ["| policy | " + " | ".join(head) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in res["policies"].items():
        cells = [COLUMNS.get(k, (k, "{:.3f}"))[1].format(r[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from common.atomic import atomic_write_json, atomic_write_text

    with user_errors():  # a config or input mistake (a reward function's failure too): one paragraph, exit status 2
        c = parse_config(EvalConfig, sys.argv[1:] if argv is None else argv)
        res = evaluate(c)
    atomic_write_json(Path(c.out) / "eval.json", res)
    atomic_write_text(Path(c.out) / "eval.md", format_table(res) + "\n")
    print(format_table(res))
    print(f"[eval] {res['prompts']} held-out prompts x {res['n']} replies; wrote {Path(c.out) / 'eval.json'}")
    return res


if __name__ == "__main__":
    main()
