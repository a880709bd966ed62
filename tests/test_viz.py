"""Tests for minigpt.viz: token grouping, the token HTML and the live token explorer; training curves;
attention maps, their plots and the attention explorer; the traced KV-cache decoding and its explorer."""

import html
import re
import struct
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.positions import apply_rotary  # noqa: E402
from minigpt.train import load_tokenizer  # noqa: E402
from minigpt.viz import (  # noqa: E402
    GROUP_COLORS,
    GenerationTrace,
    attention_explorer,
    attention_maps,
    attention_text_html,
    group_tokens,
    kv_cache_explorer,
    kv_group,
    plot_attention,
    plot_generation_step,
    plot_heads,
    plot_training,
    refuse_special_text,
    token_explorer,
    token_labels,
    tokens_html,
    trace_generation,
)
from minigpt.viz import DEFAULT_TEXT  # noqa: E402

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


def test_explorer_refuses_special_token_text_as_user_input(byte_tok, pair_tok):
    explorer = token_explorer({"bytes": byte_tok, "pairs": pair_tok}, "hi")
    textarea, row = explorer.children
    textarea.value = f"the end{EOT} and more"
    for panel in row.children:
        shown = visible_text(panel.value)
        assert "the text contains <|endoftext|>, the spelling of a special token" in shown
        assert "special token <|endoftext|>" not in panel.value  # not drawn as a control token
        assert "allowed_special" not in shown  # no advice a widget user cannot follow
    textarea.value = "the end"
    assert [header_numbers(p.value)[0] for p in row.children] == [len(byte_tok.encode("the end")), len(pair_tok.encode("the end"))]


def test_refuse_special_text_names_the_first_special_spelling(course_tok):
    refuse_special_text(course_tok, "ordinary text, <| even |> brackets")
    with pytest.raises(ValueError, match=r"contains <\|im_end\|>, the spelling of a special token; .* Delete it "):
        refuse_special_text(course_tok, "a <|im_end|> alone")
    with pytest.raises(ValueError, match=r"contains <\|im_start\|>, <\|endoftext\|>, spellings of special tokens; "
                                         r".* Delete them to see the rest"):
        refuse_special_text(course_tok, "a <|im_start|> then <|endoftext|> and <|im_start|>")
    assert not any(special in DEFAULT_TEXT for special in course_tok.special_tokens)


def test_explorer_accepts_a_list_and_labels_by_name(byte_tok, pair_tok):
    explorer = token_explorer([byte_tok, pair_tok, byte_tok])
    panels = explorer.children[1].children
    assert len(panels) == 3
    assert ["<b>bytes</b>" in p.value for p in panels] == [True, False, True]
    assert "<b>pairs</b>" in panels[1].value
    assert all(p.layout.flex == "1 1 0" for p in panels)


# ---------------------------------------------------------------------------------------------
# Training curves, attention maps, the attention explorer and the KV-cache explorer

N_LAYER, N_HEAD, N_KV_HEAD = 2, 4, 2


def tiny_gpt(vocab_size: int = 64, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, context=32, n_layer=N_LAYER, n_head=N_HEAD, n_kv_head=N_KV_HEAD, n_embd=32)
    return GPT(GPTConfig(**{**fields, **overrides})).eval()


@pytest.fixture(scope="module")
def course_tok():
    """The real course tokenizer (8,192 ids, special tokens refused in user text by default)."""
    return load_tokenizer("minigpt-8k")


@pytest.fixture(scope="module")
def course_gpt(course_tok):
    return tiny_gpt(vocab_size=course_tok.n_vocab)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def image_axes(figure: Figure) -> list:
    """The visible axes that hold a heatmap (a colorbar's axes hold none)."""
    return [ax for ax in figure.axes if ax.images and ax.get_visible()]


def attention_titles(page: str) -> dict[int, float]:
    """position -> attention probability, read from the hover titles of `attention_text_html`."""
    return {int(p): float(w) for p, w in re.findall(r'title="position (\d+): attention ([\d.]+)"', page)}


# --- plot_training ------------------------------------------------------------------------------

HISTORY = {"step": list(range(1, 11)), "train_loss": [9.0 - 0.5 * i for i in range(10)],
           "val_step": [5, 10], "val_bpb": [3.0, 2.5], "seconds": [0.1 * i for i in range(1, 11)]}


