"""Notebook 05's exercise checks (minigpt/exercises/vision.py) against the worked solutions."""

import pytest
import torch
from conftest import assert_rejected, load_solutions, unsolved
from einops import rearrange

from minigpt.exercises import UNSOLVED_HINT
from minigpt.exercises import vision as ex
from minigpt.vision import ImageMarkers, VisionConfig, check_image_slots, splice_images

solutions = load_solutions("vision")
PATCHIFY_CODE = ("permute(0, 2, 4, 3, 5, 1)", "(ph pw c)", "rearrange")  # what a hint must not give away
SPLICE_CODE = ("masked_scatter", "[slots] =", "reshape(-1")


def _raises(*args):
    raise RuntimeError("shape mismatch in my code")


# --- Exercise 1: cut an image into patches -----------------------------------------------------


def _channels_first(images, p):  # (c ph pw) inside a patch
    return rearrange(images, "b c (gh ph) (gw pw) -> b (gh gw) (c ph pw)", ph=p, pw=p)


def _column_major(images, p):  # patches down the columns
    return rearrange(images, "b c (gh ph) (gw pw) -> b (gw gh) (ph pw c)", ph=p, pw=p)


def _pixel_columns_first(images, p):  # inside a patch, down the pixel columns
    return rearrange(images, "b c (gh ph) (gw pw) -> b (gh gw) (pw ph c)", ph=p, pw=p)


def _plain_reshape(images, p):  # no permute: runs of memory, not squares
    return images.reshape(images.shape[0], -1, p * p * images.shape[1])


def _channels_last_rows(images, p):  # channels moved last, then runs along each pixel row
    return images.permute(0, 2, 3, 1).reshape(images.shape[0], -1, p * p * images.shape[1])


def _one_vector_per_image(images, p):  # wrong shape
    return images.reshape(images.shape[0], -1)


def test_patchify_accepts_the_solution():
    assert ex.check_patchify(solutions.patchify)


@pytest.mark.parametrize("wrong, words", [
    (_channels_first, "channels must vary fastest"),
    (_column_major, "row by row"),
    (_pixel_columns_first, "down the columns"),
    (_plain_reshape, "memory order"),
    (_channels_last_rows, "not square patches"),
    (_one_vector_per_image, "one vector per patch"),
    (lambda images, p: solutions.patchify(images, p).flip(-1), "wrong order"),  # each vector backwards
    (lambda images, p: solutions.patchify(images.transpose(2, 3), p), "the k-th square patch"),  # transposed
])
def test_patchify_rejects_typical_mistakes_and_names_them(wrong, words):
    verdict = ex.check_patchify(wrong)
    assert_rejected(verdict, *PATCHIFY_CODE)
    assert words in verdict.hint


