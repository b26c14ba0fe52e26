"""The generated vision task: shapes drawn with PIL whose answers need the image.

`shape_color`: one shape, "what colour is it?" — the text is the same for every colour, so the text prior
gives chance accuracy (1 / len(COLORS)); only the pixels tell.  `shape_count`: 1–4 shapes, "how many?".
Samples are a pure function of (seed, split, index), so train and held-out splits never overlap.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ["circle", "square", "triangle"]
COUNTS = [1, 2, 3, 4]
_QUESTIONS = {
    "shape_color": ["What color is the shape in the image?", "Which color does the shape have?",
                    "Name the color of the shape."],
    "shape_count": ["How many shapes are in the image?", "Count the shapes in the image."],
}
ANSWERS = {"shape_color": list(COLORS), "shape_count": [str(c) for c in COUNTS],
           "shape_color_hint": list(COLORS)}  # hint_task.py: shape_color with a hint in the question
_SPLIT_OFFSET = {"train": 0, "eval": 1_000_003}


@dataclass
class Sample:
    """One prompt: its images (one or more, in prompt order), the question text and the reference answer."""
    images: list[Image.Image]
    question: str
    answer: str
    uid: str
    caption: str = ""  # what the image shows WITHOUT the answer (generated task only; used by the warm-start)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


def question_texts() -> list[str]:
    return [q for qs in _QUESTIONS.values() for q in qs]


def task_questions(task: str) -> list[str]:
    """Every question the generated task `task` asks."""
    return list(_QUESTIONS[task])


def chance_accuracy(task: str) -> float:
    return 1.0 / len(ANSWERS[task])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_sample(task: str, index: int, split: str, seed: int, image_size: int) -> Sample:
    rng = random.Random(f"{task}|{seed}|{_SPLIT_OFFSET[split] + index}")  # str seeds are stable across processes
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    if task == "shape_color":
        color = rng.choice(list(COLORS))
        size = rng.randint(image_size // 2, image_size - 8)
        x0, y0 = rng.randint(2, image_size - size - 2), rng.randint(2, image_size - size - 2)
        shape = rng.choice(SHAPES)
        _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), COLORS[color])
        answer, caption = color, f"I see a {shape}."
    elif task == "shape_count":
        count = rng.choice(COUNTS)
        cell = image_size // 2
        shape = rng.choice(SHAPES)
        for slot in rng.sample(range(4), count):  # one shape per quadrant: no overlaps, countable
            size = rng.randint(cell // 2, cell - 4)
            cx, cy = (slot % 2) * cell, (slot // 2) * cell
            x0, y0 = cx + rng.randint(1, cell - size - 1), cy + rng.randint(1, cell - size - 1)
            _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), rng.choice(list(COLORS.values())))
        answer, caption = str(count), f"I see {shape}s."
    else:
        raise ValueError(f"data.task={task!r}: must be one of {', '.join(_QUESTIONS)}")
    return Sample(images=[image], question=rng.choice(_QUESTIONS[task]), answer=answer, uid=f"{task}-{split}-{index}",
                  caption=caption)


class GeneratedDataset:
    """Indexable, deterministic: dataset[i] is always the same sample for a given (task, split, seed)."""

    def __init__(self, task: str, split: str, size: int, seed: int, image_size: int):
        self.task, self.split, self.size, self.seed, self.image_size = task, split, size, seed, image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return make_sample(self.task, index, self.split, self.seed, self.image_size)
