"""Pictures and widgets for the notebooks: tokens, attention, the KV cache, training curves.

Tokens. 
`tokens_html` shows a text with every token on its own colored background, so the token
boundaries are visible at a glance; `show_tokens` displays that in Jupyter, and `token_explorer`
is a text box that re-tokenizes on every keystroke with several tokenizers side by side.

Tokens are byte strings, not characters: with a small vocabulary one emoji's four UTF-8 bytes can
land in four different tokens, none of which is text on its own. `group_tokens` therefore joins
such tokens into one group before anything is drawn, and the group's hover text tells how many
tokens it spans.

Everything is plain HTML with inline styles (no JavaScript, no stylesheet), so it renders the same
in JupyterLab, VS Code and exported notebooks, offline, on light and dark themes.

Attention. `attention_maps` reads a model's own attention probabilities; `plot_heads` draws a
layer's heads as heatmaps framed by key/value group; `attention_explorer` puts a prompt box, layer
and head menus and a token slider around them; `kv_cache_explorer` steps through cached decoding.
The widgets are ipywidgets showing matplotlib PNGs: nothing loads from the network.

Training. `plot_training` draws the loss curve and validation bits per byte.
"""

from __future__ import annotations

import codecs
import html
import io
import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Literal, NamedTuple, Protocol

import ipywidgets as widgets
import matplotlib
import numpy as np
import torch
from IPython.display import HTML, display
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from minigpt.model import GPT


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
    "Emoji 🦙 and 中文 cost more tokens."
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


def refuse_special_text(tok: TokenizerLike, text: str) -> None:
    """Raise ValueError if `text`, typed into a widget, spells any of `tok`'s special tokens.

    What a reader types is user input, and user input never becomes a control token anywhere in
    the course (notebook 01, section 9). The message names every such spelling, in order of first
    appearance, and says what to do; a widget shows it in place of its output.
    """
    found = sorted((text.find(special), special) for special in tok.special_tokens if special in text)
    if found:
        names = ", ".join(special for _, special in found)
        what = "the spelling of a special token" if len(found) == 1 else "spellings of special tokens"
        raise ValueError(
            f"the text contains {names}, {what}; typed text is user input, which may not contain special "
            f"tokens. Delete {'it' if len(found) == 1 else 'them'} to see the rest."
        )


def _error_html(message: str) -> str:
    """A widget's error message: red text, HTML-escaped."""
    return f'<div style="font-family:sans-serif;color:#b91c1c">{html.escape(message)}</div>'


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
    sharing the width equally; every edit of `textarea.value` redraws each panel. What is typed is
    user input, so text that spells a special token is refused in the panel (`refuse_special_text`).
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
            try:
                refuse_special_text(tok, new_text)
            except ValueError as error:
                panel.value = _header(label, 0, len(new_text.encode("utf-8"))) + _error_html(str(error))
                continue
            panel.value = tokens_html(tok, new_text, name=label)

    redraw(text)
    textarea.observe(lambda change: redraw(change["new"]), names="value")
    return widgets.VBox([textarea, widgets.HBox(panels, layout=widgets.Layout(width="100%"))])


# ---------------------------------------------------------------------------------------------
# Training curves


def plot_training(
    history: Mapping[str, Sequence[float]], title: str | None = None,
    references: Mapping[str, float] | None = None, figure: Figure | None = None,
    finished: bool = True, eval_every: int | None = None, eval_windows: int | None = None,
) -> Figure:
    """Training loss (nats per token, raw and smoothed) and validation bits per byte, by step.

    `history` is what `minigpt.train.train` returns. Its periodic evaluations read only a sample of
    the validation text (the first `eval_windows` windows, every `eval_every` steps), and its final
    one, the last entry of `history["val_bpb"]`, reads the whole text. So the two are drawn apart:
    the periodic points joined by a line, the final one with a star and a legend entry of its own,
    and a faint segment between them, since that step also changes the sample. `finished=False`
    (a run still going, as in the notebook's live plot) draws every point as periodic.
    `eval_every` and `eval_windows` (from the run's `TrainConfig`) only make the legend precise.

    `references` draws labelled horizontal lines on the validation panel (for example another
    recipe's bits per byte). Pass the previous `figure` to redraw it in place.
    """
    figure = figure or Figure(figsize=(10, 3.6), layout="constrained")
    figure.clear()
    loss_ax, val_ax = figure.subplots(1, 2)
    steps, losses = list(history["step"]), list(history["train_loss"])
    loss_ax.plot(steps, losses, color="#9ec5e8", linewidth=0.8, label="per step")
    if losses:
        smoothed, average = [], losses[0]
        for loss in losses:  # exponential moving average: the trend under the batch-to-batch noise
            average = 0.95 * average + 0.05 * loss
            smoothed.append(average)
        loss_ax.plot(steps, smoothed, color="#1f5f9e", linewidth=1.8, label="moving average")
    loss_ax.set(xlabel="step", ylabel="training loss (nats per token)", title="training loss")
    loss_ax.legend(loc="best")  # wherever it hides the least of the curves
    val_steps, val_bpb = list(history["val_step"]), list(history["val_bpb"])
    has_final = finished and len(val_bpb) > 0
    periodic_steps, periodic_bpb = (val_steps[:-1], val_bpb[:-1]) if has_final else (val_steps, val_bpb)
    every = f"every {eval_every} steps" if eval_every else "periodic"
    sample = f"first {eval_windows} windows" if eval_windows else "a sample of the validation text"
    val_ax.plot(periodic_steps, periodic_bpb, "o-", color="#c2410c", markersize=4, label=f"{every}: {sample}")
    if has_final:
        if periodic_steps:  # the last segment: more training and a change of sample at once
            val_ax.plot(val_steps[-2:], val_bpb[-2:], color="#c2410c", alpha=0.35, linewidth=1.2,
                        label="_change of sample")  # faint: not a dotted or dashed style, which references use
        val_ax.plot(val_steps[-1:], val_bpb[-1:], "*", color="#7f1d1d", markersize=13, linestyle="none",
                    label="final: the whole validation text")
    for (label, value), style in zip((references or {}).items(), itertools.cycle(("--", ":", "-."))):
        val_ax.axhline(value, color="#555", linestyle=style, linewidth=1, label=label)
    val_ax.set(xlabel="step", ylabel="bits per byte", title="held-out Shakespeare")
    val_ax.legend(loc="best", fontsize=8)
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


