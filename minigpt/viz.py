"""Pictures for the notebooks: what a tokenizer does to text, drawn as HTML.

`tokens_html` shows a text with every token on its own colored background, so the token
boundaries are visible at a glance; `show_tokens` displays that in Jupyter, and `token_explorer`
is a text box that re-tokenizes on every keystroke with several tokenizers side by side.

Tokens are byte strings, not characters: with a small vocabulary one emoji's four UTF-8 bytes can
land in four different tokens, none of which is text on its own. `group_tokens` therefore joins
such tokens into one group before anything is drawn, and the group's hover text tells how many
tokens it spans.

Everything is plain HTML with inline styles (no JavaScript, no stylesheet), so it renders the same
in JupyterLab, VS Code and exported notebooks, offline, on light and dark themes.
"""

from __future__ import annotations

import codecs
import html
from collections.abc import Collection, Mapping, Sequence
from typing import Literal, NamedTuple, Protocol

import ipywidgets as widgets
from IPython.display import HTML, display


Specials = Literal["all"] | Collection[str]  # special tokens by text, or all of them


class TokenizerLike(Protocol):
    """What the renderers need from a tokenizer (`minigpt.tokenizer.Tokenizer` has all of it)."""

    name: str
    special_tokens: dict[str, int]

    def encode(
        self, text: str, allowed_special: Specials = ..., disallowed_special: Specials = ...
    ) -> list[int]: ...

    def decode_tokens_bytes(self, ids: list[int]) -> list[bytes]: ...

# Backgrounds cycled by group index, so neighbouring groups always differ; ordered so neighbours
# are far apart in hue. Light enough for dark text, saturated enough for a washed-out projector.
COLORS = ("#ffb3c6", "#b5ecb0", "#ffc9a8", "#a8daff", "#fbe38e", "#d4c4ff")
TEXT_COLOR = "#1a1a1a"
MUTED_COLOR = "#6b7280"  # the whitespace markers: visible, but quieter than the text
FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"

# Invisible characters drawn as visible markers; a newline also breaks the line.
WHITESPACE = {" ": "·", "\t": "→", "\n": "↵", "\r": "␍"}

DEFAULT_TEXT = (
    "Hello world! Tokenizers cut text into pieces.\n"
    "\tdef add(a, b):  return a + b\n"
    "1234567 + 89 = 1234656\n"
    "Emoji 🦙 and 中文 cost more tokens.<|endoftext|>"
)


class TokenGroup(NamedTuple):
    """Consecutive tokens whose bytes together end on a UTF-8 character boundary."""

    positions: list[int]  # indices of the tokens in the encoded sequence
    data: bytes  # the tokens' bytes, concatenated

    @property
    def text(self) -> str:
        """The group's bytes as text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.data.decode("utf-8", errors="replace")


def group_tokens(token_bytes: Sequence[bytes]) -> list[TokenGroup]:
    """Group consecutive tokens so that every group ends on a UTF-8 character boundary.

    The rule: starting at the first token not yet grouped, take tokens one by one until the bytes
    taken so far do not end inside a character, that is until a UTF-8 decoder fed those bytes
    holds no unfinished multi-byte sequence. That run of tokens is one group. ASCII tokens and
    whole-character tokens are groups of one; a character split across N tokens becomes one
    group of N tokens.

    Invalid UTF-8 never stalls a group: a byte that cannot start or continue a character (such as
    a lone continuation byte) is decoded at once as U+FFFD, and a sequence still unfinished after
    the last token closes the last group and reads as U+FFFD too. Each token is read once.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    groups, positions, data = [], [], b""
    for position, chunk in enumerate(token_bytes):
        decoder.decode(chunk)
        positions.append(position)
        data += chunk
        pending, _ = decoder.getstate()
        if not pending:
            groups.append(TokenGroup(positions, data))
            positions, data = [], b""
    if positions:
        groups.append(TokenGroup(positions, data))
    return groups


def _visible(text: str) -> str:
    """`text` HTML-escaped, with whitespace drawn as muted markers and newlines as line breaks."""
    out = []
    for char in text:
        if char in WHITESPACE:
            out.append(f'<span style="color:{MUTED_COLOR}">{WHITESPACE[char]}</span>')
            out.append("<br>" if char == "\n" else "<wbr>")  # <wbr>: lines may wrap at spaces
        else:
            out.append(html.escape(char))
    return "".join(out)


def _hover(group: TokenGroup, ids: list[int], token_bytes: list[bytes]) -> str:
    """The tooltip of one group: its token id(s), and which bytes each token holds."""
    group_ids = [ids[p] for p in group.positions]
    pieces = " + ".join(repr(token_bytes[p]) for p in group.positions)
    if len(group_ids) == 1:
        return f"token id {group_ids[0]}: {pieces}"
    n_chars = len(group.text)
    which = "1 character split" if n_chars == 1 else f"{n_chars} characters spread"
    id_list = ", ".join(map(str, group_ids))
    return f"{which} across {len(group_ids)} tokens: ids {id_list}\n{pieces}"


