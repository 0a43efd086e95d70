"""Synthetic visual question answering: coloured shapes on a grid, one templated question each.

An offline task small enough for CPU that still needs the image to be answered: counting,
colour and shape recognition, spatial lookup and colour-shape binding. Every sample is a pure
function of ``(seed, index)`` (and the constructor arguments), so train and validation sets
are just two seeds, and worker processes or a resumed run see exactly the same data.

Answers are single words; :func:`vocabulary` lists every word a sample or the default
conversation template can contain, for :func:`tokenmill.data.text.word_tokenizer`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .seeding import derive_seed
from .text import GPT, HUMAN, IMAGE_TOKEN, VICUNA_SYSTEM, split_words, word_tokenizer

SHAPES = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 45),
    "white": (240, 240, 240),
    "purple": (155, 60, 205),
}
DEFAULT_COLORS = ("red", "green", "blue", "yellow")
QUESTION_TYPES = ("count", "color", "shape_at", "exists", "color_at")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NOTHING = "nothing"
MAX_GRID = 3

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": (
        "how many shapes are there?",
        "how many shapes are in the image?",
        "how many objects can you see?",
        "count the shapes in the picture.",
    ),
    "color": (
        "what color is the {shape}?",
        "what is the color of the {shape}?",
        "which color does the {shape} have?",
    ),
    "shape_at": (
        "what shape is in the {cell}?",
        "which shape is at the {cell}?",
        "what is the shape in the {cell} of the image?",
    ),
    "exists": (
        "is there a {color} {shape}?",
        "is there a {color} {shape} in the image?",
        "do you see a {color} {shape}?",
    ),
    "color_at": (
        "what color is the shape in the {cell}?",
        "what is the color of the shape at the {cell}?",
        "which color is the object in the {cell}?",
    ),
}

_ROWS = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLUMNS = {1: ("",), 2: ("left", "right"), 3: ("left", "center", "right")}

EMPTY_CELL_PROBABILITY = 0.25  # *_at questions ask about an empty cell this often (when there is one)
NEAR_MISS_PROBABILITY = 0.5  # a "no" for exists names a present shape or colour in the wrong pairing


def cell_name(row: int, column: int, grid: int) -> str:
    """``"top left"``, ``"bottom right"``; on a 3x3 grid also ``"middle left"``, ``"top center"``
    and ``"center"`` for the middle cell (the single cell of a 1x1 grid is ``"center"`` too)."""
    if grid not in _ROWS:
        raise ValueError(f"grid must be in 1..{MAX_GRID}, got {grid}")
    name = " ".join(part for part in (_ROWS[grid][row], _COLUMNS[grid][column]) if part)
    return "center" if name in ("", "middle center") else name


@dataclass(frozen=True)
class PlacedShape:
    shape: str
    color: str
    row: int
    column: int
    center: tuple[float, float]  # (x, y) in pixels; inside the shape for every shape type
    half_size: float  # pixels from the centre to the bounding box edge

    def as_dict(self, grid: int) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "row": self.row,
            "column": self.column,
            "cell": cell_name(self.row, self.column, grid),
            "center": self.center,
            "half_size": self.half_size,
        }


@dataclass(frozen=True)
class SceneSample:
    """Everything about one sample except the pixels (cheap: no rendering)."""

    index: int
    key: str
    shapes: tuple[PlacedShape, ...]
    background: tuple[int, int, int]
    noise_seed: int
    question_type: str
    question: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def conversation(self) -> list[dict[str, str]]:
        return [
            {"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{self.question}"},
            {"from": GPT, "value": self.answer},
        ]


class SyntheticVQA(Dataset):
    """``num_samples`` images of 1..``max_shapes`` coloured shapes, each in its own grid cell,
    with one question of a type drawn uniformly from ``question_types``.

    Items: ``{"image": PIL RGB, "conversation": [human "<image>\\n{question}", gpt answer],
    "question_type", "answer", "key", "shapes": [{"shape", "color", "row", "column", "cell",
    "center", "half_size"}, ...]}``.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        grid: int = 2,
        max_shapes: int = 3,
        seed: int = 0,
        question_types: Sequence[str] | None = None,
        colors: Sequence[str] | None = None,
        noise_std: float = 6.0,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 1 <= grid <= MAX_GRID:
            raise ValueError(f"grid must be in 1..{MAX_GRID} (cells per side), got {grid}")
        if not 1 <= max_shapes <= grid * grid:
            raise ValueError(
                f"max_shapes must be in 1..{grid * grid} for a {grid}x{grid} grid, got {max_shapes}"
            )
        if image_size < 8 * grid:
            raise ValueError(f"image_size must be at least {8 * grid} for grid={grid}, got {image_size}")
        types = tuple(QUESTION_TYPES if question_types is None else question_types)
        unknown = [name for name in types if name not in QUESTION_TYPES]
        if unknown or not types:
            raise ValueError(
                f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {list(types)}"
            )
        palette = tuple(DEFAULT_COLORS if colors is None else colors)
        unknown = [name for name in palette if name not in PALETTE]
        if unknown or len(palette) < 2 or len(set(palette)) != len(palette):
            raise ValueError(
                f"colors must be at least two distinct names from {tuple(PALETTE)}, got {list(palette)}"
            )
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.grid = int(grid)
        self.max_shapes = int(max_shapes)
        self.seed = int(seed)
        self.question_types = types
        self.colors = palette
        self.noise_std = float(noise_std)

    def __len__(self) -> int:
        return self.num_samples

    def answer_options(self, question_type: str) -> list[str]:
        return answer_options(question_type, max_shapes=self.max_shapes, colors=self.colors)

    # --------------------------------------------------------------------------- scene
    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for SyntheticVQA of {self.num_samples} samples")
        return index

    def _draw_shapes(self, rng: np.random.Generator) -> tuple[PlacedShape, ...]:
        cell = self.image_size / self.grid
        count = int(rng.integers(1, self.max_shapes + 1))
        cells = sorted(int(c) for c in rng.choice(self.grid * self.grid, size=count, replace=False))
        shapes = []
        for flat in cells:
            row, column = divmod(flat, self.grid)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = self.colors[int(rng.integers(len(self.colors)))]
            half = float(rng.uniform(0.26, 0.38)) * cell
            jitter = max(cell / 2 - half - 1.0, 0.0)
            x = (column + 0.5) * cell + float(rng.uniform(-jitter, jitter))
            y = (row + 0.5) * cell + float(rng.uniform(-jitter, jitter))
            shapes.append(PlacedShape(shape, color, row, column, (x, y), half))
        return tuple(shapes)

    def describe(self, index: int) -> SceneSample:
        """The sample's scene, question and answer without drawing it."""
        index = self._check_index(index)
        rng = np.random.default_rng(derive_seed("synthetic-vqa", self.seed, index))
        question_type = self.question_types[int(rng.integers(len(self.question_types)))]
        level = int(rng.integers(20, 60))
        background = tuple(int(np.clip(level + rng.integers(-8, 9), 0, 255)) for _ in range(3))
        noise_seed = int(rng.integers(1 << 62))
        shapes = self._draw_shapes(rng)
        if question_type == "color":
            # Only ask about a shape type that occurs exactly once; one shape always qualifies.
            while not any(n == 1 for n in Counter(s.shape for s in shapes).values()):
                shapes = self._draw_shapes(rng)
        question, answer, extra = self._question(question_type, shapes, rng)
        return SceneSample(
            index=index,
            key=f"synthvqa-s{self.seed}-{index:08d}",
            shapes=shapes,
            background=background,  # type: ignore[arg-type]
            noise_seed=noise_seed,
            question_type=question_type,
            question=question,
            answer=answer,
            extra=extra,
        )

    def _question(
        self, question_type: str, shapes: tuple[PlacedShape, ...], rng: np.random.Generator
    ) -> tuple[str, str, dict[str, Any]]:
        templates = QUESTION_TEMPLATES[question_type]
        template = templates[int(rng.integers(len(templates)))]
        if question_type == "count":
            return template, NUMBER_WORDS[len(shapes)], {}
        if question_type == "color":
            counts = Counter(s.shape for s in shapes)
            unique = [s for s in shapes if counts[s.shape] == 1]
            target = unique[int(rng.integers(len(unique)))]
            return template.format(shape=target.shape), target.color, {"shape": target.shape}
        if question_type in ("shape_at", "color_at"):
            occupied = {(s.row, s.column): s for s in shapes}
            empty = [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) not in occupied]
            if empty and rng.random() < EMPTY_CELL_PROBABILITY:
                row, column = empty[int(rng.integers(len(empty)))]
                answer = NOTHING
            else:
                target = shapes[int(rng.integers(len(shapes)))]
                row, column = target.row, target.column
                answer = target.shape if question_type == "shape_at" else target.color
            cell = cell_name(row, column, self.grid)
            return template.format(cell=cell), answer, {"row": row, "column": column}
        # exists: yes/no with probability 1/2 each
        present = {(s.color, s.shape) for s in shapes}
        if rng.random() < 0.5:
            target = shapes[int(rng.integers(len(shapes)))]
            color, shape, answer = target.color, target.shape, "yes"
        else:
            absent = [(c, s) for c in self.colors for s in SHAPES if (c, s) not in present]
            colors_seen = {c for c, _ in present}
            shapes_seen = {s for _, s in present}
            near = [(c, s) for c, s in absent if c in colors_seen or s in shapes_seen]
            pool = near if near and rng.random() < NEAR_MISS_PROBABILITY else absent
            color, shape = pool[int(rng.integers(len(pool)))]
            answer = "no"
        return template.format(color=color, shape=shape), answer, {"color": color, "shape": shape}

    # --------------------------------------------------------------------------- pixels
    def render(self, scene: SceneSample) -> Image.Image:
        size = self.image_size
        image = Image.new("RGB", (size, size), scene.background)
        draw = ImageDraw.Draw(image)
        for placed in scene.shapes:
            x, y = placed.center
            h = placed.half_size
            fill = PALETTE[placed.color]
            if placed.shape == "circle":
                draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
            elif placed.shape == "square":
                s = 0.85 * h  # similar area to the circle
                draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
            else:  # triangle pointing up; (x, y) lies inside, above its base
                draw.polygon(((x, y - h), (x + h, y + 0.8 * h), (x - h, y + 0.8 * h)), fill=fill)
        if self.noise_std > 0:
            noise = np.random.default_rng(scene.noise_seed).normal(0.0, self.noise_std, (size, size, 3))
            pixels = np.asarray(image, dtype=np.float32) + noise
            image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.describe(index)
        return {
            "image": self.render(scene),
            "conversation": scene.conversation,
            "question_type": scene.question_type,
            "answer": scene.answer,
            "key": scene.key,
            "shapes": [placed.as_dict(self.grid) for placed in scene.shapes],
        }


