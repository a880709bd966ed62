"""Tests for minigpt/vision.py: patches and pixel shuffle, the encoder (checked against a
re-implementation from its weights), the splice of image vectors into the language model's
sequence, cached generation, clear errors on bad images and bad image blocks, prompts and
batches, the answer-only loss, checkpoints, training and evaluation.

Tiny models throughout (one or two layers, 16 or 32 wide) on the course tokenizer.
"""

import json
import math
import shlex
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt import visual_math
from minigpt.model import GPT, GPTConfig
from minigpt.train import CHECKPOINT_DIR, CheckpointError, load_tokenizer
from minigpt.vision import (
    ImageMarkers,
    Projector,
    VisionConfig,
    VisionEncoder,
    VisionLanguageModel,
    VisionTrainConfig,
    answer_attention,
    answer_ids,
    answer_loss,
    answer_questions,
    chat_prompt,
    evaluate,
    images_tensor,
    load_vision_checkpoint,
    main,
    patchify,
    pixel_shuffle,
    prompt_ids,
    save_vision_checkpoint,
    splice_images,
    swapped_images,
    train_vision,
    training_batch,
)

VISION = VisionConfig(n_layer=1, n_head=2, n_embd=16, projector_hidden=16)  # 16 image tokens
SHUFFLED = replace(VISION, pixel_shuffle=2)  # 4 image tokens: short sequences
TRAIN_VISION = VisionConfig(n_layer=1, n_embd=32, projector_hidden=32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster than several, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32))


def tiny_vlm(config: VisionConfig = SHUFFLED, seed: int = 0) -> VisionLanguageModel:
    lm = tiny_lm(seed)
    torch.manual_seed(seed + 1)
    return VisionLanguageModel(config, lm).eval()