# ---------------------------------------------------------------------------------------------
# Attention: heatmaps, a highlighted-text view, the explorer widget, and the KV cache growing

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."
HEAT = "Blues"  # attention probability 0 (white) to 1 (dark blue)
FUTURE_COLOR = "#eeeeee"  # keys a causal query cannot see
GROUP_COLORS = ("#c2410c", "#15803d", "#7c3aed", "#0e7490", "#be185d", "#a16207", "#1d4ed8", "#4d7c0f")


def token_labels(tok: TokenizerLike, ids: Sequence[int]) -> list[str]:
    """A short printable label per token: its bytes as text, whitespace drawn as · ↵ →."""
    labels = []
    for data in tok.decode_tokens_bytes(list(ids)):
        text = data.decode("utf-8", errors="replace")
        labels.append("".join(WHITESPACE.get(char, char) for char in text) or "∅")
    return labels


@torch.no_grad()
def attention_maps(model: GPT, ids: Sequence[int]) -> torch.Tensor:
    """The model's own attention probabilities for one sequence: `(n_layer, n_head, T, T)`.

    They come from the model's explicit attention path (SDPA does not return probabilities), in
    eval mode, so they are exactly what the model computes when it reads `ids`.
    """
    was_training = model.training
    model.eval()
    attentions = model(torch.tensor([list(ids)]), return_attention=True).attentions  # per layer (1, n_head, T, T)
    model.train(was_training)
    return torch.stack(attentions)[:, 0]


def kv_group(head: int, n_head: int, n_kv_head: int) -> int:
    """The key/value head that query head `head` reads under grouped-query attention."""
    if n_kv_head < 1 or n_head % n_kv_head or not 0 <= head < n_head:
        raise ValueError(f"need 0 <= head < n_head and n_kv_head dividing n_head, got head={head}, "
                         f"n_head={n_head}, n_kv_head={n_kv_head}")
    return head // (n_head // n_kv_head)


def plot_attention(
    weights: torch.Tensor, labels: Sequence[str], ax, selected: int | None = None, title: str = "",
    show_labels: bool = True, frame_color: str | None = None,
) -> AxesImage:
    """Draw one head's attention `(T_q, T_k)` as a heatmap on `ax`: rows are queries, columns keys
    (both axes labelled so).

    Keys a causal query cannot see (above the diagonal) are grey, so the triangle is visible; the
    `selected` query's row is outlined. Returns the image, for a colorbar.
    """
    n_queries, n_keys = weights.shape
    visible = torch.ones(n_queries, n_keys).tril(n_keys - n_queries).bool()
    shown = np.ma.masked_array(weights.float().numpy(), mask=~visible.numpy())
    cmap = matplotlib.colormaps[HEAT].with_extremes(bad=FUTURE_COLOR)
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    if show_labels:
        size = max(5, min(9, 260 / max(n_keys, 1)))
        ax.set_xticks(range(n_keys), labels[-n_keys:], rotation=90, fontsize=size)
        ax.set_yticks(range(n_queries), labels[-n_queries:], fontsize=size)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("key (attended to)", fontsize=8)
    ax.set_ylabel("query (attending)", fontsize=8)
    if selected is not None:
        ax.add_patch(Rectangle((-0.5, selected - 0.5), n_keys, 1, fill=False, edgecolor="#dc2626", linewidth=1.6))
    if frame_color:
        for spine in ax.spines.values():
            spine.set(edgecolor=frame_color, linewidth=3)
    ax.set_title(title, fontsize=9, color=frame_color or "black")
    return image