# ------------------------------------------------------------------------------ vocabulary
def answer_options(
    question_type: str, max_shapes: int = MAX_GRID * MAX_GRID, colors: Sequence[str] = DEFAULT_COLORS
) -> list[str]:
    """Every answer a question type can have (for the given dataset settings)."""
    if question_type == "count":
        return list(NUMBER_WORDS[1 : max_shapes + 1])
    if question_type == "color":
        return list(colors)
    if question_type == "shape_at":
        return [*SHAPES, NOTHING]
    if question_type == "color_at":
        return [*colors, NOTHING]
    if question_type == "exists":
        return ["yes", "no"]
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")


def vocabulary(system: str = VICUNA_SYSTEM, user: str = "USER", assistant: str = "ASSISTANT") -> list[str]:
    """Every word (lower-cased, punctuation split off) that a :class:`SyntheticVQA` sample of any
    grid size and palette, rendered with the default conversation template, can contain.

    Deterministic order: template words first, then questions and answers.
    """
    texts = [system, f"{user}: {assistant}:"]
    cells = [cell_name(r, c, g) for g in range(1, MAX_GRID + 1) for r in range(g) for c in range(g)]
    for templates in QUESTION_TEMPLATES.values():
        for template in templates:
            for shape in SHAPES:
                for color in PALETTE:
                    for cell in cells:
                        texts.append(template.format(shape=shape, color=color, cell=cell))
    for question_type in QUESTION_TYPES:
        texts.extend(answer_options(question_type, colors=tuple(PALETTE)))
    words: dict[str, None] = {}
    for text in texts:
        words.update(dict.fromkeys(split_words(text)))
    return list(words)


