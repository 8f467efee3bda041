"""A new user's journey: their own model folder (saved by transformers: weights, tokenizer, chat template,
generation config) and their own files, through SFT -> reward model -> DPO -> PPO -> evaluate -> chat.

Folders: a Qwen2.5-style one (Qwen2.5-Instruct's real chat template, its default system message, Qwen2.5's extra
special tokens, no <|reward|>, generation config with two EOS ids), a Qwen3 one (Qwen3's real template with its
think block, no default system message), and a Llama one (a non-Qwen architecture: every trainer with
--model_impl hf, KTO too). Each stage runs in-process through its entry point's main(), as `python align/X.py ...`
would, while an audit hook records every file opened under data/demo/: none may be. The README section "Your own
model and data" is written from these commands.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reward_hf import QWEN3_EXTRA, QWEN25_EXTRA, without_reward_token

REPO = Path(__file__).resolve().parents[1]
DEMO = str((REPO / "data" / "demo").resolve())
FIXTURES = REPO / "tests" / "fixtures"
OPENED: list[str] = []  # files under data/demo/ opened while a stage ran
WATCH = [False]


def _audit(event, args):
    if event == "open" and WATCH[0] and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(DEMO):
            OPENED.append(path)


sys.addaudithook(_audit)

QA = [("What colour is the sky?", "The sky is blue on a clear day."),
      ("天空是什麼顏色？", "晴天時天空是藍色的。"),
      ("Name a fruit.", "An apple is a fruit."),
      ("今天天气怎么样？", "今天天气晴朗。"),
      ("What is two plus two?", "Two plus two is four."),
      ("Say hello.", "Hello! How can I help you today?"),
      ("請用一句話介紹臺北。", "臺北是臺灣最大的城市。"),
      ("What do cats eat?", "Cats eat meat and fish.")]


def write_user_files(d: Path) -> None:
    """What a user brings: conversations (one with a system message, one multi-turn), preference pairs, ratings,
    prompts, and a checkable rule of their own."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "sft.jsonl", "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(QA * 4):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i == 1:
                msgs = [{"role": "system", "content": "Answer in one sentence."}] + msgs
            if i == 2:
                msgs += [{"role": "user", "content": "And another?"}, {"role": "assistant", "content": "A pear."}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    with open(d / "pairs.jsonl", "w", encoding="utf-8") as f:
        for q, a in QA * 2:
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                "chosen": [{"role": "assistant", "content": a}],
                                "rejected": [{"role": "assistant", "content": "I do not know."}]},
                               ensure_ascii=False) + "\n")
    with open(d / "ratings.jsonl", "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(QA * 2):
            good = i % 3 != 0
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                "completion": [{"role": "assistant", "content": a if good else "No idea."}],
                                "label": good}, ensure_ascii=False) + "\n")
    with open(d / "prompts.jsonl", "w", encoding="utf-8") as f:
        for q, _ in QA:
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}]}, ensure_ascii=False) + "\n")
    (d / "my_rules.py").write_text("def short(messages, reply):\n    return float(len(reply) <= 40)\n")


GEN = {"qwen2.5": {"bos_token_id": 996, "pad_token_id": 996, "do_sample": True, "eos_token_id": [998, 996],
                   "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
       "qwen3": {"bos_token_id": 996, "pad_token_id": 996, "do_sample": True, "eos_token_id": [998, 996],
                 "temperature": 0.6, "top_p": 0.95, "top_k": 20},
       "llama": {"bos_token_id": 996, "do_sample": True, "eos_token_id": [998, 996], "temperature": 0.9,
                 "top_p": 0.9}}


def build_folder(kind: str, folder: Path, small_tok) -> Path:
    """A user's model folder as transformers saves it: config, random weights, tokenizer with its chat template,
    generation_config.json (written as the model's hub folder has it)."""
    import transformers as tf

    torch.manual_seed(0)
    size = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=996, eos_token_id=998)
    if kind == "qwen2.5":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**size, tie_word_embeddings=True))
        extra, template = QWEN25_EXTRA, (FIXTURES / "qwen2.5-instruct" / "chat_template.jinja").read_text()
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**size, head_dim=16, tie_word_embeddings=True))
        extra, template = QWEN3_EXTRA, (FIXTURES / "qwen3" / "chat_template.jinja").read_text()
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**size))
        extra, template = QWEN25_EXTRA, (FIXTURES / "qwen2.5-instruct" / "chat_template.jinja").read_text()
    tok = copy.deepcopy(small_tok)
    tok.chat_template = template
    folder.mkdir(parents=True)
    tok = without_reward_token(tok, folder, extra)  # the model's own vocabulary: no <|reward|>
    assert tok.chat_template == template
    model.save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps(GEN[kind], indent=2) + "\n")
    return folder


