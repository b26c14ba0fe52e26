"""Rewards: accuracy of the final answer plus a format reward (0.9 / 0.1 by default), pluggable by dotted path.

A reward function takes (response text, reference answer) and returns a dict with at least "reward";
the default also returns "accuracy" and "format" so they can be logged separately. Accuracy compares the
extracted final answer with the reference through `answers.answers_match` (choice letters, words, math).
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

from .answers import answers_match

_THINK_THEN_BOXED = re.compile(r"^\s*<think>.*?</think>\s*.*\\boxed\{.+\}\s*$", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...}, with nested braces balanced; None when absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer: the last \\boxed{...}, else the last <answer>...</answer>, else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    return tags[-1] if tags else None


def format_ok(response: str) -> bool:
    return bool(_THINK_THEN_BOXED.match(response))


def accuracy_format_reward(response: str, answer: str, accuracy_weight: float = 0.9,
                           format_weight: float = 0.1) -> dict[str, float]:
    predicted = extract_answer(response)
    accuracy = float(predicted is not None and answers_match(predicted, answer))
    fmt = float(format_ok(response))
    return {"reward": accuracy_weight * accuracy + format_weight * fmt, "accuracy": accuracy, "format": fmt}


def load_reward_fn(dotted: str) -> Callable[..., dict[str, float]]:
    """Import `package.module.function`; a clear error names the path when it cannot be found."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        from .config import ConfigError
        raise ConfigError(f"reward.function={dotted!r}: cannot import it ({err})") from None
    if not callable(fn):
        from .config import ConfigError
        raise ConfigError(f"reward.function={dotted!r}: not callable")
    return fn
