"""Structured output: constrained decoding with a regular expression or a JSON schema.

When an API promises output that matches a JSON schema, the model is not trusted to get it right;
the sampler makes it impossible to get it wrong. The recipe, rebuilt here at toy scale:

1. Compile the format to a **deterministic finite automaton (DFA) over characters**. A JSON schema
   becomes a regular expression first (`json_schema_regex`), and the regex becomes a DFA: parse it,
   build a Thompson NFA, determinize it by subset construction. Character sets are kept as sorted,
   disjoint code-point ranges, so `[^"]` is two ranges, not 1.1 million characters. States from
   which no accepting state can be reached ("dead" states) are removed, so *every state the DFA
   is in can still be completed to a full match*.
2. Lift the DFA to the tokenizer's vocabulary. A token is a string of bytes, and byte-level BPE
   tokens may end (or begin) in the middle of a UTF-8 character, so the decoding state is a pair
   `(dfa_state, pending)`: the DFA state after every complete character, plus the bytes of an
   unfinished one. A token is allowed when feeding its bytes one at a time never kills the DFA:
   each completed character has a transition, and the unfinished bytes left at the end are a valid
   UTF-8 prefix that can still complete to a character the DFA has a transition for.
3. Before each sampling step, set the logits of disallowed tokens to -inf (`apply_mask`). The EOS
   token is allowed exactly in accepting states with no pending bytes.

Why this guarantees a match: by induction, the text generated so far always leads to a live
state, i.e. it is a prefix of some string in the language, and generation can only stop (EOS) in
an accepting state, where the text *is* in the language. Masks depend only on the state, so each is
computed once, by walking a byte trie of the whole vocabulary (shared token prefixes are walked
once, and a dead branch prunes every token below it), and cached.

The regex dialect (always anchored at both ends, as with `re.fullmatch`): literals; escapes `\\.`
and other escaped punctuation, `\\n \\t \\r \\f \\v`, `\\x` and `\\u` with 2 and 4 hex digits, the ASCII classes `\\d \\w \\s`
and their negations `\\D \\W \\S`; `.` (any character but newline); classes `[a-z_]`, `[^"\\\\]`;
groups `( )` and `(?: )`; alternation `|`; quantifiers `* + ? {m} {m,} {m,n} {,n}`; a leading `^`
and a trailing `$`, which change nothing. Everything else (backreferences, lookaround, lazy or
possessive quantifiers, named groups, word boundaries, a bare `{`) is a `ValueError`.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterable
from functools import lru_cache

import torch

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # not characters: UTF-8 cannot encode them, so no DFA has them
MAX_REPEAT = 1000  # the largest bound a `{m,n}` quantifier may have: copies of the NFA are made
DEFAULT_MAX_ITEMS = 8  # arrays without `maxItems` hold at most this many items (or `minItems`)
MAX_DIGITS = 6  # integers and fractions in JSON numbers have at most this many digits

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive (lo, hi) code-point ranges


# --- character sets ------------------------------------------------------------------------------


def char_ranges(pairs: Iterable[tuple[int, int]]) -> Ranges:
    """Normalize inclusive `(lo, hi)` code-point pairs: sorted, merged, surrogates removed."""
    merged: list[list[int]] = []
    for lo, hi in sorted(pairs):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out = []
    for lo, hi in merged:
        for a, b in ((lo, min(hi, SURROGATES[0] - 1)), (max(lo, SURROGATES[1] + 1), hi)):
            if a <= b:
                out.append((a, b))
    return tuple(out)


def negate(ranges: Ranges) -> Ranges:
    """Every character not in `ranges`."""
    gaps, next_lo = [], 0
    for lo, hi in ranges:
        if lo > next_lo:
            gaps.append((next_lo, lo - 1))
        next_lo = hi + 1
    if next_lo <= MAX_CODE_POINT:
        gaps.append((next_lo, MAX_CODE_POINT))
    return char_ranges(gaps)


def _char(c: str) -> Ranges:
    return ((ord(c), ord(c)),)


def _single(ranges: Ranges) -> int | None:
    """The code point if `ranges` is one character, else None."""
    return ranges[0][0] if len(ranges) == 1 and ranges[0][0] == ranges[0][1] else None


DIGIT = char_ranges([(48, 57)])
WORD = char_ranges([(48, 57), (65, 90), (95, 95), (97, 122)])
SPACE = char_ranges([(9, 13), (32, 32)])
CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE, "D": negate(DIGIT), "W": negate(WORD), "S": negate(SPACE)}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
HEX_ESCAPES = {"x": 2, "u": 4}  # escape letter -> number of hex digits
ANY_BUT_NEWLINE = negate(_char("\n"))
GROUP_EXTENSIONS = [  # (what follows "(", its name), longest first; all unsupported but "(?:"
    ("?<=", "lookbehind (?<="),
    ("?<!", "negative lookbehind (?<!"),
    ("?=", "lookahead (?="),
    ("?!", "negative lookahead (?!"),
    ("?P", "named group (?P"),
    ("?<", "named group (?<"),
]


# --- parsing: pattern -> syntax tree -------------------------------------------------------------
# Nodes: ("set", ranges) one character; ("cat", [nodes]); ("alt", [nodes]); ("repeat", node, lo, hi)
# with hi=None for no upper bound.


class _Parser:
    """Recursive descent over the pattern; `pos` is the index of the next unread character."""

    def __init__(self, pattern: str):
        self.pattern, self.pos = pattern, 0

    def fail(self, what: str, pos: int | None = None):
        pos = self.pos if pos is None else pos
        raise ValueError(f"{what} at position {pos} in pattern {self.pattern!r}")

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.pattern[i] if i < len(self.pattern) else None

    def parse(self) -> tuple:
        if self.peek() == "^":
            self.pos += 1
        node = self.alternation()
        if self.peek() == ")":
            self.fail("unbalanced parenthesis ')'")
        return node

    def alternation(self) -> tuple:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() == "$" and self.pos == len(self.pattern) - 1:
                self.pos += 1
                break
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def quantified(self, node: tuple) -> tuple:
        bounds = self.quantifier()
        if bounds is None:
            return node
        follower = self.peek()
        if follower == "?":
            self.fail("unsupported lazy quantifier (a quantifier followed by '?')")
        if follower == "+":
            self.fail("unsupported possessive quantifier (a quantifier followed by '+')")
        if follower is not None and follower in "*{":
            self.fail("unsupported repeated quantifier (wrap the first in a group)")
        return ("repeat", node, *bounds)

    def quantifier(self) -> tuple[int, int | None] | None:
        start, c = self.pos, self.peek()
        if c is not None and c in "*+?":
            self.pos += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        close = self.pattern.find("}", start)
        lo_text, comma, hi_text = self.pattern[start + 1 : close].partition(",") if close != -1 else ("", "", "")
        if not all(t == "" or t.isascii() and t.isdigit() for t in (lo_text, hi_text)) or not (lo_text or hi_text):
            self.fail("malformed quantifier '{' (use {m}, {m,}, {m,n} or {,n}; write \\{ for a brace)", start)
        lo = int(lo_text or 0)
        hi = lo if not comma else int(hi_text) if hi_text else None
        if hi is not None and lo > hi:
            self.fail(f"quantifier {{{lo},{hi}}} has min {lo} > max {hi}", start)
        if max(lo, hi or 0) > MAX_REPEAT:
            self.fail(f"quantifier bound {max(lo, hi or 0)} exceeds {MAX_REPEAT}", start)
        self.pos = close + 1
        return lo, hi

    def atom(self) -> tuple:
        start, c = self.pos, self.peek()
        self.pos += 1
        if c == "(":
            return self.group(start)
        if c == "[":
            return ("set", self.char_class(start))
        if c == ".":
            return ("set", ANY_BUT_NEWLINE)
        if c == "\\":
            return ("set", self.escape())
        if c in "*+?{":
            self.fail(f"quantifier {c!r} with nothing to repeat (write \\{c} for the literal)", start)
        if c in "^$":
            self.fail(f"unsupported anchor {c!r} (only a leading ^ and a trailing $ are allowed)", start)
        return ("set", _char(c))

    def group(self, start: int) -> tuple:
        if self.pattern.startswith("?:", self.pos):
            self.pos += 2
        elif self.peek() == "?":
            kind = next((name for prefix, name in GROUP_EXTENSIONS if self.pattern.startswith(prefix, self.pos)), None)
            self.fail(f"unsupported {kind or 'group flag (?'}", start)
        node = self.alternation()
        if self.peek() != ")":
            self.fail("unbalanced parenthesis '('", start)
        self.pos += 1
        return node

    def char_class(self, start: int) -> Ranges:
        negated = self.peek() == "^"
        self.pos += negated
        pairs: list[tuple[int, int]] = []
        while self.peek() != "]":
            if self.peek() is None:
                self.fail("unterminated character class '['", start)
            item = self.class_item()
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                self.pos += 1
                first, last = _single(item), _single(self.class_item())
                if first is None or last is None or first > last:
                    self.fail("bad range in character class (ends must be single characters, in order)")
                item = ((first, last),)
            pairs.extend(item)
        self.pos += 1
        if not pairs:
            self.fail("empty character class (write \\] for a literal bracket)", start)
        return negate(char_ranges(pairs)) if negated else char_ranges(pairs)

    def class_item(self) -> Ranges:
        c = self.peek()
        self.pos += 1
        return self.escape() if c == "\\" else _char(c)

    def escape(self) -> Ranges:
        start, c = self.pos - 1, self.peek()
        if c is None:
            self.fail("trailing backslash", start)
        self.pos += 1
        if c in CLASS_ESCAPES:
            return CLASS_ESCAPES[c]
        if c in CHAR_ESCAPES:
            return _char(CHAR_ESCAPES[c])
        if c in HEX_ESCAPES:
            digits = self.pattern[self.pos : self.pos + HEX_ESCAPES[c]]
            if len(digits) != HEX_ESCAPES[c] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"malformed escape \\{c} (needs {HEX_ESCAPES[c]} hex digits)", start)
            self.pos += len(digits)
            return char_ranges([(int(digits, 16), int(digits, 16))])
        if c.isdigit():
            self.fail(f"unsupported backreference \\{c}", start)
        if c.isalnum() or c == "_":
            self.fail(f"unsupported escape \\{c}", start)
        return _char(c)


# --- automata: syntax tree -> NFA -> DFA ---------------------------------------------------------


class _NFA:
    """Thompson's construction: `edges[state]` is a list of (ranges, target); ranges None is epsilon."""

    def __init__(self):
        self.edges: list[list[tuple[Ranges | None, int]]] = []

    def new_state(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        """Add states for `node`; return its (entry, exit) states."""
        kind, start = node[0], self.new_state()
        if kind == "set":
            end = self.new_state()
            self.edges[start].append((node[1], end))
            return start, end
        if kind == "alt":
            end = self.new_state()
            for branch in node[1]:
                entry, exit_ = self.build(branch)
                self.edges[start].append((None, entry))
                self.edges[exit_].append((None, end))
            return start, end
        if kind == "cat":
            current = start
            for item in node[1]:
                current = self.chain(current, item)
            return start, current
        _, item, lo, hi = node  # "repeat": `lo` compulsory copies, then a loop or `hi - lo` optional ones
        current = start
        for _ in range(lo):
            current = self.chain(current, item)
        if hi is None:  # current -> item -> current
            entry, exit_ = self.build(item)
            self.edges[current].append((None, entry))
            self.edges[exit_].append((None, current))
            return start, current
        end = self.new_state()
        for _ in range(hi - lo):  # each optional copy has a way out to `end` before it
            self.edges[current].append((None, end))
            current = self.chain(current, item)
        self.edges[current].append((None, end))
        return start, end

    def chain(self, current: int, node: tuple) -> int:
        entry, exit_ = self.build(node)
        self.edges[current].append((None, entry))
        return exit_

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        """`states` and every state reachable from them by epsilon edges."""
        seen, stack = set(states), list(states)
        while stack:
            for ranges, target in self.edges[stack.pop()]:
                if ranges is None and target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)


