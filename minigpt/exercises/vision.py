"""Checks for the exercises of notebook 05 (vision: images in, text out).

1. `check_patchify`: an image batch cut into flattened patches, against `minigpt.vision.patchify`.
2. `check_image_token_count`: how many `<|image|>` slots one image fills, against
   `minigpt.vision.VisionConfig.n_image_tokens`.
3. `check_splice`: image vectors put in place of the `<|image|>` slots' embeddings, against
   `minigpt.vision.splice_images`.

Every expected value is computed here with the package's own code; no hint contains one.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from einops import rearrange

from minigpt.exercises import CheckResult, call, call_for_tensor, not_yet, right
from minigpt.vision import VisionConfig, patchify, splice_images

PATCHIFY = "Exercise 1 (cut an image into patches)"
IMAGE_TOKENS = "Exercise 2 (image tokens per image)"
SPLICE = "Exercise 3 (splice images into the sequence)"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=0.0, atol=1e-6)


# --- Exercise 1: cut an image into patches -----------------------------------------------------

PATCHIFY_CASES = [  # (image shape (B, C, H, W), patch_size): square and wide images, 1 to 3 channels
    ((2, 3, 16, 16), 4),
    ((1, 3, 8, 12), 2),
    ((2, 2, 6, 9), 3),
    ((1, 1, 4, 8), 2),
    ((1, 3, 4, 4), 4),
]


def _patchify_mistakes(images: torch.Tensor, patch_size: int) -> list[tuple[torch.Tensor, str]]:
    """What the typical wrong answers return on `images`, each with the hint that names its mistake."""
    batch, channels = images.shape[:2]
    p = {"ph": patch_size, "pw": patch_size}
    return [
        (rearrange(images, "b c (gh ph) (gw pw) -> b (gh gw) (c ph pw)", **p),
         "inside a patch the channels must vary fastest: the channels of the patch's first pixel side by "
         "side, then those of the next pixel. Your vectors group each channel's pixels together."),
        (rearrange(images, "b c (gh ph) (gw pw) -> b (gw gh) (ph pw c)", **p),
         "the patches go column by column; they must go in reading order, row by row: the whole top row "
         "of patches first, left to right, then the next row."),
        (rearrange(images, "b c (gh ph) (gw pw) -> b (gh gw) (pw ph c)", **p),
         "inside a patch, take the pixels row by row: the patch's top row of pixels left to right, then "
         "its next row (yours goes down the columns)."),
        (images.reshape(batch, -1, patch_size * patch_size * channels),
         "a reshape alone keeps the numbers in memory order, so each vector is a run of consecutive "
         "values, not a square patch of pixels: split the height and the width into (patches, pixels in "
         "a patch), reorder the axes, then flatten."),
        (images.permute(0, 2, 3, 1).reshape(batch, -1, patch_size * patch_size * channels),
         "with the channels moved last, a reshape still cuts runs of pixels along each row of the image, "
         "not square patches: split the height and the width into (patches, pixels in a patch) first."),
    ]


def check_patchify(patchify_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> CheckResult:
    """Exercise 1: `patchify_fn(images, patch_size)`, with `images` `(B, C, H, W)`, must return
    `(B, n_patches, patch_size * patch_size * C)` exactly as `minigpt.vision.patchify` does: the
    patches row by row, and inside a patch the pixel rows, then the pixel columns, with the channels
    of one pixel side by side. Tried on seeded random images, square and wide, with 1 to 3 channels."""
    generator = torch.Generator().manual_seed(5)
    for shape, patch_size in PATCHIFY_CASES:
        images = torch.rand(shape, generator=generator)
        result, verdict = call_for_tensor(PATCHIFY, patchify_fn, images.clone(), patch_size)
        if verdict is not None:
            return verdict
        expected = patchify(images, patch_size)
        if result.shape != expected.shape:
            return not_yet(PATCHIFY, f"for images of shape {shape} and patch_size {patch_size} the result is "
                                     "(B, n_patches, patch_size * patch_size * C), one vector per patch; got "
                                     f"{tuple(result.shape)}.")
        if _same(result, expected):
            continue
        for mistake, hint in _patchify_mistakes(images, patch_size):
            if _same(result, mistake):
                return not_yet(PATCHIFY, hint)
        if _same(result.sort(dim=-1).values, expected.sort(dim=-1).values):
            return not_yet(PATCHIFY, "each vector holds the right patch's pixels, in the wrong order: pixel "
                                     "rows, then pixel columns, and the channels of one pixel side by side.")
        return not_yet(PATCHIFY, f"for images {shape} with patch_size {patch_size} the vectors do not hold the "
                                 "patches' pixels: vector k must hold exactly the pixels of the k-th square "
                                 "patch, counting row by row. Print one small image beside your patches.")
    return right(PATCHIFY)


# --- Exercise 2: image tokens per image -------------------------------------------------------

IMAGE_TOKEN_CASES = [  # (image_size, patch_size, pixel_shuffle)
    (16, 4, 1),  # the course's model: a 4 x 4 grid of patches
    (16, 2, 2),
    (32, 4, 2),
    (24, 4, 3),
    (16, 8, 1),
    (64, 4, 4),
]


def _image_token_mistakes(image_size: int, patch_size: int, shuffle: int) -> list[tuple[int, str]]:
    """What the typical wrong answers count, each with the hint that names its mistake."""
    grid = image_size // patch_size
    return [
        (grid // shuffle, "that counts the tokens along one side only: the image is a square grid of them."),
        (grid**2, "pixel shuffle is left out: it merges each pixel_shuffle x pixel_shuffle block of patches "
                  "into one token."),
        (grid**2 // shuffle, "pixel shuffle merges a square block of patches, pixel_shuffle along each side, "
                             "into one token; you divided by its side, not by the size of the block."),
        (image_size**2 // shuffle**2, "that counts pixels: one token stands for a patch of "
                                      "patch_size x patch_size pixels."),
        ((grid // shuffle) ** 2 + 2, "the <|image_start|> and <|image_end|> markers are tokens of their own, "
                                     "not <|image|> slots: count the slots only."),
    ]


def check_image_token_count(count_fn: Callable[[int, int, int], int]) -> CheckResult:
    """Exercise 2: `count_fn(image_size, patch_size, pixel_shuffle)` must give the number of
    `<|image|>` slots one square image fills in the language model's sequence, equal to
    `minigpt.vision.VisionConfig(...).n_image_tokens`, on the course's model and five other shapes
    with and without pixel shuffle."""
    for image_size, patch_size, shuffle in IMAGE_TOKEN_CASES:
        value, verdict = call(IMAGE_TOKENS, count_fn, image_size, patch_size, shuffle)
        if verdict is not None:
            return verdict
        expected = VisionConfig(image_size=image_size, patch_size=patch_size, pixel_shuffle=shuffle).n_image_tokens
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == expected:
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return not_yet(IMAGE_TOKENS, f"return a number of slots, an int (got a {type(value).__name__}).")
        if value == expected:
            return not_yet(IMAGE_TOKENS, "return a whole number of slots, an int: `/` gives a float, `//` an int.")
        for mistake, hint in _image_token_mistakes(image_size, patch_size, shuffle):
            if value == mistake:
                return not_yet(IMAGE_TOKENS, hint)
        return not_yet(IMAGE_TOKENS, "the count is off: how many patches fit along one side, how many tokens "
                                     "after pixel shuffle along one side, then how many in the whole square?")
    return right(IMAGE_TOKENS)


# --- Exercise 3: splice images into the sequence ---------------------------------------------

IMAGE = "image"  # in a layout: one <|image_start|>, the image's <|image|> slots, one <|image_end|>
SPLICE_CASES = [  # (rows of the batch as layouts, tokens per image, slot id): text runs and images
    ([(2, IMAGE, 3), (4, IMAGE, 1)], 4, 61),  # two rows, one image each, at different positions
    ([(1, IMAGE, 2, IMAGE, 2)], 3, 70),  # one row holding two images
    ([(IMAGE, 7), (11,), (3, IMAGE, IMAGE)], 2, 55),  # three rows: one image, none, two
]
WIDTH = 8  # D, the width of every embedding in the splice cases


def _token_ids(layouts: list[tuple], tokens_per_image: int, slot_id: int, generator: torch.Generator) -> torch.Tensor:
    """Ids `(B, T)` for rows written as layouts of one length: an int is that many random text ids
    (below 50), `IMAGE` an image block (start marker `slot_id - 1`, the slots, end marker `slot_id + 1`)."""
    rows = []
    for layout in layouts:
        row = []
        for part in layout:
            if part == IMAGE:
                row += [slot_id - 1] + [slot_id] * tokens_per_image + [slot_id + 1]
            else:
                row += torch.randint(0, 50, (part,), generator=generator).tolist()
        rows.append(row)
    return torch.tensor(rows)


def _splice_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(token embeddings `(B, T, D)`, ids `(B, T)`, image embeddings `(n_images, n_tokens, D)`, slot id)."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for layouts, tokens_per_image, slot_id in SPLICE_CASES:
        idx = _token_ids(layouts, tokens_per_image, slot_id, generator)
        n_images = sum(layout.count(IMAGE) for layout in layouts)
        token_embeddings = torch.randn(*idx.shape, WIDTH, generator=generator)
        image_embeddings = torch.randn(n_images, tokens_per_image, WIDTH, generator=generator)
        cases.append((token_embeddings, idx, image_embeddings, slot_id))
    return cases


def _splice_mistakes(token_embeddings: torch.Tensor, idx: torch.Tensor, image_embeddings: torch.Tensor,
                     slot_id: int) -> list[tuple[torch.Tensor, str]]:
    """What the typical wrong answers return, each with the hint that names its mistake."""
    slots = (idx == slot_id)[..., None]  # (B, T, 1)
    expected = splice_images(token_embeddings, idx, image_embeddings, slot_id)
    down_columns = splice_images(token_embeddings.transpose(0, 1), idx.T, image_embeddings, slot_id).transpose(0, 1)
    return [
        (expected + token_embeddings * slots,
         "the image vectors are added to the slots' embeddings; they must replace them."),
        (down_columns,
         "the slots are filled position by position across the rows of the batch (down the columns); "
         "fill them in reading order: all of the first row's slots, then the next row's."),
        (splice_images(token_embeddings, idx, image_embeddings.flip(0), slot_id),
         "the images go in the wrong order: the first image fills the first block of slots in reading order."),
        (splice_images(token_embeddings, idx, image_embeddings.flip(1), slot_id),
         "each image's tokens go in backwards: its first token fills the first slot of its block."),
    ]


def check_splice(splice_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]) -> CheckResult:
    """Exercise 3: `splice_fn(token_embeddings, idx, image_embeddings, slot_id)` must return a new
    `(B, T, D)` tensor equal to `minigpt.vision.splice_images`: the rows of `token_embeddings` where
    `idx == slot_id` replaced, in reading order, by the image vectors `(n_images, n_tokens, D)`, every
    other position unchanged, and `token_embeddings` itself left as it was. Tried on a batch of two
    rows with one image each, one row holding two images, and three rows holding one, none and two."""
    for token_embeddings, idx, image_embeddings, slot_id in _splice_cases():
        given = token_embeddings.clone()
        result, verdict = call_for_tensor(SPLICE, splice_fn, given, idx.clone(), image_embeddings.clone(), slot_id)
        if verdict is not None:
            return verdict
        if result.shape != token_embeddings.shape:
            return not_yet(SPLICE, f"return the sequence with the images spliced in, the shape of token_embeddings "
                                   f"{tuple(token_embeddings.shape)}; got {tuple(result.shape)}.")
        expected = splice_images(token_embeddings, idx, image_embeddings, slot_id)
        if _same(result, expected):
            if not torch.equal(given, token_embeddings):
                return not_yet(SPLICE, "your function changed the token_embeddings it was given: clone them and "
                                       "return the new tensor, so the caller's embeddings stay as they were.")
            continue
        for mistake, hint in _splice_mistakes(token_embeddings, idx, image_embeddings, slot_id):
            if _same(result, mistake):
                return not_yet(SPLICE, hint)
        slots = idx == slot_id  # (B, T)
        if not _same(result[~slots], token_embeddings[~slots]):
            return not_yet(SPLICE, "a position that is not an <|image|> slot changed: text and the image markers "
                                   "must keep their embeddings.")
        rows_with_slots = [row for row in range(idx.shape[0]) if slots[row].any()]
        unfilled = [row for row in rows_with_slots if _same(result[row, slots[row]], token_embeddings[row, slots[row]])]
        if unfilled == rows_with_slots:
            return not_yet(SPLICE, "the <|image|> slots still hold their token embeddings: the image vectors "
                                   "must take their place.")
        if unfilled:
            return not_yet(SPLICE, f"the slots of row {unfilled[0]} of the batch still hold their token embeddings: "
                                   "fill the slots of every row, not only the first.")
        return not_yet(SPLICE, "the slots hold the wrong vectors: take the images in order, and each image's "
                               "tokens in order, filling the slots row by row, left to right.")
    return right(SPLICE)
