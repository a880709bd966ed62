"""Worked solutions to the exercises of notebook 05 (vision: images in, text out).

Try each exercise in the notebook first; the checks there say whether you are right without giving
the answer away. Each solution is plain torch, and its docstring explains the reasoning.
"""

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Exercise 1: cut images `(B, C, H, W)` into flattened patches `(B, n_patches, patch_size**2 * C)`.

    A reshape never moves a number in memory, so it cannot gather a square patch by itself: first
    split the height into (patch row, pixel row in the patch) and the width into (patch column,
    pixel column), both free reshapes. Then reorder the axes into the order the vectors must read:
    patch row, patch column (so the patches come row by row), then pixel row, pixel column and
    channel (so inside a patch the pixels go row by row, the channels of one pixel side by side).
    The last reshape merges the two patch axes into one and the three pixel axes into one vector;
    after the permute it copies, which is what puts each square's pixels next to each other.
    """
    batch, channels, height, width = images.shape  # (B, C, H, W)
    rows, columns = height // patch_size, width // patch_size  # patches along each side
    grid = images.reshape(batch, channels, rows, patch_size, columns, patch_size)  # (B, C, gh, ph, gw, pw)
    grid = grid.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, ph, pw, C)
    return grid.reshape(batch, rows * columns, patch_size * patch_size * channels)  # (B, n_patches, ph * pw * C)


def image_tokens(image_size: int, patch_size: int, pixel_shuffle: int) -> int:
    """Exercise 2: the `<|image|>` slots one square image fills in the language model's sequence.

    The encoder makes one vector per patch: `image_size // patch_size` patches along each side, so
    a square grid of that many squared. Pixel shuffle then concatenates each
    `pixel_shuffle x pixel_shuffle` block of neighbouring patches into one token, dividing each
    side by `pixel_shuffle` and the count by its square. The `<|image_start|>` and `<|image_end|>`
    markers around the block are ordinary tokens of the text, not slots. For the course's model
    (16-pixel images, 4-pixel patches, no shuffle) that is a 4 x 4 grid: 16 slots.
    """
    patches_per_side = image_size // patch_size
    tokens_per_side = patches_per_side // pixel_shuffle
    return tokens_per_side**2


def splice(token_embeddings: torch.Tensor, idx: torch.Tensor, image_embeddings: torch.Tensor,
           slot_id: int) -> torch.Tensor:
    """Exercise 3: put the image vectors in place of the `<|image|>` slots' embeddings.

    `idx == slot_id` marks the slots `(B, T)`. Indexing a `(B, T, D)` tensor with that boolean mask
    picks the marked positions in reading order, row by row and left to right within a row, as
    `(n_slots, D)`. Flattening the images `(n_images, n_tokens, D)` to `(n_images * n_tokens, D)`
    lists their vectors in the same order: the first image's tokens first. Assigning one to the
    other replaces the slots (rather than adding to them) and touches nothing else. Cloning first
    leaves the caller's embeddings as they were.
    """
    spliced = token_embeddings.clone()  # (B, T, D)
    slots = idx == slot_id  # (B, T)
    width = token_embeddings.shape[-1]
    spliced[slots] = image_embeddings.reshape(-1, width).to(spliced.dtype)  # (n_slots, D), in reading order
    return spliced
