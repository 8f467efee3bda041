"""Reward models beyond the custom Qwen2: any transformers backbone (model_impl hf), Qwen3, tokenizers without
<|reward|> (Qwen2/2.5/3's own vocabularies), and scoring outside the package (score_texts, transformers alone)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, build_config
from data.chatml import REWARD_TOKEN
from reward.model import (add_reward_token, load_reward_model, load_tokenizer, pad_sequences, reward_token_id,
                          score, score_texts, scoring_text)

README = Path(__file__).resolve().parents[1] / "README.md"
# Qwen2.5's special tokens after <|im_end|> (ids 151646..151664), then Qwen3's four (151665..151668).
QWEN25_EXTRA = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN3_EXTRA = QWEN25_EXTRA + ["<tool_response>", "</tool_response>", "<think>", "</think>"]


WORDS = "apple banana cherry dog egg fish grape house ice jam kite lemon".split()


def _pairs_file(path, n, seed):
    """Separable toy comparisons: the chosen reply repeats the request, the rejected one is unrelated words."""
    import random

    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5)))
            bad = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 5))) + " no"
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Repeat: " + q}],
                                "chosen": [{"role": "assistant", "content": q}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return path


def without_reward_token(tok, folder: Path, extra: list[str] = ()):
    """Save `tok` to `folder` without <|reward|>, then with `extra` added tokens at the next ids (as Qwen2.5's and
    Qwen3's own tokenizers have them), and load it back."""
    tok.save_pretrained(str(folder))
    tj = json.loads((folder / "tokenizer.json").read_text())
    added = [a for a in tj["added_tokens"] if a["content"] != REWARD_TOKEN]
    for t in extra:
        added.append({**added[-1], "id": added[-1]["id"] + 1, "content": t, "special": t.startswith("<|")})
    tj["added_tokens"] = added
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["extra_special_tokens"] = [t for t in tc.get("extra_special_tokens", []) if t != REWARD_TOKEN]
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    out = load_tokenizer(folder)
    assert out.convert_tokens_to_ids(REWARD_TOKEN) is None
    return out


def hf_lm(arch: str, vocab: int = 1000):
    """A tiny transformers causal LM of another architecture, built from its config with random weights."""
    import transformers as tf

    cfg = {"llama": lambda: tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=512, initializer_range=0.1,
                                           bos_token_id=996, eos_token_id=998, pad_token_id=996),
           "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                         initializer_range=0.1, bos_token_id=996, eos_token_id=998),
           "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=512, initializer_range=0.1,
                                                bos_token_id=996, eos_token_id=998)}[arch]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_hf_backbone_scores_at_reward_token(tmp_path, small_tok, arch):
    """Any transformers backbone gets the same head and the same reading rule: the pair's scores do not depend on
    batch composition, padding side or padding length, nor on tokens after <|reward|>; the saved folder loads in
    transformers' AutoModelForSequenceClassification and, on one unpadded sequence, gives our score."""
    from transformers import AutoModelForSequenceClassification

    hf_lm(arch).save_pretrained(tmp_path / "lm")
    model = load_reward_model(str(tmp_path / "lm"), head_seed=3)  # 'auto': not Qwen, so model_impl hf
    assert type(model).__name__ == "HFScalarHeadModel" and model.fresh_head
    assert torch.equal(model.net.score.weight, load_reward_model(str(tmp_path / "lm"), head_seed=3).net.score.weight)
    rid, pad = reward_token_id(small_tok), small_tok.pad_token_id
    enc = lambda s: small_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pair = [enc("Repeat: egg fish") + [rid], enc("Repeat: dog") + [rid]]
    others = [enc("a much longer sequence with many more words in it " * 3) + [rid], enc("x") + [rid]]

    def run(seqs, side, extra=0):
        ids, mask = pad_sequences(seqs, pad, side)
        fill = (torch.full((len(seqs), extra), pad), torch.zeros(len(seqs), extra, dtype=torch.long))
        ids, mask = (torch.cat([ids, fill[0]], 1), torch.cat([mask, fill[1]], 1)) if side == "right" else \
            (torch.cat([fill[0], ids], 1), torch.cat([fill[1], mask], 1))
        with torch.no_grad():
            return score(model, ids, mask, rid)

    alone = run(pair, "right")
    assert abs(alone[0] - alone[1]) > 1e-3
    for got in (run(pair + others, "right")[:2], run(others[:1] + pair, "left")[1:3], run(pair, "left", extra=7),
                run(pair + others[1:], "right", extra=5)[:2]):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ids, mask = pad_sequences([pair[0] + enc(" trailing")], pad)
        assert abs(score(model, ids, mask, rid)[0] - alone[0]) < 1e-5
        values = model(torch.tensor([pair[0]]))  # (1, T): the last position is <|reward|>
        assert abs(values[0, -1] - alone[0]) < 1e-5 and abs(values[0, -2] - alone[0]) > 1e-4
    model.save_pretrained(tmp_path / "rm", tokenizer=small_tok)
    seq = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert seq.config.architectures[0].endswith("ForSequenceClassification") and seq.config.num_labels == 1
    with torch.no_grad():
        assert abs(seq(torch.tensor([pair[0]])).logits[0, 0] - alone[0]) < 1e-5
    again = load_reward_model(str(tmp_path / "rm"))
    assert not again.fresh_head and torch.equal(again.net.score.weight, model.net.score.weight)


