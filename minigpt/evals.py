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

Long-context probes. The probes of `minigpt.data` (a passkey in filler, keys and values, a
variable chain, the most frequent word, multi-round coreference) are scored by exact match:
`answers_correct` asks whether greedy decoding would produce the answer's tokens, from one
teacher-forced pass per probe, and `answer_token_accuracy` says at which answer token a model goes
wrong. `fit_probe` sizes a probe to a token budget, `loss_by_position`
gives the loss curve along the context, and `effective_length` reads off how far a model's score
holds up past its training length.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.attention import attention, chunked_attention
from minigpt.data import Probe
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


# --- long-context probes ------------------------------------------------------------------------


def probe_ids(tokenizer, probe: Probe) -> tuple[list[int], list[int]]:
    """The token ids of a probe's prompt and of its answer, each encoded on its own.

    Scoring asks whether the model continues the prompt's ids with the answer's ids. The probes'
    prompts end with a word or a symbol and their answers start with a space, so with the course's
    pre-split pattern both halves encode exactly as they do inside `prompt + answer`.
    """
    prompt, answer = tokenizer.encode_ordinary(probe.prompt), tokenizer.encode_ordinary(probe.answer)
    if not prompt or not answer:
        raise ValueError(f"a probe needs a non-empty prompt and answer, got {probe.prompt[:40]!r} and {probe.answer!r}")
    return prompt, answer


def fit_probe(make: Callable[[int], Probe], tokenizer, n_tokens: int, smallest: int = 0) -> tuple[int, Probe]:
    """The largest size whose probe fits in `n_tokens` tokens (prompt plus answer), and that probe.

    `make(size)` builds a probe from its size argument (`n_filler`, `n_pairs`, ...), for example
    `lambda n: passkey_probe(random.Random(seed), n, depth=0.5)`; it should give the same probe
    for the same size. A probe's length grows with its size, so the search doubles the size until
    the probe no longer fits, then bisects: about `2 * log2(size)` probes are built and encoded.

    Returns a size `s >= smallest` such that `make(s)` fits and `make(s + 1)` does not. When the
    length grows strictly with size (every size unit adds at least one token, as in every probe
    of `minigpt.data`), that is the largest size that fits. (If `make` draws different words at
    different sizes, the length can dip by a token or two as the size grows; `s` is then still a
    size where the probe stops fitting, if not always the very largest.) Raises a clear error if
    even `make(smallest)` does not fit, or if the length does not grow with the size at all.
    """
    _check_positive("n_tokens", n_tokens)

    def fits(size: int) -> tuple[bool, Probe]:
        probe = make(size)
        prompt, answer = probe_ids(tokenizer, probe)
        return len(prompt) + len(answer) <= n_tokens, probe

    fit, probe = fits(smallest)
    if not fit:
        raise ValueError(f"even the smallest probe (size {smallest}) needs more than {n_tokens} tokens")
    # If each size unit adds a token, no size past `smallest + n_tokens - 1` can fit.
    limit = smallest + n_tokens
    low, step = smallest, 1
    while True:  # invariant: make(low) fits
        high = min(low + step, limit)
        fit, candidate = fits(high)
        if not fit:
            break
        if high == limit:
            raise ValueError(f"the probe still fits {n_tokens} tokens at size {high}: its length must grow with size")
        low, probe, step = high, candidate, 2 * step
    while high - low > 1:  # make(low) fits, make(high) does not
        middle = (low + high) // 2
        fit, candidate = fits(middle)
        if fit:
            low, probe = middle, candidate
        else:
            high = middle
    return low, probe


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def answer_predictions(model: GPT, tokenizer, probes: list[Probe], batch_size: int = 8) -> list[tuple[list[int], list[int]]]:
    """For each probe, the model's argmax at every answer position with the true answer fed in
    (teacher forcing), and the answer's token ids: `(predicted, answer)`, two lists of equal length.

    Probes are batched only with probes of the same token length, so no padding is needed; each
    batch of `batch_size` holds `batch_size * length * vocab` logits in memory. A probe longer than
    the model's context (`model.config.context`) is a clear error, not a silent truncation.
    """
    probes = list(probes)
    if not probes:
        raise ValueError("no probes to score")
    _check_positive("batch_size", batch_size)
    encoded = [probe_ids(tokenizer, probe) for probe in probes]
    by_length: dict[int, list[int]] = {}
    for i, (prompt, answer) in enumerate(encoded):
        length = len(prompt) + len(answer)
        if length > model.config.context:
            raise ValueError(
                f"probe {i} ({probes[i].kind}) needs {length} tokens, more than the model's context of "
                f"{model.config.context}; make it smaller (see fit_probe) or extend the model's context"
            )
        by_length.setdefault(length, []).append(i)
    device = _device(model)
    results: list[tuple[list[int], list[int]]] = [([], [])] * len(probes)
    was_training = model.training
    model.eval()
    try:
        for rows in by_length.values():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                ids = torch.tensor([encoded[i][0] + encoded[i][1] for i in batch], device=device)
                # The last answer token is never an input; position t predicts token t + 1.
                predicted = model(ids[:, :-1]).logits.argmax(dim=-1).tolist()  # (B, length - 1)
                for row, i in zip(predicted, batch):
                    prompt, answer = encoded[i]
                    results[i] = (row[len(prompt) - 1 :], answer)
    finally:
        model.train(was_training)
    return results


