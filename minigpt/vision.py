"""Images in, text out: a vision transformer (ViT) trained from scratch, a projector, and image
tokens spliced into the language model's sequence.

    python -m minigpt.vision train --seed 0 --out data/checkpoints/mini-vision.pt
    python -m minigpt.vision train --seed 0 --blind --out data/checkpoints/mini-vision-blind.pt
    python -m minigpt.vision evaluate --checkpoint data/checkpoints/mini-vision.pt \
        --blind-checkpoint data/checkpoints/mini-vision-blind.pt

The path an image takes:

1. `patchify`: the image `(B, C, H, W)` in [0, 1] is cut into `patch_size` squares, each flattened
   to a vector `(B, n_patches, patch_size * patch_size * C)`.
2. `VisionEncoder`: a linear patch embedding, a learned 2D position (row embedding + column
   embedding), and pre-norm transformer blocks whose attention has no causal mask: every patch
   sees every other, because an image has no reading order.
3. `Projector`: optionally `pixel_shuffle` (each 2 x 2 block of patch vectors concatenated into one,
   a quarter of the tokens, as SmolVLM does), then a two-layer MLP into the language model's width.
4. `splice_images`: the chat text holds `<|image_start|>`, one `<|image|>` per image token and
   `<|image_end|>`; the projected vectors replace the `<|image|>` embeddings and the language model
   runs on the result through `GPT.forward_embeddings`. Text without images is embedded exactly as
   the text model embeds it.

The mask: image tokens sit in the language model under the same causal mask as text. The encoder
has already mixed the patches with full (bidirectional) attention, so each image token carries the
whole image before the language model sees it; keeping one causal mask means the KV cache, cached
generation and every attention implementation work unchanged. (A bidirectional block inside each
image, as PaliGemma's prefix-LM does, would need a custom mask threaded through all three.)
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from minigpt import visual_math
from minigpt.attention import attention, sdpa_attention
from minigpt.model import GPT, GPTConfig, RMSNorm, SwiGLU
from minigpt.tokenizer import Tokenizer
from minigpt.train import (CHECKPOINT_DIR, SAVE_DTYPES, CheckpointError, checkpoint_weights, load_checkpoint,
                           load_tokenizer, optimizer_step, refusal_reason, weight_decay_groups)

RESULTS_DIR = CHECKPOINT_DIR.parent / "vision"
IMAGE_MARKERS = ("<|image_start|>", "<|image|>", "<|image_end|>")


@dataclass(frozen=True)
class VisionConfig:
    """The shape of the image path: encoder and projector. Stored in every vision checkpoint."""

    image_size: int = 16  # pixels on a side (square images)
    channels: int = 3  # red, green, blue
    patch_size: int = 4  # pixels on a side of one patch
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    pixel_shuffle: int = 1  # 1: one token per patch; 2: one per 2 x 2 block of patches (a quarter)
    projector_hidden: int = 256
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "n_layer", "n_head", "n_embd", "pixel_shuffle",
                     "projector_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.grid % self.pixel_shuffle:
            raise ValueError(f"pixel_shuffle ({self.pixel_shuffle}) must divide the patch grid ({self.grid} patches a side)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def grid(self) -> int:
        """Patches along each side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def token_grid(self) -> int:
        """Image tokens along each side, after pixel shuffle."""
        return self.grid // self.pixel_shuffle

    @property
    def n_image_tokens(self) -> int:
        """`<|image|>` slots one image fills in the language model's sequence."""
        return self.token_grid**2


# --- checking and cutting images ------------------------------------------------------------------