def random_images(n: int, seed: int = 1, size: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minigpt-8k")


@pytest.fixture(scope="module")
def markers(tok):
    return ImageMarkers.of(tok)


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained briefly by `train_vision`: one frozen step, two joint steps."""
    config = VisionTrainConfig(frozen_steps=1, steps=2, batch_size=4)
    model, history = train_vision(config, TRAIN_VISION, progress=False, lm=tiny_lm())
    return model, history, config


def block(markers: ImageMarkers, slots: int) -> list[int]:
    return [markers.start, *[markers.slot] * slots, markers.end]


def text(tok, words: str) -> list[int]:
    return tok.encode_ordinary(words)


# ---------------------------------------------------------------------------------------------
# Config, patches, pixel shuffle


def test_n_image_tokens_with_and_without_pixel_shuffle():
    assert VisionConfig().n_image_tokens == 16 and VisionConfig().grid == 4 and VisionConfig().n_patches == 16
    assert VisionConfig(pixel_shuffle=2).n_image_tokens == 4 and VisionConfig(pixel_shuffle=2).token_grid == 2
    assert VisionConfig(pixel_shuffle=4).n_image_tokens == 1
    assert VisionConfig(image_size=32, patch_size=4, pixel_shuffle=2).n_image_tokens == 16
    assert VisionConfig(image_size=16, patch_size=2).n_image_tokens == 64


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(image_size=0), "image_size must be a positive integer, got 0"),
        (dict(channels=-1), "channels must be a positive integer"),
        (dict(n_layer=2.0), "n_layer must be a positive integer, got 2.0"),
        (dict(n_head="4"), "n_head must be a positive integer, got '4'"),
        (dict(pixel_shuffle=0), "pixel_shuffle must be a positive integer"),
        (dict(projector_hidden=0), "projector_hidden must be a positive integer"),
        (dict(patch_size=5), r"image_size \(16\) must be a multiple of patch_size \(5\)"),
        (dict(pixel_shuffle=3), r"pixel_shuffle \(3\) must divide the patch grid \(4 patches a side\)"),
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be a multiple of n_head \(4\)"),
    ],
)
def test_bad_vision_config_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**fields)


def test_patchify_shape_and_patches_in_reading_order():
    images = torch.zeros(2, 3, 16, 16)
    for row in range(4):
        for column in range(4):
            images[:, :, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4] = 4 * row + column
    patches = patchify(images, 4)
    assert patches.shape == (2, 16, 4 * 4 * 3)
    for k in range(16):
        assert (patches[:, k] == k).all()
    assert patchify(torch.zeros(5, 1, 12, 8), 2).shape == (5, 24, 4)


def test_patchify_orders_a_patch_by_rows_then_columns_with_channels_fastest():
    p, channels = 4, 3
    images = torch.arange(2 * channels * 8 * 12, dtype=torch.float32).reshape(2, channels, 8, 12)
    patches = patchify(images, p)
    assert patches.shape == (2, 6, p * p * channels)
    for b in range(2):
        for k in range(6):
            top, left = p * (k // 3), p * (k % 3)
            for y in range(p):
                for x in range(p):
                    for c in range(channels):
                        assert patches[b, k, (y * p + x) * channels + c] == images[b, c, top + y, left + x]


def test_pixel_shuffle_concatenates_each_two_by_two_block_of_patches():
    grid, d = 4, 5
    patches = torch.randn(2, grid * grid, d)
    shuffled = pixel_shuffle(patches, 2)
    assert shuffled.shape == (2, 4, 4 * d)
    for j in range(4):
        top, left = 2 * (j // 2), 2 * (j % 2)
        expected = torch.cat([patches[:, (top + dy) * grid + left + dx] for dy in (0, 1) for dx in (0, 1)], dim=-1)
        assert torch.equal(shuffled[:, j], expected)
    assert torch.equal(pixel_shuffle(patches, 1), patches)
    assert pixel_shuffle(torch.randn(1, 36, 2), 3).shape == (1, 4, 18)


def test_pixel_shuffle_refuses_a_grid_it_cannot_split():
    with pytest.raises(ValueError, match="square grid divisible by 2, got 15 patches"):
        pixel_shuffle(torch.randn(1, 15, 4), 2)
    with pytest.raises(ValueError, match="square grid divisible by 2, got 9 patches"):
        pixel_shuffle(torch.randn(1, 9, 4), 2)


# ---------------------------------------------------------------------------------------------
# Encoder and projector


def test_encoder_and_projector_shapes():
    encoder = VisionEncoder(VISION)
    vectors = encoder(random_images(3))
    assert vectors.shape == (3, 16, 16)
    assert Projector(VISION, 48)(vectors).shape == (3, 16, 48)
    assert Projector(SHUFFLED, 48)(vectors).shape == (3, 4, 48)
    vectors, attentions = encoder(random_images(3), return_attention=True)
    assert len(attentions) == VISION.n_layer and attentions[0].shape == (3, VISION.n_head, 16, 16)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(3, VISION.n_head, 16))


def test_projector_output_width_is_the_language_models(vlm):
    projected = vlm.encode_images(random_images(2))
    assert projected.shape == (2, SHUFFLED.n_image_tokens, vlm.lm.config.n_embd)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain


def encoder_by_hand(encoder: VisionEncoder, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ViT written out from the encoder's weights, one image, one patch and one head at a time."""
    c = encoder.config
    p, d, heads = c.patch_size, c.n_embd, c.n_head
    head_dim = d // heads
    outputs, all_weights = [], []
    for image in images:
        rows = []
        for r in range(c.grid):
            for col in range(c.grid):
                pixels = image[:, r * p : (r + 1) * p, col * p : (col + 1) * p]  # (C, p, p)
                flat = torch.stack([pixels[ch, y, xx] for y in range(p) for xx in range(p) for ch in range(c.channels)])
                embedded = encoder.patch_embedding.weight @ flat + encoder.patch_embedding.bias
                rows.append(embedded + encoder.row_position.weight[r] + encoder.column_position.weight[col])
        x = torch.stack(rows)  # (N, d)
        weights_per_layer = []
        for blk in encoder.blocks:
            h = rms_norm(x, blk.attention_norm.weight, c.norm_eps)
            qkv = h @ blk.attention.query_key_value.weight.T  # (N, 3d): q, then k, then v
            q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
            outs, layer_weights = [], []
            for i in range(heads):
                s = slice(i * head_dim, (i + 1) * head_dim)
                scores = q[:, s] @ k[:, s].T / math.sqrt(head_dim)  # no mask: every patch sees every patch
                weights = torch.softmax(scores, dim=-1)
                layer_weights.append(weights)
                outs.append(weights @ v[:, s])
            x = x + torch.cat(outs, dim=-1) @ blk.attention.out.weight.T
            h = rms_norm(x, blk.mlp_norm.weight, c.norm_eps)
            gate, up = h @ blk.mlp.gate.weight.T, h @ blk.mlp.up.weight.T
            x = x + (F.silu(gate) * up) @ blk.mlp.down.weight.T
            weights_per_layer.append(torch.stack(layer_weights))
        outputs.append(rms_norm(x, encoder.final_norm.weight, c.norm_eps))
        all_weights.append(weights_per_layer)
    return torch.stack(outputs), [torch.stack([w[i] for w in all_weights]) for i in range(c.n_layer)]


def test_encoder_equals_a_re_implementation_from_its_weights():
    config = VisionConfig(n_layer=2, n_head=2, n_embd=16, patch_size=4)
    encoder = VisionEncoder(config).eval()
    with torch.no_grad():  # move every weight off its initial value, norm gains and biases included
        for parameter in encoder.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    images = random_images(2)
    with torch.no_grad():
        expected, expected_weights = encoder_by_hand(encoder, images)
        got, got_weights = encoder(images, return_attention=True)
        plain = encoder(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-5)
    for got_layer, expected_layer in zip(got_weights, expected_weights):
        torch.testing.assert_close(got_layer, expected_layer, rtol=1e-4, atol=1e-6)


def test_encoder_attention_is_bidirectional():
    encoder = VisionEncoder(VISION).eval()
    images = random_images(1)
    changed = images.clone()
    changed[:, :, 12:, 12:] = 1 - changed[:, :, 12:, 12:]  # the last patch only
    with torch.no_grad():
        before, after = encoder(images), encoder(changed)
    assert not torch.allclose(before[:, 0], after[:, 0])  # the first patch sees the last one


def test_float64_images_are_read_or_refused_by_name():
    """check_images accepts any floating dtype; a float64 image (numpy's default) must then either
    work like its float32 copy or be refused with a message naming float64, never a matmul error."""
    encoder = VisionEncoder(VISION).eval()
    images = random_images(2).double()
    with torch.no_grad():
        try:
            got = encoder(images)
        except (TypeError, ValueError) as error:
            assert "float64" in str(error)
        else:
            torch.testing.assert_close(got.float(), encoder(images.float()), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad images


def with_nan(images: torch.Tensor) -> torch.Tensor:
    images[0, 1, 5, 7] = float("nan")
    return images


BAD_IMAGES = [
    (lambda: random_images(1, channels=1), ValueError, r"must have 3 channels \(red, green, blue\), got 1"),
    (lambda: random_images(1).permute(0, 2, 3, 1), ValueError, r"must have 3 channels.*got 16 .*\(B, C, H, W\)"),
    (lambda: torch.rand(1, 3, 16, 18), ValueError, "image size 16 x 18 is not divisible by the patch size 4"),
    (lambda: torch.rand(1, 3, 8, 8), ValueError, r"reads 16 x 16 images .*got 8 x 8"),
    (lambda: torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), TypeError,
     r"floating point .*torch.uint8.*divide by 255"),
    (lambda: torch.randint(0, 2, (1, 3, 16, 16)), TypeError, r"floating point .*torch.int64"),
    (lambda: random_images(1) * 255, ValueError, r"pixel values must lie in \[0, 1\], found .* to 25\d"),
    (lambda: random_images(1) - 0.5, ValueError, r"pixel values must lie in \[0, 1\], found -0\.\d+"),
    (lambda: with_nan(random_images(1)), ValueError, "images contain NaN values"),
    (lambda: random_images(1).numpy(), TypeError, "images must be a torch tensor .*got ndarray"),
    (lambda: random_images(1).tolist(), TypeError, "images must be a torch tensor .*got list"),
    (lambda: random_images(1)[0], ValueError, r"shape \(batch, channels, height, width\), got \(3, 16, 16\)"),
    (lambda: random_images(1)[None], ValueError, r"shape \(batch, channels, height, width\), got \(1, 1, 3, 16, 16\)"),
]


@pytest.mark.parametrize("make, error, message", BAD_IMAGES)
def test_bad_images_are_refused_by_the_encoder_with_a_clear_message(make, error, message):
    with pytest.raises(error, match=message):
        VisionEncoder(VISION)(make())


@pytest.mark.parametrize("make, error, message", BAD_IMAGES)
def test_bad_images_are_refused_by_the_model_before_any_splice(vlm, tok, markers, make, error, message):
    ids = torch.tensor([text(tok, "Look:") + block(markers, SHUFFLED.n_image_tokens)])
    with pytest.raises(error, match=message):
        vlm.embed(ids, make())


# ---------------------------------------------------------------------------------------------
# Splicing


def test_slots_hold_the_projected_images_in_reading_order_and_text_keeps_its_embedding(vlm, tok, markers):
    n = SHUFFLED.n_image_tokens
    row0 = text(tok, "First") + block(markers, n) + text(tok, " then") + block(markers, n) + text(tok, " done.")
    row1 = text(tok, "Only one image here:") + block(markers, n)
    length = max(len(row0), len(row1))
    row0 += text(tok, " x" * 20)[: length - len(row0)]
    row1 += text(tok, " y" * 20)[: length - len(row1)]
    ids = torch.tensor([row0, row1])
    images = random_images(3)
    with torch.no_grad():
        embedded = vlm.embed(ids, images)
        projected = vlm.encode_images(images)  # (3, n, lm width)
        plain = vlm.lm.embed(ids)
    assert embedded.shape == plain.shape == (2, length, vlm.lm.config.n_embd)
    slots = ids == markers.slot
    starts = [(r, t) for r in range(2) for t in range(length) if ids[r, t] == markers.start]
    assert starts == [(0, len(text(tok, "First"))), (0, starts[1][1]), (1, len(text(tok, "Only one image here:")))]
    for image, (r, t) in enumerate(starts):
        assert torch.equal(embedded[r, t + 1 : t + 1 + n], projected[image])
    assert torch.equal(embedded[~slots], plain[~slots])


def test_splice_images_refuses_a_count_that_does_not_fill_the_slots(markers):
    ids = torch.tensor([[1, markers.slot, markers.slot, 2]])
    embeddings = torch.zeros(1, 4, 8)
    spliced = splice_images(embeddings, ids, torch.ones(1, 2, 8), markers.slot)
    assert spliced[0, 1:3].eq(1).all() and spliced[0, [0, 3]].eq(0).all()
    with pytest.raises(ValueError, match="2 <\\|image\\|> slots for 1 images of 3 tokens each"):
        splice_images(embeddings, ids, torch.ones(1, 3, 8), markers.slot)


def test_text_only_input_gives_exactly_the_text_models_logits(vlm, tok):
    ids = torch.tensor([text(tok, "The cat sat on the mat, and then it slept.")])
    with torch.no_grad():
        assert torch.equal(vlm(ids).logits, vlm.lm(ids).logits)
        assert torch.equal(vlm(ids, None).logits, vlm.lm(ids).logits)
        assert torch.equal(vlm.embed(ids), vlm.lm.embed(ids))


def test_positions_before_an_image_see_only_text_and_those_after_see_the_image(vlm, tok, markers):
    prefix = text(tok, "Before the picture")
    ids = torch.tensor([prefix + block(markers, SHUFFLED.n_image_tokens) + text(tok, " after")])
    with torch.no_grad():
        first = vlm(ids, random_images(1, seed=1)).logits
        second = vlm(ids, random_images(1, seed=2)).logits
        text_only = vlm.lm(ids).logits
    cut = len(prefix) + 1  # through <|image_start|>
    torch.testing.assert_close(first[:, :cut], text_only[:, :cut], rtol=0, atol=1e-6)
    torch.testing.assert_close(first[:, :cut], second[:, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(first[:, -1], second[:, -1])


def test_forward_passes_its_options_to_the_language_model(vlm, tok, markers):
    ids = torch.tensor([text(tok, "See") + block(markers, SHUFFLED.n_image_tokens) + text(tok, " it")])
    with torch.no_grad():
        full = vlm(ids, random_images(1))
        last = vlm(ids, random_images(1), last_only=True)
        weights = vlm(ids, random_images(1), return_attention=True)
    torch.testing.assert_close(last.logits, full.logits[:, -1:], rtol=0, atol=1e-5)
    assert weights.attentions[0].shape == (1, 2, ids.shape[1], ids.shape[1])


# ---------------------------------------------------------------------------------------------
# Bad image blocks


def slot_error_cases(markers: ImageMarkers, n: int):
    good = [5, *block(markers, n), 6]
    return [
        ([good], 2, "hold 1 image blocks but 2 images were given"),
        ([good], 0, "hold 1 image blocks but 0 images were given"),
        ([good + block(markers, n)], 1, "hold 2 image blocks but 1 images were given"),
        ([[5, *block(markers, n - 1), 6]], 1, f"row 0: an image block holds {n - 1} <\\|image\\|> slots, but the "
         f"encoder gives {n} tokens per image"),
        ([[5, *block(markers, n + 1), 6]], 1, f"holds {n + 1} <\\|image\\|> slots.*write exactly {n}"),
        ([[5, markers.slot, *block(markers, n)]], 1, "row 0: an <\\|image\\|> slot at position 1 stands outside"),
        ([[5, *block(markers, n)[:-1], 6]], 1, f"row 0: text token 6 at position {n + 2} stands inside an image block"),
        ([[5, 6, *block(markers, n)[:-1]]], 1, "row 0: an image block is never closed with <\\|image_end\\|>"),
        ([[markers.start, *block(markers, n), markers.end]], 1,
         "row 0: <\\|image_start\\|> at position 1 opens an image inside another"),
        ([[5, markers.end, *block(markers, n)]], 1, "row 0: <\\|image_end\\|> at position 1 closes no image"),
        ([good, [5, 6, 7, *block(markers, n)[:-1]]], 2, "row 1: an image block is never closed"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_image_blocks_are_refused_with_the_row_position_and_reason(vlm, markers, case):
    rows, n_images, message = slot_error_cases(markers, SHUFFLED.n_image_tokens)[case]
    ids = torch.tensor(rows)
    images = random_images(n_images) if n_images else None
    with pytest.raises(ValueError, match=message):
        vlm.embed(ids, images)


def test_a_tokenizer_without_image_markers_is_refused():
    fake = types.SimpleNamespace(name="plain", special_tokens={"<|image|>": 3, "<|im_end|>": 4})
    with pytest.raises(ValueError, match=r"'plain' lacks the image markers \['<\|image_start\|>', '<\|image_end\|>'\]"):
        ImageMarkers.of(fake)


# ---------------------------------------------------------------------------------------------
# Generation


def test_cached_generation_equals_uncached_generation(vlm, tok):
    examples = visual_math.benchmark(2, kinds=("digit",)) + visual_math.benchmark(1, kinds=("which_bar",))
    prompts = [prompt_ids(tok, e.question, SHUFFLED.n_image_tokens) for e in examples]
    for group in ([0, 1], [2]):  # same-length prompts batch together
        ids = torch.tensor([prompts[i] for i in group])
        images = images_tensor([examples[i] for i in group])
        cached = vlm.generate(ids, images, 8, use_cache=True)
        uncached = vlm.generate(ids, images, 8, use_cache=False)
        assert cached.shape == (len(group), 8) and cached.dtype == torch.long
        assert torch.equal(cached, uncached)
        with torch.no_grad():
            assert torch.equal(cached[:, 0], vlm(ids, images).logits[:, -1].argmax(-1))


def test_generation_continues_a_text_only_prompt_like_the_text_model(vlm, tok):
    ids = torch.tensor([text(tok, "Once upon a time")])
    assert torch.equal(vlm.generate(ids, None, 5), vlm.lm.generate(ids, 5)[:, ids.shape[1] :])


def test_generate_refuses_a_bad_length(vlm, tok, markers):
    ids = torch.tensor([text(tok, "Look") + block(markers, SHUFFLED.n_image_tokens)])
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            vlm.generate(ids, random_images(1), bad)
    with pytest.raises(ValueError, match=f"a {ids.shape[1]}-token prompt plus 256 new tokens exceeds the model's context of 256"):
        vlm.generate(ids, random_images(1), 256)


# ---------------------------------------------------------------------------------------------
# Prompts, batches, the answer-only loss


def test_prompt_ids_hold_one_image_block_and_match_the_chat_text(tok, markers):
    question = "How many red circles are there?"
    ids = prompt_ids(tok, question, 4)
    assert ids.count(markers.start) == ids.count(markers.end) == 1 and ids.count(markers.slot) == 4
    assert ids == tok.encode(chat_prompt(question, 4), allowed_special="all")
    assert tok.decode(ids) == chat_prompt(question, 4)
    assert answer_ids(tok, "12") == tok.encode("12") + [tok.special_tokens["<|im_end|>"]]


@pytest.mark.parametrize("special", ["<|image|>", "<|im_end|>", "<|image_start|>"])
def test_prompt_ids_refuse_special_token_text_in_the_question(tok, special):
    with pytest.raises(ValueError, match=f"special token '{special.replace('|', '[|]')}'"):
        prompt_ids(tok, f"What is {special} here?", 4)


def test_training_batch_scores_only_the_answer_and_its_end(tok):
    examples = [visual_math.benchmark(1, kinds=(kind,))[0] for kind in ("digit", "count", "bar_range")]
    examples.append(visual_math.Example("digit_sum", "What is the sum of the two digits?", "15", examples[0].image))
    n = 4
    ids, targets, images = training_batch(tok, examples, n)
    end = tok.special_tokens["<|im_end|>"]
    rows = [(prompt_ids(tok, e.question, n), answer_ids(tok, e.answer)) for e in examples]
    assert ids.shape == targets.shape == (4, max(len(p) + len(a) for p, a in rows) - 1)
    assert ids.dtype == targets.dtype == torch.long
    for row, (prompt, answer) in enumerate(rows):
        sequence = prompt + answer
        assert ids[row, : len(sequence) - 1].tolist() == sequence[:-1]
        assert (ids[row, len(sequence) - 1 :] == end).all()  # padding
        scored = targets[row] != -100
        assert scored.nonzero().squeeze(1).tolist() == list(range(len(prompt) - 1, len(sequence) - 1))
        assert targets[row, scored].tolist() == answer and answer[-1] == end
        assert tok.decode(answer[:-1]) == examples[row].answer
        # teacher forcing: each scored target is the next input token
        assert targets[row, len(prompt) - 1 : len(sequence) - 2].tolist() == ids[row, len(prompt) : len(sequence) - 1].tolist()
    assert torch.equal(images, torch.from_numpy(np.stack([e.image for e in examples])))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 16, 16)
    _, _, blind = training_batch(tok, examples, n, blind=True)
    assert blind.shape == images.shape and not blind.any()


def test_answer_loss_is_the_cross_entropy_over_the_answer_positions_only(vlm, tok):
    examples = [visual_math.benchmark(1, kinds=(kind,))[0] for kind in ("digit", "count", "bar_range")]
    ids, targets, images = training_batch(tok, examples, SHUFFLED.n_image_tokens)
    with torch.no_grad():
        loss = answer_loss(vlm, ids, targets, images)
        logits = vlm(ids, images).logits
        scored = targets != -100
        manual = F.cross_entropy(logits[scored], targets[scored])
        ignoring = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        # what unscored positions hold makes no difference: change every padding id after the answers
        padded = ids.clone()
        for row in range(len(ids)):
            padded[row, int(scored[row].nonzero().max()) + 1 :] = 42
        loss_padded = answer_loss(vlm, padded, targets, images)
        # but a different answer does
        other = targets.clone()
        other[scored] = (other[scored] + 1) % vlm.lm.config.vocab_size
        loss_other = answer_loss(vlm, ids, other, images)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ignoring, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_padded, loss, rtol=0, atol=1e-6)
    assert not torch.isclose(loss_other, loss)


def test_answer_loss_gradient_reaches_the_encoder(tok):
    model = tiny_vlm()
    examples = visual_math.benchmark(2, kinds=("digit",))
    ids, targets, images = training_batch(tok, examples, SHUFFLED.n_image_tokens)
    answer_loss(model, ids, targets, images).backward()
    assert model.encoder.patch_embedding.weight.grad.abs().sum() > 0
    assert model.projector.out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_swapped_images_keep_the_question_and_change_the_answer():
    examples = visual_math.benchmark(20)
    images, answers = swapped_images(examples, seed=3)
    assert images.shape == (len(examples), 3, 16, 16) and images.dtype == torch.float32
    assert len(answers) == len(examples)
    for example, image, answer in zip(examples, images.numpy(), answers):
        sources = [other for other in examples if np.array_equal(other.image, image)]
        assert sources and all(s.answer == answer and s.question == example.question for s in sources)
        assert answer != example.answer
    again, answers_again = swapped_images(examples, seed=3)
    assert torch.equal(images, again) and answers == answers_again


def test_swapped_images_refuse_a_question_asked_once():
    examples = visual_math.benchmark(3, kinds=("digit",))[:1]
    with pytest.raises(ValueError, match="no other example asks 'Which digit is this\\?' with a different answer"):
        swapped_images(examples)


def test_answer_questions_returns_one_string_per_example_in_order(vlm, tok):
    examples = [e for kind in ("digit", "which_bar", "count") for e in visual_math.benchmark(2, kinds=(kind,))]
    vlm.train()
    answers = answer_questions(vlm, examples, batch_size=3)
    assert vlm.training  # its mode is restored
    vlm.eval()
    assert len(answers) == len(examples) and all(isinstance(a, str) for a in answers)
    end = tok.special_tokens["<|im_end|>"]
    for example, answer in zip(examples, answers):  # each equals a generation of its own
        ids = torch.tensor([prompt_ids(tok, example.question, SHUFFLED.n_image_tokens)])
        new = vlm.generate(ids, images_tensor([example]), 3)[0].tolist()
        assert answer == tok.decode(new[: new.index(end)] if end in new else new)
    blind = answer_questions(vlm, examples, blind=True)
    swapped = answer_questions(vlm, examples, images=images_tensor(examples[::-1]))
    assert len(blind) == len(swapped) == len(examples) and all(isinstance(a, str) for a in blind + swapped)


def test_evaluate_reports_accuracy_and_the_image_swap_check(vlm):
    examples = visual_math.benchmark(6, kinds=("digit", "which_bar"))
    result = evaluate(vlm, examples)
    assert set(result["accuracy"]) == {"digit", "which_bar", "all"}
    assert len(result["predictions"]) == len(examples)
    assert set(result["swap"]) == {"digit", "which_bar"}
    for kind, swap in result["swap"].items():
        assert set(swap) == {"follows_image", "keeps_original"}
        assert 0 <= swap["follows_image"] <= 1 and 0 <= swap["keeps_original"] <= 1
        assert swap["follows_image"] + swap["keeps_original"] <= 1  # the two answers differ
    assert "swap" not in evaluate(vlm, examples, blind=True)


def test_answer_attention_is_a_share_over_the_image_grid(vlm):
    example = visual_math.benchmark(1, kinds=("digit",))[0]
    shares = answer_attention(vlm, example)
    assert shares.shape == (vlm.lm.config.n_layer, vlm.lm.config.n_head, SHUFFLED.token_grid, SHUFFLED.token_grid)
    assert (shares >= 0).all() and (shares.sum(dim=(-1, -2)) <= 1 + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_in_float32_is_exact(tmp_path, trained, tok):
    model, history, config = trained
    path = tmp_path / "vision.pt"
    save_vision_checkpoint(path, model, config, history, "float32", command="python -m minigpt.vision train")
    loaded, checkpoint = load_vision_checkpoint(path)
    assert loaded.vision_config == model.vision_config and loaded.lm.config == model.lm.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    examples = visual_math.benchmark(2, kinds=("digit",))
    ids, _, images = training_batch(tok, examples, TRAIN_VISION.n_image_tokens)
    with torch.no_grad():
        assert torch.equal(loaded(ids, images).logits, model(ids, images).logits)
    assert json.loads(checkpoint["history"]) == history
    assert json.loads(checkpoint["train_config"])["frozen_steps"] == 1
    assert checkpoint["command"] == "python -m minigpt.vision train"
    assert loaded.lm.lm_head.weight is loaded.lm.token_embedding.weight


def test_checkpoint_in_float16_stores_half_precision_once_per_tied_weight_and_loads_close(tmp_path, trained):
    model, history, config = trained
    path = tmp_path / "half.pt"
    save_vision_checkpoint(path, model, config, history)  # float16 by default
    raw = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.float16 for t in raw["model"].values())
    assert raw["model"]["lm.token_embedding.weight"].data_ptr() == raw["model"]["lm.lm_head.weight"].data_ptr()
    loaded, _ = load_vision_checkpoint(path)
    for name, value in model.state_dict().items():
        restored = loaded.state_dict()[name]
        assert restored.dtype == torch.float32
        torch.testing.assert_close(restored, value, rtol=1e-3, atol=1e-4)
    full = tmp_path / "full.pt"
    save_vision_checkpoint(full, model, config, history, "float32")
    assert path.stat().st_size < 0.6 * full.stat().st_size


def test_save_refuses_an_unknown_dtype(tmp_path, trained):
    model, history, config = trained
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_vision_checkpoint(tmp_path / "x.pt", model, config, history, "float64")


class RunsCode:
    """What a malicious pickle holds: unpickling it calls a function of the file's choosing."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.fixture(scope="module")
def refused(tmp_path_factory, trained):
    """Files the loader must refuse, each with words its one-line reason must contain."""
    folder = tmp_path_factory.mktemp("refused")
    model, history, config = trained
    good = folder / "good.pt"
    save_vision_checkpoint(good, model, config, history)
    (folder / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    (folder / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save({"model": RunsCode(), "vision_config": {}, "model_config": {}}, folder / "code.pt")
    return folder, {
        folder / "truncated.pt": "is not a readable minigpt vision checkpoint: the archive is incomplete or corrupt",
        folder / "random.pt": "is not a readable minigpt vision checkpoint: it is not a PyTorch checkpoint archive",
        folder / "code.pt": "is not a readable minigpt vision checkpoint: it holds pickled Python objects",
        CHECKPOINT_DIR / "nano.pt": "is a text-only checkpoint (no vision_config)",
    }


def test_refused_checkpoints_raise_checkpoint_error_in_one_line(refused, capsys):
    _, files = refused
    for path, reason in files.items():
        with pytest.raises(CheckpointError) as error:
            load_vision_checkpoint(path)
        message = str(error.value)
        assert message.startswith(f"{path} ") and reason in message, message
        assert "\n" not in message and "weights_only" not in message
    assert "this ran while loading" not in capsys.readouterr().out


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        load_vision_checkpoint(tmp_path / "absent.pt")


def test_command_line_evaluate_ends_on_a_refused_checkpoint_with_one_line(refused, tmp_path, capsys):
    folder, files = refused
    bad = folder / "truncated.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"python -m minigpt.vision: error: {bad} is not a readable minigpt vision checkpoint: ")
    for path in (folder / "code.pt", CHECKPOINT_DIR / "nano.pt", tmp_path / "absent.pt"):
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--checkpoint", str(path), "--per-kind", "1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and str(path) in err
    good = folder / "good.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(good), "--blind-checkpoint", str(bad), "--per-kind", "20",
              "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_command_line_evaluate_writes_the_report(refused, tmp_path, capsys):
    folder, _ = refused
    out = tmp_path / "report.json"
    main(["evaluate", "--checkpoint", str(folder / "good.pt"), "--per-kind", "20", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["kinds"] == list(visual_math.KINDS) and report["per_kind"] == 20
    assert set(report["accuracy"]) == {*visual_math.KINDS, "all"} and set(report["swap"]) == set(visual_math.KINDS)
    assert report["chance"]["digit"] == pytest.approx(0.1) and report["train_steps"] == 3
    assert len(report["predictions"]) == len(report["questions"]) == 100
    assert report["command"].startswith("python -m minigpt.vision evaluate --checkpoint")
    printed = capsys.readouterr().out
    assert "all" in printed and f"-> {out}" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per-kind", "0"], "per_kind must be a positive integer, got 0"),
        (["--per-kind", "5"], "no other example asks"),  # too few questions for the image-swap check
    ],
)
def test_command_line_evaluate_ends_on_a_bad_value_with_one_line(refused, tmp_path, capsys, flags, message):
    """Bad values reach the package's ValueError; the command line should end with it in one line
    (exit 2) like every other refusal, not with a traceback."""
    folder, _ = refused
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(folder / "good.pt"), "--out", str(tmp_path / "r.json"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err


def test_command_line_evaluate_refuses_a_blind_checkpoint_that_was_not_trained_blind(refused, tmp_path, capsys):
    folder, _ = refused
    good = str(folder / "good.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", good, "--blind-checkpoint", good, "--per-kind", "20",
              "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "was not trained blind" in err


def test_command_line_train_saves_a_checkpoint_with_its_flags_and_command(tmp_path, capsys):
    out = tmp_path / "v.pt"
    main(["train", "--init-from", str(CHECKPOINT_DIR / "nano.pt"), "--frozen-steps", "1", "--steps", "1",
          "--batch-size", "2", "--vision-n-layer", "1", "--vision-n-embd", "16", "--vision-n-head", "2",
          "--vision-pixel-shuffle", "2", "--vision-projector-hidden", "16", "--kinds", "digit", "--blind",
          "--save-dtype", "float32", "--out", str(out)])
    model, checkpoint = load_vision_checkpoint(out)
    assert model.vision_config == VisionConfig(n_layer=1, n_head=2, n_embd=16, pixel_shuffle=2, projector_hidden=16)
    train_config = json.loads(checkpoint["train_config"])
    assert train_config["blind"] and train_config["kinds"] == ["digit"] and train_config["steps"] == 1
    assert checkpoint["command"].startswith("python -m minigpt.vision train --init-from")
    assert json.loads(checkpoint["history"])["step"] == [1, 2]
    assert f"-> {out}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Training


def test_the_frozen_phase_trains_the_image_path_and_leaves_the_language_model_unchanged():
    lm = tiny_lm()
    before = {name: value.clone() for name, value in lm.state_dict().items()}
    config = VisionTrainConfig(frozen_steps=2, steps=0, batch_size=4, seed=0)
    torch.manual_seed(config.seed)
    initial = VisionLanguageModel(TRAIN_VISION, tiny_lm())  # the encoder train_vision starts from
    model, history = train_vision(config, TRAIN_VISION, progress=False, lm=lm)
    assert model.lm is lm and history["step"] == [1, 2] and history["frozen_steps"] == 2
    for name, value in lm.state_dict().items():
        assert torch.equal(value, before[name]), name
    for part in ("encoder", "projector"):
        start, end = getattr(initial, part).state_dict(), getattr(model, part).state_dict()
        assert any(not torch.equal(start[name], end[name]) for name in start), part
    assert all(p.requires_grad for p in lm.parameters())  # unfrozen again for whoever uses it next
    assert not model.training


def test_the_joint_phase_trains_the_language_model_too():
    lm = tiny_lm()
    before = {name: value.clone() for name, value in lm.state_dict().items()}
    train_vision(VisionTrainConfig(frozen_steps=0, steps=1, batch_size=4), TRAIN_VISION, progress=False, lm=lm)
    assert any(not torch.equal(value, before[name]) for name, value in lm.state_dict().items())


def test_the_same_seed_gives_the_same_history_and_another_seed_does_not():
    config = VisionTrainConfig(frozen_steps=1, steps=1, batch_size=4, seed=7)
    first, a = train_vision(config, TRAIN_VISION, progress=False, lm=tiny_lm())
    second, b = train_vision(config, TRAIN_VISION, progress=False, lm=tiny_lm())
    _, c = train_vision(replace(config, seed=8), TRAIN_VISION, progress=False, lm=tiny_lm())
    assert a["train_loss"] == b["train_loss"] and a["step"] == [1, 2]
    assert all(math.isfinite(loss) and loss > 0 for loss in a["train_loss"])
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert a["train_loss"] != c["train_loss"]


def test_a_time_budget_stops_training_early():
    _, history = train_vision(VisionTrainConfig(frozen_steps=5, steps=5, batch_size=2, time_budget=0.0),
                              TRAIN_VISION, progress=False, lm=tiny_lm())
    assert history["step"] == [1]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(frozen_steps=-1), "frozen_steps and steps must be non-negative .* got -1 and 2"),
        (dict(steps=-1), "frozen_steps and steps must be non-negative .* got 1 and -1"),
        (dict(frozen_steps=0, steps=0), "at least one step in all, got 0 and 0"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(kinds=("digit", "colour")), "question types must be some of"),
    ],
)
def test_bad_training_settings_are_refused(change, message):
    config = replace(VisionTrainConfig(frozen_steps=1, steps=2, batch_size=4), **change)
    with pytest.raises(ValueError, match=message):
        train_vision(config, TRAIN_VISION, progress=False, lm=tiny_lm())


def test_every_shipped_vision_checkpoint_records_the_command_that_made_it():
    """The shipped vision checkpoints carry a `python -m minigpt.vision train` command whose options
    the command line accepts and whose settings are the checkpoint's own."""
    paths = [p for p in sorted(CHECKPOINT_DIR.glob("*.pt")) if "vision_config" in torch.load(p, weights_only=True)]
    assert any(p.name == "mini-vision.pt" for p in paths)
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        arguments = shlex.split(checkpoint["command"])
        assert arguments[:4] == ["python", "-m", "minigpt.vision", "train"], path.name
        recorded = json.loads(checkpoint["train_config"])
        history = json.loads(checkpoint["history"])
        assert history["step"][-1] == recorded["frozen_steps"] + recorded["steps"], path.name
        steps = int(arguments[arguments.index("--steps") + 1]) if "--steps" in arguments else VisionTrainConfig().steps
        assert steps == recorded["steps"], path.name
