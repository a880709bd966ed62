"""Model benchmarks: every figure beside its baseline, measured in the same run.

    python benchmarks/model.py        # a few minutes on a 2-core laptop

1. Training throughput (tokens/s, forward + backward + AdamW) of the `mini` preset against a plain
   reference of the same shape written below in the most direct PyTorch. Goal: >= 0.95.
2. Decoding speed generating 512 tokens with the KV cache against recomputing the whole sequence
   at every step. Goal: >= 5x.
3. Peak memory and time of chunked (online-softmax) attention against exact attention at 8,192
   tokens, each measured in a fresh process as the rise of its peak resident memory. Goal: < 1/8.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.evals import attention_cost
from minigpt.model import GPT, GPTConfig, preset


class PlainGPT(nn.Module):
    """The same architecture as minigpt.model.GPT, written as directly as PyTorch allows."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.embedding = nn.Embedding(c.vocab_size, c.n_embd)
        kv = c.n_kv_head * c.head_dim
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "norm1": nn.RMSNorm(c.n_embd, eps=c.norm_eps), "q": nn.Linear(c.n_embd, c.n_embd, bias=False),
                "kv": nn.Linear(c.n_embd, 2 * kv, bias=False), "o": nn.Linear(c.n_embd, c.n_embd, bias=False),
                "norm2": nn.RMSNorm(c.n_embd, eps=c.norm_eps), "gate": nn.Linear(c.n_embd, c.hidden, bias=False),
                "up": nn.Linear(c.n_embd, c.hidden, bias=False), "down": nn.Linear(c.hidden, c.n_embd, bias=False),
            })
            for _ in range(c.n_layer)
        )
        self.norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.head.weight = self.embedding.weight
        angles = torch.outer(torch.arange(c.context).double(), c.rope_base ** (-torch.arange(0, c.head_dim, 2).double() / c.head_dim))
        self.register_buffer("cos", angles.cos().float())
        self.register_buffer("sin", angles.sin().float())

    def rotate(self, x):
        even, odd = x[..., 0::2], x[..., 1::2]
        cos, sin = self.cos[: x.shape[2]], self.sin[: x.shape[2]]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

    def forward(self, idx, targets):
        B, T = idx.shape
        c = self.c
        x = self.embedding(idx)
        for layer in self.layers:
            h = layer["norm1"](x)
            q = layer["q"](h).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
            k, v = layer["kv"](h).view(B, T, 2, c.n_kv_head, c.head_dim).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v, is_causal=True, enable_gqa=True)
            x = x + layer["o"](y.transpose(1, 2).reshape(B, T, c.n_embd))
            h = layer["norm2"](x)
            x = x + layer["down"](F.silu(layer["gate"](h)) * layer["up"](h))
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def training_tokens_per_second(model: nn.Module, loss_of, config: GPTConfig, batch: int, steps: int, repeats: int) -> float:
    """Best-of-`repeats` tokens/s over `steps` AdamW steps on random batches, after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (steps + 1, batch, config.context + 1), generator=generator)

    def step(i):
        loss = loss_of(model, data[i, :, :-1], data[i, :, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(steps)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        best = min(best, time.perf_counter() - start)
    return steps * batch * config.context / best


def bench_training(batch: int, steps: int, repeats: int) -> None:
    config = preset("mini")
    torch.manual_seed(0)
    ours = training_tokens_per_second(GPT(config), lambda m, x, y: m(x, y).loss, config, batch, steps, repeats)
    torch.manual_seed(0)
    plain = training_tokens_per_second(PlainGPT(config), lambda m, x, y: m(x, y), config, batch, steps, repeats)
    print(f"training mini, batch {batch} x {config.context} tokens:")
    print(f"  minigpt GPT            {ours:9,.0f} tokens/s | plain PyTorch reference {plain:9,.0f} tokens/s"
          f" | ratio {ours / plain:.2f} (goal >= 0.95)")


def bench_decoding(new_tokens: int) -> None:
    torch.manual_seed(0)
    model = GPT(preset("mini", context=new_tokens + 16)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    model.generate(prompt, 8)  # warm-up
    timings = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        out = model.generate(prompt, new_tokens, use_cache=use_cache)
        timings[use_cache] = time.perf_counter() - start
        timings[f"out{use_cache}"] = out
    same = "same tokens" if torch.equal(timings["outTrue"], timings["outFalse"]) else "DIFFERENT TOKENS"
    cached, recomputed = new_tokens / timings[True], new_tokens / timings[False]
    print(f"\ngreedy decoding of {new_tokens} tokens with mini ({same}):")
    print(f"  with KV cache          {cached:9,.0f} tokens/s | full recompute each step {recomputed:9,.0f} tokens/s"
          f" | ratio {cached / recomputed:.1f}x (goal >= 5x)")


def bench_attention_memory(length: int, n_head: int, head_dim: int) -> None:
    exact, chunked = (attention_cost(kind, length, n_head, head_dim) for kind in ("exact", "chunked"))
    scores = n_head * length * length * 4
    print(f"\nattention over {length:,} tokens, {n_head} heads of {head_dim} (float32; one score matrix = {scores / 2**20:,.0f} MiB):")
    print(f"  chunked (online softmax) peak +{chunked['peak_bytes'] / 2**20:8,.1f} MiB | exact +{exact['peak_bytes'] / 2**20:8,.1f} MiB"
          f" | ratio {chunked['peak_bytes'] / exact['peak_bytes']:.3f} (goal < 0.125)")
    print(f"  chunked time {chunked['seconds']:.2f} s | exact time {exact['seconds']:.2f} s"
          f" | ratio {chunked['seconds'] / exact['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--length", type=int, default=8192)
    args = parser.parse_args()
    bench_training(args.batch, args.steps, args.repeats)
    with torch.no_grad():
        bench_decoding(args.new_tokens)
        bench_attention_memory(args.length, n_head=4, head_dim=32)


if __name__ == "__main__":
    main()