def test_patchify_rejects_the_template_and_a_raising_function():
    verdict = ex.check_patchify(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    raised = ex.check_patchify(_raises)
    assert not raised and "RuntimeError" in raised.hint


# --- Exercise 2: image tokens per image -------------------------------------------------------


def _expected_counts():
    return [VisionConfig(image_size=size, patch_size=patch, pixel_shuffle=shuffle).n_image_tokens
            for size, patch, shuffle in ex.IMAGE_TOKEN_CASES]


def test_image_token_count_accepts_the_solution_and_matches_the_course_model():
    assert ex.check_image_token_count(solutions.image_tokens)
    default = VisionConfig()
    count = solutions.image_tokens(default.image_size, default.patch_size, default.pixel_shuffle)
    assert count == default.n_image_tokens


@pytest.mark.parametrize("wrong, words", [
    (lambda size, patch, shuffle: size // patch // shuffle, "one side only"),  # forgot the square
    (lambda size, patch, shuffle: (size // patch) ** 2, "pixel shuffle is left out"),
    (lambda size, patch, shuffle: (size // patch) ** 2 // shuffle, "not by the size of the block"),
    (lambda size, patch, shuffle: size**2 // shuffle**2, "counts pixels"),
    (lambda size, patch, shuffle: (size // patch // shuffle) ** 2 + 2, "markers"),  # start and end counted
    (lambda size, patch, shuffle: (size / patch / shuffle) ** 2, "an int"),  # a float
    (lambda size, patch, shuffle: (size // patch // shuffle) ** 2 - 1, "the count is off"),
])
def test_image_token_count_rejects_typical_mistakes_and_names_them(wrong, words):
    verdict = ex.check_image_token_count(wrong)
    assert_rejected(verdict, *_expected_counts())
    assert words in verdict.hint


def test_image_token_count_rejects_the_template_a_raising_function_and_a_non_number():
    verdict = ex.check_image_token_count(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    assert "RuntimeError" in ex.check_image_token_count(_raises).hint
    assert ex.check_image_token_count(lambda size, patch, shuffle: "16 tokens").hint.startswith("return")


# --- Exercise 3: splice images into the sequence ---------------------------------------------


def _column_major_splice(embeddings, idx, images, slot_id):  # slots taken position by position across rows
    return splice_images(embeddings.transpose(0, 1), idx.T, images, slot_id).transpose(0, 1)


def _reversed_images(embeddings, idx, images, slot_id):
    return splice_images(embeddings, idx, images.flip(0), slot_id)


def _added(embeddings, idx, images, slot_id):  # image vectors added to the slot embeddings
    slots = idx == slot_id
    spliced = embeddings.clone()
    spliced[slots] += images.reshape(-1, embeddings.shape[-1])
    return spliced


def _first_row_only(embeddings, idx, images, slot_id):
    spliced = embeddings.clone()
    slots = idx[0] == slot_id
    spliced[0, slots] = images.reshape(-1, embeddings.shape[-1])[: int(slots.sum())]
    return spliced


def _in_place(embeddings, idx, images, slot_id):  # right values, but the caller's tensor is overwritten
    embeddings[idx == slot_id] = images.reshape(-1, embeddings.shape[-1])
    return embeddings


def _text_zeroed(embeddings, idx, images, slot_id):
    return splice_images(torch.zeros_like(embeddings), idx, images, slot_id)


def _reversed_tokens(embeddings, idx, images, slot_id):
    return splice_images(embeddings, idx, images.flip(1), slot_id)


def test_splice_cases_are_well_formed_image_blocks():
    for embeddings, idx, images, slot_id in ex._splice_cases():
        markers = ImageMarkers(slot_id - 1, slot_id, slot_id + 1)
        check_image_slots(idx, images.shape[0], images.shape[1], markers)
        assert embeddings.shape == (*idx.shape, images.shape[-1])


def test_splice_accepts_the_solution():
    assert ex.check_splice(solutions.splice)


@pytest.mark.parametrize("wrong, words", [
    (_column_major_splice, "reading order"),
    (_reversed_images, "wrong order"),
    (_reversed_tokens, "backwards"),
    (_added, "must replace them"),
    (_first_row_only, "every row"),
    (_in_place, "changed the token_embeddings"),
    (_text_zeroed, "not an <|image|> slot"),
    (lambda embeddings, idx, images, slot_id: images, "the shape of token_embeddings"),
    (lambda embeddings, idx, images, slot_id: embeddings.clone(), "must take their place"),  # nothing spliced
    (lambda embeddings, idx, images, slot_id: splice_images(embeddings, idx, images.roll(1, dims=1), slot_id),
     "the wrong vectors"),
])
def test_splice_rejects_typical_mistakes_and_names_them(wrong, words):
    verdict = ex.check_splice(wrong)
    assert_rejected(verdict, *SPLICE_CODE)
    assert words in verdict.hint


def test_splice_rejects_the_template_and_a_raising_function():
    verdict = ex.check_splice(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    raised = ex.check_splice(_raises)
    assert not raised and "RuntimeError" in raised.hint
