"""Tests for minigpt/structured.py: the regex -> DFA compiler, JSON schema -> regex, and token masks.

The oracle is independent of the module: Python's `re.fullmatch` for patterns (on every short
string over a small alphabet, for hand-written and random patterns), `json.loads` for schemas,
and random walks that pick uniformly among allowed tokens must always end in text `re` accepts.
"""

import itertools
import json
import random
import re

import pytest
import torch

from minigpt.structured import TokenConstraint, apply_mask, compile_regex, json_schema_regex, regex_escape
from minigpt.train import load_tokenizer


def all_strings(alphabet: str, max_length: int):
    for length in range(max_length + 1):
        for chars in itertools.product(alphabet, repeat=length):
            yield "".join(chars)


def assert_agrees_with_re(pattern: str, alphabet: str, max_length: int) -> None:
    dfa, oracle = compile_regex(pattern), re.compile(pattern, re.ASCII)
    for text in all_strings(alphabet, max_length):
        assert dfa.matches(text) == bool(oracle.fullmatch(text)), (pattern, text)


# --- the regex compiler --------------------------------------------------------------------------

CONSTRUCTS = [
    "a", "ab", "", "a|b", "a|", "(a|b)*", "a+b?", "(?:ab)+", "()", "(a*)*b", "((a|b)(1|-))*",
    "[ab]", "[^a]", "[a-b1]+", "[^ab\\n]*", "[-a]", "[a-]", "[\\]a]", "[\\d-]{2}", "[^\"\\\\]+",
    ".", ".*", "a.b", "\\d", "\\D+", "\\w*", "\\W", "\\s", "\\S?", "\\.", "\\-", "\\n", "\\t?a",
    "a{2}", "a{1,}", "a{1,3}b", "(a|b){0,2}", "a{,2}", "^a$", "^(a|b1)$",
    "\\u00e9+", "[\\u00e0-\\u00ff]", "\\x61", "é", "[é世]+", "[^é]",
]


@pytest.mark.parametrize("pattern", CONSTRUCTS)
def test_regex_matches_like_re_fullmatch(pattern):
    assert_agrees_with_re(pattern, "ab1-é\n\t", 4)


def random_pattern(rng: random.Random, depth: int) -> str:
    atoms = ["a", "b", "1", ".", "[ab]", "[^a]", "\\d", "\\w", "[a-c1]"]
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(atoms)
    kind = rng.choice(["cat", "alt", "star", "plus", "opt", "count", "group"])
    left, right = random_pattern(rng, depth - 1), random_pattern(rng, depth - 1)
    lo = rng.randint(0, 2)
    return {
        "cat": left + right,
        "alt": f"(?:{left}|{right})",
        "star": f"(?:{left})*",
        "plus": f"(?:{left})+",
        "opt": f"(?:{left})?",
        "count": f"(?:{left}){{{lo},{lo + rng.randint(0, 2)}}}",
        "group": f"({left})",
    }[kind]


def test_random_patterns_match_like_re_fullmatch():
    rng = random.Random(0)
    for _ in range(80):
        assert_agrees_with_re(random_pattern(rng, 3), "ab1", 5)


def test_hand_made_cases():
    phone = compile_regex(r"\d{3}-\d{4}")
    assert phone.matches("555-1234") and not phone.matches("555-123") and not phone.matches("5551234")
    quoted = compile_regex(r'"(?:[^"\\]|\\["\\])*"')
    assert quoted.matches(r'"say \"hi\""') and not quoted.matches(r'"a"b"') and not quoted.matches('"a')
    anything = compile_regex(".+")
    assert anything.matches("世界") and not anything.matches("a\nb")


def test_classes_are_ranges_not_enumerations():
    dfa = compile_regex('[^"]')
    assert len(dfa.transitions[0]) <= 3  # below ", above " (and around the surrogates), not 1.1M entries
    assert dfa.matches("世") and dfa.matches("\U0010ffff") and not dfa.matches('"')