def plot_heads(
    maps: torch.Tensor, labels: Sequence[str], n_kv_head: int, layer: int, selected: int | None = None,
    heads: Sequence[int] | None = None,
) -> Figure:
    """All heads of one layer side by side, framed by key/value group: `maps` is `(n_head, T, T)`.

    Heads framed in the same colour read the same keys and values (grouped-query attention); they
    differ only in their queries. With one head, the heatmap is drawn large with token labels.
    """
    n_head = maps.shape[0]
    heads = list(range(n_head)) if heads is None else list(heads)
    if not heads:
        raise ValueError("heads must name at least one head (or be None for all of them)")
    columns = min(len(heads), 4)
    rows = math.ceil(len(heads) / columns)
    single = len(heads) == 1
    side = 5.7 if single else 3.0
    figure = Figure(figsize=(side * columns + 0.8, side * rows + (0.9 if single else 0.4)), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax, head in zip(axes, heads):
        group = kv_group(head, n_head, n_kv_head)
        image = plot_attention(
            maps[head], labels, ax, selected, f"layer {layer} · head {head} · kv group {group}",
            show_labels=single or len(labels) <= 24, frame_color=None if n_kv_head == n_head else GROUP_COLORS[group % 8],
        )
    for ax in axes[len(heads):]:
        ax.set_visible(False)
    figure.colorbar(image, ax=list(axes[: len(heads)]), shrink=0.6, label="attention probability")
    if not single and n_kv_head != n_head:
        figure.suptitle(f"{n_head} query heads share {n_kv_head} key/value heads: same frame colour, same keys and values",
                        fontsize=10)
    return figure


def attention_text_html(labels: Sequence[str], row: torch.Tensor, selected: int) -> str:
    """The tokens as text, each shaded by how much token `selected` attends to it (`row` is `(T,)`).

    Shading is relative to the row's largest weight so that a spread-out head is still readable;
    the hover shows each exact probability. Later tokens, which a causal query cannot see, are grey.
    """
    peak = max(row[: selected + 1].max().item(), 1e-9)
    spans = []
    for position, label in enumerate(labels):
        text = html.escape(label).replace("↵", "↵<br>")
        if position > selected:
            spans.append(f'<span style="color:#b0b0b0;padding:1px 1px">{text}</span>')
            continue
        weight = row[position].item()
        outline = "outline:2px solid #dc2626;" if position == selected else ""
        spans.append(
            f'<span title="position {position}: attention {weight:.3f}" style="background:rgba(30,90,200,'
            f'{0.85 * weight / peak:.3f});{outline}border-radius:3px;padding:1px 1px">{text}</span>'
        )
    box = (f"font-family:{FONT};font-size:14px;line-height:2;color:{TEXT_COLOR};background:#fff;"
           "border:1px solid #d0d0d0;border-radius:6px;padding:6px 10px;overflow-wrap:anywhere")
    return f'<div style="{box}">{"".join(spans)}</div>'


PNG_DPI = 80


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI)
    return buffer.getvalue()


def _show_png(picture: widgets.Image, figure: Figure) -> None:
    """Put `figure` in `picture` at its own pixel size: a VBox would otherwise stretch the image to
    the full width, upscaling it (blurry, and a single head taller than the screen)."""
    picture.value = _png(figure)
    picture.layout.width = f"{round(figure.get_figwidth() * PNG_DPI)}px"
    picture.layout.max_width = "100%"  # a narrow window may still shrink it, never enlarge it


def attention_explorer(model: GPT, tok: TokenizerLike, prompt: str = DEFAULT_PROMPT) -> widgets.VBox:
    """An interactive view of the model's attention: a prompt box, layer and head menus (or all
    heads of a layer as a grid, framed by key/value group), and a token slider whose token's
    attention is highlighted in the text and outlined in the heatmaps.

    Pure ipywidgets and matplotlib: it works offline and needs no JavaScript beyond Jupyter's own.
    """
    config = model.config
    prompt_box = widgets.Textarea(value=prompt, continuous_update=False, description="prompt",
                                  layout=widgets.Layout(width="100%", height="5em"))
    layer_menu = widgets.Dropdown(options=[(f"layer {i}", i) for i in range(config.n_layer)],
                                  value=config.n_layer - 1, description="layer")
    head_menu = widgets.Dropdown(
        options=[("all heads", -1)] + [(f"head {h} (kv group {kv_group(h, config.n_head, config.n_kv_head)})", h)
                                       for h in range(config.n_head)],
        value=-1, description="head")
    token_slider = widgets.IntSlider(min=0, max=0, description="token", continuous_update=False,
                                     layout=widgets.Layout(width="60%"))
    text_panel, message = widgets.HTML(), widgets.HTML()
    picture = widgets.Image(format="png")
    state = {}

    def read_prompt(text: str) -> None:
        try:
            refuse_special_text(tok, text)
            ids = tok.encode(text)
            if not ids:
                raise ValueError("the prompt is empty: type some text")
            if len(ids) > config.context:
                raise ValueError(f"the prompt is {len(ids)} tokens; this model reads at most {config.context}")
        except ValueError as error:
            message.value = _error_html(str(error))
            return
        message.value = ""
        state.update(labels=token_labels(tok, ids), maps=attention_maps(model, ids))
        token_slider.max = len(ids) - 1
        token_slider.value = len(ids) - 1
        redraw()

    def redraw(*_) -> None:
        if "maps" not in state:
            return
        layer, head, selected = layer_menu.value, head_menu.value, token_slider.value
        maps, labels = state["maps"][layer], state["labels"]
        row = maps[head, selected] if head >= 0 else maps[:, selected].mean(0)
        which = f"head {head}" if head >= 0 else "the mean of all heads"
        token_slider.description = f"token {selected}"
        text_panel.value = (f'<div style="font-family:sans-serif;font-size:0.85em;color:#444">What token {selected} '
                            f'<b>{html.escape(labels[selected])}</b> attends to in layer {layer}, {which}:</div>'
                            + attention_text_html(labels, row, selected))
        _show_png(picture, plot_heads(maps, labels, config.n_kv_head, layer, selected, None if head < 0 else [head]))

    prompt_box.observe(lambda change: read_prompt(change["new"]), names="value")
    for control in (layer_menu, head_menu, token_slider):
        control.observe(redraw, names="value")
    read_prompt(prompt)
    return widgets.VBox([prompt_box, message, widgets.HBox([layer_menu, head_menu]), token_slider, text_panel, picture])


