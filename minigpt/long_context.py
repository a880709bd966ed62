"""Long-context experiments: one trained model, its RoPE stretched by each scheme, measured.

    python -m minigpt.long_context evaluate --checkpoint data/checkpoints/mini.pt

A model trained on windows of `L` tokens is rebuilt with a longer context and a RoPE scaling
scheme (`minigpt.positions`), with no change to its weights and no fine-tuning, and tested at
1x, 2x, 4x, 8x and 16x `L`:

- **passkey** retrieval by needle depth (the needle-in-a-haystack heatmap);
- the other probes of `minigpt.data` (key-value lookup, variable chain, most frequent word, the
  toy multi-round coreference test) by length;
- **loss by position** on held-out Shakespeare, out to the longest length.

Each scheme's **effective length** is the longest length whose passkey accuracy stays within 5
points of the loaded model's own accuracy at its training length (0 if even 1x falls short); each
other probe gets one the same way, against the loaded model's accuracy on that probe.

Static schemes (PI, NTK, YaRN) use one scale factor, the longest multiple, at every length, as a
deployed model would; dynamic NTK sets its own from each input's length. Results go to a JSON file
in `data/long_context/` that notebook 04 loads, with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigpt import data, evals
from minigpt.model import GPT
from minigpt.positions import SCHEMES
from minigpt.train import CheckpointError, corpus_tokens, load_checkpoint, load_tokenizer

RESULTS_DIR = data.DATA_DIR / "long_context"
MULTIPLES = (1, 2, 4, 8, 16)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
OTHER_PROBES = ("kv", "variable-chain", "frequent-word", "mrcr")


def training_context(model: GPT) -> int:
    """The length the model was trained at: its original context if already stretched."""
    return model.config.rope_original_context or model.config.context


def stretch(model: GPT, scheme: str, factor: float) -> GPT:
    """The same weights in a model whose context is `factor` times the training length, with `scheme`.

    Positions add no weights, so the state dict loads as it is. Plain `"rope"` keeps its angles
    and simply runs past the length it was trained on.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    original = training_context(model)
    config = replace(model.config, context=round(original * factor), rope_scaling=scheme,
                     rope_factor=float(factor), rope_original_context=original)
    stretched = GPT(config)
    stretched.load_state_dict(model.state_dict())
    return stretched.eval()


def fitted_probes(kind: str, tokenizer, length: int, n: int, seed: int, **options) -> list[data.Probe]:
    """`n` probes of `kind`, each as large as fits in `length` tokens, drawn from seeds `seed ...`.

    Each probe is fitted on its own: the same size can take a different number of tokens with
    different words or digits, so one size fitted on the first seed may not fit the next.
    """
    return [evals.fit_probe(lambda s, i=i: data.make_probe(kind, random.Random(seed + i), s, **options), tokenizer,
                            length, smallest=data.PROBE_SMALLEST[kind])[1] for i in range(n)]


def passkey_grid(model: GPT, tokenizer, lengths: list[int], depths=DEPTHS, n: int = 10, seed: int = 0) -> list[list[float]]:
    """Passkey accuracy `[length][depth]`: `n` probes per cell, each filling the length."""
    grid = []
    for length in lengths:
        row = []
        for depth in depths:
            probes = fitted_probes("passkey", tokenizer, length, n, seed, depth=depth)
            row.append(evals.answer_accuracy(model, tokenizer, probes, batch_size=4))
        grid.append(row)
    return grid