def test_dead_states_are_removed():
    dfa = compile_regex(r"a(b|c[^\s\S])")
    after_a = dfa.step(0, ord("a"))
    assert dfa.step(after_a, ord("b")) is not None and dfa.step(after_a, ord("c")) is None
    for pattern in [r"a(b|c[^\s\S])", r"(ab|a[^\d\D])*c", json_schema_regex(PERSON)]:
        dfa = compile_regex(pattern)
        for state in range(len(dfa)):  # from every state an accepting state is reachable
            seen, stack = {state}, [state]
            while stack:
                for _, _, target in dfa.transitions[stack.pop()]:
                    if target not in seen:
                        seen.add(target)
                        stack.append(target)
            assert any(dfa.accepting[s] for s in seen), (pattern, state)


@pytest.mark.parametrize(
    "pattern, named",
    [
        ("a\\1", "backreference"),
        ("(?=a)b", "lookahead"),
        ("(?!a)b", "negative lookahead"),
        ("(?<=a)b", "lookbehind"),
        ("(?<!a)b", "negative lookbehind"),
        ("(?P<x>a)", "named group"),
        ("(?i)a", "group flag"),
        ("a*?", "lazy quantifier"),
        ("a+?", "lazy quantifier"),
        ("a*+", "possessive quantifier"),
        ("a**", "repeated quantifier"),
        ("(a", "unbalanced parenthesis '('"),
        ("a)", "unbalanced parenthesis ')'"),
        ("a{2,1}", "min 2 > max 1"),
        ("a{x}", "malformed quantifier"),
        ("a{", "malformed quantifier"),
        ("a{2000}", "exceeds"),
        ("[]", "empty character class"),
        ("[^]", "empty character class"),
        ("[ab", "unterminated character class"),
        ("[b-a]", "bad range"),
        ("[\\d-z]", "bad range"),
        ("*a", "nothing to repeat"),
        ("{3}", "nothing to repeat"),
        ("a^b", "anchor '^'"),
        ("a$b", "anchor '$'"),
        ("\\b", "escape \\b"),
        ("\\p{L}", "escape \\p"),
        ("\\u12", "malformed escape \\u"),
        ("a\\", "trailing backslash"),
    ],
)
def test_unsupported_or_malformed_patterns_raise(pattern, named):
    with pytest.raises(ValueError, match="position") as error:
        compile_regex(pattern)
    assert named in str(error.value)


@pytest.mark.parametrize("pattern", [r"[^\s\S]", r"a[^\d\D]b", r"\ud800"])
def test_empty_language_raises(pattern):
    with pytest.raises(ValueError, match="no string matches"):
        compile_regex(pattern)


# --- JSON schema -> regex ------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0},
        "height": {"type": "number"},
        "admin": {"type": "boolean"},
        "nickname": {"type": "null"},
        "role": {"enum": ["user", "admin", "a.b*c"]},
        "level": {"enum": [1, 2.5, True, None, "x"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"const": "0000"}},
            "required": ["zip", "city"],
            "additionalProperties": False,
        },
    },
}
VALID_PERSON = {
    "name": 'Al "x" \\',
    "age": 42,
    "height": -1.75,
    "admin": False,
    "nickname": None,
    "role": "a.b*c",
    "level": 2.5,
    "tags": ["a", "bc"],
    "home": {"city": "Paris", "zip": "0000"},
}


def person_with(**changes) -> dict:
    return {**VALID_PERSON, **changes}


def test_json_schema_regex_matches_valid_values():
    dfa = compile_regex(json_schema_regex(PERSON))
    for value in [
        VALID_PERSON,
        person_with(age=0, height=3, admin=True, role="user", level=None, tags=[]),
        person_with(level=True, tags=["", "abcd", "x"], home={"city": "", "zip": "0000"}),
        person_with(level="x", height=123456.123456, name="ab{}[]"),
    ]:
        assert dfa.matches(json.dumps(value)), json.dumps(value)