def run_stage(main, argv: list[str]):
    """One entry point, in-process, watched by the audit hook; a nonzero exit fails with its message."""
    WATCH[0] = True
    try:
        return main(argv)
    except SystemExit as e:
        if e.code:
            raise AssertionError(f"{argv[:2]}... exited {e.code}") from None
    finally:
        WATCH[0] = False


def same_files(a: Path, b: Path, names) -> list[str]:
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


def journey(kind: str, root: Path, small_tok) -> dict:
    """The commands of the README section, on `kind`'s folder; returns the folders."""
    import align.dpo
    import align.evaluate
    import align.kto
    import align.ppo
    import align.sft
    import reward.train

    data, model, out = root / "data", build_folder(kind, root / "model", small_tok), root / "runs"
    write_user_files(data)
    hf = ["--model_impl", "hf"] if kind == "llama" else []
    common = ["--seq_len", "256", "--micro_batch_size_per_rank", "4", "--grad_accum_steps", "1", "--warmup_steps",
              "0", "--max_steps", "2"]
    run_stage(align.sft.main, ["--model_path", str(model), "--train_files", str(data / "sft.jsonl"), "--lr", "1e-3",
                               "--output_dir", str(out / "sft"), *common, "--seq_len", "128", *hf,
                               *(["--packing", "false"] if hf else [])])
    run_stage(reward.train.main, ["--model_path", str(out / "sft" / "final"), "--train_files",
                                  str(data / "pairs.jsonl"), "--eval_files", str(data / "pairs.jsonl"), "--lr", "1e-3",
                                  "--output_dir", str(out / "rm"), *common, *hf])
    run_stage(align.dpo.main, ["--model_path", str(out / "sft" / "final"), "--train_files", str(data / "pairs.jsonl"),
                               "--lr", "1e-4", "--output_dir", str(out / "dpo"), *common, *hf])
    if kind == "llama":
        run_stage(align.kto.main, ["--model_path", str(out / "sft" / "final"), "--train_files",
                                   str(data / "ratings.jsonl"), "--lr", "1e-4", "--output_dir", str(out / "kto"),
                                   *common, *hf])
    # no pretraining or held-out text: PPO runs without ptx and measures no alignment tax (it says so at start)
    run_stage(align.ppo.main, ["--policy_path", str(out / "sft" / "final"), "--reward_path", str(out / "rm" / "final"),
                               "--prompt_files", str(data / "prompts.jsonl"), "--value_warmup_steps", "1",
                               "--max_steps", "3", "--rollout_batch_prompts", "4", "--micro_batch_size", "4", "--max_new_tokens",
                               "12", "--policy_lr", "1e-4", "--value_lr", "1e-4", "--output_dir", str(out / "ppo"),
                               *hf])
    res = run_stage(align.evaluate.main, ["--policy", f"SFT={out / 'sft' / 'final'}", "--policy",
                                          f"DPO={out / 'dpo' / 'final'}", "--policy", f"PPO={out / 'ppo' / 'final'}",
                                          "--reward", str(out / "rm" / "final"), "--prompts",
                                          str(data / "prompts.jsonl"), "--reward_funcs",
                                          f"{data / 'my_rules.py'}:short", "--n", "1", "--max_new_tokens", "8",
                                          "--out", str(out / "eval")])
    return {"model": model, "data": data, "out": out, "eval": res}


pytestmark = pytest.mark.slow  # each folder's journey takes minutes on 2 cores


@pytest.fixture(scope="module", params=["qwen2.5", "qwen3", "llama"])
def trip(request, tmp_path_factory, small_tok):
    OPENED.clear()
    folders = journey(request.param, tmp_path_factory.mktemp(request.param.replace(".", "")), small_tok)
    folders["kind"], folders["opened"] = request.param, list(OPENED)
    return folders


def test_no_demo_file_is_opened(trip):
    assert trip["opened"] == []


def test_outputs_keep_the_folders_template_and_generation_config(trip):
    from data.tokenizer import load_tokenizer

    model, out = trip["model"], trip["out"]
    template = load_tokenizer(model).chat_template
    finals = [out / s / "final" for s in ("sft", "dpo", "ppo") + (("kto",) if trip["kind"] == "llama" else ())]
    for final in finals:
        assert same_files(model, final, ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]) == []
        assert load_tokenizer(final).chat_template == template
    rm = load_tokenizer(out / "rm" / "final")  # the reward model: the input tokenizer + <|reward|>, nothing else
    tok = load_tokenizer(model)
    assert rm.chat_template == template and len(rm) == len(tok) + 1
    assert {t: i for t, i in rm.get_vocab().items() if t != "<|reward|>"} == tok.get_vocab()


