"""Training: AdamW with warmup and cosine decay, validation in bits per byte, checkpoints, and
DistributedDataParallel when launched with `torchrun`.

    python -m minigpt.train --preset mini --steps 2000             # one process
    torchrun --nproc_per_node=2 -m minigpt.train --preset mini     # DDP: gloo on CPU, nccl on GPU

Every rank draws the *same* seeded global batch and trains on its own slice of it; DDP averages
the gradients, so N processes take exactly the steps one process would take on the global batch.

Validation loss is reported in **bits per byte** of held-out Shakespeare: the model's total
surprise about the validation text divided by its length in bytes. Unlike loss per token it does
not depend on the tokenizer, so it compares with character-level and other recipes directly.

Two position tricks prepare a model for long contexts while it trains on short windows (notebook 04,
section 10): `--yarn-factors` runs each step with YaRN at a random scale factor, and
`--position-skip` (PoSE) moves every position after a random cut on by a random skip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minigpt import data
from minigpt.evals import fit_probe, head_scores, repeated_random_tokens
from minigpt.model import IGNORE_TARGET, GPT, GPTConfig, preset
from minigpt.positions import SCHEMES, RopeScaling
from minigpt.tokenizer import Tokenizer

CHECKPOINT_DIR = data.DATA_DIR / "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the schedule, the batch, and when to evaluate and save."""

    preset: str = "mini"
    steps: int = 2000
    batch_size: int = 16  # sequences per step, across all processes
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4  # the cosine schedule ends here
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_windows: int = 64  # validation windows per periodic evaluation (the final one uses all)
    seed: int = 0
    time_budget: float | None = None  # seconds of training after which to stop early
    probe_mix: float = 0.0  # share of each batch's rows that are synthetic retrieval probes, not Shakespeare
    probe_kinds: tuple[str, ...] = data.PROBE_KINDS  # which probes the mix draws from
    answer_loss_only: bool = False  # probe rows score only their answers (`probe_rows`), not their prompts
    model_overrides: dict = field(default_factory=dict)  # GPTConfig fields to change from the preset
    init_from: str | None = None  # start from this checkpoint's weights and config (overrides applied), not the preset
    # The induction curriculum: `copy_steps` steps of `data.repeated_segments` before the corpus.
    copy_steps: int = 0
    copy_batch_size: int = 64  # the phase change to in-context copying needs larger batches than the corpus
    copy_learning_rate: float = 1e-3  # held constant after the warmup
    copy_length: int = 128  # tokens per curriculum row
    copy_vocab: int = 1024  # the segments draw from this many of the corpus's most common tokens
    copy_mix: float = 0.0  # share of each corpus-phase batch that stays curriculum rows, so the heads are kept
    # Scale-factor augmentation: each step runs YaRN at a factor drawn from these (relative to the
    # training context), so the model cannot lean on the exact speed of its slow pairs.
    yarn_factors: tuple[float, ...] = ()
    # Positional skip-wise training (PoSE, Zhu et al. 2023): each step, positions jump by a random
    # skip of 0 to position_skip at a random cut, so short windows show long relative distances.
    position_skip: int = 0