def test_json_schema_regex_rejects_invalid_values():
    dfa = compile_regex(json_schema_regex(PERSON))
    missing = {k: v for k, v in VALID_PERSON.items() if k != "admin"}
    reordered = {"age": 42, **{k: v for k, v in VALID_PERSON.items() if k != "age"}}
    for value in [
        missing,
        person_with(extra=1),
        reordered,
        person_with(age="42"),
        person_with(age=-3),  # minimum 0
        person_with(age=1.5),
        person_with(admin="false"),
        person_with(role="root"),
        person_with(level=3),
        person_with(name=""),  # minLength 1
        person_with(name="x" * 11),  # maxLength 10
        person_with(tags=["a", "b", "c", "d"]),  # maxItems 3
        person_with(tags=["abcde"]),
        person_with(tags="a"),
        person_with(home={"city": "Paris", "zip": "1111"}),
        person_with(nickname="none"),
        [VALID_PERSON],
    ]:
        assert not dfa.matches(json.dumps(value)), json.dumps(value)
    assert not dfa.matches(json.dumps(VALID_PERSON, separators=(",", ":")))
    assert not dfa.matches(json.dumps(VALID_PERSON, indent=1))


def test_json_schema_arrays_and_scalars():
    def matches(schema, value):
        return compile_regex(json_schema_regex(schema)).matches(json.dumps(value))

    bounded = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
    assert [matches(bounded, [1] * n) for n in range(5)] == [False, False, True, True, False]
    default = {"type": "array", "items": {"type": "boolean"}}
    assert matches(default, []) and matches(default, [True] * 8) and not matches(default, [True] * 9)
    assert matches({"type": "array", "items": {"type": "null"}, "maxItems": 0}, [])
    nested = {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "maxItems": 2}
    assert matches(nested, [[1, -2], []]) and not matches(nested, [[1, 2, 3]])
    integer = {"type": "integer"}
    assert all(matches(integer, n) for n in (0, 7, -7, 999999, -100000))
    assert not any(matches(integer, n) for n in (1234567, 1.0, True))
    assert not compile_regex(json_schema_regex(integer)).matches("-0")
    number = {"type": "number", "minimum": 0}
    assert matches(number, 0.5) and matches(number, 12) and not matches(number, -0.5)
    empty = {"type": "object", "properties": {}}
    assert matches(empty, {}) and not matches(empty, {"a": 1})


def test_json_strings_round_trip():
    """Every string the regex allows is a value json.dumps writes back identically."""
    dfa = compile_regex(json_schema_regex({"type": "string", "maxLength": 3}))
    for text in all_strings('a"\\ ~', 3):
        assert dfa.matches(json.dumps(text))
    for written in ['"\\n"', '"\\u00e9"', '"\\x"', '"a\\"', '"\t"', '"é"']:
        assert not dfa.matches(written), written  # escapes other than \" and \\, raw control/non-ASCII


def test_regex_escape_is_literal():
    for text in ['a.b*c', '{"x": [1]}', "(a|b)?$^\\+"]:
        assert compile_regex(regex_escape(text)).matches(text)
        assert not compile_regex(regex_escape(text)).matches(text + "x")