def _group_span(index: int, group: TokenGroup, ids: list[int], token_bytes: list[bytes]) -> str:
    """One group as an inline `<span>`, its background picked by its index."""
    title = html.escape(_hover(group, ids, token_bytes))
    split = len(group.positions) > 1  # a dashed outline flags characters split across tokens
    style = (
        f"background:{COLORS[index % len(COLORS)]};border-radius:3px;padding:2px 0;"
        + ("outline:1.5px dashed #555;outline-offset:-1.5px;" if split else "")
    )
    return f'<span title="{title}" style="{style}">{_visible(group.text)}</span>'


def _special_span(name: str, token_id: int) -> str:
    """A special token: bold dark-red text in a bordered box, its hover naming it as special."""
    title = html.escape(f"special token {name}, id {token_id}")
    style = (
        "font-weight:bold;color:#9b1c1c;background:#fff;border:2px solid #9b1c1c;"
        "border-radius:4px;padding:0 3px;margin:0 2px"
    )
    return f'<span title="{title}" style="{style}">{html.escape(name)}</span>'


def _count(n: int, noun: str) -> str:
    """`n` followed by `noun`, plural unless `n` is 1: "1 token", "12 tokens"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _header(name: str, n_tokens: int, n_bytes: int) -> str:
    """The summary line: tokenizer, token count, byte count and bytes per token."""
    ratio = f"{n_bytes / n_tokens:.2f}" if n_tokens else "–"
    return (
        '<div style="font-family:sans-serif;font-size:0.85em;color:#444;margin-bottom:6px">'
        f"<b>{html.escape(name)}</b> · {_count(n_tokens, 'token')} · "
        f"{_count(n_bytes, 'UTF-8 byte')} · "
        f"{ratio} bytes/token</div>"
    )


def tokens_html(
    tok: TokenizerLike, text: str, allowed_special: Specials = "all", name: str | None = None
) -> str:
    """HTML that shows how `tok` cuts `text` into tokens.

    Each group of tokens (see `group_tokens`) is a span on one of `COLORS`, cycled so neighbours
    differ; hovering shows the token id(s) and bytes. Spaces, tabs and newlines are drawn as
    `·`, `→` and `↵`, and special tokens as bold boxed labels. Special tokens not in
    `allowed_special` are tokenized as ordinary text rather than raising. A header line gives
    the tokenizer's name (or `name`), the number of tokens, of UTF-8 bytes, and bytes per token.
    """
    ids = tok.encode(text, allowed_special=allowed_special, disallowed_special=())
    token_bytes = tok.decode_tokens_bytes(ids)
    special_names = {token_id: special for special, token_id in tok.special_tokens.items()}
    spans = []
    for index, group in enumerate(group_tokens(token_bytes)):
        first_id = ids[group.positions[0]]
        if len(group.positions) == 1 and first_id in special_names:
            spans.append(_special_span(special_names[first_id], first_id))
        else:
            spans.append(_group_span(index, group, ids, token_bytes))
    box = (
        f"font-family:{FONT};font-size:15px;line-height:1.8;color:{TEXT_COLOR};background:#fff;"
        "border:1px solid #d0d0d0;border-radius:6px;padding:8px 10px;overflow-wrap:anywhere"
    )
    header = _header(name or tok.name, len(ids), len(text.encode("utf-8")))
    return f'<div style="{box}">{header}<div>{"".join(spans)}</div></div>'


def show_tokens(
    tok: TokenizerLike, text: str, allowed_special: Specials = "all", name: str | None = None
) -> None:
    """Display `tokens_html(tok, text, ...)` in the notebook; returns None, so nothing repeats."""
    display(HTML(tokens_html(tok, text, allowed_special, name)))


def token_explorer(
    tokenizers: Mapping[str, TokenizerLike] | Sequence[TokenizerLike], text: str = DEFAULT_TEXT
) -> widgets.VBox:
    """A text box whose contents are re-tokenized live by every tokenizer, side by side.

    `tokenizers` is a list (each panel is headed by `tok.name`) or a dict of label -> tokenizer.
    The returned widget is `VBox([textarea, HBox(panels)])`, one `HTML` panel per tokenizer, all
    sharing the width equally; every edit of `textarea.value` redraws each panel.
    """
    if isinstance(tokenizers, Mapping):
        labelled = list(tokenizers.items())
    else:
        labelled = [(tok.name, tok) for tok in tokenizers]
    textarea = widgets.Textarea(
        value=text,
        placeholder="Type here...",
        continuous_update=True,
        layout=widgets.Layout(width="100%", height="7em"),
    )
    panel_layout = dict(flex="1 1 0", min_width="0", margin="0 4px")
    panels = [widgets.HTML(layout=widgets.Layout(**panel_layout)) for _ in labelled]

    def redraw(new_text: str) -> None:
        for panel, (label, tok) in zip(panels, labelled):
            panel.value = tokens_html(tok, new_text, name=label)

    redraw(text)
    textarea.observe(lambda change: redraw(change["new"]), names="value")
    return widgets.VBox([textarea, widgets.HBox(panels, layout=widgets.Layout(width="100%"))])