class GenerationTrace(NamedTuple):
    """What happened at each step of cached greedy decoding (step 0 is the prompt's prefill)."""

    ids: list[int]  # the prompt followed by the generated tokens
    prompt_length: int
    cache_lengths: list[int]  # positions in the KV cache after each step
    cache_bytes: list[int]  # bytes those positions occupy
    rows: list[torch.Tensor]  # per step, the newest token's attention over the cache: (n_layer, n_head, cache_length)


@torch.no_grad()
def trace_generation(model: GPT, ids: Sequence[int], max_new_tokens: int) -> GenerationTrace:
    """Decode greedily with a KV cache, recording the cache's size and each new token's attention."""
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(1)
    tokens, step_input = list(ids), torch.tensor([list(ids)])
    lengths, sizes, rows = [], [], []
    for step in range(max_new_tokens + 1):
        output = model(step_input, kv_cache=cache, return_attention=True)
        lengths.append(len(cache))
        sizes.append(cache.nbytes())
        rows.append(torch.stack([a[0, :, -1] for a in output.attentions]))  # (n_layer, n_head, cache length)
        if step < max_new_tokens:
            tokens.append(int(output.logits[0, -1].argmax()))
            step_input = torch.tensor([[tokens[-1]]])
    model.train(was_training)
    return GenerationTrace(tokens, len(ids), lengths, sizes, rows)


def plot_generation_step(trace: GenerationTrace, labels: Sequence[str], step: int) -> Figure:
    """Step `step` of a `GenerationTrace`: the new token's attention over every cached position, one
    row per layer and head (positions not yet cached are grey), and the cache's bytes so far."""
    row = trace.rows[step]  # (n_layer, n_head, length)
    n_layer, n_head, length = row.shape
    total = trace.cache_lengths[-1]  # positions in the cache at the last step
    grid = np.full((n_layer * n_head, total), np.nan)
    grid[:, :length] = row.reshape(n_layer * n_head, length).numpy()
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    heat_ax, bytes_ax = figure.subplots(1, 2, width_ratios=(3.2, 1))
    cmap = matplotlib.colormaps[HEAT].with_extremes(bad=FUTURE_COLOR)
    heat_ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    heat_ax.set_xticks(range(total), labels[:total], rotation=90, fontsize=6)
    heat_ax.set_yticks(range(n_layer * n_head), [f"L{i // n_head} H{i % n_head}" for i in range(n_layer * n_head)],
                       fontsize=7)
    heat_ax.axvline(trace.prompt_length - 0.5, color="#dc2626", linewidth=1)
    heat_ax.set(xlabel="key: cached position", ylabel="layer and head (query: the newest token)")
    query = "the last prompt token (prefill)" if step == 0 else f"new token {step}: {labels[length - 1]!r}"
    heat_ax.set_title(f"attention of {query} over the {length} cached positions", fontsize=9)
    kib = [b / 1024 for b in trace.cache_bytes]
    bytes_ax.plot(trace.cache_lengths, kib, color="#9ca3af")
    bytes_ax.plot(trace.cache_lengths[step], kib[step], "o", color="#dc2626")
    bytes_ax.set(xlabel="positions cached", ylabel="KV cache (KiB)", title="cache size")
    bytes_ax.grid(alpha=0.3)
    return figure


