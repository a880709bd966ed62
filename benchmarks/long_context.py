"""Long-context prefill: time and peak memory against context length, for the package's chunked
(online-softmax) attention and PyTorch's SDPA on CPU, in one run.

    python benchmarks/long_context.py                       # 1K tokens, doubling until one stops fitting
    python benchmarks/long_context.py --max-length 32768    # a shorter run
    python benchmarks/long_context.py --max-seconds 150 --json data/long_context/prefill.json   # notebook 04's figures
    python benchmarks/long_context.py --device cuda --chunk-size 4096 --min-length 4096 --max-length 1047576 \
        --max-seconds 120 --json data/long_context/prefill_gpu.json     # on a GPU, to GPT-4.1 mini's whole window

The model is `mini` (4 layers, 4 query heads sharing 2 key/value heads of 32 dimensions) with its
context stretched by YaRN to each length, random weights (speed and memory do not depend on what
was learned). A prefill runs the whole prompt once, fills the KV cache, and computes the logits of
the last position only. Each measurement runs in a fresh Python process and reports how far the
prefill raised the process's peak resident memory (`minigpt.evals.peak_memory_rise`).

An implementation stops fitting at the first length where its process fails (out of memory), its
projected peak (twice the last one, since attention memory here grows at least linearly) would
pass the memory this machine has available, or it runs longer than `--max-seconds`. Both
columns are printed with the ratio chunked / SDPA and the point where each stopped. Lengths
double from `--min-length`; the last one is `--max-length` itself.

With `--device cuda` the model runs in bfloat16 (the precision GPUs serve in, and the one SDPA's
flash kernel needs) and every measurement runs in this one process after a warm-up: the peak is
`torch.cuda.max_memory_allocated` above what was allocated before the prefill, the time is taken
between two synchronizations, and an implementation stops where the GPU runs out of memory or
where the next length, at four times the last time (attention is quadratic), would pass
`--max-seconds`. The package's chunk loop is Python, so on a GPU it wants large blocks
(`--chunk-size`): each block is a handful of kernel launches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
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
def prefill_here(impl: str, length: int, device: str = "cpu", chunk_size: int = 256) -> dict:
    """Build a stretched `mini` and prefill `length` random tokens with `impl`; peak memory and time."""
    torch.manual_seed(0)
    original = preset("mini").context
    config = preset("mini", context=length, rope_scaling="yarn", rope_factor=max(1.0, length / original),
                    rope_original_context=original, attention_chunk=chunk_size)
    model = GPT(config).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    cache = model.new_kv_cache(1)

    def run():
        return model(ids, kv_cache=cache, attention_impl=impl, last_only=True)

    peak, seconds = cuda_peak_rise(run) if device == "cuda" else peak_memory_rise(run)
    return {"peak_bytes": peak, "seconds": seconds, "cache_bytes": cache.nbytes()}


def cuda_peak_rise(run) -> tuple[int, float]:
    """Bytes by which `run()` raises the GPU's peak allocation, and its seconds between synchronizations."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, time.perf_counter() - start


def measure(impl: str, length: int, max_seconds: float, chunk_size: int) -> dict | None:
    """`prefill_here` on the CPU in a fresh process; None if it failed or ran out of time."""
    command = [sys.executable, __file__, "--one", impl, str(length), "--chunk-size", str(chunk_size)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=max_seconds)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(result.stdout) if result.returncode == 0 else None


def measure_cuda(impl: str, length: int, chunk_size: int) -> dict | None:
    """`prefill_here` on the GPU in this process; None if it ran out of GPU memory."""
    try:
        return prefill_here(impl, length, "cuda", chunk_size)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def lengths_to_measure(smallest: int, largest: int) -> list[int]:
    """`smallest`, doubling, while below `largest`; then `largest` itself."""
    if not 1 <= smallest <= largest:
        raise ValueError(f"lengths need 1 <= --min-length <= --max-length, got {smallest} and {largest}")
    lengths = [smallest]
    while lengths[-1] * 2 < largest:
        lengths.append(lengths[-1] * 2)
    return lengths + [largest] if lengths[-1] != largest else lengths