def check_images(images: object, config: VisionConfig) -> None:
    """Raise a clear error unless `images` is a float tensor `(B, C, H, W)` in [0, 1] that fits `config`."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch tensor (B, C, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point with values in [0, 1], got {images.dtype} "
                        "(for 8-bit pixels, divide by 255)")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}")
    _, channels, height, width = images.shape
    if channels != config.channels:
        raise ValueError(f"images must have {config.channels} channels (red, green, blue), got {channels} "
                         "(channels come second: (B, C, H, W))")
    if height % config.patch_size or width % config.patch_size:
        raise ValueError(f"image size {height} x {width} is not divisible by the patch size {config.patch_size}")
    if (height, width) != (config.image_size, config.image_size):
        raise ValueError(f"this encoder reads {config.image_size} x {config.image_size} images (its position "
                         f"embeddings cover a {config.grid} x {config.grid} grid), got {height} x {width}")
    if torch.isnan(images).any():
        raise ValueError("images contain NaN values; every pixel must be a number in [0, 1]")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"pixel values must lie in [0, 1], found {images.min().item():.3g} to {images.max().item():.3g}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, C, H, W)` to `(B, n_patches, patch_size * patch_size * C)`, patches in reading order (row by row)."""
    return rearrange(images, "b c (gh ph) (gw pw) -> b (gh gw) (ph pw c)", ph=patch_size, pw=patch_size)


def pixel_shuffle(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """Concatenate each `factor x factor` block of neighbouring patch vectors into one:
    `(B, grid * grid, D)` to `(B, (grid / factor)^2, factor^2 * D)`, a factor^2 shorter sequence."""
    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1] or grid % factor:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by {factor}, got {patches.shape[1]} patches")
    return rearrange(patches, "b (gh fh gw fw) d -> b (gh gw) (fh fw d)", fh=factor, fw=factor, gh=grid // factor)


# --- the encoder and projector --------------------------------------------------------------------


class EncoderAttention(nn.Module):
    """Multi-head self-attention over patches: the package's attention with `causal=False`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n_head = config.n_head
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = rearrange(self.query_key_value(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        weights = None
        if return_weights:
            y, weights = attention(q, k, v, causal=False, return_weights=True)  # weights (B, H, T, T)
        else:
            y = sdpa_attention(q, k, v, causal=False)
        return self.out(rearrange(y, "b h t d -> b t (h d)")), weights


class EncoderBlock(nn.Module):
    """Pre-norm attention then pre-norm SwiGLU MLP, each added to the residual stream (as in the text model)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = EncoderAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, 4 * config.n_embd)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.attention_norm(x), return_weights)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), weights