def kv_cache_explorer(model: GPT, tok: TokenizerLike, prompt: str = DEFAULT_PROMPT,
                      max_new_tokens: int = 24) -> widgets.VBox:
    """A step slider through cached greedy decoding: the cache grows by one position per step and
    each new token attends to everything stored (the red line marks the end of the prompt)."""
    ids = tok.encode(prompt)
    trace = trace_generation(model, ids, max_new_tokens)
    labels = token_labels(tok, trace.ids)
    slider = widgets.IntSlider(min=0, max=max_new_tokens, value=0, description="step", continuous_update=False)
    text_panel, picture = widgets.HTML(), widgets.Image(format="png")

    def redraw(step: int) -> None:
        length = trace.cache_lengths[step]
        cached = "".join(html.escape(label) for label in labels[:length])
        upcoming = "".join(html.escape(label) for label in labels[length:])
        text_panel.value = (
            f'<div style="font-family:{FONT};font-size:13px;line-height:1.7">'
            f'<span style="background:#dcfce7">{cached}</span><span style="color:#b0b0b0">{upcoming}</span></div>'
            f'<div style="font-family:sans-serif;font-size:0.85em;color:#444">{length} positions cached, '
            f"{trace.cache_bytes[step]:,} bytes</div>")
        _show_png(picture, plot_generation_step(trace, labels, step))

    slider.observe(lambda change: redraw(change["new"]), names="value")
    redraw(0)
    return widgets.VBox([slider, text_panel, picture])


# ---------------------------------------------------------------------------------------------
# Vision: a prompt of text tokens and image patches, and where the answer looks in the image

PATCH_HEAT = "inferno"  # attention on an image token: 0 (black) to the largest shown (pale yellow)


def _image_pixels(image) -> np.ndarray:
    """An image `(C, H, W)` in [0, 1] (numpy or torch) as `(H, W, C)` float for `imshow`."""
    pixels = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if pixels.ndim != 3:
        raise ValueError(f"image must have shape (channels, height, width), got {tuple(pixels.shape)}")
    return np.clip(pixels.transpose(1, 2, 0).astype(np.float32), 0.0, 1.0)


def _draw_grid(ax, height: int, width: int, cell: int, color: str = "#9ca3af") -> None:
    """Thin lines on the borders of `cell` x `cell` pixel squares."""
    for x in range(cell, width, cell):
        ax.axvline(x - 0.5, color=color, linewidth=0.8)
    for y in range(cell, height, cell):
        ax.axhline(y - 0.5, color=color, linewidth=0.8)


def _wrap_label(label: str, width: int = 9) -> str:
    """A token label on at most two lines, broken after `|`, `_` or at `width` characters."""
    if len(label) <= width:
        return label
    for mark in ("_", "|"):
        cut = label.find(mark, 2, len(label) - 2)
        if cut > 0:
            return label[: cut + 1] + "\n" + label[cut + 1 :]
    return label[:width] + "\n" + label[width:]