@pytest.mark.parametrize(
    "schema, named",
    [
        ({"$ref": "#/defs/a"}, "'$ref' at /"),
        ({"type": "object", "properties": {"a": {"oneOf": [{"type": "null"}]}}}, "'oneOf' at /properties/a"),
        ({"anyOf": [{"type": "null"}]}, "'anyOf' at /"),
        ({"allOf": [{"type": "null"}]}, "'allOf' at /"),
        ({"not": {"type": "null"}}, "'not' at /"),
        ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "a+"}}}},
         "'pattern' at /properties/tags/items"),
        ({"type": "string", "format": "date"}, "'format' at /"),
        ({"type": "object", "patternProperties": {}}, "'patternProperties' at /"),
        ({"type": ["string", "null"]}, "type lists at /"),
        ({"type": "tuple"}, "type 'tuple' at /"),
        ({}, "type None at /"),
        ({"type": "integer", "minimum": 5}, "minimum 5 at /"),
        ({"type": "integer", "maxLength": 5}, "'maxLength' at / does not apply"),
        ({"type": "object", "properties": {"a": {"type": "null"}}, "required": []}, "required at /"),
        ({"type": "object", "properties": {}, "additionalProperties": True}, "additionalProperties at /"),
        ({"type": "array"}, "items schema"),
        ({"type": "array", "items": {"type": "null"}, "minItems": 3, "maxItems": 2}, "minItems 3 > maxItems 2"),
        ({"type": "array", "items": {"type": "null"}, "maxItems": -1}, "maxItems at / must be a non-negative"),
        ({"type": "string", "minLength": 1.5}, "minLength at / must be"),
        ({"enum": [{"a": 1}]}, "unsupported enum value"),
        ({"enum": []}, "non-empty list"),
        ({"type": "string", "enum": [1]}, "not of type 'string'"),
        ({"enum": ["a"], "const": "a"}, "'const' at /"),
        ({"type": "object", "properties": {"a/b": {"type": "array", "items": {"format": "x"}}}},
         "/properties/a~1b/items"),
    ],
)
def test_unsupported_schemas_raise(schema, named):
    with pytest.raises(ValueError) as error:
        json_schema_regex(schema)
    assert named in str(error.value)


# --- TokenConstraint -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab():
    """The course tokenizer's token bytes, its end-of-text id and its special ids."""
    tok = load_tokenizer("minigpt-8k")
    token_bytes = tok.decode_tokens_bytes(range(tok.n_vocab))
    return tok, token_bytes, tok.special_tokens["<|endoftext|>"], set(tok.special_tokens.values())


def random_walk(constraint: TokenConstraint, token_bytes, rng: random.Random, max_steps: int = 300) -> bytes:
    """Pick uniformly among the allowed tokens until EOS or nothing but EOS is left."""
    state, out = constraint.start(), b""
    for _ in range(max_steps):
        if constraint.is_finished(state):
            return out
        choices = constraint.allowed(state).nonzero().flatten().tolist()
        token_id = rng.choice(choices)
        if token_id == constraint.eos_id:
            assert constraint.is_accepting(state)
            return out
        out += token_bytes[token_id]
        state = constraint.advance(state, token_id)
    raise AssertionError(f"no end after {max_steps} steps: {out!r}")


WALK_PATTERNS = [
    r"[a-z]{1,6}@[a-z]{2,5}\.(com|org)",
    r"(\d{1,3}\.){3}\d{1,3}",
    r"(yes|no|maybe)",
    r"[é世]{1,4}",
    r'"([^"\\]|\\["\\]){0,8}"',
    r"-?\d{1,4}(\.\d{1,2})?",
    r"(The|A) [a-z]{2,8} (is|was) [^\n]{0,6}\.",
]


@pytest.mark.parametrize("pattern", WALK_PATTERNS)
def test_random_walks_match_pattern(vocab, pattern):
    _, token_bytes, eos, special = vocab
    constraint = TokenConstraint(pattern, token_bytes, eos, special_ids=special)
    rng = random.Random(0)
    for _ in range(50):
        text = random_walk(constraint, token_bytes, rng).decode("utf-8")
        assert re.fullmatch(pattern, text, re.ASCII), text
        assert constraint.text_matches(text)