class VisionEncoder(nn.Module):
    """A ViT: patches to vectors, plus a learned row and column position, through bidirectional blocks."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.patch_size**2 * config.channels, config.n_embd)
        self.row_position = nn.Embedding(config.grid, config.n_embd)
        self.column_position = nn.Embedding(config.grid, config.n_embd)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.final_norm = RMSNorm(config.n_embd, config.norm_eps)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def positions(self) -> torch.Tensor:
        """The 2D position embedding of every patch `(n_patches, n_embd)`: row's vector plus column's."""
        rows = self.row_position.weight[:, None, :]  # (grid, 1, n_embd)
        columns = self.column_position.weight[None, :, :]  # (1, grid, n_embd)
        return rearrange(rows + columns, "gh gw d -> (gh gw) d")

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """Patch vectors `(B, n_patches, n_embd)` for images `(B, C, H, W)` in [0, 1] (and, if asked,
        each block's attention `(B, n_head, n_patches, n_patches)`)."""
        check_images(images, self.config)
        images = images.to(self.patch_embedding.weight.dtype)  # float64 (numpy's default) reads as float32
        x = self.patch_embedding(patchify(images, self.config.patch_size)) + self.positions()  # (B, N, n_embd)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, return_attention)
            attentions.append(weights)
        x = self.final_norm(x)
        return (x, attentions) if return_attention else x


class Projector(nn.Module):
    """Encoder vectors to language-model vectors: optional pixel shuffle, then Linear, GELU, Linear."""

    def __init__(self, config: VisionConfig, lm_width: int):
        super().__init__()
        self.shuffle = config.pixel_shuffle
        self.hidden = nn.Linear(config.n_embd * config.pixel_shuffle**2, config.projector_hidden)
        self.out = nn.Linear(config.projector_hidden, lm_width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """`(B, n_patches, n_embd)` to `(B, n_image_tokens, lm_width)`."""
        if self.shuffle > 1:
            patches = pixel_shuffle(patches, self.shuffle)
        return self.out(F.gelu(self.hidden(patches)))


# --- splicing images into the sequence ------------------------------------------------------------


class ImageMarkers(NamedTuple):
    """The ids of the tokenizer's three image markers."""

    start: int
    slot: int
    end: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ImageMarkers:
        missing = [name for name in IMAGE_MARKERS if name not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.name!r} lacks the image markers {missing}")
        return cls(*(tokenizer.special_tokens[name] for name in IMAGE_MARKERS))


def check_image_slots(idx: torch.Tensor, n_images: int, tokens_per_image: int, markers: ImageMarkers) -> None:
    """Raise a clear error unless every image block in `idx` is `<|image_start|>`, exactly
    `tokens_per_image` `<|image|>` slots, `<|image_end|>`, and there are `n_images` blocks in all."""
    blocks = 0
    for row_number, row in enumerate(idx.tolist()):
        inside, slots = False, 0
        for position, token in enumerate(row):
            if token == markers.start:
                if inside:
                    raise ValueError(f"row {row_number}: <|image_start|> at position {position} opens an image "
                                     "inside another; close each image with <|image_end|> first")
                inside, slots = True, 0
            elif token == markers.slot:
                if not inside:
                    raise ValueError(f"row {row_number}: an <|image|> slot at position {position} stands outside "
                                     "<|image_start|> ... <|image_end|>")
                slots += 1
            elif token == markers.end:
                if not inside:
                    raise ValueError(f"row {row_number}: <|image_end|> at position {position} closes no image")
                if slots != tokens_per_image:
                    raise ValueError(f"row {row_number}: an image block holds {slots} <|image|> slots, but the "
                                     f"encoder gives {tokens_per_image} tokens per image; write exactly "
                                     f"{tokens_per_image}")
                inside, blocks = False, blocks + 1
            elif inside:
                raise ValueError(f"row {row_number}: text token {token} at position {position} stands inside an "
                                 "image block; an image block holds <|image|> slots only")
        if inside:
            raise ValueError(f"row {row_number}: an image block is never closed with <|image_end|>")
    if blocks != n_images:
        raise ValueError(f"the token ids hold {blocks} image blocks but {n_images} images were given; "
                         "give one image per <|image_start|> ... <|image_end|> block, in reading order")


def splice_images(
    token_embeddings: torch.Tensor, idx: torch.Tensor, image_embeddings: torch.Tensor, slot_id: int
) -> torch.Tensor:
    """Replace the embeddings at `<|image|>` slots with image vectors, in reading order.

    `token_embeddings` `(B, T, D)` are the ids' embeddings, `idx` `(B, T)` the ids, and
    `image_embeddings` `(n_images, n_image_tokens, D)` the projected images, taken row by row:
    the first image fills the first block of slots. Every other position keeps its embedding.
    """
    slots = idx == slot_id  # (B, T)
    if int(slots.sum()) != image_embeddings.shape[0] * image_embeddings.shape[1]:
        raise ValueError(f"{int(slots.sum())} <|image|> slots for {image_embeddings.shape[0]} images of "
                         f"{image_embeddings.shape[1]} tokens each")
    return token_embeddings.masked_scatter(slots[..., None], image_embeddings.to(token_embeddings.dtype))


class VisionLanguageModel(nn.Module):
    """A text model `lm` that also reads images: encoder, projector, and the splice into its sequence."""

    def __init__(self, vision_config: VisionConfig, lm: GPT):
        super().__init__()
        self.vision_config = vision_config
        self.encoder = VisionEncoder(vision_config)
        self.projector = Projector(vision_config, lm.config.n_embd)
        self.lm = lm
        self.markers = ImageMarkers.of(load_tokenizer(lm.config.tokenizer))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(N, C, H, W)` to language-model vectors `(N, n_image_tokens, lm_width)`."""
        return self.projector(self.encoder(images))

    def embed(self, idx: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids `(B, T)` plus the images their blocks stand for, to vectors `(B, T, lm_width)`."""
        token_embeddings = self.lm.embed(idx)  # checks the ids
        if images is not None:
            check_images(images, self.vision_config)
        n_images = 0 if images is None else images.shape[0]
        check_image_slots(idx, n_images, self.vision_config.n_image_tokens, self.markers)
        if n_images == 0:
            return token_embeddings
        return splice_images(token_embeddings, idx, self.encode_images(images), self.markers.slot)

    def forward(self, idx: torch.Tensor, images: torch.Tensor | None = None, **options):
        """The language model's output (`GPT.forward_embeddings`, whose options pass through) on ids and images."""
        return self.lm.forward_embeddings(self.embed(idx, images), **options)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, images: torch.Tensor | None, max_new_tokens: int,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of `idx` `(B, T)` with its images: the new ids `(B, max_new_tokens)`.

        The prompt, images included, runs once into the KV cache; every new token is text, so the
        following steps go through the text model alone. Without `use_cache` each step reruns the
        whole sequence (the slow reference).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if idx.ndim == 2 and idx.shape[1] + max_new_tokens > self.lm.config.context:
            raise ValueError(f"a {idx.shape[1]}-token prompt plus {max_new_tokens} new tokens exceeds the model's "
                             f"context of {self.lm.config.context}")
        cache = self.lm.new_kv_cache(idx.shape[0]) if use_cache else None
        x = self.embed(idx, images)
        new_tokens = []
        for _ in range(max_new_tokens):
            logits = self.lm.forward_embeddings(x, kv_cache=cache, last_only=True).logits[:, -1]
            next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            new_tokens.append(next_token)
            step = self.lm.embed(next_token)
            x = step if use_cache else torch.cat([x, step], dim=1)
        return torch.cat(new_tokens, dim=1)


# --- prompts, answers, batches --------------------------------------------------------------------


def chat_prompt(question: str, n_image_tokens: int) -> str:
    """The user turn holding one image and a question, then the assistant's opening."""
    image = "<|image_start|>" + "<|image|>" * n_image_tokens + "<|image_end|>"
    return f"<|im_start|>user<|im_sep|>{image}{question}<|im_end|><|im_start|>assistant<|im_sep|>"


def prompt_ids(tokenizer: Tokenizer, question: str, n_image_tokens: int) -> list[int]:
    """The chat prompt's ids; the question is user text, so special-token text inside it is refused."""
    image_ids = [tokenizer.special_tokens["<|image|>"]] * n_image_tokens
    special = tokenizer.special_tokens
    return ([special["<|im_start|>"], *tokenizer.encode_ordinary("user"), special["<|im_sep|>"],
             special["<|image_start|>"], *image_ids, special["<|image_end|>"]]
            + tokenizer.encode(question)  # raises on special-token text in the question
            + [special["<|im_end|>"], special["<|im_start|>"], *tokenizer.encode_ordinary("assistant"),
               special["<|im_sep|>"]])


def answer_ids(tokenizer: Tokenizer, answer: str) -> list[int]:
    """What the assistant writes: the answer, then `<|im_end|>`."""
    return tokenizer.encode(answer) + [tokenizer.special_tokens["<|im_end|>"]]


def images_tensor(examples: Sequence[visual_math.Example], blind: bool = False) -> torch.Tensor:
    """The examples' images as one `(N, 3, 16, 16)` tensor (all zeros when `blind`)."""
    images = torch.from_numpy(np.stack([example.image for example in examples]))
    return torch.zeros_like(images) if blind else images


def training_batch(tokenizer: Tokenizer, examples: Sequence[visual_math.Example], n_image_tokens: int,
                   blind: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids `(B, T)`, targets `(B, T)` and images for teacher forcing: the loss falls on the answer and
    its `<|im_end|>` only (other targets are -100, ignored). Short rows are padded at the end,
    which a causal model never attends to."""
    rows = [(prompt_ids(tokenizer, e.question, n_image_tokens), answer_ids(tokenizer, e.answer)) for e in examples]
    length = max(len(prompt) + len(answer) for prompt, answer in rows) - 1
    pad = tokenizer.special_tokens["<|im_end|>"]
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        sequence = prompt + answer
        ids[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)
    return ids, targets, images_tensor(examples, blind)


def answer_questions(model: VisionLanguageModel, examples: Sequence[visual_math.Example], blind: bool = False,
                     images: torch.Tensor | None = None, batch_size: int = 200, max_new_tokens: int = 3) -> list[str]:
    """The model's greedy answer to each example (text before its `<|im_end|>`), in order.

    `images` replaces the examples' own images (the image-swap check); `blind` blanks them.
    """
    tokenizer = load_tokenizer(model.lm.config.tokenizer)
    end = tokenizer.special_tokens["<|im_end|>"]
    all_images = images_tensor(examples, blind) if images is None else images
    prompts = [prompt_ids(tokenizer, e.question, model.vision_config.n_image_tokens) for e in examples]
    answers: list[str] = [""] * len(examples)
    by_length: dict[int, list[int]] = {}
    for number, prompt in enumerate(prompts):  # same-length prompts batch together without padding
        by_length.setdefault(len(prompt), []).append(number)
    was_training = model.training
    model.eval()
    for numbers in by_length.values():
        for start in range(0, len(numbers), batch_size):
            chunk = numbers[start : start + batch_size]
            ids = torch.tensor([prompts[n] for n in chunk])
            new = model.generate(ids, all_images[chunk], max_new_tokens).tolist()
            for n, tokens in zip(chunk, new):
                answers[n] = tokenizer.decode(tokens[: tokens.index(end)] if end in tokens else tokens)
    model.train(was_training)
    return answers


def answer_attention(model: VisionLanguageModel, example: visual_math.Example) -> torch.Tensor:
    """Where the position that writes the answer looks among the image tokens:
    `(n_layer, n_head, token_grid, token_grid)`, each layer-head's share of attention on each token."""
    tokenizer = load_tokenizer(model.lm.config.tokenizer)
    ids = torch.tensor([prompt_ids(tokenizer, example.question, model.vision_config.n_image_tokens)])
    with torch.no_grad():
        attentions = model(ids, images_tensor([example]), return_attention=True).attentions
    slots = (ids[0] == model.markers.slot).nonzero().squeeze(1)
    last = torch.stack([layer[0, :, -1, slots] for layer in attentions])  # (n_layer, n_head, n_image_tokens)
    grid = model.vision_config.token_grid
    return rearrange(last, "layer head (gh gw) -> layer head gh gw", gh=grid)


# --- checkpoints ----------------------------------------------------------------------------------


def save_vision_checkpoint(path: str | Path, model: VisionLanguageModel, train_config: VisionTrainConfig,
                           history: dict, dtype: str = "float16", command: str = "") -> None:
    """Write encoder, projector and language model with both configs: the path is all a loader needs."""
    weights = checkpoint_weights(model, dtype)  # the tied embedding stays one tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "vision_config": asdict(model.vision_config), "model_config": asdict(model.lm.config),
                "train_config": json.dumps(asdict(train_config)), "history": json.dumps(history),
                "command": command}, path)


def load_vision_checkpoint(path: str | Path) -> tuple[VisionLanguageModel, dict]:
    """The vision-language model in a checkpoint, and the checkpoint; loaded with `weights_only=True`
    (tensors and plain data only). A file that is not one raises `CheckpointError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "model_config" in checkpoint and "vision_config" not in checkpoint:
            raise CheckpointError(f"{path} is a text-only checkpoint (no vision_config); load it with "
                                  "minigpt.train.load_checkpoint, or train a vision model with python -m minigpt.vision train")
        missing = [key for key in ("model", "vision_config", "model_config", "train_config", "history", "command")
                   if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{path} is not a minigpt vision checkpoint: it lacks {missing}; "
                                  "vision checkpoints are written by python -m minigpt.vision train")
        model = VisionLanguageModel(VisionConfig(**checkpoint["vision_config"]), GPT(GPTConfig(**checkpoint["model_config"])))
        model.load_state_dict({k: v.float() for k, v in checkpoint["model"].items()})
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable minigpt vision checkpoint: {refusal_reason(path, error)}") from None
    return model, checkpoint


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionTrainConfig:
    """How a vision-language model is trained: first the image path alone, then everything together."""

    init_from: str = "data/checkpoints/mini.pt"  # the language model to start from
    frozen_steps: int = 0  # first, steps with the language model frozen (only encoder and projector learn)
    steps: int = 6000  # then steps training everything jointly
    batch_size: int = 64
    learning_rate: float = 2e-3  # encoder and projector
    lm_learning_rate: float = 5e-4  # the language model, in the joint phase
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1  # cosine decay ends at this fraction of each peak rate
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    blind: bool = False  # train on blanked images: the question-only baseline
    kinds: tuple[str, ...] = visual_math.KINDS + ("count",)  # the training mix: counting, the slowest to learn, twice
    seed: int = 0
    time_budget: float | None = None  # stop after this many seconds


def _rate(step: int, total: int, config: VisionTrainConfig) -> float:
    """The schedule's multiplier: linear warmup, then cosine decay to `min_lr_fraction`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_vision(config: VisionTrainConfig, vision_config: VisionConfig = VisionConfig(), progress: bool = True,
                 lm: GPT | None = None) -> tuple[VisionLanguageModel, dict]:
    """Train encoder and projector from scratch on the benchmark's training split, and the language
    model from `config.init_from` (or the given `lm`); returns the model and its history."""
    if config.frozen_steps < 0 or config.steps < 0 or config.frozen_steps + config.steps < 1:
        raise ValueError(f"frozen_steps and steps must be non-negative with at least one step in all, got "
                         f"{config.frozen_steps} and {config.steps}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {config.batch_size}")
    kinds = visual_math.check_kinds(config.kinds)
    torch.manual_seed(config.seed)
    if lm is None:
        init_from = Path(config.init_from)
        if not init_from.is_absolute() and not init_from.exists():  # a repository path, read from elsewhere
            init_from = CHECKPOINT_DIR.parent.parent / init_from
        lm, _ = load_checkpoint(init_from)
    model = VisionLanguageModel(vision_config, lm)
    tokenizer = load_tokenizer(lm.config.tokenizer)
    image_path = nn.ModuleList([model.encoder, model.projector])
    optimizer = torch.optim.AdamW(
        weight_decay_groups(image_path, config.weight_decay, lr=config.learning_rate, peak=config.learning_rate)
        + weight_decay_groups(model.lm, config.weight_decay, lr=config.lm_learning_rate, peak=config.lm_learning_rate),
        betas=(0.9, 0.95))  # "peak": each group's rate before the schedule scales it
    rng = np.random.default_rng(config.seed)
    total = config.frozen_steps + config.steps
    history = {"step": [], "train_loss": [], "seconds": [], "frozen_steps": config.frozen_steps}
    clock = time.perf_counter()
    bar = tqdm(range(total), desc="training vision" + (" (blind)" if config.blind else ""), disable=not progress)
    for step in bar:
        frozen = step < config.frozen_steps
        model.lm.requires_grad_(not frozen)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * _rate(step, total, config)
        examples = visual_math.training_examples(rng, config.batch_size, kinds)
        ids, targets, images = training_batch(tokenizer, examples, vision_config.n_image_tokens, config.blind)
        loss = answer_loss(model, ids, targets, images)
        optimizer_step(model, optimizer, loss, config.grad_clip)
        seconds = time.perf_counter() - clock
        history["step"].append(step + 1)
        history["train_loss"].append(loss.item())
        history["seconds"].append(seconds)
        bar.set_postfix(loss=f"{loss.item():.3f}", phase="frozen LM" if frozen else "joint")
        if config.time_budget is not None and seconds >= config.time_budget:
            break
    model.lm.requires_grad_(True)
    model.eval()
    return model, history


def answer_loss(model: VisionLanguageModel, ids: torch.Tensor, targets: torch.Tensor,
                images: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (targets not -100) only: the output layer, most
    of a small model's compute at an 8,192-token vocabulary, runs on the answer positions alone."""
    hidden, _ = model.lm.residual_stream(model.embed(ids, images))  # (B, T, lm_width)
    scored = targets != -100  # (B, T)
    logits = model.lm.lm_head(model.lm.final_norm(hidden[scored]))  # (n_scored, vocab)
    return F.cross_entropy(logits, targets[scored])


# --- evaluation -----------------------------------------------------------------------------------


def swapped_images(examples: Sequence[visual_math.Example], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """For each example, the image of another held-out example with the same question and a different
    answer, and that image's answer: a model that looks must follow the image."""
    rng = np.random.default_rng(seed)
    by_question: dict[str, list[visual_math.Example]] = {}
    for example in examples:
        by_question.setdefault(example.question, []).append(example)
    images, answers = [], []
    for example in examples:
        others = [other for other in by_question[example.question] if other.answer != example.answer]
        if not others:
            raise ValueError(f"no other example asks {example.question!r} with a different answer; use more examples")
        other = others[int(rng.integers(len(others)))]
        images.append(other.image)
        answers.append(other.answer)
    return torch.from_numpy(np.stack(images)), answers


def evaluate(model: VisionLanguageModel, examples: Sequence[visual_math.Example], blind: bool = False) -> dict:
    """Accuracy per question type, and the image-swap check, on `examples`; predictions kept for reading."""
    predictions = answer_questions(model, examples, blind=blind)
    result = {"accuracy": visual_math.score(predictions, examples), "predictions": predictions}
    if not blind:
        images, swapped_answers = swapped_images(examples)
        swapped = answer_questions(model, examples, images=images)
        follows = [visual_math.normalize_answer(p) == a for p, a in zip(swapped, swapped_answers)]
        keeps = [visual_math.normalize_answer(p) == e.answer for p, e in zip(swapped, examples)]
        result["swap"] = {kind: {"follows_image": float(np.mean([f for f, e in zip(follows, examples) if e.kind == kind])),
                                 "keeps_original": float(np.mean([k for k, e in zip(keeps, examples) if e.kind == kind]))}
                          for kind in dict.fromkeys(e.kind for e in examples)}
    return result


def evaluate_checkpoints(checkpoint: Path, blind_checkpoint: Path | None, per_kind: int = 200) -> dict:
    """`evaluate` on the held-out benchmark for a checkpoint and, beside it, its blind baseline."""
    model, saved = load_vision_checkpoint(checkpoint)
    blind_model, blind_saved = load_vision_checkpoint(blind_checkpoint) if blind_checkpoint is not None else (None, None)
    if blind_saved is not None and not json.loads(blind_saved["train_config"])["blind"]:
        raise ValueError(f"{blind_checkpoint} was not trained blind (train it with --blind)")
    examples = visual_math.benchmark(per_kind)
    kinds = list(dict.fromkeys(e.kind for e in examples))
    history = json.loads(saved["history"])
    report = {"checkpoint": str(checkpoint), "per_kind": per_kind, "kinds": kinds,
              "chance": {kind: visual_math.chance(kind) for kind in kinds},
              "train_seconds": history["seconds"][-1], "train_steps": history["step"][-1],
              "train_command": saved["command"], **evaluate(model, examples)}
    if blind_model is not None:
        blind = evaluate(blind_model, examples, blind=True)
        report["blind"] = blind["accuracy"]
        report["blind_predictions"] = blind["predictions"]
        report["blind_checkpoint"] = str(blind_checkpoint)
    report["questions"] = [{"kind": e.kind, "question": e.question, "answer": e.answer} for e in examples]
    return report


def main(argv: list[str] | None = None) -> None:
    """Command line: `train` a vision-language model, or `evaluate` one on the held-out benchmark."""
    parser = argparse.ArgumentParser(prog="python -m minigpt.vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train encoder, projector and language model")
    defaults, vision_defaults = VisionTrainConfig(), VisionConfig()
    for name in ("frozen_steps", "steps", "batch_size", "warmup_steps", "seed"):
        train_parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("learning_rate", "lm_learning_rate", "min_lr_fraction", "weight_decay", "grad_clip"):
        train_parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    for name in ("patch_size", "n_layer", "n_head", "n_embd", "pixel_shuffle", "projector_hidden"):
        train_parser.add_argument(f"--vision-{name.replace('_', '-')}", type=int, default=getattr(vision_defaults, name))
    train_parser.add_argument("--init-from", default=defaults.init_from, help="the language model's checkpoint")
    train_parser.add_argument("--blind", action="store_true", help="blank every image: the question-only baseline")
    train_parser.add_argument("--kinds", nargs="+", choices=visual_math.KINDS, default=list(defaults.kinds),
                              help="question types to train on, each drawn equally often; list one twice to draw it twice as often")
    train_parser.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    train_parser.add_argument("--threads", type=int, default=None,
                              help="CPU threads for PyTorch (default: its own choice); 1 per run when runs share the cores")
    train_parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float16")
    train_parser.add_argument("--out", type=Path, default=None,
                              help="checkpoint path (default data/checkpoints/mini-vision[-blind].pt)")
    evaluate_parser = commands.add_parser("evaluate", help="accuracy per question type, chance, blind baseline, image swap")
    evaluate_parser.add_argument("--checkpoint", type=Path, required=True)
    evaluate_parser.add_argument("--blind-checkpoint", type=Path, default=None,
                                 help="the same recipe trained with --blind, evaluated with blanked images")
    evaluate_parser.add_argument("--per-kind", type=int, default=200, help="held-out questions of each type")
    evaluate_parser.add_argument("--out", type=Path, default=None,
                                 help="JSON path (default data/vision/CHECKPOINT_NAME.json)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "minigpt.vision", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.command == "train":
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            vision_config = VisionConfig(**{name: getattr(args, f"vision_{name}") for name in
                                            ("patch_size", "n_layer", "n_head", "n_embd", "pixel_shuffle", "projector_hidden")})
            config = replace(defaults, **{name: getattr(args, name) for name in
                                          ("frozen_steps", "steps", "batch_size", "warmup_steps", "seed", "learning_rate",
                                           "lm_learning_rate", "min_lr_fraction", "weight_decay", "grad_clip", "init_from",
                                           "blind", "time_budget")}, kinds=tuple(args.kinds))
            out = args.out or CHECKPOINT_DIR / ("mini-vision-blind.pt" if args.blind else "mini-vision.pt")
            model, history = train_vision(config, vision_config)
            save_vision_checkpoint(out, model, config, history, args.save_dtype, command)
            print(f"{history['step'][-1]} steps in {history['seconds'][-1]:.0f} s, final loss "
                  f"{history['train_loss'][-1]:.3f} -> {out}")
        else:
            report = evaluate_checkpoints(args.checkpoint, args.blind_checkpoint, args.per_kind)
            report["command"] = command
            out = args.out or RESULTS_DIR / f"{args.checkpoint.stem}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            for kind in report["kinds"] + ["all"]:
                blind = f"  blind {report['blind'][kind]:6.1%}" if "blind" in report else ""
                chance = f"  chance {report['chance'][kind]:6.1%}" if kind in report["chance"] else ""
                print(f"{kind:<10} {report['accuracy'][kind]:6.1%}{blind}{chance}")
            print(f"-> {out}")
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
