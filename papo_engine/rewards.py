"""Rewards: accuracy of the final answer plus a format reward (0.9 / 0.1 by default), pluggable by dotted path.

A reward function takes (response text, reference answer) and returns a dict with at least "reward";
the default also returns "accuracy" and "format" so they can be logged separately. Accuracy compares the
extracted final answer with the reference through `answers.answers_match` (choice letters, words, math).
"""
from __future__ import annotations

import importlib
import inspect
import re
import traceback
from typing import Callable

import torch

from . import distributed as dist_utils
from .answers import answers_match
from .config import Config, ConfigError
from .data_sources import one_line

_THINK_THEN_BOXED = re.compile(r"^\s*<think>.*?</think>\s*.*\\boxed\{.+\}\s*$", re.DOTALL)
# a chat template that opens the think block itself (Qwen3-VL-Thinking's ends the prompt with "<think>\n"): the
# response closes it, then answers (the authors' examples/reward_function/qwen3_vl_think.py, branch main_qwen3)
_CLOSE_THINK_THEN_BOXED = re.compile(r".*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_SPACE_AROUND_TAG_CHARACTERS = re.compile(r"\s*(<|>|/)\s*")
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


def think_opened_format_reward(response: str, answer: str, accuracy_weight: float = 0.9,
                                format_weight: float = 0.1) -> dict[str, float]:
    """`accuracy_format_reward` for prompts whose chat template opened the think block: the format is `</think>` then
    `\\boxed{}` (after removing spaces around <, > and /, as the authors' Qwen3 reward does)."""
    scored = accuracy_format_reward(response, answer, accuracy_weight, format_weight)
    fmt = float(bool(_CLOSE_THINK_THEN_BOXED.fullmatch(_SPACE_AROUND_TAG_CHARACTERS.sub(r"\1", response))))
    return {**scored, "reward": accuracy_weight * scored["accuracy"] + format_weight * fmt, "format": fmt}


def load_reward_fn(dotted: str) -> Callable[..., dict[str, float]]:
    """Import `package.module.function`; a clear error names the path when it cannot be found."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"reward.function={dotted!r}: cannot import it ({err})") from None
    if not callable(fn):
        raise ConfigError(f"reward.function={dotted!r}: not callable")
    return fn


class RewardRole:
    """Calls the configured reward function; weights are passed only if the function declares them."""

    def __init__(self, cfg: Config):
        self.name = cfg.reward.function
        self.fn = load_reward_fn(cfg.reward.function)
        params = inspect.signature(self.fn).parameters
        self.kwargs = {k: v for k, v in (("accuracy_weight", cfg.reward.accuracy_weight),
                                         ("format_weight", cfg.reward.format_weight)) if k in params}

    def check(self, answer: str) -> None:
        """Score one well-formed response that gives `answer`, at start-up: a function that raises or returns the
        wrong shape is named before the model is trained, not after the warm-up.
        Collective: a failure on any rank stops every rank with one line."""
        error = None
        try:
            self([f"<think>I look at the image.</think> \\boxed{{{answer}}}"], [answer])
        except ConfigError as err:
            error = err
        dist_utils.raise_together(error)

    def __call__(self, texts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        rows = [self._score(t, a) for t, a in zip(texts, answers)]
        keys = rows[0].keys() if rows else ["reward"]
        scores = {k: torch.tensor([self._number(r, k, t, a) for r, t, a in zip(rows, texts, answers)]) for k in keys}
        for k, values in scores.items():  # a NaN reward would poison every advantage of its group silently
            bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
            if bad:
                raise ConfigError(f"reward.function={self.name!r} returned {k}={values[bad[0]].item()} for "
                                  f"{len(bad)} of {len(values)} responses (first: answer {answers[bad[0]]!r}, "
                                  f"response {texts[bad[0]][:80]!r}); rewards must be finite numbers")
        return scores

    def _score(self, text: str, answer: str) -> dict:
        """One response's dict, or a ConfigError naming the function, what went wrong and the response."""
        try:
            row = self.fn(text, answer, **self.kwargs)
        except Exception as err:  # the user's code: one line with the exception and where it was raised
            where = traceback.extract_tb(err.__traceback__)[-1]
            raise ConfigError(f"reward.function={self.name!r} raised {type(err).__name__}: {one_line(err)} (at "
                              f"{where.filename}:{where.lineno}; {self._case(text, answer)})") from None
        if not isinstance(row, dict) or "reward" not in row:
            raise ConfigError(f"reward.function={self.name!r} returned {one_line(repr(row))[:80]} "
                              f"({self._case(text, answer)}); it must return a dict with a 'reward' number")
        return row

    def _number(self, row: dict, key: str, text: str, answer: str) -> float:
        try:
            return float(row[key])
        except KeyError:
            raise ConfigError(f"reward.function={self.name!r} returned no {key!r} ({self._case(text, answer)}) where "
                              f"it returned one for another response; return the same keys every time") from None
        except (TypeError, ValueError):
            raise ConfigError(f"reward.function={self.name!r} returned {key}={one_line(repr(row[key]))[:80]} "
                              f"({self._case(text, answer)}); its values must be numbers") from None

    @staticmethod
    def _case(text: str, answer: str) -> str:
        return f"answer {answer!r}, response {text[:80]!r}"