def _contains(ranges: Ranges, code_point: int) -> bool:
    i = bisect_right(ranges, (code_point, MAX_CODE_POINT + 1)) - 1
    return i >= 0 and ranges[i][1] >= code_point


def _split_moves(moves: list[tuple[Ranges, int]]) -> list[tuple[int, int, frozenset[int]]]:
    """Cut the code points into intervals on which the set of NFA targets is constant."""
    cuts = sorted({p for ranges, _ in moves for lo, hi in ranges for p in (lo, hi + 1)})
    pieces = []
    for lo, next_lo in zip(cuts, cuts[1:]):
        targets = frozenset(target for ranges, target in moves if _contains(ranges, lo))
        if targets:
            pieces.append((lo, next_lo - 1, targets))
    return pieces


class DFA:
    """A deterministic automaton over code points. State 0 is the start; every state is live.

    `transitions[state]` is a sorted list of `(lo, hi, next_state)`, one per range of characters.
    """

    def __init__(self, transitions: list[list[tuple[int, int, int]]], accepting: list[bool]):
        self.transitions, self.accepting = transitions, accepting
        self._starts = [[lo for lo, _, _ in row] for row in transitions]  # for bisection

    def __len__(self) -> int:
        return len(self.transitions)

    def step(self, state: int, code_point: int) -> int | None:
        """The state after reading `code_point`, or None if no match can continue with it."""
        row, i = self.transitions[state], bisect_right(self._starts[state], code_point) - 1
        return row[i][2] if i >= 0 and row[i][1] >= code_point else None

    def steps_within(self, state: int, lo: int, hi: int) -> bool:
        """Whether some character in `lo..hi` has a transition out of `state`."""
        i = bisect_right(self._starts[state], hi) - 1
        return i >= 0 and self.transitions[state][i][1] >= lo

    def matches(self, text: str) -> bool:
        """Whether the whole of `text` is in the language."""
        state = 0
        for char in text:
            state = self.step(state, ord(char))
            if state is None:
                return False
        return self.accepting[state]


