"""Tokenizer benchmark: every figure beside its baseline, measured in the same run.

    python benchmarks/tokenizer.py            # about a minute on a 2-core laptop

1. Encoding speed on the real o200k_base ranks and the Shakespeare training text: minigpt with a
   cold piece cache (and warm, for reference) against tiktoken's single-threaded `encode_ordinary`.
   Goal: at least 0.4 of tiktoken's speed, cold.
2. Training time for the course's 8,192-token vocabulary on the whole training text. Goal: < 10 s.
3. The fast trainer against the naive recount-every-merge trainer on a subset: same merges, speed-up.
Each timing is the best of a few repeats, to shed noise from the rest of the machine.
"""

from __future__ import annotations

import argparse
import time

import tiktoken

from minigpt import data
from minigpt.tokenizer import (
    O200K_SPECIAL_TOKENS,
    PATTERNS,
    SPECIAL_TOKENS,
    Tokenizer,
    train_bpe,
    train_bpe_naive,
)


def best_seconds(run, repeats: int, setup=lambda: None) -> float:
    """The fastest of `repeats` timed calls of `run()`, each after an untimed `setup()`."""
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def report(label: str, value: float, unit: str, baseline_label: str, baseline: float, goal: str) -> None:
    print(f"{label:<38} {value:>9.2f} {unit:<5} | {baseline_label:<30} {baseline:>9.2f} {unit:<5}"
          f" | ratio {value / baseline:6.2f}  (goal: {goal})")


def bench_encoding(text: str, repeats: int) -> None:
    ours = Tokenizer.o200k_base()
    theirs = tiktoken.Encoding(
        "o200k_base", pat_str=PATTERNS["o200k"], mergeable_ranks=ours.mergeable_ranks,
        special_tokens=O200K_SPECIAL_TOKENS,
    )
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), "outputs differ"
    megabytes = len(text.encode("utf-8")) / 1e6
    tiktoken_speed = megabytes / best_seconds(lambda: theirs.encode_ordinary(text), repeats)
    cold = megabytes / best_seconds(lambda: ours.encode_ordinary(text), repeats, ours.clear_cache)
    warm = megabytes / best_seconds(lambda: ours.encode_ordinary(text), repeats)
    print(f"encoding {megabytes:.2f} MB of Shakespeare with the real o200k_base ranks (same ids):")
    report("minigpt encode, cold cache", cold, "MB/s", "tiktoken encode, 1 thread", tiktoken_speed, ">= 0.40")
    report("minigpt encode, warm cache", warm, "MB/s", "tiktoken encode, 1 thread", tiktoken_speed, "-")


def bench_training(text: str, subset_bytes: int, subset_vocab: int) -> None:
    start = time.perf_counter()
    Tokenizer.train(text, 8192, progress=False)
    seconds = time.perf_counter() - start
    print(f"\ntraining the 8,192-token vocabulary on all {len(text.encode()) / 1e6:.2f} MB of training text:")
    print(f"{'minigpt train_bpe, 8,192 tokens':<38} {seconds:>9.2f} s     | goal: under 10 s")

    subset = text[:subset_bytes]
    n_mergeable = subset_vocab - len(SPECIAL_TOKENS)
    fast_ranks, naive_ranks = {}, {}
    fast = best_seconds(lambda: fast_ranks.update(train_bpe(subset, n_mergeable, progress=False)), 3)
    naive = best_seconds(lambda: naive_ranks.update(train_bpe_naive(subset, n_mergeable)), 1)
    same = "same merges" if fast_ranks == naive_ranks else "DIFFERENT MERGES"
    print(f"\nfast against naive trainer, {len(subset.encode()) / 1e3:.0f} KB subset, {subset_vocab} tokens ({same}):")
    report("minigpt train_bpe (fast)", 1 / fast, "run/s", "train_bpe_naive (recount)", 1 / naive, "speed-up")
    print(f"{'':<38} i.e. {fast:.2f} s against {naive:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subset-bytes", type=int, default=100_000)
    parser.add_argument("--subset-vocab", type=int, default=512)
    args = parser.parse_args()
    text = data.shakespeare_text("train")
    bench_encoding(text, args.repeats)
    bench_training(text, args.subset_bytes, args.subset_vocab)


if __name__ == "__main__":
    main()
