"""Your own checkable reward rules: `module:function` (or `path/to/file.py:function`) specs, each a function
`(messages, reply_text) -> float` (messages: the prompt's chat messages; reply_text: the decoded reply without its
end-of-turn token). Used by align/evaluate.py (one column per function) and PPO's --reward_funcs. Not an entry point.

    # my_rules.py
    def polite(messages, reply):
        return 1.0 if reply.rstrip().endswith(("Thanks!", "謝謝。")) else 0.0

    python -m align.evaluate ... --reward_funcs my_rules:polite
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Callable

from common.config import ConfigError

RewardFunc = Callable[[list, str], float]


def _import(module: str, spec: str):
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise ConfigError(f"--reward_funcs {spec}: no such file {path}")
        loader = importlib.util.spec_from_file_location(f"reward_funcs_{path.stem}", path)
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        return mod
    if os.getcwd() not in sys.path:  # `accelerate launch align/ppo.py` puts align/, not the working folder, first
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--reward_funcs {spec}: cannot import module {module!r} ({e}); give module:function with "
                          f"the module importable from the working folder, or path/to/file.py:function") from None


def load_reward_funcs(specs: list[str]) -> list[tuple[str, RewardFunc]]:
    """[(name, function)] for specs 'module:function' / 'file.py:function'; ConfigError naming the spec when one
    cannot be imported or is not a function. name is the function's name (the spec when two share a name)."""
    out = []
    for spec in specs:
        module, sep, attr = spec.rpartition(":")
        if not sep or not module or not attr:
            raise ConfigError(f"--reward_funcs {spec!r}: expected module:function or path/to/file.py:function")
        mod = _import(module, spec)
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise ConfigError(f"--reward_funcs {spec}: {module} has no function {attr!r}")
        out.append((attr, fn))
    names = [n for n, _ in out]
    return [(n if names.count(n) == 1 else spec, fn) for (n, fn), spec in zip(out, specs)]


def call_reward_func(name: str, fn: RewardFunc, messages: list, reply: str) -> float:
    """fn(messages, reply) as a float; ValueError naming the function when it returns anything but a finite number."""
    value = fn(messages, reply)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reward function {name} returned {value!r} for the reply {reply[:60]!r}; it must return a "
                         f"finite number")
    return float(value)