def test_plot_training_draws_losses_moving_average_validation_and_references():
    figure = plot_training(HISTORY, title="nano run", references={"char-level": 2.2, "other recipe": 1.9})
    loss_ax, val_ax = figure.axes
    raw, smoothed = loss_ax.get_lines()
    assert list(raw.get_xdata()) == HISTORY["step"] and list(raw.get_ydata()) == HISTORY["train_loss"]
    expected, average = [], HISTORY["train_loss"][0]
    for loss in HISTORY["train_loss"]:
        average = 0.95 * average + 0.05 * loss
        expected.append(average)
    assert np.allclose(smoothed.get_ydata(), expected)
    assert smoothed.get_ydata()[0] == pytest.approx(HISTORY["train_loss"][0])
    assert smoothed.get_ydata()[-1] > HISTORY["train_loss"][-1]  # the average lags a falling loss
    periodic, segment, final, *references = val_ax.get_lines()
    assert list(periodic.get_xdata()) == [5] and list(periodic.get_ydata()) == [3.0]
    assert list(segment.get_xdata()) == [5, 10] and list(segment.get_ydata()) == [3.0, 2.5]
    assert list(final.get_xdata()) == [10] and list(final.get_ydata()) == [2.5]
    assert [(line.get_label(), line.get_ydata()[0]) for line in references] == [("char-level", 2.2), ("other recipe", 1.9)]
    assert references[0].get_linestyle() != references[1].get_linestyle()
    legend = [text.get_text() for text in val_ax.get_legend().get_texts()]
    assert legend == ["periodic: a sample of the validation text", "final: the whole validation text",
                      "char-level", "other recipe"]
    assert figure.get_suptitle() == "nano run"


def test_plot_training_sets_the_final_whole_text_point_apart_from_the_periodic_sample():
    history = {**HISTORY, "val_step": [3, 6, 9, 10], "val_bpb": [3.2, 2.9, 2.7, 2.4]}
    figure = plot_training(history, eval_every=3, eval_windows=64)
    periodic, segment, final = figure.axes[1].get_lines()
    assert list(periodic.get_xdata()) == [3, 6, 9] and list(periodic.get_ydata()) == [3.2, 2.9, 2.7]
    assert list(final.get_xdata()) == [10] and list(final.get_ydata()) == [2.4]
    assert final.get_marker() != periodic.get_marker() and final.get_linestyle() == "None"
    assert segment.get_label().startswith("_")  # drawn, but no legend entry: the final point's entry says it
    assert segment.get_alpha() < 1 and list(segment.get_xdata()) == [9, 10]
    legend = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
    assert legend == ["every 3 steps: first 64 windows", "final: the whole validation text"]
    # A run still going: its last evaluation is a periodic one, so nothing is drawn as final.
    going = plot_training(history, finished=False, eval_every=3, eval_windows=64)
    (only,) = going.axes[1].get_lines()
    assert list(only.get_ydata()) == [3.2, 2.9, 2.7, 2.4]
    assert [text.get_text() for text in going.axes[1].get_legend().get_texts()] == ["every 3 steps: first 64 windows"]
    # A single evaluation (a run shorter than eval_every) is the final one alone, with no segment.
    single = plot_training({**HISTORY, "val_step": [10], "val_bpb": [2.4]})
    periodic, final = single.axes[1].get_lines()
    assert len(periodic.get_xdata()) == 0 and list(final.get_ydata()) == [2.4]


def test_plot_training_accepts_a_history_without_validation_or_steps():
    no_validation = {**HISTORY, "val_step": [], "val_bpb": []}
    figure = plot_training(no_validation)
    assert len(figure.axes[1].get_lines()) == 1 and len(figure.axes[1].get_lines()[0].get_xdata()) == 0
    assert figure.get_suptitle() == ""
    empty = plot_training({"step": [], "train_loss": [], "val_step": [], "val_bpb": []})
    assert len(empty.axes[0].get_lines()) == 1  # no moving average of nothing


def test_plot_training_redraws_a_passed_figure_in_place():
    figure = plot_training({**HISTORY, "step": HISTORY["step"][:3], "train_loss": HISTORY["train_loss"][:3]})
    again = plot_training(HISTORY, figure=figure)
    assert again is figure
    assert len(figure.axes) == 2  # cleared, not stacked on the old axes
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == HISTORY["step"]


# --- token_labels -------------------------------------------------------------------------------


def test_token_labels_show_whitespace_split_characters_and_specials(byte_tok, pair_tok):
    assert token_labels(byte_tok, byte_tok.encode("a b\tc\n")) == ["a", "·", "b", "→", "c", "↵"]
    assert token_labels(pair_tok, pair_tok.encode("he中")) == ["he", "\ufffd", "\ufffd"]
    assert token_labels(byte_tok, [byte_tok.special_tokens[EOT]]) == [EOT]

    class EmptyToken:
        def decode_tokens_bytes(self, ids):
            return [b"" for _ in ids]

    assert token_labels(EmptyToken(), [0]) == ["∅"]


def test_token_labels_spell_the_text_with_the_course_tokenizer(course_tok):
    text = "Hello there,\nmy friend"
    labels = token_labels(course_tok, course_tok.encode(text))
    assert len(labels) == len(course_tok.encode(text))
    assert "".join(labels) == text.replace(" ", "·").replace("\n", "↵")


# --- attention_maps and kv_group ----------------------------------------------------------------