def has_shape(value, schema) -> bool:
    """An independent check of a parsed value against the test schemas' keywords."""
    if "enum" in schema or "const" in schema:
        return value in schema.get("enum", [schema.get("const")])
    kind = schema["type"]
    if kind == "object":
        return isinstance(value, dict) and list(value) == list(schema["properties"]) and all(
            has_shape(value[k], s) for k, s in schema["properties"].items()
        )
    if kind == "array":
        fits = isinstance(value, list) and len(value) <= schema.get("maxItems", 8)
        return fits and all(has_shape(v, schema["items"]) for v in value)
    if kind == "string":
        return isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9)
    if kind == "integer":
        return type(value) is int and value >= schema.get("minimum", -(10**9))
    if kind == "number":
        return type(value) in (int, float)
    return value is None if kind == "null" else type(value) is bool


WALK_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", 3, None]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "pets": {"type": "null"}},
        },
    },
}


def test_random_walks_on_a_nested_schema_give_valid_json(vocab):
    _, token_bytes, eos, special = vocab
    constraint = TokenConstraint.from_schema(WALK_SCHEMA, token_bytes, eos, special_ids=special)
    rng = random.Random(1)
    for _ in range(50):
        text = random_walk(constraint, token_bytes, rng).decode("utf-8")
        assert has_shape(json.loads(text), WALK_SCHEMA), text


def test_masks_never_block_the_tokenizers_own_encoding(vocab):
    """Completeness: the tokens the tokenizer would write for a valid value are all allowed."""
    tok, token_bytes, eos, special = vocab
    constraint = TokenConstraint.from_schema(WALK_SCHEMA, token_bytes, eos, special_ids=special)
    value = {"name": "Ann", "age": 7, "score": -0.25, "ok": True, "tags": ["red", 3]}
    value["home"] = {"city": "Rome", "pets": None}
    state = constraint.start()
    for token_id in tok.encode_ordinary(json.dumps(value)):
        assert constraint.allowed(state)[token_id]
        state = constraint.advance(state, token_id)
    assert constraint.is_accepting(state) and constraint.is_finished(state)
    multibyte = TokenConstraint("[é世]+", token_bytes, eos, special_ids=special)
    state = multibyte.start()
    for byte in "世é世".encode():  # byte by byte, through the pending-bytes states
        state = multibyte.advance(state, byte)
    assert multibyte.is_accepting(state) and not multibyte.is_finished(state)


def test_special_tokens_are_never_allowed(vocab):
    tok, token_bytes, eos, special = vocab
    constraint = TokenConstraint(r"[^\n]{0,20}", token_bytes, eos, special_ids=special)
    mask = constraint.allowed(constraint.start())
    assert mask[eos]  # the empty string matches
    assert not any(mask[i] for i in special - {eos})
    unprotected = TokenConstraint(r"[^\n]{0,20}", token_bytes, eos)
    assert unprotected.allowed(unprotected.start())[tok.special_tokens["<|im_start|>"]]  # why special_ids matter


def test_masks_are_computed_once_per_state(vocab):
    _, token_bytes, eos, special = vocab
    constraint = TokenConstraint.from_schema(WALK_SCHEMA, token_bytes, eos, special_ids=special)
    state = constraint.start()
    first = constraint.allowed(state)
    assert first.shape == (len(token_bytes),) and first.dtype == torch.bool
    assert constraint.allowed(state) is first and constraint.cached_states == 1
    random_walk(constraint, token_bytes, random.Random(2))
    cached = constraint.cached_states
    random_walk(constraint, token_bytes, random.Random(2))  # the same walk again: nothing new to compute
    assert constraint.cached_states == cached == len(constraint.mask_cache)


SPLIT_VOCAB = [b"\xc3", b"\xa9", b"\xe4", b"\xb8\x96", b"\xa9\xe4", b"\xe4\xb8", b"\x96", b"a", b"<eos>", b"\xc3\xa8"]
EOS = 8  # é = c3 a9, 世 = e4 b8 96, è = c3 a8


