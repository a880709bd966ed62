"""Tests for minigpt.viz: token grouping, the token HTML and the live token explorer."""

import html
import re
from html.parser import HTMLParser

import pytest

from minigpt.viz import group_tokens, token_explorer, tokens_html

EOT = "<|endoftext|>"


class StandInTokenizer:
    """A toy tokenizer with the course Tokenizer's interface: greedy longest match over `merged`
    multi-byte tokens (ids 256 and up) and the 256 single bytes, plus one special token."""

    def __init__(self, name: str, merged: list[bytes] = ()):
        self.name = name
        self.vocab = [bytes([b]) for b in range(256)] + list(merged)
        self.ids = {token: token_id for token_id, token in enumerate(self.vocab)}
        self.special_tokens = {EOT: len(self.vocab)}
        self.longest = max(len(token) for token in self.vocab)

    def encode(self, text, allowed_special="all", disallowed_special="all"):
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        ids = []
        for part in re.split(f"({re.escape(EOT)})", text) if allowed else [text]:
            if part in allowed:
                ids.append(self.special_tokens[part])
            else:
                ids.extend(self._encode_ordinary(part.encode("utf-8")))
        return ids

    def _encode_ordinary(self, data: bytes) -> list[int]:
        ids, start = [], 0
        while start < len(data):
            prefixes = (data[start : start + n] for n in range(self.longest, 0, -1))
            token = next(prefix for prefix in prefixes if prefix in self.ids)
            ids.append(self.ids[token])
            start += len(token)
        return ids

    def decode_tokens_bytes(self, ids):
        names = {token_id: name.encode() for name, token_id in self.special_tokens.items()}
        return [names[i] if i in names else self.vocab[i] for i in ids]


@pytest.fixture
def byte_tok():
    return StandInTokenizer("bytes")


@pytest.fixture
def pair_tok():
    return StandInTokenizer("pairs", [b"he", b"ll", b"o ", b"\xe4\xb8"])  # \xe4\xb8: 2/3 of 中


def header_numbers(page: str) -> tuple[int, int, str]:
    found = re.search(r"(\d+) tokens? · (\d+) UTF-8 bytes? · ([\d.–]+) bytes/token", page)
    return int(found[1]), int(found[2]), found[3]


def visible_text(page: str) -> str:
    """What the page shows, header included: the markup stripped and entities decoded."""
    return html.unescape(re.sub(r"<[^>]*>", "", page))


def titles(page: str) -> list[str]:
    return re.findall(r'title="([^"]*)"', page)


def test_emoji_split_across_four_byte_tokens_is_one_group(byte_tok):
    token_bytes = byte_tok.decode_tokens_bytes(byte_tok.encode("🦙"))
    assert len(token_bytes) == 4
    groups = group_tokens(token_bytes)
    assert len(groups) == 1
    assert groups[0].positions == [0, 1, 2, 3]
    assert groups[0].text == "🦙"


def test_ascii_tokens_map_one_to_one(byte_tok):
    groups = group_tokens(byte_tok.decode_tokens_bytes(byte_tok.encode("Hi there")))
    assert [g.positions for g in groups] == [[i] for i in range(8)]
    assert "".join(g.text for g in groups) == "Hi there"


def test_groups_follow_merged_tokens(pair_tok):
    ids = pair_tok.encode("hello 中!")
    token_bytes = pair_tok.decode_tokens_bytes(ids)
    assert token_bytes == [b"he", b"ll", b"o ", b"\xe4\xb8", b"\xad", b"!"]
    groups = group_tokens(token_bytes)
    assert [g.positions for g in groups] == [[0], [1], [2], [3, 4], [5]]
    assert [g.text for g in groups] == ["he", "ll", "o ", "中", "!"]


def test_group_can_span_characters_when_a_token_straddles_them():
    groups = group_tokens([b"a\xe4", b"\xb8\xadb"])
    assert [(g.positions, g.text) for g in groups] == [([0, 1], "a中b")]


@pytest.mark.parametrize(
    "token_bytes, texts",
    [
        ([b"\x80", b"a"], ["\ufffd", "a"]),  # lone continuation byte
        ([b"a", b"\xf0\x9f"], ["a", "\ufffd"]),  # truncated sequence at the end
        ([b"\xf0\x9f", b"A", b"b"], ["\ufffdA", "b"]),  # truncated sequence, then ASCII
        ([b"\xff\xfe", b"\xe4\xb8"], ["\ufffd\ufffd", "\ufffd"]),  # never-valid bytes
    ],
)
def test_invalid_utf8_terminates_with_replacement_character(token_bytes, texts):
    groups = group_tokens(token_bytes)
    assert [g.text for g in groups] == texts
    assert sum(len(g.positions) for g in groups) == len(token_bytes)
    assert b"".join(g.data for g in groups) == b"".join(token_bytes)


