"""A toy visual-math benchmark in MathVista's spirit: small images, a question about each, one exact answer.

Every image is a `(3, 16, 16)` float32 array in [0, 1] (channels red, green, blue; black background)
that this module renders with numpy from a seed, so the benchmark is rebuilt byte for byte on any
machine and nothing is downloaded. Five question types:

    digit       Which digit is this?                        one handwritten digit          0-9
    digit_sum   What is the sum of the two digits?           two digits side by side        0-18
    count       How many red circles are there?              coloured circles and squares   0-5
    which_bar   Which bar is tallest? (or shortest)          a four-bar chart               1-4
    bar_range   ... the tallest bar's value minus the shortest's   the same charts          3-7

The handwriting is real: scikit-learn's bundled digits (1,797 images of
8 x 8 pixels: the test set of the UCI optical digits, written by 13 people). Held-out images never appear in training: the digits are split
once by a seeded shuffle (360 held out), and every rendered count scene or bar chart belongs to
one split by a hash of its pixels, so a generator draws again until its scene falls in the split
asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 16  # pixels on a side
KINDS = ("digit", "digit_sum", "count", "which_bar", "bar_range")
ANSWERS: dict[str, tuple[str, ...]] = {  # every answer a question type can have
    "digit": tuple(str(d) for d in range(10)),
    "digit_sum": tuple(str(s) for s in range(19)),
    "count": tuple(str(c) for c in range(6)),
    "which_bar": ("1", "2", "3", "4"),
    "bar_range": tuple(str(r) for r in range(3, 8)),  # four distinct values from 1 to 8 span 3 to 7
}
SPLITS = ("train", "test")
HELD_OUT_DIGITS = 360  # of scikit-learn's 1,797
COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.2, 0.9, 0.2), "blue": (0.25, 0.4, 1.0)}
SHAPES = {  # 4 x 4 masks, one per grid cell of the count scenes
    "circle": np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=np.float32),
    "square": np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=np.float32),
}
BAR_COLOURS = ((1.0, 0.6, 0.1), (0.3, 0.8, 1.0), (0.9, 0.4, 0.9), (0.6, 0.9, 0.3))  # by position, left to right
BAR_UNIT = 2  # pixels of height per unit of value: values 1 to 8 fill 2 to 16 pixels


class Example(NamedTuple):
    """One benchmark item: an image, a question about it, and the exact answer (as text)."""

    kind: str
    question: str
    answer: str
    image: np.ndarray  # (3, 16, 16) float32 in [0, 1]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@lru_cache(maxsize=1)
def handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as float32 `(1797, 8, 8)` in [0, 1], and their labels."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: read from disk, never downloaded

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@lru_cache(maxsize=2)
def digit_indices(split: str) -> np.ndarray:
    """Which of the 1,797 digits belong to `split`: a fixed seeded shuffle, the first 360 held out."""
    _check_split(split)
    order = np.random.default_rng(0).permutation(len(handwritten_digits()[1]))
    return np.sort(order[:HELD_OUT_DIGITS] if split == "test" else order[HELD_OUT_DIGITS:])


def scene_split(image: np.ndarray) -> str:
    """The split a rendered scene belongs to, from a hash of its pixels (one in five is held out)."""
    return "test" if zlib.crc32(np.ascontiguousarray(image).tobytes()) % 5 == 0 else "train"


def _blank() -> np.ndarray:
    return np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


def _paste_digit(image: np.ndarray, index: int, top: int, left: int) -> None:
    """Draw digit number `index` (grey levels, so white on black) with its 8 x 8 corner at (top, left)."""
    pixels = handwritten_digits()[0][index]
    region = image[:, top : top + 8, left : left + 8]
    np.maximum(region, pixels[None], out=region)


def _random_digit(rng: np.random.Generator, split: str) -> int:
    return int(rng.choice(digit_indices(split)))


def digit_example(rng: np.random.Generator, split: str = "train") -> Example:
    """One handwritten digit in the centre."""
    _check_split(split)
    index = _random_digit(rng, split)
    image = _blank()
    _paste_digit(image, index, 4, 4)
    return Example("digit", "Which digit is this?", str(handwritten_digits()[1][index]), image)


def digit_sum_example(rng: np.random.Generator, split: str = "train") -> Example:
    """Two handwritten digits side by side; the answer is their sum (reading, then arithmetic)."""
    _check_split(split)
    first, second = _random_digit(rng, split), _random_digit(rng, split)
    image = _blank()
    _paste_digit(image, first, 4, 0)
    _paste_digit(image, second, 4, 8)
    labels = handwritten_digits()[1]
    return Example("digit_sum", "What is the sum of the two digits?", str(labels[first] + labels[second]), image)


def _in_split(draw, rng: np.random.Generator, split: str) -> Example:
    """Draw scenes until one falls in `split` (by `scene_split`)."""
    _check_split(split)
    while True:
        example = draw(rng)
        if scene_split(example.image) == split:
            return example


def _draw_count(rng: np.random.Generator) -> Example:
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(SHAPES)))
    n_targets = int(rng.integers(0, 6))
    n_others = int(rng.integers(2, 7))
    others = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)]
    items = [(colour, shape)] * n_targets + [others[i] for i in rng.integers(0, len(others), n_others)]
    cells = rng.permutation(16)[: len(items)]  # the 4 x 4 grid of 4-pixel cells, one item per cell
    image = _blank()
    for (item_colour, item_shape), cell in zip(items, cells):
        top, left = 4 * (cell // 4), 4 * (cell % 4)
        image[:, top : top + 4, left : left + 4] = np.array(COLOURS[item_colour], np.float32)[:, None, None] * SHAPES[item_shape]
    return Example("count", f"How many {colour} {shape}s are there?", str(n_targets), image)


def count_example(rng: np.random.Generator, split: str = "train") -> Example:
    """Coloured circles and squares on a 4 x 4 grid; count those of one colour and shape (0 to 5)."""
    return _in_split(_draw_count, rng, split)


def bar_chart(values: Sequence[int]) -> np.ndarray:
    """Four bars, 3 pixels wide, `BAR_UNIT` pixels tall per unit of value, standing on the bottom edge."""
    if len(values) != 4 or any(not 1 <= v <= 8 for v in values):
        raise ValueError(f"a bar chart has four values from 1 to 8, got {list(values)}")
    image = _blank()
    for position, value in enumerate(values):
        colour = np.array(BAR_COLOURS[position], np.float32)[:, None, None]
        image[:, IMAGE_SIZE - BAR_UNIT * value :, 4 * position : 4 * position + 3] = colour
    return image


def _draw_bars(rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    values = [int(v) for v in rng.choice(np.arange(1, 9), size=4, replace=False)]  # distinct: one tallest, one shortest
    return values, bar_chart(values)


def _draw_which_bar(rng: np.random.Generator) -> Example:
    values, image = _draw_bars(rng)
    extreme = str(rng.choice(["tallest", "shortest"]))
    position = values.index(max(values) if extreme == "tallest" else min(values)) + 1
    return Example("which_bar", f"Which bar is {extreme}? Count from the left.", str(position), image)


def which_bar_example(rng: np.random.Generator, split: str = "train") -> Example:
    """A four-bar chart; which bar (1 to 4, from the left) is the tallest, or the shortest."""
    return _in_split(_draw_which_bar, rng, split)


def _draw_bar_range(rng: np.random.Generator) -> Example:
    values, image = _draw_bars(rng)
    question = "What is the tallest bar's value minus the shortest bar's value?"
    return Example("bar_range", question, str(max(values) - min(values)), image)


def bar_range_example(rng: np.random.Generator, split: str = "train") -> Example:
    """A four-bar chart (each value 1 to 8, two pixels a unit); the tallest value minus the shortest."""
    return _in_split(_draw_bar_range, rng, split)


GENERATORS = {
    "digit": digit_example,
    "digit_sum": digit_sum_example,
    "count": count_example,
    "which_bar": which_bar_example,
    "bar_range": bar_range_example,
}


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """`kinds` as a tuple, or a clear error unless it names some of `KINDS` and nothing else."""
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"question types must be some of {KINDS}, got {list(kinds)}")
    return kinds


def training_examples(rng: np.random.Generator, n: int, kinds: Iterable[str] = KINDS) -> list[Example]:
    """`n` training examples, each of a question type drawn uniformly from `kinds`; a type listed
    twice is drawn twice as often (the mix the shipped recipe uses to give counting more practice)."""
    kinds = check_kinds(kinds)
    return [GENERATORS[kinds[int(rng.integers(len(kinds)))]](rng, "train") for _ in range(n)]


def benchmark(per_kind: int = 200, kinds: Iterable[str] = KINDS, seed: int = 1234) -> list[Example]:
    """The held-out benchmark: `per_kind` test examples of each question type, always the same for a seed."""
    kinds = check_kinds(kinds)
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"benchmark question types must not repeat, got {list(kinds)}")
    if not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind must be a positive integer, got {per_kind!r}")
    rng = np.random.default_rng(seed)
    return [GENERATORS[kind](rng, "test") for kind in kinds for _ in range(per_kind)]


def chance(kind: str) -> float:
    """The accuracy of guessing uniformly among the type's possible answers."""
    check_kinds([kind])
    return 1 / len(ANSWERS[kind])


def normalize_answer(text: str) -> str:
    """An answer as the scorer compares it: surrounding spaces and a final full stop removed."""
    return text.strip().removesuffix(".").strip()


def score(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Exact-match accuracy per question type (after `normalize_answer`), and "all" over every example."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples; give one per example")
    if not examples:
        raise ValueError("score needs at least one example")
    right: dict[str, list[bool]] = {}
    for prediction, example in zip(predictions, examples):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions must be strings, got {type(prediction).__name__}")
        right.setdefault(example.kind, []).append(normalize_answer(prediction) == example.answer)
    accuracy = {kind: sum(flags) / len(flags) for kind, flags in right.items()}
    accuracy["all"] = sum(sum(flags) for flags in right.values()) / len(examples)
    return accuracy
