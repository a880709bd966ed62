"""Scorers: measurements of what a trained model does, each a short function with a seed.

Attention heads. A head is named by the pattern it keeps drawing, and three patterns are easy to
score on a *repeated random sequence* (random tokens `r_0 .. r_{L-1}`, then the same `L` tokens
again), where no language statistics can help and only the mechanism shows:

- **previous-token head**: the query at position `t` attends to `t - 1`;
- **duplicate-token head**: in the second copy, the query at `L + i` attends to the earlier
  occurrence of the same token, position `i`;
- **induction head**: the query at `L + i` attends to position `i + 1`, the token that *followed*
  the earlier occurrence. Together with a previous-token head one layer below, it lets the model
  predict "what came after this last time", which is in-context copying (Olsson et al., 2022,
  "In-context Learning and Induction Heads").

Each score is the mean attention probability on the expected position, so 1 means the head does
nothing else and `1/t` is what a uniform head would score.

Cost. `attention_cost` runs one attention call in a fresh Python process and reports how far it
raised the process's peak memory, and its time: the measurement behind "chunked attention needs
memory linear in the sequence length".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.attention import attention, chunked_attention
from minigpt.model import GPT

HEAD_KINDS = ("previous-token", "duplicate-token", "induction")


def repeated_random_tokens(n_sequences: int, length: int, high: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    """`(n_sequences, 2 * length)` token ids: `length` random ids from `[low, high)`, then the same ids again."""
    if n_sequences < 1 or length < 2:
        raise ValueError(f"need n_sequences >= 1 and length >= 2, got {n_sequences} and {length}")
    if not 0 <= low < high:
        raise ValueError(f"the id range [low, high) must be non-empty and non-negative, got [{low}, {high})")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(low, high, (n_sequences, length), generator=generator)
    return torch.cat([first, first], dim=1)


def _check_repeated(tokens: torch.Tensor) -> int:
    """The half length `L` of a `(B, 2L)` repeated sequence, or a clear error."""
    if tokens.ndim != 2 or tokens.shape[1] % 2:
        raise ValueError(f"expected (batch, 2 * length) repeated token ids, got shape {tuple(tokens.shape)}")
    length = tokens.shape[1] // 2
    if not torch.equal(tokens[:, :length], tokens[:, length:]):
        raise ValueError("the second half of each sequence must repeat the first (see repeated_random_tokens)")
    return length


def pattern_scores(attentions: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Score attention probabilities `(..., 2L, 2L)` on a repeated sequence of half length `L`.

    Returns, for each of `HEAD_KINDS`, the mean probability on the expected key, with the leading
    dimensions kept except the last two (for example `(B, n_layer, n_head)` -> `(n_layer, n_head)`
    after the caller's mean over the batch).
    """
    second = torch.arange(length, 2 * length)  # query positions in the second copy
    earlier = second - length  # the earlier occurrence of the same token
    previous = attentions[..., torch.arange(1, 2 * length), torch.arange(0, 2 * length - 1)]  # (..., 2L - 1)
    duplicate = attentions[..., second, earlier]  # (..., L)
    induction = attentions[..., second[:-1], earlier[:-1] + 1]  # (..., L - 1): the token after it
    return {
        "previous-token": previous.mean(-1),
        "duplicate-token": duplicate.mean(-1),
        "induction": induction.mean(-1),
    }


@torch.no_grad()
def head_scores(model: GPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score every head of `model` on repeated sequences `tokens` `(B, 2L)`: kind -> `(n_layer, n_head)`."""
    length = _check_repeated(tokens)
    was_training = model.training
    model.eval()
    attentions = torch.stack(model(tokens, return_attention=True).attentions, dim=1)  # (B, n_layer, n_head, 2L, 2L)
    model.train(was_training)
    return {kind: score.mean(0) for kind, score in pattern_scores(attentions, length).items()}


def best_heads(scores: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, float]]:
    """The top-scoring head of each kind, as `(layer, head, score)`."""
    best = {}
    for kind, table in scores.items():
        index = int(table.argmax())
        layer, head = divmod(index, table.shape[1])
        best[kind] = (layer, head, table[layer, head].item())
    return best


@torch.no_grad()
def repeat_losses(model: GPT, tokens: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss (nats) on the first copy and on the second copy of repeated sequences.

    A model with working induction heads predicts the second copy far better than the first,
    which is random: the gap is in-context copying, measured in the model's own loss.
    """
    length = _check_repeated(tokens)
    was_training = model.training
    model.eval()
    logits = model(tokens[:, :-1]).logits  # (B, 2L - 1, vocab)
    model.train(was_training)
    losses = F.cross_entropy(logits.transpose(1, 2).float(), tokens[:, 1:], reduction="none")  # (B, 2L - 1)
    # Targets 1..L-1 are in the first copy; targets L+1..2L-1 are predictable from it (the target
    # at position L, the first token of the repeat, is not: nothing says the sequence restarts).
    return losses[:, : length - 1].mean().item(), losses[:, length:].mean().item()


def peak_memory_rise(run: Callable[[], object]) -> tuple[int, float]:
    """Bytes by which `run()` raises this process's peak resident memory, and the seconds it took.

    On Linux the kernel's peak (VmHWM) is reset first, so the figure is exact. Elsewhere the
    peak so far (`ru_maxrss`) is the baseline, which is only meaningful in a fresh process.
    """
    status = Path("/proc/self/status")
    if status.exists():
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        before = _proc_kib(status, "VmRSS")
    else:
        before = _max_rss_kib()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    after = _proc_kib(status, "VmHWM") if status.exists() else _max_rss_kib()
    return (after - before) * 1024, seconds


def _proc_kib(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {status}")


def _max_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB


ATTENTION_KINDS = ("exact", "chunked")


def attention_cost(kind: str, length: int, n_head: int = 4, head_dim: int = 32, chunk_size: int = 256) -> dict:
    """Peak memory rise (bytes) and seconds of one causal attention call over `length` tokens.

    `kind` is "exact" (the full `(T, T)` score matrix) or "chunked" (online softmax over blocks of
    `chunk_size` keys). Each measurement runs in a fresh Python process so no earlier allocation
    hides in the peak; returns `{"peak_bytes": ..., "seconds": ...}`.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    command = [sys.executable, "-m", "minigpt.evals", "attention-cost", kind, str(length),
               "--n-head", str(n_head), "--head-dim", str(head_dim), "--chunk-size", str(chunk_size)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"measuring {kind} attention at {length} tokens failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


@torch.no_grad()
def _measure_attention_here(kind: str, length: int, n_head: int, head_dim: int, chunk_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n_head, length, head_dim, generator=generator) for _ in range(3))
    if kind == "exact":
        peak, seconds = peak_memory_rise(lambda: attention(q, k, v))
    else:
        peak, seconds = peak_memory_rise(lambda: chunked_attention(q, k, v, chunk_size=chunk_size))
    return {"peak_bytes": peak, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m minigpt.evals attention-cost KIND LENGTH` (used by `attention_cost`)."""
    parser = argparse.ArgumentParser(prog="python -m minigpt.evals")
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("attention-cost", help="peak memory and time of one attention call, as JSON")
    cost.add_argument("kind", choices=ATTENTION_KINDS)
    cost.add_argument("length", type=int)
    cost.add_argument("--n-head", type=int, default=4)
    cost.add_argument("--head-dim", type=int, default=32)
    cost.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args(argv)
    print(json.dumps(_measure_attention_here(args.kind, args.length, args.n_head, args.head_dim, args.chunk_size)))


if __name__ == "__main__":
    main()