def test_empty_input():
    assert group_tokens([]) == []


class StyleCollector(HTMLParser):
    """Collects the style attribute of every tag, in document order."""

    def __init__(self):
        super().__init__()
        self.styles = []

    def handle_starttag(self, tag, attrs):
        self.styles.append(dict(attrs).get("style", ""))


def test_box_style_parses_as_one_attribute(pair_tok):
    parser = StyleCollector()
    parser.feed(tokens_html(pair_tok, "hello"))
    box = parser.styles[0]
    assert "monospace" in box and "line-height" in box and "overflow-wrap:anywhere" in box


def test_html_is_escaped(byte_tok):
    page = tokens_html(byte_tok, '<script>alert("x")</script>&')
    assert "<script>" not in page
    assert visible_text(page).endswith('<script>alert("x")</script>&')
    assert "&lt;" in page and "&gt;" in page and "&amp;" in page and "&quot;" in page


def test_hover_titles_show_ids_and_split_characters(pair_tok):
    page = tokens_html(pair_tok, "he中")
    he, zhong_head = pair_tok.ids[b"he"], pair_tok.ids[b"\xe4\xb8"]
    assert titles(page) == [
        f"token id {he}: b&#x27;he&#x27;",
        f"1 character split across 2 tokens: ids {zhong_head}, 173\n"
        "b&#x27;\\xe4\\xb8&#x27; + b&#x27;\\xad&#x27;",
    ]
    assert ">中</span>" in page


def test_neighbouring_groups_have_different_colors(byte_tok):
    page = tokens_html(byte_tok, "abcdefgh")
    colors = re.findall(r"background:(#[0-9a-f]{6});border-radius:3px", page)
    assert len(colors) == 8
    assert all(a != b for a, b in zip(colors, colors[1:]))


def test_whitespace_is_made_visible(byte_tok):
    page = tokens_html(byte_tok, "a b\tc\nd")
    assert visible_text(page).endswith("a·b→c↵d")
    assert "↵</span><br>" in page


def test_special_token_is_styled_and_labelled(byte_tok):
    page = tokens_html(byte_tok, f"hi{EOT}")
    special = re.search(r'<span title="special token ([^"]*)"[^>]*>([^<]*)</span>', page)
    assert special[1] == f"&lt;|endoftext|&gt;, id {byte_tok.special_tokens[EOT]}"
    assert special[2] == "&lt;|endoftext|&gt;"
    assert "font-weight:bold" in special[0] and "border:2px solid" in special[0]


def test_special_token_not_allowed_is_ordinary_text(byte_tok):
    page = tokens_html(byte_tok, EOT, allowed_special=set())
    assert "special token" not in page
    assert header_numbers(page)[0] == len(EOT)


def test_header_numbers(pair_tok):
    page = tokens_html(pair_tok, "hello 中!")  # 6 tokens, 10 bytes
    assert "<b>pairs</b>" in page
    assert header_numbers(page) == (6, 10, "1.67")
    assert header_numbers(tokens_html(pair_tok, "")) == (0, 0, "–")
    assert header_numbers(tokens_html(pair_tok, "a")) == (1, 1, "1.00")


def test_explorer_updates_when_text_changes(byte_tok, pair_tok):
    explorer = token_explorer({"one byte per token": byte_tok, "merged pairs": pair_tok}, "hi")
    textarea, row = explorer.children
    panels = row.children
    assert [header_numbers(p.value)[0] for p in panels] == [2, 2]
    assert "<b>one byte per token</b>" in panels[0].value

    textarea.value = "hello 中!"
    assert [header_numbers(p.value)[0] for p in panels] == [10, 6]
    assert "中" in panels[1].value


def test_explorer_accepts_a_list_and_labels_by_name(byte_tok, pair_tok):
    explorer = token_explorer([byte_tok, pair_tok, byte_tok])
    panels = explorer.children[1].children
    assert len(panels) == 3
    assert ["<b>bytes</b>" in p.value for p in panels] == [True, False, True]
    assert "<b>pairs</b>" in panels[1].value
    assert all(p.layout.flex == "1 1 0" for p in panels)
