"""`shape_color_hint`: the shape-colour task with a TEXT shortcut, for the miniature reproduction of the paper's claim.

The image always holds the truth (one coloured shape, as in `shape_color`); the question ends with
"Hint: the answer is <colour>.", and the hinted colour is the right one with probability `hint_accuracy` (ρ) and
a uniformly drawn wrong one otherwise. A policy that reads the hint scores ρ; one that reads the image scores 1.
Held-out splits fix the hint: `hint="right"` (every hint right) and `hint="wrong"` (every hint wrong — only the
image gives the answer there). Samples are a pure function of (seed, split, index, ρ / hint), the image and the
question stem being exactly `shape_color`'s sample of the same (seed, split, index).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .data import COLORS, Sample, make_sample, task_questions

TASK = "shape_color_hint"
HINTS = ("right", "wrong")


@dataclass
class HintSample(Sample):
    hint: str = ""  # the colour named by the hint


def make_hint_sample(index: int, split: str, seed: int, image_size: int, hint_accuracy: float,
                     hint: str | None = None) -> HintSample:
    """Sample `index`; the hint is right with probability `hint_accuracy`, or always right / wrong when `hint`
    is "right" / "wrong"."""
    base = make_sample("shape_color", index, split, seed, image_size)
    rng = random.Random(f"{TASK}|{seed}|{split}|{index}")  # independent of shape_color's own draws
    draw, wrong = rng.random(), rng.choice([c for c in COLORS if c != base.answer])
    if hint is None:
        right = draw < hint_accuracy
    elif hint in HINTS:
        right = hint == "right"
    else:
        raise ValueError(f"hint={hint!r}: must be None, 'right' or 'wrong'")
    hinted = base.answer if right else wrong
    return HintSample(images=base.images, question=_hinted(base.question, hinted),
                      answer=base.answer, uid=f"{TASK}-{split}-{hint or 'mixed'}-{index}", caption=base.caption,
                      hint=hinted)


def _hinted(question: str, colour: str) -> str:
    return f"{question} Hint: the answer is {colour}."


def hint_questions() -> list[str]:
    """Every question this task asks: each shape_color question with each colour as its hint."""
    return [_hinted(q, colour) for q in task_questions("shape_color") for colour in COLORS]


class HintDataset:
    """Indexable and deterministic, like `data.GeneratedDataset`."""

    def __init__(self, split: str, size: int, seed: int, image_size: int, hint_accuracy: float,
                 hint: str | None = None):
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.hint_accuracy, self.hint = hint_accuracy, hint

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> HintSample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return make_hint_sample(index, self.split, self.seed, self.image_size, self.hint_accuracy, self.hint)
