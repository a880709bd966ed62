"""Tests for minigpt/visual_math.py: every generator's answer is right by construction (checked by
reading the answer back out of the pixels), seeds reproduce, the held-out split never leaks into
training, and the exact-match scorer."""

import re

import numpy as np
import pytest

from minigpt import visual_math as vm
from minigpt.visual_math import (
    ANSWERS,
    BAR_COLOURS,
    BAR_UNIT,
    COLOURS,
    GENERATORS,
    HELD_OUT_DIGITS,
    IMAGE_SIZE,
    KINDS,
    SHAPES,
    Example,
    bar_chart,
    benchmark,
    chance,
    digit_indices,
    handwritten_digits,
    normalize_answer,
    scene_split,
    score,
    training_examples,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def draw(kind: str, n: int, split: str = "train", seed: int = 0) -> list[Example]:
    generator = rng(seed)
    return [GENERATORS[kind](generator, split) for _ in range(n)]


def digit_label_at(image: np.ndarray, top: int, left: int) -> tuple[int, int]:
    """The scikit-learn label and index of the one digit whose pixels fill the 8 x 8 square at (top, left)."""
    pixels, labels = handwritten_digits()
    region = image[:, top : top + 8, left : left + 8]
    assert np.array_equal(region[0], region[1]) and np.array_equal(region[0], region[2])  # grey: white on black
    matches = np.flatnonzero((pixels == region[0]).all(axis=(1, 2)))
    assert len(matches) == 1, matches  # the 1,797 digits are distinct images
    return int(labels[matches[0]]), int(matches[0])


def bar_values(image: np.ndarray) -> list[int]:
    """Read a chart's four values back from its column heights, checking each bar's colour and width."""
    values = []
    for position in range(4):
        left = 4 * position
        column = image[:, :, left]  # (3, 16)
        height = int((column.max(axis=0) > 0).sum())
        assert height % BAR_UNIT == 0
        value = height // BAR_UNIT
        bar = image[:, IMAGE_SIZE - height :, left : left + 3]
        assert np.array_equal(bar, np.broadcast_to(np.array(BAR_COLOURS[position], np.float32)[:, None, None], bar.shape))
        assert not image[:, : IMAGE_SIZE - height, left : left + 3].any()  # nothing above the bar
        assert not image[:, :, left + 3].any()  # the gap between bars stays black
        values.append(value)
    return values


# ---------------------------------------------------------------------------------------------
# Answers right by construction


def test_digit_answers_are_the_label_of_the_pasted_digit():
    for example in draw("digit", 100):
        label, _ = digit_label_at(example.image, 4, 4)
        assert example.answer == str(label)
        assert example.question == "Which digit is this?"


def test_digit_sum_answers_are_the_sum_of_the_two_labels():
    for example in draw("digit_sum", 100):
        first, _ = digit_label_at(example.image, 4, 0)
        second, _ = digit_label_at(example.image, 4, 8)
        assert example.answer == str(first + second)


def test_count_answers_are_the_cells_that_hold_the_asked_colour_and_shape():
    for example in draw("count", 150):
        colour, shape = re.fullmatch(r"How many (\w+) (\w+)s are there\?", example.question).groups()
        target = np.array(COLOURS[colour], np.float32)[:, None, None] * SHAPES[shape]  # (3, 4, 4)
        cells = [example.image[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] for r in range(4) for c in range(4)]
        assert example.answer == str(sum(np.array_equal(cell, target) for cell in cells))
        assert sum(cell.any() for cell in cells) >= 2  # distractors are always there


def test_which_bar_answers_point_at_the_tallest_or_shortest_bar():
    for example in draw("which_bar", 100):
        values = bar_values(example.image)
        assert len(set(values)) == 4 and all(1 <= v <= 8 for v in values)
        extreme = re.fullmatch(r"Which bar is (tallest|shortest)\? Count from the left\.", example.question).group(1)
        wanted = max(values) if extreme == "tallest" else min(values)
        assert example.answer == str(values.index(wanted) + 1)


def test_bar_range_answers_are_the_tallest_value_minus_the_shortest():
    for example in draw("bar_range", 100):
        values = bar_values(example.image)
        assert example.answer == str(max(values) - min(values))


def test_bar_chart_reads_back_its_values_and_refuses_bad_ones():
    assert bar_values(bar_chart([1, 8, 3, 5])) == [1, 8, 3, 5]
    for bad in ([1, 2, 3], [0, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4, 5]):
        with pytest.raises(ValueError, match="four values from 1 to 8"):
            bar_chart(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_images_are_float32_in_zero_to_one_and_answers_are_possible_ones(kind):
    for split in ("train", "test"):
        for example in draw(kind, 40, split):
            assert example.kind == kind
            assert example.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and example.image.dtype == np.float32
            assert example.image.min() >= 0 and example.image.max() <= 1 and example.image.any()
            assert isinstance(example.answer, str) and example.answer in ANSWERS[kind]


def test_benchmark_answers_cover_most_of_each_answer_set():
    examples = benchmark(200)
    for kind in KINDS:
        seen = {e.answer for e in examples if e.kind == kind}
        assert seen <= set(ANSWERS[kind])
        assert len(seen) >= len(ANSWERS[kind]) - 3, (kind, seen)  # digit_sum's 0 and 18 are rare


# ---------------------------------------------------------------------------------------------
# Seeds


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_examples_and_another_seed_differs(kind):
    a, b, c = draw(kind, 20, seed=5), draw(kind, 20, seed=5), draw(kind, 20, seed=6)
    for x, y in zip(a, b):
        assert x.question == y.question and x.answer == y.answer and np.array_equal(x.image, y.image)
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_benchmark_is_the_same_for_a_seed_and_differs_for_another():
    a, b, c = benchmark(10), benchmark(10), benchmark(10, seed=99)
    assert [e.kind for e in a] == [k for k in KINDS for _ in range(10)]
    assert all(np.array_equal(x.image, y.image) and x[:3] == y[:3] for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_training_examples_are_seeded_and_draw_only_the_asked_kinds():
    a = training_examples(rng(3), 50, ("digit", "count"))
    b = training_examples(rng(3), 50, ("digit", "count"))
    assert {e.kind for e in a} == {"digit", "count"}
    assert all(x[:3] == y[:3] and np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert {e.kind for e in training_examples(rng(0), 200)} == set(KINDS)


def test_a_kind_listed_twice_is_drawn_about_twice_as_often():
    kinds = [e.kind for e in training_examples(rng(5), 3000, ("digit", "count", "count"))]
    share = kinds.count("count") / len(kinds)  # expected 2/3; sd of the share is 0.0086, so +-0.05 is 5.8 sd
    assert abs(share - 2 / 3) < 0.05


def test_benchmark_kinds_must_not_repeat():
    with pytest.raises(ValueError, match="must not repeat"):
        benchmark(5, kinds=("count", "count"))


# ---------------------------------------------------------------------------------------------
# The split


def test_test_and_train_digits_are_disjoint_and_cover_all_1797():
    test, train = digit_indices("test"), digit_indices("train")
    assert len(test) == HELD_OUT_DIGITS == 360 and len(train) == 1797 - 360
    assert not set(test.tolist()) & set(train.tolist())
    assert sorted(np.concatenate([test, train]).tolist()) == list(range(1797))
    pixels, labels = handwritten_digits()
    assert pixels.shape == (1797, 8, 8) and pixels.dtype == np.float32 and 0 <= pixels.min() and pixels.max() <= 1
    assert set(labels[test].tolist()) == set(range(10))  # every digit is held out somewhere


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_are_drawn_from_their_split_only(split):
    allowed = set(digit_indices(split).tolist())
    for example in draw("digit", 60, split):
        assert digit_label_at(example.image, 4, 4)[1] in allowed
    for example in draw("digit_sum", 60, split):
        assert digit_label_at(example.image, 4, 0)[1] in allowed and digit_label_at(example.image, 4, 8)[1] in allowed


def test_every_benchmark_scene_is_in_the_test_split():
    for example in benchmark(100, kinds=("count", "which_bar", "bar_range")):
        assert scene_split(example.image) == "test"
    for kind in ("count", "which_bar", "bar_range"):
        assert all(scene_split(e.image) == "train" for e in draw(kind, 50))


def test_scene_split_holds_out_about_one_in_five():
    generator = rng(0)
    scenes = [vm._draw_count(generator).image for _ in range(1000)]
    assert 0.15 < np.mean([scene_split(s) == "test" for s in scenes]) < 0.25


def test_training_examples_never_equal_a_benchmark_image():
    held_out = {e.image.tobytes() for e in benchmark(200)}
    training = training_examples(rng(0), 600)
    assert {e.kind for e in training} == set(KINDS)
    assert not [e for e in training if e.image.tobytes() in held_out]


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_split_is_refused(kind):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        GENERATORS[kind](rng(), "val")


def test_unknown_or_empty_kinds_are_refused():
    for kinds in (["digit", "colour"], [], "nonsense"):
        with pytest.raises(ValueError, match="question types must be some of"):
            benchmark(5, kinds=kinds)
        with pytest.raises(ValueError, match="question types must be some of"):
            training_examples(rng(), 5, kinds)
    with pytest.raises(ValueError, match="question types must be some of"):
        chance("colour")
    with pytest.raises(ValueError, match="split must be one of"):
        digit_indices("validation")


@pytest.mark.parametrize("per_kind", [0, -3, 2.5, "10"])
def test_a_bad_per_kind_is_refused(per_kind):
    with pytest.raises(ValueError, match="per_kind must be a positive integer"):
        benchmark(per_kind)


# ---------------------------------------------------------------------------------------------
# The scorer


def example(kind: str, answer: str) -> Example:
    return Example(kind, "?", answer, np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32))


def test_normalize_answer_strips_spaces_and_a_final_full_stop():
    assert normalize_answer(" 7.") == "7"
    assert normalize_answer("12 . ") == "12"
    assert normalize_answer("\n3\t") == "3"
    assert normalize_answer("7..") == "7."  # one full stop only
    assert normalize_answer("seven") == "seven"


def test_score_is_exact_match_per_kind_and_over_all():
    examples = [example("digit", "7"), example("digit", "3"), example("count", "2"), example("count", "0"),
                example("count", "5")]
    accuracy = score([" 7.", "8", "2", "0.", "05"], examples)
    assert accuracy == {"digit": 0.5, "count": 2 / 3, "all": 3 / 5}
    assert list(accuracy) == ["digit", "count", "all"]
    assert score(["7", "3", "2", "0", "5"], examples)["all"] == 1.0
    assert score(["", "", "", "", ""], examples) == {"digit": 0.0, "count": 0.0, "all": 0.0}


def test_score_refuses_a_length_mismatch_non_strings_and_no_examples():
    examples = [example("digit", "7"), example("digit", "3")]
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        score(["7"], examples)
    with pytest.raises(TypeError, match="predictions must be strings, got int"):
        score(["7", 3], examples)
    with pytest.raises(ValueError, match="at least one example"):
        score([], [])


def test_chance_is_one_over_the_number_of_possible_answers():
    assert chance("digit") == pytest.approx(1 / 10)
    assert chance("digit_sum") == pytest.approx(1 / 19)
    assert chance("count") == pytest.approx(1 / 6)
    assert chance("which_bar") == pytest.approx(1 / 4)
    assert chance("bar_range") == pytest.approx(1 / 5)
    assert set(ANSWERS) == set(KINDS)
