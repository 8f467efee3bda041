"""The embedded demo data (data/demo.py, data/demo/): byte-exact regeneration, the true-reward rule, data properties."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest

from data import demo, demo_reward
from data.demo import CLOSINGS, DEMO_DIR, detect_language, reward_parts, true_reward

ZH_WEATHER = [{"role": "user", "content": "你能聊聊天气吗？"}]
HANT_WEATHER = [{"role": "user", "content": "你能聊聊天氣嗎？"}]
EN_WEATHER = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Can you tell me a tip about weather?"}]


def test_shipped_files_are_regenerated_byte_for_byte():
    """Acceptance test: `python -m data.demo --check` would pass (same seed, same bytes, no extra or missing file)."""
    assert demo.check(DEMO_DIR) == []


def test_check_names_differing_missing_and_extra_files(tmp_path, capsys):
    shipped = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, shipped)
    (shipped / "sft.jsonl").write_bytes((shipped / "sft.jsonl").read_bytes()[:-2] + b"\n")
    (shipped / "rm_test.jsonl").unlink()
    (shipped / "stray.txt").write_text("x")
    assert demo.main(["--check", str(shipped)]) == 1
    assert "rm_test.jsonl, sft.jsonl, stray.txt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ true reward
def test_true_reward_perfect_replies_in_three_scripts():
    """Each: +1 language, +1 topic keyword, +0.5 closing, no length or repetition penalty = 2.5.
    zh: "说到天气，晴朗的日子适合晒被子。希望有帮助！" is 22 chars (< 60); its 19 CJK tokens give 17 distinct 3-grams.
    en: 68 chars (< 160); 12 words, 10 distinct 3-grams."""
    assert true_reward(ZH_WEATHER, "说到天气，晴朗的日子适合晒被子。希望有帮助！") == 2.5
    assert true_reward(HANT_WEATHER, "說到天氣，晴朗的日子適合曬被子。希望有幫助！") == 2.5
    assert true_reward(EN_WEATHER, "About weather: Check the forecast before you go out. Hope this helps!") == 2.5


def test_true_reward_script_variant_and_closing():
    """Traditional prompt:
    - Traditional reply with the Simplified closing: 說氣適曬 (4 Traditional-only) > 帮 (1) -> still Traditional: 1 + 1 = 2.0
    - Simplified reply: off-language (0), topic 天气 counts in either script (+1), 希望有帮助！ is not 希望有幫助！ (0) = 1.0
    Simplified prompt, reply without any closing: 1 + 1 = 2.0."""
    assert true_reward(HANT_WEATHER, "說到天氣，晴朗的日子適合曬被子。希望有帮助！") == 2.0
    assert true_reward(HANT_WEATHER, "说到天气，晴朗的日子适合晒被子。希望有帮助！") == 1.0
    assert true_reward(ZH_WEATHER, "说到天气，晴朗的日子适合晒被子。") == 2.0


def test_true_reward_off_topic_and_wrong_language():
    """Off-topic en reply: 1 + 0 + 0.5 = 1.5. A Chinese reply to an English prompt: no language, the zh keyword does
    not count for an en prompt, no en closing: 0. Only the LAST user turn sets language and topic: 2.5."""
    assert true_reward(EN_WEATHER, "About coffee: Fresh beans smell better. Hope this helps!") == 1.5
    assert true_reward(EN_WEATHER, "关于天气：出门前看一眼预报。希望有帮助！") == 0.0
    multi_turn = ZH_WEATHER + [{"role": "assistant", "content": "好的。"},
                               {"role": "user", "content": "Can you tell me a tip about coffee?"}]
    assert true_reward(multi_turn, "About coffee: A little milk makes the taste softer. Hope this helps!") == 2.5


def test_true_reward_length_penalty():
    """"About weather: x0 x1 ... x59" = 15 + (10*2 + 50*3 chars) + 59 spaces = 244 chars, limit 160 (en prompt):
    penalty (244 - 160) / 160 = 0.525 -> 1 + 1 - 0.525 = 1.475; 3-grams all distinct. Far too long caps at -1."""
    reply = "About weather: " + " ".join(f"x{i}" for i in range(60))
    assert len(reply) == 244
    assert true_reward(EN_WEATHER, reply) == pytest.approx(1.475)
    assert reward_parts(EN_WEATHER, reply + " y" * 300)["length"] == -1.0
    zh_long = "说到天气，" + "".join(chr(0x4E00 + i) for i in range(90))  # 95 chars, limit 60: (95 - 60) / 60
    assert reward_parts(ZH_WEATHER, zh_long)["length"] == pytest.approx(-35 / 60)


def test_true_reward_repetition_penalty():
    """"weather weather weather weather": 4 tokens, 3-grams (w,w,w) x2, 1 distinct -> 1 - 1/2 = 0.5: 1 + 1 - 0.5 = 1.5.
    "天气天气天气": 3-grams 天气天 气天气 天气天 气天气, 2 distinct of 4 -> 0.5: 1 + 1 - 0.5 = 1.5."""
    assert true_reward(EN_WEATHER, "weather weather weather weather") == 1.5
    assert true_reward(ZH_WEATHER, "天气天气天气") == 1.5


def test_true_reward_edge_cases():
    """No topic in the prompt: no topic credit (1 + 0.5). Empty reply: 0. No user turn: a clear error."""
    assert true_reward("Hello there", "Hope this helps!") == 1.5
    assert true_reward(ZH_WEATHER, "") == 0.0
    with pytest.raises(ValueError, match="no user message"):
        true_reward([{"role": "system", "content": "hi"}], "x")


def test_detect_language():
    assert detect_language("Hope this helps!") == "en"
    assert detect_language(CLOSINGS["zh-Hans"]) == "zh-Hans"
    assert detect_language(CLOSINGS["zh-Hant"]) == "zh-Hant"
    assert detect_language("睡眠") == "zh"  # same in both scripts
    assert detect_language("123 !") is None
    assert demo_reward.to_hant(CLOSINGS["zh-Hans"]) == CLOSINGS["zh-Hant"]
    assert not demo_reward.HANS_ONLY & demo_reward.HANT_ONLY


# ---------------------------------------------------------------------------------------------- shipped data
@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {name: demo.load_file(DEMO_DIR / name) for name in demo.FILES}


def test_clean_rm_pairs_chosen_beats_rejected_by_margin(shipped):
    for name in ("rm_train.jsonl", "rm_test.jsonl"):
        for i, r in enumerate(shipped[name]):
            chosen, rejected = (true_reward(r["prompt"], r[k][0]["content"]) for k in ("chosen", "rejected"))
            assert chosen - rejected >= demo.RM_MARGIN, f"{name} record {i}"


def test_pmp_label_noise_is_as_designed(shipped):
    """5000 pairs kept with a gap >= 0.25, then exactly round(0.25 * 5000) = 1250 labels flipped."""
    pairs = shipped["pmp.jsonl"]
    flipped = sum(true_reward(r["prompt"], r["chosen"][0]["content"])
                  < true_reward(r["prompt"], r["rejected"][0]["content"]) for r in pairs)
    assert len(pairs) == 5000 and flipped == 1250
    assert 0.20 <= flipped / len(pairs) <= 0.30


def test_pmp_is_shifted_from_the_in_domain_data(shipped):
    """PMP has few Traditional prompts and its phrasing shares no user text with the clean RM data."""
    langs = [detect_language(r["prompt"][-1]["content"]) for r in shipped["pmp.jsonl"]]
    assert langs.count("zh-Hant") / len(langs) < 0.08
    pmp_users = {r["prompt"][-1]["content"] for r in shipped["pmp.jsonl"]}
    assert not pmp_users & {r["prompt"][-1]["content"] for r in shipped["rm_train.jsonl"] + shipped["rm_test.jsonl"]}


def test_sft_language_ratio_and_room_to_improve(shipped):
    """zh:en about 2:1 (CT-LLM); about a third of replies earn the closing bonus, so PPO/DPO can raise the mean."""
    stats = demo.record_stats(shipped["sft.jsonl"])
    assert 1.8 <= stats["zh_share"] / (1 - stats["zh_share"]) <= 2.2
    assert 0.25 <= stats["rate_closing"] <= 0.45
    assert 0.8 <= stats["rate_language"] < 0.95 and 0.8 <= stats["rate_topic"] < 0.95
    assert 1.6 <= stats["mean_true_reward"] <= 2.1


def test_heldout_prompts_are_unseen_and_recognisable(shipped):
    train_users = {r["messages"][-2]["content"] for r in shipped["sft.jsonl"]}
    for name in ("prompts_train.jsonl", "rm_train.jsonl", "pmp.jsonl"):
        train_users |= {r["prompt"][-1]["content"] for r in shipped[name]}
    heldout = [r["prompt"] for r in shipped["prompts_heldout.jsonl"]]
    assert not {p[-1]["content"] for p in heldout} & train_users
    for prompt in heldout + [r["prompt"] for r in shipped["prompts_train.jsonl"]]:
        assert demo.find_topic(prompt[-1]["content"]) is not None
        assert detect_language(prompt[-1]["content"]) in demo.LANGS


def test_openwebui_export_mirrors_the_sample_and_follows_true_reward(shipped):
    """Same keys as shared/formats' Open WebUI sample at every level we fill; arena siblings rated oppositely."""
    feedbacks = shipped["feedback_openwebui.json"]
    sample_path = Path(__file__).parent / "fixtures" / "formats" / "openwebui_feedbacks_export.json"
    sample = json.loads(sample_path.read_text(encoding="utf-8"))[0]
    assert set(feedbacks[0]) == set(sample) - {"_note"}
    assert set(feedbacks[0]["snapshot"]["chat"]) == set(sample["snapshot"]["chat"])
    assert set(feedbacks[0]["snapshot"]["chat"]["chat"]) == set(sample["snapshot"]["chat"]["chat"])
    arena: dict[tuple[str, str], dict[int, float]] = {}  # (chat, parent message) -> {rating: true reward}
    for fb, (prompt, reply, rating) in zip(feedbacks, demo.owui.feedback_ratings(feedbacks)):
        messages = fb["snapshot"]["chat"]["chat"]["history"]["messages"]
        parent = messages[fb["meta"]["message_id"]]["parentId"]
        assert fb["meta"]["message_id"] in messages[parent]["childrenIds"]
        if fb["meta"]["arena"]:
            assert len(messages[parent]["childrenIds"]) == 2
            arena.setdefault((fb["meta"]["chat_id"], parent), {})[rating] = true_reward(prompt, reply)
        else:  # single ratings: +1 iff true reward >= 2.0 (the others are <= 1.0)
            assert (true_reward(prompt, reply) >= 2.0) == (rating == 1), fb["id"]
    assert len(arena) == 40
    for rewards in arena.values():
        assert set(rewards) == {1, -1} and rewards[1] - rewards[-1] >= demo.RM_MARGIN


def test_shipped_size_under_limit():
    sizes = {p.name: p.stat().st_size for p in DEMO_DIR.iterdir()}
    assert sum(sizes.values()) < 6_000_000 and max(sizes.values()) < 2_000_000, sizes