def plot_image_prompt(
    labels: Sequence[str], image, slots: Sequence[bool], cell: int, specials: Collection[int] = (),
    per_row: int = 12, title: str | None = None,
) -> Figure:
    """One prompt as the language model reads it: each position a box, in reading order, `per_row`
    to a line; text tokens show their text, special tokens (positions in `specials`) are bold red,
    and each `<|image|>` slot (`slots[i]` true) shows the piece of `image` `(C, H, W)` it stands for:
    `cell` x `cell` pixels, the image's pieces taken row by row. On the left, the image with those
    pieces outlined and numbered."""
    if len(labels) != len(slots):
        raise ValueError(f"{len(labels)} labels but {len(slots)} slot flags: give one of each per position")
    pixels = _image_pixels(image)
    height, width = pixels.shape[:2]
    if height % cell or width % cell:
        raise ValueError(f"cell ({cell}) must divide the image's {height} x {width} pixels")
    columns = width // cell
    n_slots = sum(bool(s) for s in slots)
    if n_slots != (height // cell) * columns:
        raise ValueError(f"{n_slots} <|image|> slots, but the image has {(height // cell) * columns} pieces of "
                         f"{cell} x {cell} pixels")
    n_rows = math.ceil(len(labels) / per_row)
    figure = Figure(figsize=(13, 1.2 + 0.75 * max(n_rows, 3)), layout="constrained")
    image_ax, sequence_ax = figure.subplots(1, 2, width_ratios=(1, 3.6))
    image_ax.imshow(pixels, interpolation="nearest")
    _draw_grid(image_ax, height, width, cell)
    for piece in range(n_slots):
        row, column = divmod(piece, columns)
        image_ax.text(column * cell + 0.2, row * cell + 0.9, str(piece), color="white", fontsize=7,
                      bbox={"facecolor": "#1d4ed8", "edgecolor": "none", "pad": 0.8, "alpha": 0.8})
    image_ax.set(xlabel="pixel column", ylabel="pixel row", title=f"the image: {n_slots} pieces, numbered")
    piece = 0
    for position, (label, is_slot) in enumerate(zip(labels, slots)):
        row, column = divmod(position, per_row)
        left, top = column + 0.05, row + 0.12
        if is_slot:
            r, c = divmod(piece, columns)
            sequence_ax.imshow(pixels[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell],
                               extent=(left + 0.1, left + 0.8, top + 0.72, top + 0.02), interpolation="nearest")
            sequence_ax.add_patch(Rectangle((left, top), 0.9, 0.76, fill=False, edgecolor="#1d4ed8", linewidth=1.6))
            sequence_ax.text(left + 0.88, top + 0.74, str(piece), color="#1d4ed8", fontsize=6, ha="right", va="bottom")
            piece += 1
        else:
            special = position in specials
            sequence_ax.add_patch(Rectangle((left, top), 0.9, 0.76, facecolor="#fff" if special else "#f3f4f6",
                                            edgecolor="#9b1c1c" if special else "#9ca3af",
                                            linewidth=1.6 if special else 0.8))
            sequence_ax.text(left + 0.45, top + 0.38, _wrap_label(label), ha="center", va="center",
                             fontsize=6.5, color="#9b1c1c" if special else TEXT_COLOR,
                             fontweight="bold" if special else "normal", family="monospace")
        sequence_ax.text(left + 0.02, top - 0.01, str(position), fontsize=5.5, color=MUTED_COLOR, va="bottom")
    sequence_ax.set(xlim=(0, per_row), ylim=(max(n_rows, 1), 0), aspect="auto")
    sequence_ax.set_xticks([c + 0.5 for c in range(per_row)], [f"+{c}" for c in range(per_row)], fontsize=7)
    sequence_ax.set_yticks([r + 0.5 for r in range(n_rows)], [str(r * per_row) for r in range(n_rows)], fontsize=7)
    sequence_ax.set(xlabel="position within the line (added to the line's first position)",
                    ylabel="first position of the line",
                    title=f"the sequence: {len(labels)} positions, {n_slots} of them image slots (blue)")
    for spine in sequence_ax.spines.values():
        spine.set_visible(False)
    figure.suptitle(title or "text tokens and image pieces in one sequence", fontsize=11)
    return figure


def plot_patch_attention(
    image, attention: torch.Tensor, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
    title: str | None = None, annotate: bool | None = None,
) -> Figure:
    """Where the position that writes the answer looks in the image: `attention`
    `(n_layer, n_head, grid, grid)` (what `minigpt.vision.answer_attention` returns: each head's
    probability on each image token) drawn over `image` `(C, H, W)`, upscaled so that each token
    covers its square of pixels. One panel per layer (rows) and head (columns), all on one colour
    scale; each title gives the head's total share of attention on the image (the rest goes to
    text). `annotate` writes every token's share in its square (default: when at most 4 panels)."""
    attention = torch.as_tensor(attention).detach().float().cpu()
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must have shape (n_layer, n_head, grid, grid), got {tuple(attention.shape)}")
    n_layer, n_head, grid, _ = attention.shape
    pixels = _image_pixels(image)
    height, width = pixels.shape[:2]
    if height % grid or width % grid:
        raise ValueError(f"a {grid} x {grid} token grid does not tile a {height} x {width} image")
    layers = list(range(n_layer)) if layers is None else list(layers)
    heads = list(range(n_head)) if heads is None else list(heads)
    if not layers or not heads:
        raise ValueError("layers and heads must each name at least one (or be None for all)")
    for name, chosen, count in (("layer", layers, n_layer), ("head", heads, n_head)):
        if any(not 0 <= i < count for i in chosen):
            raise ValueError(f"{name}s must lie in 0..{count - 1}, got {chosen}")
    panels = len(layers) * len(heads)
    annotate = panels <= 4 if annotate is None else annotate
    side = 4.2 if panels == 1 else (3.0 if panels <= 4 else 2.1)
    figure = Figure(figsize=(side * len(heads) + 1.2, side * len(layers) + 0.8), layout="constrained")
    axes = figure.subplots(len(layers), len(heads), squeeze=False)
    shown = attention[layers][:, heads]  # (len(layers), len(heads), grid, grid)
    vmax = max(shown.max().item(), 1e-9)
    cell = height // grid
    for (row, layer), (column, head) in itertools.product(enumerate(layers), enumerate(heads)):
        ax, weights = axes[row, column], attention[layer, head]  # weights (grid, grid)
        ax.imshow(pixels, interpolation="nearest")
        heat = ax.imshow(weights.numpy(), cmap=PATCH_HEAT, vmin=0.0, vmax=vmax, alpha=0.6, interpolation="nearest",
                         extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        _draw_grid(ax, height, width, cell, color="#6b7280")
        if annotate:
            for (r, c), value in np.ndenumerate(weights.numpy()):
                ax.text(c * cell + cell / 2 - 0.5, r * cell + cell / 2 - 0.5, f"{100 * value:.2g}%", ha="center", va="center",
                        fontsize=8 if panels == 1 else 6, color="white" if value < 0.6 * vmax else "black")
        separator = " · " if panels <= 4 else "\n"
        ax.set_title(f"layer {layer} · head {head}{separator}{weights.sum().item():.0%} on the image", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("pixel column" if row == len(layers) - 1 else "", fontsize=7)
        ax.set_ylabel("pixel row" if column == 0 else "", fontsize=7)
    figure.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.7 if len(layers) > 1 else 0.9,
                    label="attention on the image token")
    figure.suptitle(title or "where the answer position looks among the image tokens", fontsize=10)
    return figure


def patch_attention_explorer(model, examples: Sequence, layer: int | None = None,
                             head: int | None = None) -> widgets.VBox:
    """An interactive `plot_patch_attention`: menus for the example, the layer (or all layers) and the
    head (or all heads), and a line with the question, the right answer and the model's own.

    `model` is a `minigpt.vision.VisionLanguageModel` and `examples` are `minigpt.visual_math.Example`s;
    each example's attention and answer are computed when it is first chosen, then kept.
    """
    from minigpt.vision import answer_attention, answer_questions  # here: viz stays importable without it
    from minigpt.visual_math import normalize_answer

    if not examples:
        raise ValueError("examples must hold at least one example to show")
    n_layer, n_head = model.lm.config.n_layer, model.lm.config.n_head
    example_menu = widgets.Dropdown(
        options=[(f"{number}: {example.kind} · {example.question}", number) for number, example in enumerate(examples)],
        value=0, description="example", layout=widgets.Layout(width="60%"))
    layer_menu = widgets.Dropdown(options=[("all layers", -1)] + [(f"layer {i}", i) for i in range(n_layer)],
                                  value=-1 if layer is None else layer, description="layer")
    head_menu = widgets.Dropdown(options=[("all heads", -1)] + [(f"head {h}", h) for h in range(n_head)],
                                 value=-1 if head is None else head, description="head")
    text_panel, picture = widgets.HTML(), widgets.Image(format="png")
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def redraw(*_) -> None:
        number = example_menu.value
        example = examples[number]
        if number not in seen:
            seen[number] = (answer_attention(model, example), answer_questions(model, [example])[0])
        attention, said = seen[number]
        right = normalize_answer(said) == example.answer  # as the benchmark's scorer compares
        verdict = '<span style="color:#15803d">right</span>' if right else '<span style="color:#b91c1c">wrong</span>'
        text_panel.value = (f'<div style="font-family:sans-serif;font-size:0.9em">{html.escape(example.question)} '
                            f"Answer <b>{html.escape(example.answer)}</b>; the model says "
                            f"<b>{html.escape(said)}</b> ({verdict}).</div>")
        layers = list(range(n_layer)) if layer_menu.value < 0 else [layer_menu.value]
        heads = list(range(n_head)) if head_menu.value < 0 else [head_menu.value]
        _show_png(picture, plot_patch_attention(example.image, attention, layers, heads,
                                                title=f"example {number} ({example.kind}): where the answer position looks"))

    for control in (example_menu, layer_menu, head_menu):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([example_menu, layer_menu, head_menu]), text_panel, picture])