def synthetic_vqa_tokenizer(system: str = VICUNA_SYSTEM) -> Any:
    """Word-level tokenizer covering :func:`vocabulary` (Hydra-friendly shortcut)."""
    return word_tokenizer(vocabulary(system))


# ------------------------------------------------------------------------------ baselines
def majority_baseline(dataset: Any, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Per question type: how often the most common answer is right (the "always say X" baseline).

    Works on any dataset whose items have ``question_type`` and ``answer``; a
    :class:`SyntheticVQA` is read through :meth:`SyntheticVQA.describe` without rendering.
    Returns ``{type: {"num_samples", "majority_answer", "majority_rate", "num_distinct_answers"}}``
    plus, for synthetic data, ``"num_options"`` and ``"uniform_chance"`` (1 / options).
    """
    total = len(dataset) if limit is None else min(int(limit), len(dataset))
    answers: dict[str, Counter] = {}
    for index in range(total):
        if isinstance(dataset, SyntheticVQA):
            scene = dataset.describe(index)
            question_type, answer = scene.question_type, scene.answer
        else:
            item = dataset[index]
            question_type, answer = item["question_type"], item["answer"]
        answers.setdefault(question_type, Counter())[answer] += 1
    result: dict[str, dict[str, Any]] = {}
    for question_type in sorted(answers):
        counts = answers[question_type]
        answer, hits = counts.most_common(1)[0]
        size = sum(counts.values())
        stats: dict[str, Any] = {
            "num_samples": size,
            "majority_answer": answer,
            "majority_rate": hits / size,
            "num_distinct_answers": len(counts),
        }
        if isinstance(dataset, SyntheticVQA):
            options = dataset.answer_options(question_type)
            stats.update(num_options=len(options), uniform_chance=1.0 / len(options))
        result[question_type] = stats
    return result