@lru_cache(maxsize=4)
def corpus_tokens(split: str, tokenizer_name: str = "minigpt-8k") -> torch.Tensor:
    """The Shakespeare split encoded with the course tokenizer, as one long `int64` tensor."""
    tokenizer = load_tokenizer(tokenizer_name)
    return torch.tensor(tokenizer.encode_ordinary(data.shakespeare_text(split)), dtype=torch.long)


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Tokenizer:
    """A course tokenizer by name: its rank file lives in `data/tokenizer/`."""
    path = data.DATA_DIR / "tokenizer" / f"{name}.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer {name!r} at {path}; train it with `python -m minigpt.tokenizer train`")
    return Tokenizer.load(path)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 length of every token id `(n_vocab,)`: turns a sum of losses into bits per byte."""
    return torch.tensor([len(b) for b in tokenizer.decode_tokens_bytes(range(tokenizer.n_vocab))])


def sample_batch(
    tokens: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `context + 1` tokens: inputs `(B, context)` and next-token targets `(B, context)`."""
    starts = torch.randint(len(tokens) - context, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


@lru_cache(maxsize=16)
def probe_size_limits(tokenizer_name: str, length: int,
                      kinds: tuple[str, ...] = data.PROBE_KINDS) -> dict[str, tuple[int, int]]:
    """For each of `kinds` that fits in `length` tokens: the smallest size and the largest that fits.

    Measured once with `minigpt.evals.fit_probe` on a fixed draw; kinds whose smallest probe is
    longer than `length` (the variable chain needs about 150 tokens) are left out.
    """
    tokenizer, limits = load_tokenizer(tokenizer_name), {}
    for kind in kinds:
        smallest = data.PROBE_SMALLEST[kind]
        try:
            largest, _ = fit_probe(lambda size, kind=kind: data.make_probe(kind, random.Random(0), size), tokenizer,
                                   length, smallest)
        except ValueError:
            continue
        limits[kind] = (smallest, largest)
    return limits


def probe_window(rng: random.Random, tokenizer_name: str, length: int,
                 kinds: tuple[str, ...] = data.PROBE_KINDS) -> torch.Tensor:
    """`length` token ids of synthetic tasks (`minigpt.data.TASK_KINDS`: the retrieval probes and the
    editing task) packed back to back.

    Each probe's kind and size are drawn from `rng`, sizes from the smallest up to one that fills
    the window, so the model practises finding a needle anywhere from a few tokens to a whole
    window back. Probes are separated by a blank line; the last one is cut off at `length`.
    """
    return _packed_probes(rng, tokenizer_name, length, kinds, answer_only=False)[0]


def probe_rows(rng: random.Random, tokenizer_name: str, length: int, kinds: tuple[str, ...] = data.PROBE_KINDS,
               answer_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A `probe_window` of `length + 1` tokens as inputs and next-token targets, `(length,)` each.

    With `answer_only`, prompt and answer are tokenized apart (as a request is at inference) and
    every target outside an answer is `IGNORE_TARGET` (-100, which the model's loss skips): the loss is
    then on the answers and the blank line that ends each, not on predicting the prompts.
    """
    ids, is_answer = _packed_probes(rng, tokenizer_name, length + 1, kinds, answer_only)
    targets = ids[1:].clone()
    if answer_only:
        targets[~is_answer[1:]] = IGNORE_TARGET
    return ids[:-1], targets


def _packed_probes(rng: random.Random, tokenizer_name: str, length: int, kinds: tuple[str, ...],
                   answer_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Probes packed into `length` ids, and which of them belong to an answer (`(length,)` bools)."""
    tokenizer, limits = load_tokenizer(tokenizer_name), probe_size_limits(tokenizer_name, length, tuple(sorted(set(kinds))))
    usable = sorted(kind for kind in kinds if kind in limits)
    if not usable:
        raise ValueError(f"none of the probe kinds {kinds} fits in {length} tokens (those that fit: {sorted(limits)})")
    ids: list[int] = []
    is_answer: list[bool] = []
    while len(ids) < length:
        kind = rng.choice(usable)
        probe = data.make_probe(kind, rng, rng.randint(*limits[kind]))
        if answer_only:
            prompt, answer = tokenizer.encode_ordinary(probe.prompt), tokenizer.encode_ordinary(probe.answer + "\n\n")
            ids += prompt + answer
            is_answer += [False] * len(prompt) + [True] * len(answer)
        else:
            whole = tokenizer.encode_ordinary(probe.text + "\n\n")
            ids += whole
            is_answer += [False] * len(whole)
    return torch.tensor(ids[:length], dtype=torch.long), torch.tensor(is_answer[:length])


def training_batch(
    tokens: torch.Tensor, config: TrainConfig, context: int, generator: torch.Generator,
    rng: random.Random, tokenizer_name: str, copy_ids: torch.Tensor | None = None,
    copy_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch: `sample_batch` windows of the corpus, with the last rows replaced by
    `probe_mix` of `probe_rows` (answers only scored if `config.answer_loss_only`) and then
    `copy_mix` of `data.repeated_segments` drawn from `copy_ids` with `copy_generator`. Inputs and
    targets, `(batch_size, context)` each."""
    x, y = sample_batch(tokens, config.batch_size, context, generator)
    x, y = x.clone(), y.clone()  # views of one tensor: a row written into one must not shift into the other
    n_probes, n_copies = round(config.probe_mix * config.batch_size), round(config.copy_mix * config.batch_size)
    if n_probes + n_copies > config.batch_size:
        raise ValueError(f"probe_mix ({config.probe_mix}) and copy_mix ({config.copy_mix}) add up to more than the batch")
    for row in range(config.batch_size - n_probes - n_copies, config.batch_size - n_copies):
        x[row], y[row] = probe_rows(rng, tokenizer_name, context, config.probe_kinds, config.answer_loss_only)
    if n_copies:
        if copy_ids is None or copy_generator is None:
            raise ValueError("copy_mix needs the curriculum's token ids and generator")
        rows = data.repeated_segments(n_copies, context + 1, copy_ids, copy_generator)
        x[-n_copies:], y[-n_copies:] = rows[:, :-1], rows[:, 1:]
    return x, y


def most_common_tokens(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` ids that occur most often in `tokens`, most common first (ties: lower id first)."""
    counts = torch.bincount(tokens)
    if n > len(counts):
        raise ValueError(f"asked for the {n} most common tokens, but the ids only go up to {len(counts) - 1}")
    return torch.sort(counts, descending=True, stable=True).indices[:n]


def copy_batch(config: TrainConfig, token_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch of the induction curriculum, `(copy_batch_size, copy_length)` each: input
    ids drawn from `token_ids`, and targets as positions in `token_ids` (for `GPT.forward`'s `candidates`)."""
    rows = data.repeated_segments(config.copy_batch_size, config.copy_length + 1, torch.arange(len(token_ids)), generator)
    return token_ids[rows[:, :-1]], rows[:, 1:]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak rate, then cosine decay to the minimum at the last step.

    With an induction curriculum, its `copy_steps` come first, at `copy_learning_rate` after the
    same warmup; the corpus phase then runs its own warmup and cosine over `steps`.
    """
    if step < config.copy_steps:
        return config.copy_learning_rate * min(1.0, (step + 1) / max(1, config.warmup_steps))
    step -= config.copy_steps
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


@torch.no_grad()
def bits_per_byte(model: GPT, tokens: torch.Tensor, byte_lengths: torch.Tensor, max_windows: int | None = None) -> float:
    """Validation loss in bits per byte over consecutive non-overlapping windows of `tokens`."""
    context = model.config.context
    n_windows = (len(tokens) - 1) // context
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    total_nats, total_bytes = 0.0, 0
    for start in range(0, n_windows, 16):
        rows = range(start, min(start + 16, n_windows))
        x = torch.stack([tokens[r * context : (r + 1) * context] for r in rows])
        y = torch.stack([tokens[r * context + 1 : (r + 1) * context + 1] for r in rows])
        logits = model(x.to(device)).logits
        total_nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        total_bytes += byte_lengths[y].sum().item()
    model.train(was_training)
    return total_nats / math.log(2) / total_bytes


SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_weights(model: nn.Module, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """`model`'s state dict on the CPU in `dtype` (one of `SAVE_DTYPES`), ready for `torch.save`.
    Tensors that share storage (tied weights) stay one tensor, so the file holds them once."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, not {dtype!r}")
    cast: dict[int, torch.Tensor] = {}  # by storage
    return {name: cast.setdefault(tensor.data_ptr(), tensor.detach().to(device="cpu", dtype=SAVE_DTYPES[dtype]))
            for name, tensor in model.state_dict().items()}


def weight_decay_groups(module: nn.Module, weight_decay: float, **options) -> list[dict]:
    """AdamW parameter groups for `module`: matrices decay by `weight_decay`, vectors (norm gains,
    biases) do not. `options` (a learning rate, say) are set on both groups."""
    parameters = list(module.parameters())
    return [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay, **options},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0, **options}]


def save_checkpoint(
    path: str | Path, model: GPT, optimizer: torch.optim.Optimizer | None, step: int, train_config: TrainConfig,
    history: dict, dtype: str = "float32", command: str = "",
) -> None:
    """Write a checkpoint that carries its model config and tokenizer name, so its path is all a loader needs.

    `dtype` "float16" or "bfloat16" halves the file (the loader casts back to float32); without an
    optimizer the checkpoint is for inference only and cannot be resumed. `command` records how it
    was made.
    """
    weights = checkpoint_weights(model, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": weights,
        "model_config": asdict(model.config),
        "train_config": json.dumps(asdict(train_config)),
        "step": step,
        "history": json.dumps(history),
        "command": command,
    }
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
    torch.save(checkpoint, path)


def retrain_arguments(checkpoint: dict, out: str | Path) -> list[str]:
    """The `python -m minigpt.train` arguments recorded in `checkpoint`, writing the result to `out`.

    The recorded `--out` is replaced: the shipped runs wrote to a working folder and were then copied
    into data/checkpoints/, so `out` (where the file lives now) is what reproduces it.
    """
    arguments = shlex.split(checkpoint["command"])
    if arguments[:3] != ["python", "-m", "minigpt.train"]:
        raise ValueError(f"not a recorded minigpt.train command: {checkpoint['command']!r}")
    arguments = arguments[3:]
    if "--out" in arguments:
        at = arguments.index("--out")
        del arguments[at : at + 2]
    return arguments + ["--out", str(out)]


def retrain_command(checkpoint: dict, out: str | Path) -> str:
    """`retrain_arguments` as the command line to type."""
    return shlex.join(["python", "-m", "minigpt.train", *retrain_arguments(checkpoint, out)])


class CheckpointError(ValueError):
    """A file that minigpt will not load as a checkpoint; the message is one line naming the file and why."""


def refusal_reason(path: Path, error: Exception) -> str:
    """Why `torch.load` or the model refused `path`, in one line, without torch's own advice (which,
    for a pickle holding code, suggests loading it unsafely)."""
    if isinstance(error, pickle.UnpicklingError):
        with path.open("rb") as file:
            is_zip = file.read(4) == b"PK\x03\x04"  # every torch.save file since PyTorch 1.6 is a zip archive
        if is_zip:
            return ("it holds pickled Python objects other than tensors and plain data, which could run code "
                    "when loaded; minigpt loads tensors and plain data only")
        return "it is not a PyTorch checkpoint archive (a corrupt file, or one written by another program)"
    if isinstance(error, RuntimeError) and "zip archive" in str(error):
        return "the archive is incomplete or corrupt (a truncated download or copy?)"
    if isinstance(error, (KeyError, TypeError)):
        return f"it lacks minigpt's checkpoint entries ({type(error).__name__}: {error}); it was not written by minigpt.train"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"its weights do not fit its own model config ({type(error).__name__}: {first_line})"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model in a checkpoint, and the checkpoint itself (step, configs, history, optimizer state).

    Loaded with `weights_only=True`: tensors and plain data only, never arbitrary pickled code. A file
    that cannot be loaded so raises `CheckpointError`, whose one-line message names the file and the
    reason; a missing file raises `FileNotFoundError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**checkpoint["model_config"])).to(device)
        model.load_state_dict({k: v.float() for k, v in checkpoint["model"].items()})
    except Exception as error:  # a truncated, corrupt, foreign or unsafe file
        raise CheckpointError(f"{path} is not a readable minigpt checkpoint: {refusal_reason(path, error)}") from None
    return model, checkpoint


def starting_model(config: TrainConfig) -> GPT:
    """The model a run starts from: a fresh one of the preset, or with `init_from` the checkpoint's
    weights in its config, either with `model_overrides` applied (a longer context and a RoPE
    scaling for a long-context fine-tune: positions add no weights, so the state dict still fits)."""
    if config.init_from is None:
        return GPT(preset(config.preset, **config.model_overrides))
    base, _ = load_checkpoint(config.init_from)
    model = GPT(replace(base.config, **config.model_overrides))
    model.load_state_dict(base.state_dict())
    return model


@contextmanager
def rope_scaling_applied(model: GPT, scaling: RopeScaling | None) -> Iterator[None]:
    """Run `model`'s forward passes with `scaling` in place of its own RoPE scaling (None: its own).

    Positions add no weights, so only the angles change; the model's config, and what it saves,
    stay as they are.
    """
    own = model.rotary.scaling
    model.rotary.scaling = own if scaling is None else scaling
    try:
        yield
    finally:
        model.rotary.scaling = own


class SkippedRotary(nn.Module):
    """A rotary embedding whose positions jump by `skip` after the first `cut` tokens of a sequence.

    The window keeps its length, but keys before the cut look `skip` positions further from the
    queries after it: PoSE's way to show a model long relative distances in short windows.
    """

    def __init__(self, rotary: nn.Module, cut: int, skip: int):
        super().__init__()
        self.rotary, self.cut, self.skip = rotary, cut, skip

    def forward(self, start: int, length: int, device: torch.device | str | None = None):
        """cos and sin, each `(length, head_dim // 2)`, for positions `start .. start + cut - 1`, then
        `start + cut + skip ..`: the inner rotary's rows with the skipped ones left out."""
        cos, sin = self.rotary(start, length + self.skip, device)
        cut = min(self.cut, length)
        return torch.cat([cos[:cut], cos[cut + self.skip:]]), torch.cat([sin[:cut], sin[cut + self.skip:]])


@contextmanager
def positions_skipped(model: GPT, cut: int, skip: int) -> Iterator[None]:
    """Run `model`'s forward passes with its positions jumping by `skip` after `cut` tokens (0: as they are)."""
    if skip == 0:
        yield
        return
    own = model.rotary
    model.rotary = SkippedRotary(own, cut, skip)
    try:
        yield
    finally:
        model.rotary = own


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size), starting the process group when launched by torchrun: nccl for CUDA, else gloo."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def training_device(name: str) -> torch.device:
    """The device this process trains on: "cpu", or "cuda" (under torchrun, the GPU of its LOCAL_RANK)."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here; train with device 'cpu'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True if `flag` is true on any process, so that all stop at the same step."""
    if world == 1:
        return flag
    flag_tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(flag_tensor, op=dist.ReduceOp.MAX)
    return bool(flag_tensor.item())


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One update: gradients of `loss`, clipped to a global norm of `grad_clip`, then the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def train(
    config: TrainConfig, out: Path | None = None, resume: Path | None = None, progress: bool = True,
    on_step: Callable[[dict], None] | None = None, save_dtype: str = "float32", save_optimizer: bool = True,
    command: str = "", device: str = "cpu",
) -> tuple[GPT, dict]:
    """Train a model as `config` says; returns it and its history (steps, losses, bits per byte, seconds).

    `device` "cuda" trains on a GPU (each torchrun process on its own); batches are drawn on the CPU
    from the same seeded streams either way, so only floating-point rounding differs.

    `on_step(history)` is called after every step on rank 0 (the notebook draws its live loss plot
    with it). `save_dtype`, `save_optimizer` and `command` go to `save_checkpoint` when `out` is given.
    """
    if not 0 <= config.probe_mix <= 1:
        raise ValueError(f"probe_mix is the share of probe rows per batch, from 0 to 1; got {config.probe_mix}")
    if not 0 <= config.copy_mix <= 1 - config.probe_mix:
        raise ValueError(f"copy_mix is the share of curriculum rows per batch, from 0 to 1 - probe_mix "
                         f"({1 - config.probe_mix}); got {config.copy_mix}")
    unknown = set(config.probe_kinds) - set(data.TASK_KINDS)
    if unknown or not config.probe_kinds:
        raise ValueError(f"probe_kinds must name some of {data.TASK_KINDS}; got {config.probe_kinds}")
    for name, least in (("copy_steps", 0), ("copy_batch_size", 2), ("copy_length", 2), ("copy_vocab", 2)):
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be at least {least}, got {getattr(config, name)}")
    if config.position_skip < 0:
        raise ValueError(f"position_skip is the largest jump in positions, 0 or more; got {config.position_skip}")
    if any(not 1 <= factor < math.inf for factor in config.yarn_factors):
        raise ValueError(f"yarn_factors are YaRN scale factors, each >= 1 and finite; got {config.yarn_factors}")
    device = training_device(device)
    rank, world = _distributed(device)
    for name in ("batch_size", "copy_batch_size"):
        if getattr(config, name) % world:
            raise ValueError(f"{name} ({getattr(config, name)}) must be divisible by the number of processes ({world})")
    torch.manual_seed(config.seed)
    model = starting_model(config)
    model_config = model.config
    if resume is not None:  # the same config, with the resumed run's weights and optimizer
        model, checkpoint = load_checkpoint(resume)
        if model.config != model_config:
            raise ValueError(f"{resume} holds a model of config {model.config}, not the {model_config} asked for")
        if "optimizer" not in checkpoint:
            raise ValueError(f"{resume} has no optimizer state (it was saved for inference only), so it cannot be resumed")
    if config.yarn_factors and model_config.rope_scaling != "rope":
        raise ValueError(f"yarn_factors augments plain RoPE, but this model already uses {model_config.rope_scaling!r} "
                         f"(factor {model_config.rope_factor})")
    if config.copy_steps and config.copy_length > model_config.context:
        raise ValueError(f"copy_length ({config.copy_length}) must fit the context ({model_config.context})")
    model.to(device)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(0.9, 0.95))
    history = {"step": [], "train_loss": [], "val_step": [], "val_bpb": [], "val_induction": [], "seconds": []}
    start_step = 0
    if resume is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step, history = checkpoint["step"], {**history, **json.loads(checkpoint["history"])}
    if world > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        ddp_model = model

    train_tokens, val_tokens = corpus_tokens("train", model_config.tokenizer), corpus_tokens("val", model_config.tokenizer)
    byte_lengths = token_byte_lengths(load_tokenizer(model_config.tokenizer))
    generator = torch.Generator().manual_seed(config.seed)
    probe_rng = random.Random(config.seed)
    copy_ids = most_common_tokens(train_tokens, config.copy_vocab)
    copy_ids_here = copy_ids.to(device)  # the curriculum's output ids, where the logits are
    copy_generator = torch.Generator().manual_seed(config.seed + 1)  # its own stream: the corpus batches stay the same
    factor_generator = torch.Generator().manual_seed(config.seed + 2)  # the same on every rank
    skip_generator = torch.Generator().manual_seed(config.seed + 3)

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step < config.copy_steps:
            return copy_batch(config, copy_ids, copy_generator)
        return training_batch(train_tokens, config, model_config.context, generator, probe_rng, model_config.tokenizer,
                              copy_ids, copy_generator)

    def next_scaling() -> RopeScaling | None:
        if not config.yarn_factors:
            return None
        factor = config.yarn_factors[int(torch.randint(len(config.yarn_factors), (1,), generator=factor_generator))]
        return RopeScaling("yarn", float(factor), model_config.context)

    def next_skip() -> tuple[int, int]:
        if not config.position_skip:
            return 0, 0
        cut = int(torch.randint(1, model_config.context, (1,), generator=skip_generator))
        return cut, int(torch.randint(config.position_skip + 1, (1,), generator=skip_generator))

    for step in range(start_step):  # replay the batch stream, so a resumed run sees the same batches
        next_batch(step)
        next_scaling()
        next_skip()
    # The induction score on repeated random sequences of the corpus's common tokens (not the
    # curriculum's own draws): rare tokens' embeddings are barely trained, by the curriculum or the corpus.
    induction_tokens = copy_ids[repeated_random_tokens(8, min(32, model_config.context // 2), high=config.copy_vocab,
                                                       seed=10**6)].to(device)

    total_steps = config.copy_steps + config.steps
    elapsed = history["seconds"][-1] if history["seconds"] else 0.0
    clock = time.perf_counter() - elapsed
    name = config.preset if config.init_from is None else Path(config.init_from).stem
    bar = tqdm(range(start_step, total_steps), desc=f"training {name}", disable=not progress or rank != 0)
    for step in bar:
        x, y = next_batch(step)
        local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        candidates = copy_ids_here if step < config.copy_steps else None  # the curriculum scores only its own ids
        with rope_scaling_applied(model, next_scaling()), positions_skipped(model, *next_skip()):
            loss = ddp_model(x[local].to(device), y[local].to(device), candidates=candidates).loss
        optimizer_step(model, optimizer, loss, config.grad_clip)
        seconds = time.perf_counter() - clock
        history["step"].append(step + 1)
        history["train_loss"].append(loss.item())
        history["seconds"].append(seconds)
        out_of_time = config.time_budget is not None and _any_rank(seconds >= config.time_budget, world, device)
        last = step + 1 == total_steps or out_of_time
        if rank == 0 and ((step + 1) % config.eval_every == 0 or last):
            bpb = bits_per_byte(model, val_tokens, byte_lengths, None if last else config.eval_windows)
            induction = head_scores(model, induction_tokens)["induction"].max().item()
            history["val_step"].append(step + 1)
            history["val_bpb"].append(bpb)
            history["val_induction"].append(induction)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_bpb=f"{bpb:.3f}", induction=f"{induction:.2f}")
        if rank == 0 and on_step is not None:
            on_step(history)
        if last:
            break
    if rank == 0 and out is not None:
        save_checkpoint(out, model, optimizer if save_optimizer else None, history["step"][-1], config, history,
                        dtype=save_dtype, command=command)
    return model, history


def main(argv: list[str] | None = None) -> None:
    """Command line: train a preset and save its checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m minigpt.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--preset", default=defaults.preset)
    for name in ("steps", "batch_size", "warmup_steps", "eval_every", "eval_windows", "seed",
                 "copy_steps", "copy_batch_size", "copy_length", "copy_vocab"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip", "copy_learning_rate"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds of training")
    parser.add_argument("--context", type=int, default=None, help="train at this context length instead of the preset's")
    parser.add_argument("--rope-scaling", choices=SCHEMES, default=None,
                        help="a context extension scheme for the model (with --rope-factor and --rope-original-context)")
    parser.add_argument("--rope-factor", type=float, default=None)
    parser.add_argument("--rope-base", type=float, default=None,
                        help="the RoPE base instead of the preset's 10,000 (smaller: every pair turns faster)")
    parser.add_argument("--rope-original-context", type=int, default=None)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint's weights and config (with --context and --rope-* applied), "
                             "for example to fine-tune at a longer length")
    parser.add_argument("--probe-kinds", nargs="+", choices=data.TASK_KINDS, default=list(defaults.probe_kinds),
                        help="the probe kinds the mix draws from (default: every retrieval probe; 'edit' is the editing task)")
    parser.add_argument("--answer-loss-only", action="store_true",
                        help="probe rows score only their answers, not their prompts")
    parser.add_argument("--copy-mix", type=float, default=defaults.copy_mix,
                        help="share of each corpus-phase batch that stays induction-curriculum rows")
    parser.add_argument("--probe-mix", type=float, default=defaults.probe_mix,
                        help="share of each batch that is synthetic retrieval probes (passkey, key-value, ...)")
    parser.add_argument("--yarn-factors", nargs="+", type=float, default=list(defaults.yarn_factors),
                        help="scale-factor augmentation: each step runs YaRN at one of these factors, drawn at random")
    parser.add_argument("--position-skip", type=int, default=defaults.position_skip,
                        help="PoSE: each step, positions jump by a random 0 to this many at a random cut")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint path (default: data/checkpoints/PRESET.pt, or NAME-tuned.pt with --init-from NAME.pt)")
    parser.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint")
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float32",
                        help="precision of the saved weights (float16 halves the file)")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="save the weights only: a small file for inference that cannot be resumed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="train on the CPU (default) or a CUDA GPU (with torchrun, one GPU per process)")
    args = vars(parser.parse_args(argv))
    default_name = args["preset"] if args["init_from"] is None else f"{args['init_from'].stem}-tuned"
    out = args.pop("out") or CHECKPOINT_DIR / f"{default_name}.pt"  # never the starting checkpoint itself
    resume, save_dtype, no_optimizer = args.pop("resume"), args.pop("save_dtype"), args.pop("no_optimizer")
    device = args.pop("device")
    overrides = {name: args.pop(name) for name in ("context", "rope_scaling", "rope_factor", "rope_original_context", "rope_base")}
    args["probe_kinds"], args["yarn_factors"] = tuple(args["probe_kinds"]), tuple(args["yarn_factors"])
    args["init_from"] = None if args["init_from"] is None else str(args["init_from"])
    config = replace(defaults, **args, model_overrides={k: v for k, v in overrides.items() if v is not None})
    command = "python -m minigpt.train " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        _, history = train(config, out, resume, save_dtype=save_dtype, save_optimizer=not no_optimizer, command=command,
                           device=device)
    except (CheckpointError, FileNotFoundError) as error:  # --init-from or --resume: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if int(os.environ.get("RANK", 0)) == 0:
        from minigpt.viz import plot_training

        name = config.preset if config.init_from is None else f"from {Path(config.init_from).stem}"
        plot_training(history, title=f"{name}: {command}", eval_every=config.eval_every,
                      eval_windows=config.eval_windows).savefig(out.with_suffix(".png"), dpi=100)
        print(f"{name}: {history['step'][-1]} steps in {history['seconds'][-1]:.0f} s, "
              f"validation {history['val_bpb'][-1]:.3f} bits per byte -> {out} (loss curve {out.with_suffix('.png')})")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