# --- the sampler ---------------------------------------------------------------------------------


def _probability_bars(ax, probabilities: torch.Tensor, labels: Sequence[str], title: str,
                      reference: torch.Tensor | None = None, n_kept: int | None = None) -> None:
    """Bars of `probabilities` over the tokens `labels` (already chosen and ordered); removed tokens grey.
    `n_kept`, the tokens left in the whole vocabulary, is noted in a corner when given."""
    positions = np.arange(len(labels))
    if reference is not None:
        ax.bar(positions, reference.numpy(), color="#e5e7eb", label="before")
    kept = probabilities > 0
    ax.bar(positions, probabilities.numpy(), color=np.where(kept.numpy(), "#2563eb", "#9ca3af"), label="after")
    ax.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    ax.set(title=title, xlabel="token", ylabel="probability", ylim=(0, 1.05 * max(float(probabilities.max()),
                                                                  float(reference.max()) if reference is not None else 0)))
    ax.text(0.98, 0.95, f"{n_kept:,} tokens kept" if n_kept is not None else "",
            transform=ax.transAxes, ha="right", va="top", fontsize=8)


def pipeline_stages(logits: torch.Tensor, params) -> list[tuple[str, torch.Tensor]]:
    """The next-token distribution after each processor of `minigpt.sampler`'s pipeline, in its order.

    `logits` `(vocab,)`; `params` a `SamplingParams` (without penalties: there is no history here).
    Returns (stage name, probabilities `(vocab,)`) pairs, from the model's own to the final one.
    """
    from minigpt import sampler  # here: viz stays importable without the sampler

    logits = sampler.add_logit_bias(logits.float(), params.logit_bias)
    stages = [("model", logits.softmax(-1))]
    if params.temperature == 0:
        return stages + [("greedy", sampler.next_token_probabilities(logits, params))]
    steps = [("top-k", lambda x: sampler.top_k_filter(x, params.top_k)),
             ("top-p", lambda x: sampler.top_p_filter(x, params.top_p)),
             ("min-p", lambda x: sampler.min_p_filter(x, params.min_p))]
    temperature = (f"temperature {params.temperature:g}", lambda x: sampler.apply_temperature(x, params.temperature))
    steps = steps + [temperature] if params.temperature_last else [temperature] + steps
    for name, step in steps:
        logits = step(logits)
        stages.append((name, logits.softmax(-1)))
    return stages


