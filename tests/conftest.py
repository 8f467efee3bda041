"""Shared test fixtures: real tokenizers (never mocks), built offline and cached (see data/tokenizer.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing local file must fail fast, never try the hub

import pytest


@pytest.fixture(scope="session")
def qwen_tok():
    """The real Qwen2 tokenizer (151,643 BPE ranks + specials at 151643..151646)."""
    from data.tokenizer import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="session")
def small_tok():
    """A 1000-token byte-level BPE with the same special tokens (ids 996..999), for fast tests."""
    from data.tokenizer import small_tokenizer

    return small_tokenizer()

