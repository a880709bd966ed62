"""Long-context prefill: time and peak memory against context length, for the package's chunked
(online-softmax) attention and PyTorch's SDPA on CPU, in one run.

    python benchmarks/long_context.py                       # 1K tokens, doubling until one stops fitting
    python benchmarks/long_context.py --max-length 32768    # a shorter run
    python benchmarks/long_context.py --max-seconds 150 --json data/long_context/prefill.json   # notebook 04's figures

The model is `mini` (4 layers, 4 query heads sharing 2 key/value heads of 32 dimensions) with its
context stretched by YaRN to each length, random weights (speed and memory do not depend on what
was learned). A prefill runs the whole prompt once, fills the KV cache, and computes the logits of
the last position only. Each measurement runs in a fresh Python process and reports how far the
prefill raised the process's peak resident memory (`minigpt.evals.peak_memory_rise`).

An implementation stops fitting at the first length where its process fails (out of memory), its
projected peak (twice the last one, since attention memory here grows at least linearly) would
pass the memory this machine has available, or it runs longer than `--max-seconds`. Both
columns are printed with the ratio chunked / SDPA and the point where each stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from minigpt.evals import peak_memory_rise
from minigpt.model import GPT, preset

IMPLS = ("chunked", "sdpa")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the total physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@torch.no_grad()
def prefill_here(impl: str, length: int) -> dict:
    """Build a stretched `mini` and prefill `length` random tokens with `impl`; peak memory and time."""
    torch.manual_seed(0)
    original = preset("mini").context
    model = GPT(preset("mini", context=length, rope_scaling="yarn", rope_factor=max(1.0, length / original),
                       rope_original_context=original)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    cache = model.new_kv_cache(1)

    def run():
        return model(ids, kv_cache=cache, attention_impl=impl, last_only=True)

    peak, seconds = peak_memory_rise(run)
    return {"peak_bytes": peak, "seconds": seconds, "cache_bytes": cache.nbytes()}


def measure(impl: str, length: int, max_seconds: float) -> dict | None:
    """`prefill_here` in a fresh process; None if it failed or ran out of time."""
    command = [sys.executable, __file__, "--one", impl, str(length)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=max_seconds)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(result.stdout) if result.returncode == 0 else None


def _cell(row: dict, impl: str, key: str, scale: float, width: int, fmt: str) -> str:
    """One table cell: `row[impl][key] / scale`, or a dash where `impl` was not measured."""
    return f"{row[impl][key] / scale:>{width}{fmt}}" if impl in row else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-length", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=1 << 20)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time limit of one prefill")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and stopping points here")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(prefill_here(args.one[0], int(args.one[1]))))
        return

    budget = available_bytes()
    print(f"prefill of a YaRN-stretched mini, random weights; {budget / 2**30:.1f} GiB available")
    print(f"{'tokens':>9} {'chunked MiB':>12} {'chunked s':>10} {'SDPA MiB':>10} {'SDPA s':>8} {'memory ratio':>13} {'KV cache MiB':>13}")
    stopped = {impl: None for impl in IMPLS}
    rows = []
    length = args.min_length
    while length <= args.max_length and not all(stopped.values()):
        row = {}
        for impl in IMPLS:
            if stopped[impl]:
                continue
            result = measure(impl, length, args.max_seconds)
            if result is None:
                stopped[impl] = f"failed or took over {args.max_seconds:.0f} s at {length:,} tokens"
            else:
                row[impl] = result
                if 2 * result["peak_bytes"] > budget:
                    stopped[impl] = f"the next length would need about {2 * result['peak_bytes'] / 2**30:.1f} GiB"
        ratio = (f"{row['chunked']['peak_bytes'] / row['sdpa']['peak_bytes']:>13.2f}"
                 if len(row) == 2 and row["sdpa"]["peak_bytes"] > 0 else f"{'-':>13}")
        cache = next(iter(row.values()))["cache_bytes"] / 2**20 if row else float("nan")
        rows.append({"length": length, **row})
        print(f"{length:>9,} {_cell(row, 'chunked', 'peak_bytes', 2**20, 12, ',.0f')} "
              f"{_cell(row, 'chunked', 'seconds', 1, 10, '.2f')} {_cell(row, 'sdpa', 'peak_bytes', 2**20, 10, ',.0f')} "
              f"{_cell(row, 'sdpa', 'seconds', 1, 8, '.2f')} {ratio} {cache:>13,.0f}", flush=True)
        length *= 2
    for impl in IMPLS:
        print(f"{impl}: stopped because {stopped[impl]}" if stopped[impl] else f"{impl}: fitted up to --max-length")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "python benchmarks/long_context.py " + " ".join(sys.argv[1:]),
                  "available_bytes": budget, "rows": rows, "stopped": stopped}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