def plot_sampling_pipeline(logits: torch.Tensor, params, labels: Sequence[str], top: int = 12) -> Figure:
    """One panel per processor: the `top` most likely tokens' probabilities before (grey) and after (blue)."""
    stages = pipeline_stages(logits, params)
    order = stages[0][1].argsort(descending=True)[:top]
    names = [labels[i] for i in order.tolist()]
    figure = Figure(figsize=(3.1 * (len(stages) - 1), 3.2), layout="constrained")
    axes = figure.subplots(1, len(stages) - 1, squeeze=False)[0]
    for ax, (before, after) in zip(axes, itertools.pairwise(stages)):
        _probability_bars(ax, after[1][order], names, f"after {after[0]}", reference=before[1][order],
                          n_kept=int((after[1] > 0).sum()))
    axes[0].legend(fontsize=8, loc="center right")
    order_name = "truncation, then temperature (llama.cpp)" if params.temperature_last else "temperature first (Hugging Face)"
    figure.suptitle(f"The next-token distribution through each processor: {order_name}")
    return figure


def sampling_explorer(logits: torch.Tensor, labels: Sequence[str], top: int = 15) -> widgets.VBox:
    """Sliders for temperature, top-k, top-p and min-p, and a toggle for the order of temperature and
    truncation, redrawing the final next-token distribution over the `top` most likely tokens."""
    from minigpt.sampler import SamplingParams

    order = logits.float().softmax(-1).argsort(descending=True)[:top]
    names = [labels[i] for i in order.tolist()]
    style = {"description_width": "90px"}
    controls = {
        "temperature": widgets.FloatSlider(value=1.0, min=0.05, max=2.0, step=0.05, description="temperature", style=style),
        "top_k": widgets.IntSlider(value=0, min=0, max=top, description="top-k (0: off)", style=style),
        "top_p": widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p", style=style),
        "min_p": widgets.FloatSlider(value=0.0, min=0.0, max=0.5, step=0.01, description="min-p", style=style),
        "temperature_last": widgets.ToggleButtons(options=[("temperature first", False), ("temperature last", True)],
                                                  value=False, description="order", style=style),
    }
    picture = widgets.Image(format="png")

    def redraw(*_) -> None:
        params = SamplingParams(**{name: control.value for name, control in controls.items()})
        final = pipeline_stages(logits, params)
        figure = Figure(figsize=(8, 3.4), layout="constrained")
        ax = figure.subplots()
        _probability_bars(ax, final[-1][1][order], names, "the distribution the sampler draws from",
                          reference=final[0][1][order], n_kept=int((final[-1][1] > 0).sum()))
        ax.legend(["the model's own", "after the processors"], fontsize=8, loc="center right")
        _show_png(picture, figure)

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([*controls.values(), picture])


SPECULATIVE_COLOURS = {"accepted": "#bbf7d0", "rejected": "#fecaca", "target": "#bfdbfe"}


def plot_speculative_rounds(rounds: Sequence, labels_of, max_rounds: int = 12, title: str = "") -> Figure:
    """Speculative decoding round by round: each row is one target pass, showing the kept drafts
    (green), the first rejected draft (red, struck through) and the target's own token (blue).

    `rounds` are `minigpt.speculative.Round`s; `labels_of(ids)` turns token ids into display strings.
    Only the first `max_rounds` are drawn, and the title then says how many of how many.
    """
    total, rounds = len(rounds), list(rounds)[:max_rounds]
    figure = Figure(figsize=(11, 0.42 * len(rounds) + 1.0), layout="constrained")
    ax = figure.subplots()
    ax.set_xlim(0, 1)
    ax.set_ylim(len(rounds), -0.6)
    renderer = FigureCanvasAgg(figure).get_renderer()  # to measure each label's width as drawn
    for row, round_ in enumerate(rounds):
        cells = [(label, "accepted") for label in labels_of(round_.drafted[: round_.accepted])]
        if round_.accepted < len(round_.drafted):
            cells.append((labels_of(round_.drafted[round_.accepted : round_.accepted + 1])[0], "rejected"))
        cells.append((labels_of([round_.target_token])[0], "target"))
        x = 0.01
        for label, kind in cells:
            text = ax.text(x, row, label, va="center", fontsize=9, family="monospace",
                           bbox=dict(boxstyle="round,pad=0.25", facecolor=SPECULATIVE_COLOURS[kind], edgecolor="none"))
            width = text.get_window_extent(renderer).width / ax.get_window_extent(renderer).width  # axes fraction
            if kind == "rejected":
                ax.plot([x, x + width], [row, row], color="#b91c1c", linewidth=1, zorder=4)  # over the label
            x += width + 0.012
        ax.text(0.99, row, f"{round_.accepted}/{len(round_.drafted)} kept", va="center", ha="right", fontsize=8,
                color="#555")
    ax.set_yticks(range(len(rounds)), [f"pass {i + 1}" for i in range(len(rounds))], fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel("tokens of each round, left to right")
    ax.set_ylabel("target pass")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in SPECULATIVE_COLOURS.values()]
    figure.legend(handles, ["draft kept", "draft rejected", "target's own token"], loc="outside lower center",
                  fontsize=8, ncol=3, frameon=False)
    shown = f" (the first {len(rounds)} of {total} passes)" if len(rounds) < total else ""
    ax.set_title((title or "Speculative decoding, one target pass per row") + shown, loc="left")
    return figure
