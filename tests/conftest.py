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


def pytest_collection_modifyitems(items):
    """`make test-slow` runs two tests at a time (pytest-xdist, --dist loadgroup): tests that share an expensive module
    fixture carry one xdist_group, so they go to one worker and the fixture is built once. test_user_journey's `trip`
    (a whole folder's journey, minutes each) is parametrised, so its group is set here, one per folder kind."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item.module, "__name__", "") == "test_user_journey" and "trip" in params:
            item.add_marker(pytest.mark.xdist_group(f"user-journey-{params['trip']}"))