def test_multibyte_characters_split_across_tokens():
    constraint = TokenConstraint("[é世]+", SPLIT_VOCAB, EOS)
    start = constraint.start()
    assert constraint.allowed(start).nonzero().flatten().tolist() == [0, 2, 5]  # only lead bytes
    after_c3 = constraint.advance(start, 0)
    assert after_c3 == (0, b"\xc3") and not constraint.is_accepting(after_c3)
    assert constraint.allowed(after_c3).nonzero().flatten().tolist() == [1, 4]  # é, or é then 世's lead
    after_e4 = constraint.advance(constraint.advance(after_c3, 4), 3)  # é世
    assert constraint.is_accepting(after_e4) and constraint.allowed(after_e4)[EOS]
    rng = random.Random(0)
    for _ in range(50):
        text = random_walk(constraint, SPLIT_VOCAB, rng).decode("utf-8")
        assert re.fullmatch("[é世]+", text), text


def test_incomplete_bytes_must_complete_to_an_allowed_character():
    constraint = TokenConstraint("é", SPLIT_VOCAB, EOS)
    mask = constraint.allowed(constraint.start())
    assert mask[0] and not mask[2] and not mask[5] and not mask[9]  # c3 may become é; e4 and è cannot
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(constraint.start(), 2)


def test_invalid_utf8_is_never_allowed():
    vocab = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xf4\x90", b"a", b"<eos>", b"\xf0\x9f", b"\x98\x80"]
    constraint = TokenConstraint(".{0,3}", vocab, 6)
    assert constraint.allowed(constraint.start()).nonzero().flatten().tolist() == [5, 6, 7]
    state = constraint.advance(constraint.start(), 7)  # the start of 😀
    assert constraint.allowed(state).nonzero().flatten().tolist() == [3, 8]  # 80 continues it, but is no start


def test_unsatisfiable_vocabularies_raise():
    with pytest.raises(ValueError, match="no token sequence"):
        TokenConstraint("é", [b"\xc3", b"a", b"<eos>"], 2)  # the a9 byte is missing
    with pytest.raises(ValueError, match="no token sequence"):
        TokenConstraint("ab", [b"a", b"ba", b"<eos>"], 2)  # every byte exists, but not "ab"
    with pytest.raises(ValueError, match="no string matches"):
        TokenConstraint(r"[^\s\S]", SPLIT_VOCAB, EOS)
    assert TokenConstraint("ab", [b"a", b"ba", b"b", b"<eos>"], 3).cached_states > 0


def test_empty_string_pattern_allows_only_eos():
    constraint = TokenConstraint("(ab)?", [b"a", b"b", b"<eos>"], 2)
    start = constraint.start()
    assert constraint.is_accepting(start) and not constraint.is_finished(start)
    assert constraint.allowed(start).tolist() == [True, False, True]
    only_empty = TokenConstraint("", [b"a", b"<eos>"], 1)
    assert only_empty.is_finished(only_empty.start())


def test_advance_and_constructor_errors():
    constraint = TokenConstraint("a+", [b"a", b"b", b"<eos>", None], 2)
    with pytest.raises(ValueError, match="eos_id ends the output"):
        constraint.advance(constraint.start(), 2)
    for token_id in (1, 3, 99):
        with pytest.raises(ValueError, match="not allowed"):
            constraint.advance(constraint.start(), token_id)
    with pytest.raises(ValueError, match="eos_id and special_ids"):
        TokenConstraint("a", [b"a"], 5)
    with pytest.raises(ValueError, match=r"token_bytes\[1\]"):
        TokenConstraint("a", [b"a", "b", b"<eos>"], 2)


def test_apply_mask():
    mask = torch.tensor([True, False, True])
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])  # (2, vocab): broadcasts over rows
    masked = apply_mask(logits, mask)
    assert masked[:, 1].eq(float("-inf")).all() and torch.equal(masked[:, [0, 2]], logits[:, [0, 2]])
    assert torch.softmax(masked, -1)[:, 1].eq(0).all()
    with pytest.raises(ValueError, match="shape"):
        apply_mask(torch.zeros(4), mask)
    with pytest.raises(ValueError, match="allows no token"):
        apply_mask(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