def test_training_rows_render_as_the_folders_template(trip):
    """The rows the trainers build equal apply_chat_template of the folder's own tokenizer: SFT conversations
    (default system message of the template: Qwen2.5's, none for Qwen3), DPO prompt + reply, PPO prompts."""
    import align.ppo
    import align.sft
    from common.config import build_config
    from data.datasets import build_preference_examples, load_records
    from data.tokenizer import load_tokenizer

    model, data = trip["model"], trip["data"]
    tok = load_tokenizer(model)
    c = build_config(align.sft.SFTConfig, dict(model_path=str(model), train_files=[str(data / "sft.jsonl")],
                                               packing=False, seq_len=128, warmup_steps=0, max_steps=2))
    rows, _ = align.sft.build_rows(c, tok)
    records, _ = load_records(data / "sft.jsonl", kind="sft")
    for row, rec in zip(rows, records):
        assert row["input_ids"] == tok.apply_chat_template(rec["messages"], tokenize=True)["input_ids"]
    first = tok.apply_chat_template(records[0]["messages"], tokenize=False)
    if trip["kind"] == "qwen3":
        assert first.startswith("<|im_start|>user\n") and "<think>\n\n</think>\n\n" in first
    else:
        assert "You are Qwen, created by Alibaba Cloud." in first
    pairs, _ = build_preference_examples(load_records(data / "pairs.jsonl")[0], tok, 256)
    rec = load_records(data / "pairs.jsonl")[0][0]
    text = tok.apply_chat_template(rec["prompt"] + rec["chosen"], tokenize=False)
    assert tok.decode(pairs[0]["prompt_ids"] + pairs[0]["chosen_ids"]) + "\n" == text
    ppo_c = build_config(align.ppo.PPOConfig, dict(policy_path=str(model), prompt_files=[str(data / "prompts.jsonl")],
                                                   reward_path=str(trip["out"] / "rm" / "final")))
    prompts = align.ppo.load_data(ppo_c, tok)[0]
    for p in prompts:
        assert p["prompt_ids"] == tok.apply_chat_template(p["messages"], add_generation_prompt=True,
                                                          tokenize=True)["input_ids"]


def test_evaluate_reports_the_users_measures(trip):
    res = trip["eval"]
    assert res["reward_funcs"] == ["short"]
    for r in res["policies"].values():
        assert {"short", "rm_score", "kl", "reply_tokens", "eos_rate"} <= set(r) and "true_reward" not in r
        assert 0.0 <= r["short"] <= 1.0
    assert res["policies"]["SFT"]["kl"] == 0.0  # the reference is the first policy
    assert (trip["out"] / "eval" / "eval.md").read_text().startswith("| policy | short | RM score")


def test_a_rerun_with_another_lr_is_refused(trip, capsys):
    import align.sft

    argv = ["--model_path", str(trip["model"]), "--train_files", str(trip["data"] / "sft.jsonl"),
            "--output_dir", str(trip["out"] / "sft"), "--seq_len", "128", "--micro_batch_size_per_rank", "4",
            "--grad_accum_steps", "1", "--warmup_steps", "0", "--max_steps", "2", "--lr", "5e-4"]
    if trip["kind"] == "llama":
        argv += ["--model_impl", "hf", "--packing", "false"]
    with pytest.raises(SystemExit) as e:
        align.sft.main(argv)
    assert e.value.code == 2
    assert "lr: 0.001 -> 0.0005" in capsys.readouterr().err


def test_chat_from_a_pipe_keeps_the_conversation(trip):
    """python -m align.chat FOLDER, fed two lines: two replies, the second prompt holds the first reply; with
    temperature 0 each reply is the folder model's greedy continuation of the template's prompt, cut at its EOS."""
    from align.models import load_causal_lm_any
    from data.template import chat_format
    from data.tokenizer import load_tokenizer
    from rollout.builtin import reference_greedy

    if trip["kind"] != "qwen2.5":
        pytest.skip("one folder is enough for the chat command")
    final, conv = trip["out"] / "dpo" / "final", trip["out"] / "chat.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "align.chat", str(final), "--temperature", "0", "--max_new_tokens",
                        "6", "--save", str(conv)], input="Say hello.\n天空是什麼顏色？\n", capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "temperature 0, top_p 0.8" in p.stderr  # top_p from the folder's generation config
    messages = json.loads(conv.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert p.stdout.splitlines()[-1] == messages[3]["content"] or "\n" in messages[3]["content"]
    tok, model = load_tokenizer(final), load_causal_lm_any(str(final))
    ids = chat_format(tok).prompt_ids(messages[:3])
    greedy = reference_greedy(model, ids, 6)
    cut = next((i for i, t in enumerate(greedy) if t in (998, 996)), len(greedy))
    assert messages[3]["content"] == tok.decode(greedy[:cut], skip_special_tokens=True)