def loss_by_multiple(model: GPT, tokens: torch.Tensor, length: int, multiples: list[int], n_windows: int) -> list[float]:
    """Mean next-token loss (nats) in each stretch of positions `((m/2) L, m L]` of `n_windows`
    held-out windows of `length` tokens (fewer if the text runs out): how the loss changes past
    the training length."""
    n_windows = min(n_windows, len(tokens) // length)  # as many as the held-out text holds, up to n_windows
    if n_windows < 1:
        raise ValueError(f"the held-out text ({len(tokens):,} tokens) is shorter than one window of {length:,}")
    windows = torch.stack([tokens[i * length : (i + 1) * length] for i in range(n_windows)])  # (n, length)
    losses = evals.loss_by_position(model, windows, batch_size=2)  # (length - 1,): position p predicts p + 1
    base = length // max(multiples)
    means, start = [], 0
    for m in multiples:
        end = min(m * base, len(losses))
        means.append(losses[start:end].mean().item())
        start = end
    return means


def evaluate(model: GPT, schemes=SCHEMES, multiples=MULTIPLES, n: int = 10, seed: int = 0,
             n_windows: int = 16, progress: bool = True, other_n: int | None = None) -> dict:
    """Every scheme at every multiple of the training length: the dictionary the JSON file holds.

    `n` passkey probes per (length, depth) cell; `other_n` (default `n`) probes of each other kind
    per length."""
    other_n = n if other_n is None else other_n
    tokenizer = load_tokenizer(model.config.tokenizer)
    original = training_context(model)
    lengths = [original * m for m in multiples]
    val_tokens = corpus_tokens("val", model.config.tokenizer)
    results = {"training_context": original, "multiples": list(multiples), "lengths": lengths,
               "depths": list(DEPTHS), "probes_per_cell": n, "other_probes_per_length": other_n, "seed": seed,
               "schemes": {}}
    if n > 0:  # the model as loaded, at its training length: the scores a stretched copy should keep
        results["reference_passkey"] = sum(passkey_grid(model, tokenizer, [original], n=n, seed=seed)[0]) / len(DEPTHS)
        results["reference_probes"] = {kind: _probe_accuracy(model, tokenizer, kind, original, other_n, seed)
                                       for kind in OTHER_PROBES}
    for scheme in tqdm(schemes, desc="schemes", disable=not progress):
        stretched = stretch(model, scheme, max(multiples))
        start = time.perf_counter()
        row = {"loss_by_multiple": loss_by_multiple(stretched, val_tokens, lengths[-1], list(multiples), n_windows)}
        if n > 0:  # n = 0: the loss only, for a model that cannot retrieve yet
            grid = passkey_grid(stretched, tokenizer, lengths, n=n, seed=seed)
            passkey = [sum(cells) / len(cells) for cells in grid]
            probes = {kind: [_probe_accuracy(stretched, tokenizer, kind, length, other_n, seed) for length in lengths]
                      for kind in OTHER_PROBES}
            row |= {
                "passkey_by_depth": grid,
                "passkey": passkey,
                "probes": probes,
                "effective_length": evals.effective_length(lengths, passkey, margin=0.05,
                                                           reference=results["reference_passkey"]),
                "probe_effective_length": {kind: _probe_effective_length(lengths, probes[kind],
                                                                         results["reference_probes"][kind])
                                           for kind in OTHER_PROBES},
            }
        results["schemes"][scheme] = row | {"seconds": time.perf_counter() - start}
    return results


def _probe_accuracy(model: GPT, tokenizer, kind: str, length: int, n: int, seed: int) -> float | None:
    """Accuracy on `n` probes of `kind` filling `length` tokens, or None if even the smallest does not fit."""
    try:
        probes = fitted_probes(kind, tokenizer, length, n, seed)
    except ValueError:
        return None
    return evals.answer_accuracy(model, tokenizer, probes, batch_size=4)


def _probe_effective_length(lengths: list[int], accuracies: list[float | None], reference: float | None) -> int | None:
    """The effective length for one probe kind (5-point margin), or None where the probe does not
    fit the training length, so there is no score at it to keep."""
    if reference is None or None in accuracies:
        return None
    return evals.effective_length(lengths, accuracies, margin=0.05, reference=reference)


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m minigpt.long_context evaluate --checkpoint PATH [--out PATH]`."""
    parser = argparse.ArgumentParser(prog="python -m minigpt.long_context", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="every scheme at 1x to 16x the training length, as JSON")
    run.add_argument("--checkpoint", type=Path, required=True)
    run.add_argument("--out", type=Path, default=None, help="default: data/long_context/<checkpoint name>.json")
    run.add_argument("--probes", type=int, default=10, help="probes per cell (length, depth); 0 measures the loss only")
    run.add_argument("--other-probes", type=int, default=None,
                     help="probes of each other kind (key-value, ...) per length (default: --probes)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    run.add_argument("--multiples", nargs="+", type=int, default=list(MULTIPLES),
                     help="lengths to test, as multiples of the training length (the largest sets the scale factor)")
    args = parser.parse_args(argv)
    if args.other_probes is not None and args.other_probes < 1:
        parser.error(f"--other-probes must be at least 1, got {args.other_probes}")
    torch.manual_seed(args.seed)
    try:
        model, _ = load_checkpoint(args.checkpoint)
    except (CheckpointError, FileNotFoundError) as error:  # one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    results = evaluate(model, args.schemes, sorted(args.multiples), n=args.probes, seed=args.seed,
                       other_n=args.other_probes)
    results["checkpoint"] = str(args.checkpoint)
    results["command"] = "python -m minigpt.long_context " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or RESULTS_DIR / f"{args.checkpoint.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for scheme, r in results["schemes"].items():
        losses = "  ".join(f"{m}x {loss:.2f}" for m, loss in zip(results["multiples"], r["loss_by_multiple"]))
        print(f"{scheme:<12} loss (nats) by stretch of positions: {losses}")
        if "passkey" in r:
            cells = "  ".join(f"{m}x {a:.2f}" for m, a in zip(results["multiples"], r["passkey"]))
            print(f"{'':<12} passkey {cells}   effective length {r['effective_length']}")
            for kind, accuracies in r["probes"].items():
                if any(accuracies):  # the kinds this model answers at some length
                    cells = "  ".join(f"{m}x {'-' if a is None else f'{a:.2f}'}"
                                      for m, a in zip(results["multiples"], accuracies))
                    print(f"{'':<12} {kind} {cells}   effective length {r['probe_effective_length'][kind]}")
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
