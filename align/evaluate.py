"""Compare policies on held-out prompts: true reward, reward-model score, KL from the reference, alignment tax.

    python -m align.evaluate --policy SFT=runs/demo/sft/final --policy PPO=runs/demo/ppo/final \
        --reference runs/demo/sft/final --reward runs/demo/rm/final \
        --prompts data/demo/prompts_heldout.jsonl --heldout data/demo/pretrain_heldout.jsonl --out runs/demo/eval

Every policy samples `n` replies per held-out prompt with the same seed (temperature 1, top-p 1: the policy's own
distribution, so that the KL estimate below is unbiased). Per policy:
- true reward: `data.demo.true_reward` when the prompts come from the demo world (a rule code can check);
- RM score: the reward model read at its <|reward|> token, normalised with the model's saved statistics;
- KL(policy || reference) per reply: the mean over replies of sum_t (log pi - log pi_ref) on the sampled tokens (k1);
- LM loss on held-out pretraining text; the alignment tax is its rise over the reference (Ouyang et al. 2022).
  Without --heldout no alignment tax is measured (said at start). No data field defaults to the demo's files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import ConfigError, cfg, parse_config, user_errors


@dataclass
class EvalConfig:
    policy: list[str] = cfg([], "NAME=FOLDER of a causal-LM checkpoint; repeat for each policy to compare",
                            required=True)
    reference: str = cfg("", "the reference policy folder (the SFT model): KL and alignment tax are measured from it",
                         required=True)
    reward: str = cfg("", "reward-model folder (scores normalised with its reward_stats.json when present)",
                      required=True)
    prompts: str = cfg("", "held-out prompts ({'prompt': [messages]}), e.g. data/demo/prompts_heldout.jsonl",
                       required=True)
    heldout: str = cfg("", "held-out pretraining text ({'text'}) for the alignment tax; empty = not measured")
    tokenizer: str = cfg("small", "'qwen2', 'small', 'demo' or a tokenizer folder (the policies' tokenizer)")
    n: int = cfg(2, "replies sampled per prompt")
    max_prompts: int = cfg(200, "evaluate on at most this many prompts")
    max_new_tokens: int = cfg(64, "reply length limit")
    seq_len: int = cfg(256, "row length of the held-out text")
    heldout_rows: int = cfg(64, "rows of held-out text for the LM loss")
    seed: int = cfg(0, "sampling seed (the same for every policy)")
    out: str = cfg("runs/eval", "folder for eval.json")

    def validate(self):
        if any("=" not in p or p.startswith("=") or p.endswith("=") for p in self.policy):
            raise ConfigError(f"--policy takes NAME=FOLDER, got {self.policy}")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError("n and max_new_tokens must be >= 1")


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


def rm_scores(rm, stats, tok, ro, messages, pad_id: int) -> torch.Tensor:
    from align.experience import reward_sequences
    from reward.model import pad_sequences, reward_token_id, score

    seqs = reward_sequences(ro.prompt_ids, ro.response_ids, messages, tok, tok, True)
    out = []
    with torch.no_grad():
        for s in range(0, len(seqs), 32):
            ids, mask = pad_sequences(seqs[s:s + 32], pad_id)
            out.append(score(rm, ids, mask, reward_token_id(tok)))
    r = torch.cat(out)
    return (r - stats["mean"]) / stats["std"] if stats else r


def check_start(c: EvalConfig) -> None:
    """Before any model loads: every model folder and the data files (read and validated once)."""
    from common.preflight import check_model_folder, check_output_dir
    from data.datasets import check_records

    check_output_dir(c.out, "--out")
    for name, path in [(f"--policy {p.split('=', 1)[0]}", p.split("=", 1)[1]) for p in c.policy] + [
            ("--reference", c.reference), ("--reward", c.reward)]:
        check_model_folder(path, name)
    check_records(c.prompts, kind="prompt")
    if c.heldout:
        check_records(c.heldout, kind="text")
    else:
        print("[eval] no held-out text (--heldout): no alignment tax is measured", flush=True)


def evaluate(c: EvalConfig) -> dict:
    from align.experience import heldout_loss, stop_ids
    from data.chatml import IM_END
    from data.datasets import build_prompt_examples, build_text_examples, load_records
    from data.demo_reward import true_reward
    from model.checkpoint import load_causal_lm
    from reward.model import load_reward_model, load_tokenizer

    check_start(c)
    torch.manual_seed(c.seed)
    tok = load_tokenizer(c.tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records, _ = load_records(c.prompts, kind="prompt")
    prompts, _ = build_prompt_examples(records[:c.max_prompts], tok, 512)
    heldout = build_text_examples(load_records(c.heldout, kind="text")[0], tok, c.seq_len)[:c.heldout_rows] \
        if c.heldout else []
    stats_file = Path(c.reward) / "reward_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else None
    rm = load_reward_model(c.reward).eval()
    reference = load_causal_lm(c.reference).eval()
    ref_loss = heldout_loss(reference, heldout, pad, 256) if heldout else None
    results = {}
    for name, path in (p.split("=", 1) for p in c.policy):
        policy = load_causal_lm(path).eval()
        ro = sample(policy, [p["prompt_ids"] for p in prompts], c, pad, stop_ids(tok))
        msgs = [prompts[i]["messages"] for i in ro.prompt_index]
        texts = [tok.decode([t for t in r if t not in stop_ids(tok)]) for r in ro.response_ids]
        true = torch.tensor([true_reward(m, t) for m, t in zip(msgs, texts)])
        loss = heldout_loss(policy, heldout, pad, 256) if heldout else None
        results[name] = {
            "true_reward": true.mean().item(),
            "rm_score": rm_scores(rm, stats, tok, ro, msgs, pad).mean().item(),
            "kl": sequence_kl(policy, reference, ro, pad).mean().item(),
            "reply_tokens": sum(len(r) for r in ro.response_ids) / len(ro.response_ids),
            "eos_rate": sum(f == "stop" for f in ro.finish_reason) / len(ro.finish_reason),
            "heldout_lm_loss": loss, "alignment_tax": None if loss is None else loss - ref_loss,
            "example": {"prompt": msgs[0][-1]["content"], "reply": texts[0].removesuffix(IM_END)},
        }
        print(f"[eval] {name}: true reward {results[name]['true_reward']:.3f}, KL {results[name]['kl']:.2f}",
              flush=True)
    return {"policies": results, "reference_heldout_lm_loss": ref_loss, "prompts": len(prompts), "n": c.n}


def format_table(res: dict) -> str:
    lines = ["| policy | true reward (max 2.5) | RM score (normalised) | KL from SFT (nats/reply) | "
             "held-out LM loss | alignment tax | reply tokens | ends with EOS |", "|---" * 8 + "|"]
    for name, r in res["policies"].items():
        loss, tax = ("-", "-") if r["heldout_lm_loss"] is None else (f"{r['heldout_lm_loss']:.4f}",
                                                                    f"{r['alignment_tax']:+.4f}")
        lines.append(f"| {name} | {r['true_reward']:.3f} | {r['rm_score']:+.3f} | {r['kl']:.2f} | "
                     f"{loss} | {tax} | {r['reply_tokens']:.1f} | {r['eos_rate']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from common.atomic import atomic_write_json, atomic_write_text

    with user_errors():  # a config or input mistake: one paragraph, exit status 2
        c = parse_config(EvalConfig, sys.argv[1:] if argv is None else argv)
        res = evaluate(c)
    atomic_write_json(Path(c.out) / "eval.json", res)
    atomic_write_text(Path(c.out) / "eval.md", format_table(res) + "\n")
    print(format_table(res))
    print(f"[eval] {res['prompts']} held-out prompts x {res['n']} replies; wrote {Path(c.out) / 'eval.json'}")
    return res


if __name__ == "__main__":
    main()