def test_attention_maps_are_causal_probabilities_equal_to_the_model_output():
    model = tiny_gpt()
    ids = list(range(3, 13))
    maps = attention_maps(model, ids)
    assert maps.shape == (N_LAYER, N_HEAD, 10, 10)
    assert torch.allclose(maps.sum(-1), torch.ones(N_LAYER, N_HEAD, 10), atol=1e-6)
    assert torch.all(maps.triu(1) == 0)
    assert torch.all(maps[..., 0, 0] == 1)  # the first token can only attend to itself
    with torch.no_grad():
        direct = model(torch.tensor([ids]), return_attention=True).attentions
    for layer in range(N_LAYER):
        assert torch.equal(maps[layer], direct[layer][0])


def test_attention_maps_match_a_hand_computation_of_the_first_layer():
    model = tiny_gpt()
    ids = [5, 9, 2, 40, 7, 7, 1]
    head_dim = model.config.head_dim
    with torch.no_grad():
        x = model.blocks[0].attention_norm(model.embed(torch.tensor([ids])))
        attention = model.blocks[0].attention
        q = attention.query(x).view(1, len(ids), N_HEAD, head_dim).transpose(1, 2)
        k, _ = attention.key_value(x).view(1, len(ids), 2, N_KV_HEAD, head_dim).unbind(2)
        k = k.transpose(1, 2)
        cos, sin = model.rotary(0, len(ids), x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = k.repeat_interleave(N_HEAD // N_KV_HEAD, dim=1)  # query head h reads key head h // 2
        scores = q @ k.transpose(-1, -2) / head_dim**0.5
        causal = torch.ones(len(ids), len(ids)).tril().bool()
        expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]
    assert torch.allclose(attention_maps(model, ids)[0], expected, atol=1e-5)


def test_attention_maps_restore_training_mode():
    model = tiny_gpt().train()
    attention_maps(model, [1, 2, 3])
    assert model.training
    model.eval()
    attention_maps(model, [1, 2, 3])
    assert not model.training


@pytest.mark.parametrize("n_head, n_kv_head, groups", [
    (4, 2, [0, 0, 1, 1]),
    (4, 4, [0, 1, 2, 3]),  # multi-head attention: every head its own keys and values
    (4, 1, [0, 0, 0, 0]),  # multi-query attention: one shared key/value head
    (8, 2, [0, 0, 0, 0, 1, 1, 1, 1]),
])
def test_kv_group_maps_query_heads_to_key_value_heads(n_head, n_kv_head, groups):
    assert [kv_group(h, n_head, n_kv_head) for h in range(n_head)] == groups


def test_kv_group_predicts_which_heads_share_keys_in_the_model():
    """With every query head given the same query weights, two heads' attention is identical exactly
    when they read the same key/value head: the grouping kv_group reports."""
    model = tiny_gpt()
    head_dim = model.config.head_dim
    with torch.no_grad():
        query = model.blocks[0].attention.query.weight
        for head in range(1, N_HEAD):
            query[head * head_dim : (head + 1) * head_dim] = query[:head_dim]
    maps = attention_maps(model, [4, 8, 15, 16, 23, 42])[0]
    for a in range(N_HEAD):
        for b in range(N_HEAD):
            same_group = kv_group(a, N_HEAD, N_KV_HEAD) == kv_group(b, N_HEAD, N_KV_HEAD)
            assert torch.allclose(maps[a], maps[b], atol=1e-6) == same_group, (a, b)


# --- plot_attention and plot_heads --------------------------------------------------------------


def test_plot_attention_greys_future_keys_and_outlines_the_selected_query():
    weights = attention_maps(tiny_gpt(), [1, 2, 3, 4, 5])[0, 0]
    ax = Figure().subplots()
    image = plot_attention(weights, list("abcde"), ax, selected=2, title="t", frame_color="#c2410c")
    shown = image.get_array()
    assert np.array_equal(shown.mask, np.triu(np.ones((5, 5), bool), 1))
    assert np.allclose(shown.data[~shown.mask], weights.numpy()[~shown.mask])
    assert image.get_clim() == (0.0, 1.0)
    outline = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(outline) == 1 and outline[0].get_xy() == (-0.5, 1.5) and outline[0].get_width() == 5
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcde")
    assert all(spine.get_edgecolor() == to_rgba("#c2410c") for spine in ax.spines.values())
    assert ax.get_title() == "t"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key (attended to)", "query (attending)")


def test_plot_attention_with_fewer_queries_than_keys_aligns_them_to_the_end():
    weights = torch.full((2, 5), 0.2)
    ax = Figure().subplots()
    image = plot_attention(weights, list("abcde"), ax, show_labels=False)
    assert np.array_equal(image.get_array().mask, [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    assert list(ax.get_xticks()) == [] and not ax.patches


def test_plot_heads_frames_heads_by_key_value_group():
    maps = attention_maps(tiny_gpt(), [1, 2, 3, 4, 5, 6])[1]
    figure = plot_heads(maps, list("abcdef"), N_KV_HEAD, layer=1, selected=3)
    axes = image_axes(figure)
    assert len(axes) == N_HEAD
    for head, ax in enumerate(axes):
        group = kv_group(head, N_HEAD, N_KV_HEAD)
        assert ax.get_title() == f"layer 1 · head {head} · kv group {group}"
        assert ax.spines["left"].get_edgecolor() == to_rgba(GROUP_COLORS[group])
        shown = ax.images[0].get_array()
        assert np.allclose(shown.data[~shown.mask], maps[head].numpy()[~shown.mask])
        assert [p.get_xy() for p in ax.patches] == [(-0.5, 2.5)]
    colours = [ax.spines["left"].get_edgecolor() for ax in axes]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert "4 query heads share 2 key/value heads" in figure.get_suptitle()


def test_plot_heads_without_grouping_has_no_frames_or_group_title():
    maps = attention_maps(tiny_gpt(n_kv_head=N_HEAD), [1, 2, 3])[0]
    figure = plot_heads(maps, list("abc"), n_kv_head=N_HEAD, layer=0)
    axes = image_axes(figure)
    assert [ax.get_title() for ax in axes] == [f"layer 0 · head {h} · kv group {h}" for h in range(N_HEAD)]
    assert all(ax.spines["left"].get_linewidth() != 3 for ax in axes)
    assert figure.get_suptitle() == ""


def test_plot_heads_single_head_is_large_with_labels_and_many_heads_wrap():
    maps = torch.eye(5).expand(8, 5, 5)
    single = plot_heads(maps, list("abcde"), 2, layer=0, heads=[5])
    (ax,) = image_axes(single)
    assert ax.get_title() == "layer 0 · head 5 · kv group 1"
    assert [t.get_text() for t in ax.get_yticklabels()] == list("abcde")
    assert single.get_suptitle() == ""
    six = plot_heads(maps, list("abcde"), 2, layer=0, heads=range(6))
    assert len(image_axes(six)) == 6
    assert len([ax for ax in six.axes if ax.images and not ax.get_visible()]) == 0
    assert len([ax for ax in six.axes if not ax.get_visible()]) == 2  # a 2 x 4 grid, two cells hidden
    assert single.get_size_inches()[0] > 2 * six.get_size_inches()[0] / 4  # one head is drawn large
    many_labels = plot_heads(torch.eye(30).expand(2, 30, 30), [str(i) for i in range(30)], 1, layer=0)
    assert all(len(ax.get_xticks()) == 0 for ax in image_axes(many_labels))  # too many tokens to label


# --- attention_text_html ------------------------------------------------------------------------


def test_attention_text_html_shades_by_weight_relative_to_the_peak():
    page = attention_text_html(["a", "<b>", "c", "d"], torch.tensor([0.2, 0.6, 0.2, 0.0]), selected=2)
    assert attention_titles(page) == {0: 0.2, 1: 0.6, 2: 0.2}
    alphas = [float(a) for a in re.findall(r"rgba\(30,90,200,([\d.]+)\)", page)]
    assert alphas == pytest.approx([0.85 / 3, 0.85, 0.85 / 3], abs=1e-3)
    assert page.count("outline:2px solid") == 1
    assert re.search(r'title="position 2[^"]*" style="[^"]*outline:2px solid', page)
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert re.search(r'<span style="color:#b0b0b0[^"]*">d</span>', page)  # a future token, greyed
    assert visible_text(page) == "a<b>cd"


def test_attention_text_html_ignores_weights_after_the_selected_token():
    page = attention_text_html(["x", "y", "z"], torch.tensor([0.5, 0.5, 0.9]), selected=1)
    alphas = [float(a) for a in re.findall(r"rgba\(30,90,200,([\d.]+)\)", page)]
    assert alphas == pytest.approx([0.85, 0.85])
    assert "↵<br>" in attention_text_html(["↵", "a"], torch.tensor([1.0, 0.0]), selected=1)


# --- attention_explorer -------------------------------------------------------------------------


def explorer_parts(explorer):
    prompt_box, message, menus, slider, text_panel, picture = explorer.children
    layer_menu, head_menu = menus.children
    return prompt_box, message, layer_menu, head_menu, slider, text_panel, picture


def test_attention_explorer_shows_the_last_token_in_the_last_layer(course_tok, course_gpt):
    prompt = "To be, or not to be"
    ids = course_tok.encode(prompt)
    explorer = attention_explorer(course_gpt, course_tok, prompt)
    prompt_box, message, layer_menu, head_menu, slider, text_panel, picture = explorer_parts(explorer)
    assert prompt_box.value == prompt and message.value == ""
    assert layer_menu.options == (("layer 0", 0), ("layer 1", 1))
    assert [label for label, _ in head_menu.options] == [
        "all heads", "head 0 (kv group 0)", "head 1 (kv group 0)", "head 2 (kv group 1)", "head 3 (kv group 1)"]
    assert (layer_menu.value, head_menu.value) == (1, -1)
    assert slider.max == slider.value == len(ids) - 1
    assert f"What token {len(ids) - 1}" in text_panel.value and "the mean of all heads" in text_panel.value
    mean_row = attention_maps(course_gpt, ids)[1, :, -1].mean(0)
    assert attention_titles(text_panel.value) == pytest.approx(dict(enumerate(mean_row.tolist())), abs=6e-4)
    width, height = png_size(picture.value)
    assert width > 2 * height  # all four heads in a row


def test_attention_explorer_redraws_when_the_controls_change(course_tok, course_gpt):
    prompt = "To be, or not to be"
    ids = course_tok.encode(prompt)
    maps = attention_maps(course_gpt, ids)
    _, _, layer_menu, head_menu, slider, text_panel, picture = explorer_parts(
        attention_explorer(course_gpt, course_tok, prompt))

    before = picture.value
    slider.value = 2
    assert slider.description == "token 2" and "What token 2" in text_panel.value
    assert set(attention_titles(text_panel.value)) == {0, 1, 2}
    assert picture.value != before

    before = picture.value
    layer_menu.value = 0
    assert "in layer 0" in text_panel.value
    assert attention_titles(text_panel.value) == pytest.approx(dict(enumerate(maps[0, :, 2, :3].mean(0).tolist())),
                                                               abs=6e-4)
    assert picture.value != before

    head_menu.value = 3
    assert "head 3" in text_panel.value
    assert attention_titles(text_panel.value) == pytest.approx(dict(enumerate(maps[0, 3, 2, :3].tolist())), abs=6e-4)
    width, height = png_size(picture.value)
    assert height > 0.8 * width  # one head, drawn large
    assert picture.layout.width == f"{width}px" and picture.layout.max_width == "100%"  # shown at its own size
    assert height <= 600  # fits a projector's screen beside the controls


def test_attention_explorer_reports_bad_prompts_in_the_widget(course_tok, course_gpt):
    prompt_box, message, _, _, slider, text_panel, picture = explorer_parts(
        attention_explorer(course_gpt, course_tok, "To be, or not to be"))
    shown = (slider.max, text_panel.value, picture.value)

    prompt_box.value = f"the end{EOT}"  # refused by the tokenizer, not raised
    assert "special token" in message.value and "&lt;|endoftext|&gt;" in message.value
    assert (slider.max, text_panel.value, picture.value) == shown  # the last good prompt stays up

    prompt_box.value = ""
    assert "the prompt is empty" in message.value

    prompt_box.value = "word " * 40
    assert re.search(r"the prompt is \d+ tokens; this model reads at most 32", message.value)
    assert (slider.max, text_panel.value, picture.value) == shown

    prompt_box.value = "Juliet"
    n = len(course_tok.encode("Juliet"))
    assert message.value == ""
    assert slider.max == slider.value == n - 1
    assert set(attention_titles(text_panel.value)) == set(range(n))
    assert picture.value != shown[2]


def test_attention_explorer_with_a_bad_initial_prompt_shows_only_the_message(course_tok, course_gpt):
    _, message, _, _, _, text_panel, picture = explorer_parts(attention_explorer(course_gpt, course_tok, EOT))
    assert "special token" in message.value
    assert text_panel.value == "" and picture.value == b""


# --- trace_generation, plot_generation_step, kv_cache_explorer ----------------------------------


def test_trace_generation_equals_greedy_generation_and_full_recompute():
    model = tiny_gpt().train()
    ids, new = [3, 14, 15, 9, 26], 6
    trace = trace_generation(model, ids, new)
    assert model.training  # mode restored
    model.eval()
    greedy = model.generate(torch.tensor([ids]), new, temperature=0.0)[0].tolist()
    assert trace.ids == greedy == model.generate(torch.tensor([ids]), new, use_cache=False)[0].tolist()
    assert trace.prompt_length == len(ids)
    assert trace.cache_lengths == list(range(len(ids), len(ids) + new + 1))
    per_position = 2 * N_LAYER * N_KV_HEAD * model.config.head_dim * 4  # keys and values, float32
    assert trace.cache_bytes == [n * per_position for n in trace.cache_lengths]
    assert len(trace.rows) == new + 1
    for step, row in enumerate(trace.rows):
        length = len(ids) + step
        assert row.shape == (N_LAYER, N_HEAD, length)
        assert torch.allclose(row.sum(-1), torch.ones(N_LAYER, N_HEAD), atol=1e-5)
        recomputed = attention_maps(model, trace.ids[:length])[:, :, -1]
        assert torch.allclose(row, recomputed, atol=1e-5), step


def test_trace_generation_with_no_new_tokens_is_the_prefill():
    model = tiny_gpt()
    trace = trace_generation(model, [1, 2, 3], 0)
    assert isinstance(trace, GenerationTrace)
    assert trace.ids == [1, 2, 3] and trace.cache_lengths == [3] and len(trace.rows) == 1
    assert torch.allclose(trace.rows[0], attention_maps(model, [1, 2, 3])[:, :, -1])


def test_plot_generation_step_shows_the_cached_positions_and_the_cache_size():
    trace = trace_generation(tiny_gpt(), [1, 2, 3, 4], 3)
    labels = [f"t{i}" for i in trace.ids]
    for step in (0, 2):
        figure = plot_generation_step(trace, labels, step)
        heat_ax, bytes_ax = figure.axes[:2]
        shown = heat_ax.images[0].get_array()
        length = trace.cache_lengths[step]
        assert shown.shape[0] == N_LAYER * N_HEAD
        assert shown.mask[:, length:].all() and not shown.mask[:, :length].any()
        assert np.allclose(shown.data[:, :length], trace.rows[step].reshape(N_LAYER * N_HEAD, length).numpy())
        assert f"over the {length} cached positions" in heat_ax.get_title()
        assert [t.get_text() for t in heat_ax.get_yticklabels()][:2] == ["L0 H0", "L0 H1"]
        assert heat_ax.get_xlabel().startswith("key") and "query" in heat_ax.get_ylabel()
        marker = bytes_ax.get_lines()[1]
        assert list(marker.get_xdata()) == [length]
        assert list(marker.get_ydata()) == [trace.cache_bytes[step] / 1024]
    assert "prefill" in plot_generation_step(trace, labels, 0).axes[0].get_title()
    assert "new token 2: 't{}'".format(trace.ids[5]) in figure.axes[0].get_title()


def test_plot_generation_step_draws_the_last_step():
    trace = trace_generation(tiny_gpt(), [1, 2, 3, 4], 3)
    labels = [f"t{i}" for i in trace.ids]
    figure = plot_generation_step(trace, labels, 3)
    assert not figure.axes[0].images[0].get_array().mask.any()  # every position is cached by then


def test_kv_cache_explorer_steps_through_decoding(course_tok, course_gpt):
    prompt, new = "To be, or not", 4
    n_prompt = len(course_tok.encode(prompt))
    explorer = kv_cache_explorer(course_gpt, course_tok, prompt, max_new_tokens=new)
    slider, text_panel, picture = explorer.children
    assert (slider.min, slider.max, slider.value) == (0, new, 0)
    trace = trace_generation(course_gpt, course_tok.encode(prompt), new)
    labels = token_labels(course_tok, trace.ids)
    per_position = trace.cache_bytes[0] // n_prompt

    def cached_text(page):
        return visible_text(re.search(r'<span style="background:#dcfce7">(.*?)</span>', page)[1])

    assert f"{n_prompt} positions cached, {n_prompt * per_position:,} bytes" in text_panel.value
    assert cached_text(text_panel.value) == "".join(labels[:n_prompt])
    first = picture.value
    assert picture.layout.width == f"{png_size(first)[0]}px"

    slider.value = 2
    assert f"{n_prompt + 2} positions cached, {(n_prompt + 2) * per_position:,} bytes" in text_panel.value
    assert cached_text(text_panel.value) == "".join(labels[: n_prompt + 2])
    assert picture.value != first


# --- vision: plot_image_prompt, plot_patch_attention, patch_attention_explorer ------------------


@pytest.fixture(scope="module")
def tiny_vision_model():
    from minigpt import vision

    torch.manual_seed(0)
    lm = GPT(GPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    return vision.VisionLanguageModel(vision.VisionConfig(n_layer=1, n_embd=32, projector_hidden=32), lm).eval()


@pytest.fixture(scope="module")
def vision_examples():
    from minigpt import visual_math

    return visual_math.benchmark(1)  # one held-out example of each question type


def test_plot_image_prompt_draws_every_position_and_each_slot_with_its_piece(course_tok, vision_examples):
    from minigpt import vision
    from minigpt.viz import MUTED_COLOR, plot_image_prompt

    example = vision_examples[3]  # a bar chart
    ids = vision.prompt_ids(course_tok, example.question, 16)
    slot = course_tok.special_tokens["<|image|>"]
    specials = {i for i, token in enumerate(ids) if token in set(course_tok.special_tokens.values())}
    figure = plot_image_prompt(token_labels(course_tok, ids), example.image, [t == slot for t in ids], 4, specials,
                               per_row=10, title="one prompt")
    image_ax, sequence_ax = figure.axes
    assert figure._suptitle.get_text() == "one prompt"
    assert image_ax.get_title() and sequence_ax.get_title()
    assert image_ax.get_xlabel() and image_ax.get_ylabel() and sequence_ax.get_xlabel() and sequence_ax.get_ylabel()
    assert np.allclose(image_ax.images[0].get_array(), example.image.transpose(1, 2, 0))
    thumbnails = sequence_ax.images
    assert len(thumbnails) == 16
    for piece, thumbnail in enumerate(thumbnails):  # slot k shows piece k, the pieces row by row
        row, column = divmod(piece, 4)
        assert np.allclose(thumbnail.get_array(), example.image[:, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
                           .transpose(1, 2, 0))
    position_numbers = [t.get_text() for t in sequence_ax.texts if t.get_color() == MUTED_COLOR]
    assert position_numbers == [str(p) for p in range(len(ids))]  # every box numbered, in order
    piece_numbers = [t.get_text() for t in sequence_ax.texts if to_rgba(t.get_color()) == to_rgba("#1d4ed8")]
    assert piece_numbers == [str(p) for p in range(16)]
    assert "<|im_" in "".join(t.get_text().replace("\n", "") for t in sequence_ax.texts)
    assert len(sequence_ax.get_yticks()) == -(-len(ids) // 10)  # lines of 10, the last one partial


def test_plot_image_prompt_refuses_slots_that_do_not_match_the_image(vision_examples):
    from minigpt.viz import plot_image_prompt

    image = vision_examples[0].image
    with pytest.raises(ValueError, match="one of each"):
        plot_image_prompt(["a", "b"], image, [True], 4)
    with pytest.raises(ValueError, match="3 <|image|> slots"):
        plot_image_prompt(["a", "b", "c"], image, [True, True, True], 4)
    with pytest.raises(ValueError, match="must divide"):
        plot_image_prompt(["a"], image, [True], 5)


def test_plot_patch_attention_draws_every_layer_and_head_over_the_image(tiny_vision_model, vision_examples):
    from minigpt.vision import answer_attention
    from minigpt.viz import plot_patch_attention

    example = vision_examples[1]
    attention = answer_attention(tiny_vision_model, example)  # (1, 2, 4, 4)
    figure = plot_patch_attention(example.image, attention, title="where it looks")
    assert figure._suptitle.get_text() == "where it looks"
    panels = image_axes(figure)
    assert len(panels) == 2  # one layer, two heads
    for head, ax in enumerate(panels):
        picture, heat = ax.images
        assert np.allclose(picture.get_array(), example.image.transpose(1, 2, 0))
        assert np.allclose(heat.get_array(), attention[0, head].numpy())
        assert heat.get_extent() == [-0.5, 15.5, 15.5, -0.5]  # each token covers its 4 x 4 pixels
        assert ax.get_title() == f"layer 0 · head {head} · {attention[0, head].sum().item():.0%} on the image"
        assert ax.get_xlabel() == "pixel column"
        assert len([t for t in ax.texts if t.get_text().endswith("%")]) == 16  # two panels: annotated
    assert panels[0].get_ylabel() == "pixel row"
    shared = {ax.images[1].get_clim() for ax in panels}
    assert shared == {(0.0, attention.max().item())}  # one colour scale for every panel
    colorbar_axes = [ax for ax in figure.axes if ax not in panels]
    assert colorbar_axes and "attention" in colorbar_axes[0].get_ylabel()


def test_plot_patch_attention_picks_layers_and_heads_and_refuses_bad_input(vision_examples):
    from minigpt.viz import plot_patch_attention

    image = vision_examples[0].image
    attention = torch.rand(3, 4, 4, 4) / 16
    figure = plot_patch_attention(image, attention, layers=[2], heads=[1, 3])
    titles = [ax.get_title() for ax in image_axes(figure)]
    assert [t.split(" · ")[:2] for t in titles] == [["layer 2", "head 1"], ["layer 2", "head 3"]]
    assert len(image_axes(plot_patch_attention(image, attention))) == 12
    assert not image_axes(plot_patch_attention(image, attention))[0].texts  # 12 panels: not annotated
    with pytest.raises(ValueError, match="grid, grid"):
        plot_patch_attention(image, torch.rand(1, 2, 4, 3))
    with pytest.raises(ValueError, match="does not tile"):
        plot_patch_attention(image, torch.rand(1, 2, 5, 5))
    with pytest.raises(ValueError, match="heads must lie in 0..3"):
        plot_patch_attention(image, attention, heads=[4])
    with pytest.raises(ValueError, match="channels, height, width"):
        plot_patch_attention(image[0], attention)


def test_patch_attention_explorer_builds_and_redraws(tiny_vision_model, vision_examples):
    from minigpt.vision import answer_questions
    from minigpt.viz import patch_attention_explorer

    explorer = patch_attention_explorer(tiny_vision_model, vision_examples)
    menus, text_panel, picture = explorer.children
    example_menu, layer_menu, head_menu = menus.children
    assert [value for _, value in example_menu.options] == list(range(len(vision_examples)))
    assert example_menu.options[3][0] == f"3: which_bar · {vision_examples[3].question}"
    assert layer_menu.options == (("all layers", -1), ("layer 0", 0))
    assert head_menu.options == (("all heads", -1), ("head 0", 0), ("head 1", 1))
    said = answer_questions(tiny_vision_model, vision_examples[:1])[0]
    assert vision_examples[0].question in text_panel.value
    assert f"Answer <b>{vision_examples[0].answer}</b>" in text_panel.value
    assert f"the model says <b>{html.escape(said)}</b>" in text_panel.value
    both_heads = picture.value
    width, height = png_size(both_heads)
    assert width > 1.5 * height and picture.layout.width == f"{width}px"

    head_menu.value = 1
    one_head = picture.value
    width, height = png_size(one_head)
    assert one_head != both_heads and 0.8 * width < height < 1.3 * width

    example_menu.value = 3
    assert vision_examples[3].question in text_panel.value
    assert picture.value != one_head
    with pytest.raises(ValueError, match="at least one example"):
        patch_attention_explorer(tiny_vision_model, [])


# --- the sampler ----------------------------------------------------------------------------------


def test_pipeline_stages_follow_the_sampler_in_either_order():
    from minigpt.sampler import SamplingParams, next_token_probabilities
    from minigpt.viz import pipeline_stages

    logits = torch.tensor([3.0, 2.5, 1.0, 0.5, -1.0, -2.0])
    for last in (False, True):
        params = SamplingParams(temperature=1.7, top_k=4, top_p=0.9, min_p=0.05, temperature_last=last)
        stages = pipeline_stages(logits, params)
        names = [name for name, _ in stages]
        assert names[0] == "model" and (names[-1] == "temperature 1.7") == last
        torch.testing.assert_close(stages[0][1], logits.softmax(-1))
        torch.testing.assert_close(stages[-1][1], next_token_probabilities(logits, params))  # the sampler's own
    greedy = pipeline_stages(logits, SamplingParams(temperature=0))
    assert [name for name, _ in greedy] == ["model", "greedy"] and greedy[-1][1].tolist() == [1, 0, 0, 0, 0, 0]


def test_plot_sampling_pipeline_draws_one_titled_panel_per_processor():
    from minigpt.sampler import SamplingParams
    from minigpt.viz import plot_sampling_pipeline

    logits = torch.linspace(2, -2, 20)
    figure = plot_sampling_pipeline(logits, SamplingParams(temperature=1.5, top_k=10, top_p=0.8, min_p=0.05),
                                    [f"t{i}" for i in range(20)], top=12)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["after temperature 1.5", "after top-k", "after top-p", "after min-p"]
    assert all(ax.get_ylabel() == "probability" and len(ax.get_xticklabels()) == 12 for ax in figure.axes)
    assert "Hugging Face" in figure._suptitle.get_text()


def test_sampling_explorer_redraws_when_a_slider_moves():
    from minigpt.viz import sampling_explorer

    explorer = sampling_explorer(torch.linspace(2, -2, 30), [f"t{i}" for i in range(30)], top=10)
    *controls, picture = explorer.children
    assert [c.description for c in controls] == ["temperature", "top-k (0: off)", "top-p", "min-p", "order"]
    before = picture.value
    controls[2].value = 0.3  # top-p
    assert picture.value != before and png_size(picture.value)[0] > 0


def test_plot_speculative_rounds_draws_kept_rejected_and_target_tokens():
    from minigpt.speculative import Round
    from minigpt.viz import SPECULATIVE_COLOURS, plot_speculative_rounds

    rounds = [Round([1, 2, 3], 2, 9), Round([4, 5], 2, 6), Round([7], 0, 8)]
    figure = plot_speculative_rounds(rounds, lambda ids: [f"w{i}" for i in ids], title="three rounds")
    ax = figure.axes[0]
    boxes = {t.get_text(): to_rgba(t.get_bbox_patch().get_facecolor()) for t in ax.texts if t.get_bbox_patch()}
    assert boxes["w1"] == boxes["w2"] == boxes["w4"] == to_rgba(SPECULATIVE_COLOURS["accepted"])
    assert boxes["w3"] == boxes["w7"] == to_rgba(SPECULATIVE_COLOURS["rejected"])
    assert boxes["w9"] == boxes["w6"] == boxes["w8"] == to_rgba(SPECULATIVE_COLOURS["target"])
    assert "w5" in boxes and len(ax.lines) == 2  # one strike-through per rejected draft
    assert [t.get_text() for t in ax.get_yticklabels()] == ["pass 1", "pass 2", "pass 3"]
    assert ax.get_title(loc="left") == "three rounds" and ax.get_xlabel() and ax.get_ylabel()
    first_two = plot_speculative_rounds(rounds, lambda ids: [f"w{i}" for i in ids], max_rounds=2, title="two")
    assert first_two.axes[0].get_title(loc="left") == "two (the first 2 of 3 passes)"