def rm_config(tmp, model_path, files, **kw):
    from reward.train import RewardConfig

    values = dict(model_path=str(model_path), tokenizer="small", train_files=[str(files[0])],
                  eval_files=[str(files[1])], seq_len=64, micro_batch_size_per_rank=4, grad_accum_steps=2,
                  lr=2e-3, max_steps=4, output_dir=str(tmp))
    values.update(kw)
    return build_config(RewardConfig, values)


def test_reward_training_on_llama_resumes_and_scores_in_transformers(tmp_path, small_tok):
    """model_impl hf on a LlamaForCausalLM: training lowers the loss, a stopped run resumes to the same losses, the
    final folder is a LlamaForSequenceClassification whose transformers score equals score_texts."""
    import reward.train as rt
    from transformers import AutoModelForSequenceClassification

    hf_lm("llama").save_pretrained(tmp_path / "lm")
    files = [_pairs_file(tmp_path / "train.jsonl", 48, 0), _pairs_file(tmp_path / "test.jsonl", 24, 1)]
    full = rt.train(rm_config(tmp_path / "full", tmp_path / "lm", files, model_impl="hf"))
    part = rt.train(rm_config(tmp_path / "cut", tmp_path / "lm", files, model_impl="hf", stop_at_step=2))
    part += rt.train(rm_config(tmp_path / "cut", tmp_path / "lm", files, model_impl="hf"))
    assert part == pytest.approx(full, rel=1e-6) and full[-1] < full[0]
    final = tmp_path / "full" / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    conv = [{"role": "user", "content": "Repeat: egg fish"}, {"role": "assistant", "content": "egg fish"}]
    ours = score_texts(final, None, [conv])[0]
    seq = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    ids = small_tok(scoring_text(small_tok, conv), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        assert seq(ids).logits[0, 0].item() == pytest.approx(ours, abs=1e-5)
    with pytest.raises(ConfigError, match="model_impl must be"):
        rm_config(tmp_path / "x", tmp_path / "lm", files, model_impl="vllm")


def test_custom_impl_refuses_llama_with_the_way_out(tmp_path):
    import reward.train as rt

    hf_lm("llama").save_pretrained(tmp_path / "lm")
    files = [_pairs_file(tmp_path / "train.jsonl", 16, 0), _pairs_file(tmp_path / "test.jsonl", 8, 1)]
    with pytest.raises(ValueError, match=r"model_type='llama'.*model_impl: hf"):
        rt.train(rm_config(tmp_path / "out", tmp_path / "lm", files))


def test_qwen3_reward_model_with_qwen3s_own_tokenizer(tmp_path, qwen_tok):
    """A Qwen3 folder whose tokenizer has Qwen3's real vocabulary (151,669 tokens, no <|reward|>): the trainer adds
    <|reward|> as id 151669 (inside the padded 151,936 rows, so no resize), starts its row at the mean embedding,
    trains, and saves the input tokenizer plus that one token (same template, same other ids)."""
    import reward.train as rt
    from transformers import AutoModelForSequenceClassification

    from model.checkpoint import save_causal_lm
    from model.qwen import QwenConfig, QwenForCausalLM

    tok = without_reward_token(qwen_tok, tmp_path / "tok", QWEN3_EXTRA)
    assert len(tok) == 151669
    cfg = QwenConfig(model_type="qwen3", vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    save_causal_lm(QwenForCausalLM(cfg).init_weights(std=0.2, seed=0), tmp_path / "lm", tokenizer=tok)
    files = [_pairs_file(tmp_path / "train.jsonl", 16, 0), _pairs_file(tmp_path / "test.jsonl", 8, 1)]
    losses = rt.train(rm_config(tmp_path / "out", tmp_path / "lm", files, tokenizer=str(tmp_path / "lm"),
                                max_steps=2, seq_len=128))
    assert len(losses) == 2
    final = tmp_path / "out" / "final"
    saved = load_tokenizer(final)
    assert reward_token_id(saved) == 151669 and len(saved) == 151670
    assert saved.get_vocab() == {**tok.get_vocab(), REWARD_TOKEN: 151669}
    assert saved.chat_template == tok.chat_template and saved.all_special_tokens == tok.all_special_tokens + \
        [REWARD_TOKEN]
    assert json.loads((final / "config.json").read_text())["architectures"] == ["Qwen3ForSequenceClassification"]
    # the row was set to the mean before training, so it moved only by 2 AdamW steps (lr 2e-3 -> at most ~4e-3)
    emb = load_reward_model(str(final)).get_input_embeddings().weight
    start = QwenForCausalLM(cfg).init_weights(std=0.2, seed=0).get_input_embeddings().weight
    mean = start[:151669].mean(0)  # the other tokens' rows
    assert (emb[151669] - mean).abs().max().item() < 5e-3 < (start[151669] - mean).abs().max().item()
    seq = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    conv = [{"role": "user", "content": "Repeat: egg fish"}, {"role": "assistant", "content": "egg fish"}]
    ids = saved(scoring_text(saved, conv), add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, -1].item() == 151669
    with torch.no_grad():
        assert seq(ids).logits[0, 0].item() == pytest.approx(score_texts(final, saved, [conv])[0], abs=1e-5)


@pytest.mark.parametrize("impl", ["custom", "hf"])
def test_reward_token_that_does_not_fit_grows_the_embedding(tmp_path, small_tok, impl):
    """A tokenizer of 999 tokens without <|reward|> on a model with exactly 999 rows: the token gets id 999 and the
    embedding one more row; the saved folder says vocab_size 1000 and loads in transformers. A tokenizer larger than
    the model by more than that one token is refused with both sizes."""
    import reward.train as rt
    from transformers import AutoModelForSequenceClassification

    from model.checkpoint import save_causal_lm
    from model.qwen import QwenConfig, QwenForCausalLM

    tok = without_reward_token(small_tok, tmp_path / "tok")
    if impl == "custom":
        cfg = QwenConfig(vocab_size=999, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
        save_causal_lm(QwenForCausalLM(cfg).init_weights(seed=0), tmp_path / "lm")
    else:
        hf_lm("llama", vocab=999).save_pretrained(tmp_path / "lm")
    files = [_pairs_file(tmp_path / "train.jsonl", 16, 0), _pairs_file(tmp_path / "test.jsonl", 8, 1)]
    kw = dict(tokenizer=str(tmp_path / "tok"), model_impl=impl, max_steps=2)
    rt.train(rm_config(tmp_path / "out", tmp_path / "lm", files, **kw))
    final = tmp_path / "out" / "final"
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 1000
    assert reward_token_id(load_tokenizer(final)) == 999
    seq = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = small_tok(scoring_text(small_tok, conv), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        assert seq(ids).logits[0, 0].item() == pytest.approx(score_texts(final, None, [conv])[0], abs=1e-5)
    # a run stopped after 1 step resumes on the grown model (no second resize, the row is not re-initialised)
    part = rt.train(rm_config(tmp_path / "cut", tmp_path / "lm", files, stop_at_step=1, **kw))
    part += rt.train(rm_config(tmp_path / "cut", tmp_path / "lm", files, **kw))
    assert part == pytest.approx(rt.train(rm_config(tmp_path / "again", tmp_path / "lm", files, **kw)), rel=1e-6)
    big = tmp_path / "big"
    tok.add_tokens(["<|a|>", "<|b|>"], special_tokens=True)
    tok.save_pretrained(str(big))
    with pytest.raises(ConfigError, match=r"has 1001 tokens but model_path .*lm has vocab_size 999 \(config.json\)"):
        rt.train(rm_config(tmp_path / "err", tmp_path / "lm", files, **{**kw, "tokenizer": str(big)}))


def test_add_reward_token_changes_nothing_else(small_tok, tmp_path):
    tok = without_reward_token(small_tok, tmp_path / "tok")
    before = tok.get_vocab()
    text = "<|im_start|>user\nhello<|im_end|>"
    ids = tok(text)["input_ids"]
    assert add_reward_token(tok) and not add_reward_token(tok)
    assert tok.get_vocab() == {**before, REWARD_TOKEN: 999} and tok(text)["input_ids"] == ids
    assert tok(text + REWARD_TOKEN)["input_ids"] == ids + [999]
    assert not add_reward_token(small_tok)  # already there: untouched


def readme_snippet() -> str:
    """The README's "score with transformers alone" code block."""
    text = README.read_text()
    m = re.search(r"score with transformers alone.*?```python\n(.*?)```", text, re.S | re.I)
    assert m, "README.md has no 'score with transformers alone' python block"
    return textwrap.dedent(m.group(1))


def test_readme_snippet_equals_score_texts_and_the_training_layout(tmp_path, qwen_tok):
    """The README's transformers-only code, score_texts and the trainer's own scoring (build_preference_examples +
    score) give the same number on the real Qwen2 tokenizer; the same code without <|reward|> gives another one."""
    from data.datasets import build_preference_examples
    from model.checkpoint import save_causal_lm
    from model.heads import ScalarHeadModel
    from model.qwen import QwenConfig, QwenForCausalLM

    cfg = QwenConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    save_causal_lm(QwenForCausalLM(cfg).init_weights(std=0.3, seed=0), tmp_path / "lm")
    rm = ScalarHeadModel.from_pretrained(tmp_path / "lm", head_seed=1)
    rm.save_pretrained(tmp_path / "rm", tokenizer=qwen_tok)
    prompt = [{"role": "user", "content": "What is the capital of France?\n\nAnswer in one word."}]
    chosen, rejected = [{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": " Lyon!\n"}]

    code = readme_snippet()
    assert code.count('+ "<|reward|>"') == 1
    ns = {"print": lambda *a: None}
    exec(code.replace('"runs/demo/rm/final"', repr(str(tmp_path / "rm"))), ns)  # as printed, on another folder
    ours = score_texts(tmp_path / "rm", qwen_tok, [prompt + chosen, prompt + rejected, ns["conversation"]])
    assert ns["score"] == pytest.approx(ours[2], abs=1e-5)
    # the same lines on our conversations, with the model and tokenizer the snippet loaded; then without <|reward|>
    tail = code[code.index("text = "):]
    scores = []
    with_token, without = '"<|reward|>"', '""'
    for conv, suffix in ((prompt + chosen, with_token), (prompt + rejected, with_token), (prompt + chosen, without)):
        ns["conversation"] = conv
        exec(tail.replace('"<|reward|>"', suffix), ns)
        scores.append(ns["score"])
    assert scores[:2] == pytest.approx(ours[:2], abs=1e-5)
    assert abs(scores[2] - scores[0]) > 1e-2  # forgetting <|reward|> reads another token: another score
    ex, _ = build_preference_examples([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], qwen_tok, 256,
                                      reward_token=True)
    rid = reward_token_id(qwen_tok)
    seqs = [ex[0]["prompt_ids"] + ex[0]["chosen_ids"], ex[0]["prompt_ids"] + ex[0]["rejected_ids"]]
    assert seqs == [qwen_tok(scoring_text(qwen_tok, prompt + r), add_special_tokens=False)["input_ids"]
                    for r in (chosen, rejected)]
    ids, mask = pad_sequences(seqs, qwen_tok.pad_token_id)
    with torch.no_grad():
        assert score(rm, ids, mask, rid).tolist() == pytest.approx(ours[:2], abs=1e-5)
    with pytest.raises(ValueError, match="must end with the assistant reply"):
        score_texts(rm, qwen_tok, [prompt])