def _cell(row: dict, impl: str, key: str, scale: float, width: int, fmt: str) -> str:
    """One table cell: `row[impl][key] / scale`, or a dash where `impl` was not measured."""
    return f"{row[impl][key] / scale:>{width}{fmt}}" if impl in row else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-length", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=1 << 20)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time limit of one prefill")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and stopping points here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--chunk-size", type=int, default=256, help="block size of the chunked attention")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(prefill_here(args.one[0], int(args.one[1]), chunk_size=args.chunk_size)))
        return
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and PyTorch sees none here")

    if on_gpu:
        budget = torch.cuda.mem_get_info()[0]
        where = f"{torch.cuda.get_device_name()}, bfloat16, {budget / 2**30:.1f} GiB free"
        for impl in IMPLS:  # warm-up: the first launches load kernels and libraries
            measure_cuda(impl, args.min_length, args.chunk_size)
    else:
        budget = available_bytes()
        where = f"CPU, float32, {budget / 2**30:.1f} GiB available"
    print(f"prefill of a YaRN-stretched mini, random weights, chunks of {args.chunk_size}; {where}")
    print(f"{'tokens':>9} {'chunked MiB':>12} {'chunked s':>10} {'SDPA MiB':>10} {'SDPA s':>8} {'memory ratio':>13} {'KV cache MiB':>13}")
    stopped = {impl: None for impl in IMPLS}
    rows = []
    lengths = lengths_to_measure(args.min_length, args.max_length)
    for length in lengths:
        if all(stopped.values()):
            break
        row = {}
        for impl in IMPLS:
            if stopped[impl]:
                continue
            if on_gpu:
                result = measure_cuda(impl, length, args.chunk_size)
                failure = f"ran out of GPU memory at {length:,} tokens"
            else:
                result = measure(impl, length, args.max_seconds, args.chunk_size)
                failure = f"failed or took over {args.max_seconds:.0f} s at {length:,} tokens"
            if result is None:
                stopped[impl] = failure
            else:
                row[impl] = result
                if length == lengths[-1]:  # nothing longer to project to
                    continue
                if 2 * result["peak_bytes"] > budget:
                    stopped[impl] = f"the next length would need about {2 * result['peak_bytes'] / 2**30:.1f} GiB"
                elif on_gpu and 4 * result["seconds"] > args.max_seconds:
                    stopped[impl] = f"the next length would take about {4 * result['seconds']:.0f} s"
        ratio = (f"{row['chunked']['peak_bytes'] / row['sdpa']['peak_bytes']:>13.2f}"
                 if len(row) == 2 and row["sdpa"]["peak_bytes"] > 0 else f"{'-':>13}")
        cache = next(iter(row.values()))["cache_bytes"] / 2**20 if row else float("nan")
        rows.append({"length": length, **row})
        print(f"{length:>9,} {_cell(row, 'chunked', 'peak_bytes', 2**20, 12, ',.0f')} "
              f"{_cell(row, 'chunked', 'seconds', 1, 10, '.2f')} {_cell(row, 'sdpa', 'peak_bytes', 2**20, 10, ',.0f')} "
              f"{_cell(row, 'sdpa', 'seconds', 1, 8, '.2f')} {ratio} {cache:>13,.0f}", flush=True)
        if args.json is not None:  # after every row, so a run cut short keeps what it measured
            write_record(args.json, where, budget, rows, stopped)
    for impl in IMPLS:
        print(f"{impl}: stopped because {stopped[impl]}" if stopped[impl] else f"{impl}: fitted up to --max-length")
    if args.json is not None:
        write_record(args.json, where, budget, rows, stopped)
        print(f"figures written to {args.json}")


def write_record(path: Path, where: str, budget: int, rows: list[dict], stopped: dict) -> None:
    """The command, the machine, the rows so far and the stopping points, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/long_context.py " + " ".join(sys.argv[1:]), "machine": where,
              "available_bytes": budget, "rows": rows, "stopped": stopped}
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