def compile_regex(pattern: str) -> DFA:
    """Compile `pattern` (the module docstring's dialect) to a DFA that matches whole strings."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    nfa = _NFA()
    entry, accept = nfa.build(_Parser(pattern).parse())
    sets, index, rows = [nfa.closure([entry])], {}, []
    index[sets[0]] = 0
    for members in sets:  # subset construction: `sets` grows as new subsets are found
        moves = [edge for s in members for edge in nfa.edges[s] if edge[0] is not None]
        row = []
        for lo, hi, targets in _split_moves(moves):
            target = nfa.closure(targets)
            if target not in index:
                index[target] = len(sets)
                sets.append(target)
            if row and row[-1][1] == lo - 1 and row[-1][2] == index[target]:
                row[-1] = (row[-1][0], hi, index[target])
            else:
                row.append((lo, hi, index[target]))
        rows.append(row)
    return _prune_dead([accept in members for members in sets], rows, pattern)


def _prune_dead(accepting: list[bool], rows: list, pattern: str) -> DFA:
    """Keep only the states from which an accepting state can be reached, renumbered in order."""
    predecessors = [set() for _ in rows]
    for state, row in enumerate(rows):
        for _, _, target in row:
            predecessors[target].add(state)
    live = {s for s, accepts in enumerate(accepting) if accepts}
    stack = list(live)
    while stack:
        for source in predecessors[stack.pop()] - live:
            live.add(source)
            stack.append(source)
    if 0 not in live:
        raise ValueError(f"no string matches pattern {pattern!r} (its language is empty)")
    new_id = {old: new for new, old in enumerate(sorted(live))}
    transitions = [[(lo, hi, new_id[t]) for lo, hi, t in rows[old] if t in live] for old in sorted(live)]
    return DFA(transitions, [accepting[old] for old in sorted(live)])


# --- JSON schema -> regex ------------------------------------------------------------------------

META_CHARACTERS = set("\\.^$|?*+()[]{}")
JSON_STRING_CHAR = r'(?:[ !#-\[\]-~]|\\["\\])'  # printable ASCII but " and \, or the escapes \" and \\
ANNOTATIONS = {"title", "description", "$schema", "$comment", "default", "examples"}  # ignored
TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": {"minimum"},
    "number": {"minimum"},
    "boolean": set(),
    "null": set(),
}
KNOWN_KEYWORDS = set().union(*TYPE_KEYWORDS.values()) | ANNOTATIONS | {"type", "enum", "const"}


def regex_escape(text: str) -> str:
    """`text` as a pattern that matches exactly it."""
    return "".join("\\" + c if c in META_CHARACTERS else c for c in text)


def json_schema_regex(schema: dict) -> str:
    """A pattern for the values of `schema`, written as `json.dumps(value)` writes them by default.

    That is compact JSON with ", " and ": " separators and no other whitespace. Supported:

    - object: `properties`, each present and in that order (`required`, if given, must list them
      all; `additionalProperties`, if given, must be false);
    - array: `items`, `minItems`, `maxItems` (default max(minItems, DEFAULT_MAX_ITEMS));
    - string: `minLength`, `maxLength`. Characters are printable ASCII, with `"` and `\\` written
      as json.dumps writes them, `\\"` and `\\\\`; the other escapes it writes (`\\n`, `\\u00e9`) are
      left out, so strings with control or non-ASCII characters cannot be produced;
    - integer, number: at most MAX_DIGITS digits before (and after) the point; `minimum: 0`
      forbids the sign;
    - boolean, null; `enum` and `const` of strings, numbers, booleans and null.

    Anything else raises ValueError naming the keyword and where it is, as a JSON pointer.
    """
    return _schema_regex(schema, "")


def _schema_regex(schema: dict, path: str) -> str:
    where = path or "/"
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {where} must be a dict, got {type(schema).__name__}")
    unknown = sorted(schema.keys() - KNOWN_KEYWORDS)
    if unknown:
        raise ValueError(f"unsupported keyword {unknown[0]!r} at {where}; supported: {sorted(KNOWN_KEYWORDS)}")
    if "enum" in schema or "const" in schema:
        return _enum_regex(schema, path)
    kind = schema.get("type")
    if not isinstance(kind, str) or kind not in TYPE_KEYWORDS:
        what = "type lists" if isinstance(kind, list) else f"type {kind!r}"
        raise ValueError(f"unsupported {what} at {where}; use one of {sorted(TYPE_KEYWORDS)}, or enum/const")
    misplaced = sorted(schema.keys() - TYPE_KEYWORDS[kind] - ANNOTATIONS - {"type"})
    if misplaced:
        allows = sorted(TYPE_KEYWORDS[kind])
        raise ValueError(f"keyword {misplaced[0]!r} at {where} does not apply to type {kind!r} (it allows {allows})")
    if kind == "object":
        return _object_regex(schema, path)
    if kind == "array":
        return _array_regex(schema, path)
    if kind == "string":
        lo = _count(schema, "minLength", 0, path)
        hi = _count(schema, "maxLength", None, path)
        _check_bounds(lo, hi, "minLength", "maxLength", where)
        return f'"{JSON_STRING_CHAR}{{{lo},{"" if hi is None else hi}}}"'
    if kind in ("integer", "number"):
        if schema.get("minimum", 0) != 0:
            raise ValueError(f"unsupported minimum {schema['minimum']!r} at {where}: only minimum 0 is supported")
        sign = "" if "minimum" in schema else "-?"
        if kind == "integer":  # no "-0": json.dumps never writes it
            return f"(?:0|{sign}[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"
        return f"{sign}(?:0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})(?:\\.[0-9]{{1,{MAX_DIGITS}}})?"
    return "(?:true|false)" if kind == "boolean" else "null"


def _enum_regex(schema: dict, path: str) -> str:
    where = path or "/"
    beside = sorted(schema.keys() - {"enum", "const", "type"} - ANNOTATIONS)
    if beside or ("enum" in schema and "const" in schema):
        key = beside[0] if beside else "const"
        raise ValueError(f"keyword {key!r} at {where} cannot be combined with enum/const")
    values = schema["enum"] if "enum" in schema else [schema["const"]]
    if not isinstance(values, list) or not values:
        raise ValueError(f"enum at {where} must be a non-empty list")
    types = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
    for value in values:
        if type(value) not in types:
            raise ValueError(f"unsupported enum value {value!r} at {where}: only strings, numbers, booleans, null")
        kind = schema.get("type", types[type(value)])
        if kind != types[type(value)] and not (kind == "number" and type(value) is int):
            raise ValueError(f"enum value {value!r} at {where} is not of type {kind!r}")
    return "(?:" + "|".join(regex_escape(json.dumps(value)) for value in values) + ")"


def _object_regex(schema: dict, path: str) -> str:
    where, properties = path or "/", schema.get("properties", {})
    if not isinstance(properties, dict):
        raise ValueError(f"properties at {where} must be a dict of schemas")
    required = schema.get("required", list(properties))
    if not isinstance(required, list) or sorted(required) != sorted(properties):
        raise ValueError(f"unsupported required at {where}: every property must be required, {list(properties)}")
    if schema.get("additionalProperties", False) is not False:
        raise ValueError(f"unsupported additionalProperties at {where}: only false is supported")
    fields = []
    for key, value_schema in properties.items():
        pointer = key.replace("~", "~0").replace("/", "~1")
        value = _schema_regex(value_schema, f"{path}/properties/{pointer}")
        fields.append(regex_escape(json.dumps(key)) + ": " + value)
    return r"\{" + ", ".join(fields) + r"\}"


def _array_regex(schema: dict, path: str) -> str:
    where = path or "/"
    if "items" not in schema:
        raise ValueError(f"array at {where} needs an items schema")
    item = "(?:" + _schema_regex(schema["items"], f"{path}/items") + ")"
    lo = _count(schema, "minItems", 0, path)
    hi = _count(schema, "maxItems", max(lo, DEFAULT_MAX_ITEMS), path)
    _check_bounds(lo, hi, "minItems", "maxItems", where)
    if hi == 0:
        return r"\[\]"
    items = f"{item}(?:, {item}){{{max(lo - 1, 0)},{hi - 1}}}"
    return rf"\[{items}\]" if lo > 0 else rf"\[(?:{items})?\]"


def _count(schema: dict, key: str, default: int | None, path: str) -> int | None:
    value = schema.get(key, default)
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{key} at {path or '/'} must be a non-negative integer, got {value!r}")
    return value


def _check_bounds(lo: int, hi: int | None, lo_name: str, hi_name: str, where: str) -> None:
    if hi is not None and lo > hi:
        raise ValueError(f"{lo_name} {lo} > {hi_name} {hi} at {where}: no value fits")


# --- the DFA lifted to tokens --------------------------------------------------------------------


def _utf8_length(lead: int) -> int:
    """How many bytes the UTF-8 character starting with byte `lead` has (0 if none can)."""
    if lead < 0x80:
        return 1
    if lead < 0xC0 or lead >= 0xF8:  # a continuation byte, or a byte UTF-8 never uses
        return 0
    return 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


@lru_cache(maxsize=None)
def _utf8_span(prefix: bytes) -> tuple[int, int] | None:
    """The code points `prefix` (the start of one UTF-8 character) can still decode to, as `(lo, hi)`.

    None if no character starts this way: bad lead or continuation byte, only overlong encodings,
    only code points past U+10FFFF. Surrogates are not excluded here: no DFA has them.
    """
    length = _utf8_length(prefix[0])
    if length == 0 or len(prefix) > length or any(byte & 0xC0 != 0x80 for byte in prefix[1:]):
        return None
    value = prefix[0] & (0x7F >> length)
    for byte in prefix[1:]:
        value = value << 6 | byte & 0x3F
    missing_bits = 6 * (length - len(prefix))
    lowest = (0, 0, 0x80, 0x800, 0x10000)[length]  # anything below has a shorter encoding
    lo, hi = max(value << missing_bits, lowest), min((value + 1 << missing_bits) - 1, MAX_CODE_POINT)
    return (lo, hi) if lo <= hi else None


class TokenConstraint:
    """Which tokens may come next so that the output matches `pattern` in the end.

    A state is `(dfa_state, pending)`: pending holds the bytes of an unfinished UTF-8 character.
    `special_ids` (for the course tokenizer, `tok.special_tokens.values()`: their text is ordinary
    bytes, so only the caller can say they are special) and None entries of `token_bytes` are never
    allowed, except `eos_id`, which is allowed exactly where the output is complete. The empty
    string is a fine match: EOS at once.

    Raises ValueError if no sequence of tokens spells a match. With every single byte among the
    tokens (byte-level BPE) no walk can get stuck; with a vocabulary that lacks bytes a state with
    nothing allowed can still be reached off the path to a match, so check `allowed(state).any()`.
    """

    def __init__(
        self, pattern: str, token_bytes: list[bytes | None], eos_id: int, special_ids: Iterable[int] = ()
    ):
        special = set(special_ids) | {eos_id}
        for token_id in special:
            if not (isinstance(token_id, int) and 0 <= token_id < len(token_bytes)):
                raise ValueError(f"eos_id and special_ids must be ids in 0..{len(token_bytes) - 1}, got {token_id!r}")
        self.pattern, self.dfa = pattern, compile_regex(pattern)
        self.vocab_size, self.eos_id = len(token_bytes), eos_id
        self.token_bytes = [None if i in special else data for i, data in enumerate(token_bytes)]
        self._ascii_next = [[self.dfa.step(s, b) for b in range(128)] for s in range(len(self.dfa))]
        self._build_trie()
        self.mask_cache: dict[tuple[int, bytes], torch.Tensor] = {}
        self._check_satisfiable()

    @classmethod
    def from_schema(
        cls, schema: dict, token_bytes: list[bytes | None], eos_id: int, special_ids: Iterable[int] = ()
    ) -> TokenConstraint:
        """The constraint for `json_schema_regex(schema)`."""
        return cls(json_schema_regex(schema), token_bytes, eos_id, special_ids)

    def _build_trie(self) -> None:
        """A byte trie of the ordinary tokens: `_children[node]` maps byte -> node, `_ends[node]` ids."""
        self._children: list[dict[int, int]] = [{}]
        self._ends: list[list[int]] = [[]]
        for token_id, data in enumerate(self.token_bytes):
            if data is None:
                continue
            if not isinstance(data, bytes) or not data:
                raise ValueError(f"token_bytes[{token_id}] must be non-empty bytes or None, got {data!r}")
            node = 0
            for byte in data:
                if byte not in self._children[node]:
                    self._children[node][byte] = len(self._children)
                    self._children.append({})
                    self._ends.append([])
                node = self._children[node][byte]
            self._ends[node].append(token_id)

    def _step_byte(self, dfa_state: int, pending: bytes, byte: int) -> tuple[int, bytes] | None:
        """The state after one more byte, or None if no match can continue with it."""
        if not pending and byte < 0x80:
            next_state = self._ascii_next[dfa_state][byte]
            return None if next_state is None else (next_state, b"")
        pending += bytes((byte,))
        span = _utf8_span(pending)
        if span is None:
            return None
        if len(pending) == _utf8_length(pending[0]):  # a complete character: lo == hi
            next_state = self.dfa.step(dfa_state, span[0])
            return None if next_state is None else (next_state, b"")
        return (dfa_state, pending) if self.dfa.steps_within(dfa_state, *span) else None

    def _feed(self, state: tuple[int, bytes], data: bytes) -> tuple[int, bytes] | None:
        for byte in data:
            state = self._step_byte(*state, byte)
            if state is None:
                return None
        return state

    def start(self) -> tuple[int, bytes]:
        """The state before any token."""
        return (0, b"")

    def is_accepting(self, state: tuple[int, bytes]) -> bool:
        """Whether the output so far is a complete match (so EOS is allowed)."""
        return not state[1] and self.dfa.accepting[state[0]]

    def allowed(self, state: tuple[int, bytes]) -> torch.Tensor:
        """Bool mask `(vocab_size,)` of the tokens that may come next; computed once per state."""
        mask = self.mask_cache.get(state)
        if mask is None:
            mask = self.mask_cache[state] = self._compute_mask(state)
        return mask

    def _compute_mask(self, state: tuple[int, bytes]) -> torch.Tensor:
        allowed_ids = []
        stack = [(0, state)]  # (trie node, state after the node's bytes); a dead branch is never pushed
        while stack:
            node, (dfa_state, pending) = stack.pop()
            for byte, child in self._children[node].items():
                next_state = self._step_byte(dfa_state, pending, byte)
                if next_state is not None:
                    allowed_ids.extend(self._ends[child])
                    if self._children[child]:
                        stack.append((child, next_state))
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # (vocab_size,)
        mask[allowed_ids] = True
        mask[self.eos_id] = self.is_accepting(state)
        return mask

    def advance(self, state: tuple[int, bytes], token_id: int) -> tuple[int, bytes]:
        """The state after `token_id`; ValueError if it is not allowed (or is EOS, which ends the output)."""
        if token_id == self.eos_id:
            raise ValueError("eos_id ends the output: there is no state after it, stop decoding instead")
        data = self.token_bytes[token_id] if 0 <= token_id < self.vocab_size else None
        next_state = None if data is None else self._feed(state, data)
        if next_state is None:
            raise ValueError(f"token {token_id} ({data!r}) is not allowed in state {state} of {self.pattern!r}")
        return next_state

    def is_finished(self, state: tuple[int, bytes]) -> bool:
        """Whether the output is complete and no ordinary token can extend it: only EOS remains."""
        return self.is_accepting(state) and int(self.allowed(state).sum()) == 1

    def text_matches(self, text: str) -> bool:
        """Whether the whole of `text` matches the pattern."""
        return self.dfa.matches(text)

    @property
    def cached_states(self) -> int:
        """How many states have their mask computed."""
        return len(self.mask_cache)

    def _check_satisfiable(self) -> None:
        """Raise unless some token sequence reaches an accepting state.

        With every single byte in the vocabulary any string spells out byte by byte, and the DFA's
        language is not empty (compile_regex checked). Otherwise search the reachable states.
        """
        if len({data for data in self.token_bytes if data is not None and len(data) == 1}) == 256:
            return
        seen, stack = {self.start()}, [self.start()]
        while stack:
            state = stack.pop()
            if self.is_accepting(state):
                return
            for token_id in self.allowed(state).nonzero().flatten().tolist():
                if token_id == self.eos_id:
                    continue
                next_state = self._feed(state, self.token_bytes[token_id])
                if next_state not in seen:
                    seen.add(next_state)
                    stack.append(next_state)
        raise ValueError(f"no token sequence of this vocabulary spells a match for pattern {self.pattern!r}")


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`logits` `(..., vocab_size)` with the tokens `mask` `(vocab_size,)` disallows set to -inf."""
    if mask.dtype != torch.bool or mask.shape != logits.shape[-1:]:
        expected = tuple(logits.shape[-1:])
        raise ValueError(f"mask must be a bool tensor of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("mask allows no token: every logit would be -inf")
    return logits.masked_fill(~mask, float("-inf"))