def answers_correct(model: GPT, tokenizer, probes: list[Probe], batch_size: int = 8) -> list[bool]:
    """For each probe, whether the model's greedy continuation of the prompt is exactly the answer
    (token for token), from one teacher-forced forward pass per probe (`answer_predictions`).

    Why one pass is enough: greedy decoding appends the argmax of the logits at the last position,
    one token at a time. Feed the model the prompt followed by the true answer (teacher forcing)
    and read the argmax at each position that predicts an answer token. If all of them equal the
    answer tokens, greedy decoding would have produced exactly those tokens, since at every step
    its input would have been the very prefix fed here. If one differs, greedy decoding, which
    sees the same prefix up to the first such position, picks a different token there and the
    answer is missed. So the two agree, whatever the model (up to floating-point rounding between
    a full pass and a KV-cached one, which only matters at near ties).
    """
    return [predicted == answer for predicted, answer in answer_predictions(model, tokenizer, probes, batch_size)]


def answer_token_accuracy(model: GPT, tokenizer, probes: list[Probe], batch_size: int = 8) -> list[float]:
    """The share of probes whose teacher-forced argmax is right at each answer position: where an
    answer goes wrong. For a key-value answer " 0481" (tokens " ", "0", "4", "8", "1"), the first
    digit is the lookup, the later ones the copy that follows it. The answers must all have the
    same number of tokens."""
    pairs = answer_predictions(model, tokenizer, probes, batch_size)
    sizes = {len(answer) for _, answer in pairs}
    if len(sizes) > 1:
        raise ValueError(f"answers must all have the same number of tokens to be scored by position, got {sorted(sizes)}")
    return [sum(predicted[i] == answer[i] for predicted, answer in pairs) / len(pairs) for i in range(sizes.pop())]


def answer_accuracy(model: GPT, tokenizer, probes: list[Probe], batch_size: int = 8) -> float:
    """The share of probes whose greedy answer is exactly right (see `answers_correct`)."""
    correct = answers_correct(model, tokenizer, probes, batch_size)
    return sum(correct) / len(correct)


@torch.no_grad()
def loss_by_position(model: GPT, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss (nats) at each position of `tokens` `(B, T)`, as a `(T - 1,)` tensor.

    Entry `t` is the loss on token `t + 1` given the `t + 1` tokens before it, averaged over the
    batch: the curve of perplexity against position (`loss.exp()`) that shows whether a model
    still uses its context past the length it was trained at. Rows run `batch_size` at a time.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"expected (batch, time) token ids with time >= 2, got {getattr(tokens, 'shape', tokens)}")
    _check_positive("batch_size", batch_size)
    if tokens.shape[1] - 1 > model.config.context:
        raise ValueError(
            f"{tokens.shape[1]} tokens need {tokens.shape[1] - 1} inputs, more than the model's context of "
            f"{model.config.context}"
        )
    device = _device(model)
    total = torch.zeros(tokens.shape[1] - 1)
    was_training = model.training
    model.eval()
    try:
        for chunk in tokens.split(batch_size):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1]).logits  # (b, T - 1, vocab)
            losses = F.cross_entropy(logits.transpose(1, 2).float(), chunk[:, 1:], reduction="none")
            total += losses.sum(0).cpu()
    finally:
        model.train(was_training)
    return total / tokens.shape[0]


def effective_length(lengths: list[int], scores: list[float], margin: float, higher_is_better: bool = True,
                     reference: float | None = None) -> int:
    """The longest context length whose score stays within `margin` of the score at the first
    (training) length, every shorter length staying within it too.

    `lengths` rise strictly, `scores[i]` is the score at `lengths[i]`, and `margin` is absolute (0.05
    is five accuracy points). Only a fall counts: a score better than the first is within the margin.
    The walk stops at the first length that falls further, so a later recovery does not count (a
    model that fails at 2K and passes at 4K has an effective length below 2K). With
    `higher_is_better=False` (losses, perplexities) a rise counts instead. This is the "effective
    length" of RULER (Hsieh et al., 2024) measured against the model's own training-length score
    rather than a fixed threshold. A 1e-9 slack absorbs rounding (1.0 - 0.95 > 0.05 in floats).

    `reference` replaces the first score as the score to stay near: the unstretched model's score
    at its training length, when `scores` come from a stretched copy. If even the first length
    falls short of it, no length qualifies and the result is 0; so too if the reference itself is 0
    or less (higher is better): a model that fails at its own training length has nothing to keep.
    """
    lengths, scores = list(lengths), [float(score) for score in scores]
    if not lengths or len(lengths) != len(scores):
        raise ValueError(f"need one score per length, at least one: got {len(lengths)} lengths, {len(scores)} scores")
    if any(b <= a for a, b in itertools.pairwise(lengths)):
        raise ValueError(f"lengths must rise strictly, got {lengths}")
    if not all(math.isfinite(score) for score in scores):
        raise ValueError(f"scores must be finite numbers, got {scores}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    if reference is not None and not math.isfinite(reference):
        raise ValueError(f"reference must be a finite number, got {reference!r}")
    if reference is not None and higher_is_better and reference <= 0:
        return 0
    first, longest = (scores[0] if reference is None else float(reference)), 0
    for length, score in zip(lengths, scores):
        fall = first - score if higher_is_better else score - first
        if fall > margin + 1e-9:
            break
        longest = length
    return longest


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
