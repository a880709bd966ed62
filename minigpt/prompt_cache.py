"""Prompt caching: reuse the keys and values of a prompt prefix seen recently, and what it saves.

The OpenAI API does this for GPT-4.1 models without being asked: when a new prompt starts with the
same tokens as a recent one, the prefill skips those tokens, the response's
`usage.prompt_tokens_details.cached_tokens` says how many were served from cache, and they are
billed at a quarter of the input price.

Why it is exact: attention is causal, so the key and value of position i depend only on tokens
0..i (and on i itself, through the rotary angle). Any stored sequence that shares its first L tokens
with a new prompt therefore already holds the K/V of the prompt's first L positions: the numbers a
fresh prefill would compute (up to float rounding, as matrix products of other shapes may round
differently). Only the remaining T - L tokens need to run; they attend to
the copied keys as to their own. At least one token always runs: the logits of the last position
are what decoding needs, and a cache of K/V does not store them.

The API caches prompts of at least 1,024 tokens and reports hits in steps of 128 tokens. Serving
systems such as vLLM keep K/V in fixed-size blocks keyed by a hash of every token up to the block's
end, so a lookup hashes the prompt block by block and only whole blocks match; below a minimum
length, storing and fetching K/V costs about as much as recomputing it.

This toy version keeps every prompt it prefills (no minimum length), finds the stored prompt with
the longest common prefix by comparing id tensors (a handful of entries, no hashing), reuses that
prefix rounded down to a multiple of `block_size` (1 by default; 128 mimics the API), and bounds
memory by total stored positions with least-recently-used eviction instead of expiry after
minutes of inactivity.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from minigpt.attention import KVCache
from minigpt.model import GPT


@dataclass(frozen=True)
class Prices:
    """Dollars per 1M tokens: fresh input, input served from the prompt cache, and output."""

    input: float
    cached_input: float
    output: float


# gpt-4.1-mini as listed on OpenAI's pricing page at launch (April 2025): cached input is 75% off.
PRICES = Prices(input=0.40, cached_input=0.10, output=1.60)


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as in the API's `usage` (cached_tokens is part of prompt_tokens)."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(
                f"cached_tokens ({self.cached_tokens}) cannot exceed prompt_tokens ({self.prompt_tokens}): "
                "cached tokens are the part of the prompt served from cache"
            )


def request_cost(usage: Usage, prices: Prices = PRICES) -> float:
    """Dollars for one request: uncached prompt tokens at the input price, cached ones at the cached price."""
    if not isinstance(usage, Usage):
        raise TypeError(f"usage must be a Usage, got {type(usage).__name__}")
    uncached = usage.prompt_tokens - usage.cached_tokens
    per_million = (uncached * prices.input + usage.cached_tokens * prices.cached_input
                   + usage.completion_tokens * prices.output)
    return per_million / 1_000_000


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids two 1-D id tensors share, by one vectorised comparison."""
    n = min(len(a), len(b))
    differs = a[:n] != b[:n]  # (n,) bool
    return int(differs.int().argmax()) if differs.any() else n


class PrefillResult(NamedTuple):
    logits: torch.Tensor  # (vocab,) float32: the next-token logits after the prompt's last position
    kv_cache: KVCache  # all T prompt positions, ready for decoding to continue
    cached_tokens: int  # prompt positions whose K/V came from the cache instead of the model


class _Entry(NamedTuple):
    ids: torch.Tensor  # (T,) long, on the CPU
    k: torch.Tensor  # (n_layer, n_kv_head, T, head_dim)
    v: torch.Tensor  # (n_layer, n_kv_head, T, head_dim)


class PromptCache:
    """Prefills batch-1 prompts, reusing the K/V of the longest prefix shared with a stored prompt.

    Stores each prefilled prompt's ids and K/V, at most `max_positions` positions in all: the least
    recently used entries (a hit refreshes recency) are evicted first, and a prompt longer than
    `max_positions` is not stored at all. A stored prompt that is a prefix of a new one is dropped
    (the new entry covers it); a new prompt that is a prefix of a stored one refreshes that entry.

    The K/V are those of the model's weights at prefill time: `clear()` after changing the weights.
    """

    def __init__(self, model: GPT, max_positions: int, block_size: int = 1):
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a minigpt GPT, got {type(model).__name__}")
        if model.config.rope_scaling == "dynamic-ntk":
            raise ValueError(
                "model uses rope_scaling='dynamic-ntk', whose rotary base grows with the total sequence "
                "length: keys cached at one length are rotated differently from the same keys recomputed "
                f"in a longer prompt (past rope_original_context={model.config.rope_original_context}), "
                "so reused K/V would be stale. Use a static scheme ('rope', 'linear', 'ntk', 'yarn')"
            )
        for name, value in (("max_positions", max_positions), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.max_positions, self.block_size = model, max_positions, block_size
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._keys = itertools.count()
        self.stored_positions = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        """Entries (stored prompts)."""
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes of stored keys and values (the ids, a few bytes per position, are not counted)."""
        return sum(entry.k.nbytes + entry.v.nbytes for entry in self._entries.values())

    def clear(self) -> None:
        """Forget every entry and reset the hit and miss counters (as `functools.lru_cache` does)."""
        self._entries.clear()
        self.stored_positions = 0
        self.hits = self.misses = 0

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor) -> PrefillResult:
        """Run a prompt `(1, T)` through the model, reusing cached K/V for its longest stored prefix.

        A prefill that reuses at least one position counts as a hit, any other as a miss.
        """
        ids = self._check_prompt(prompt_ids)  # (T,) on the CPU
        prefix_lengths = {key: common_prefix_length(entry.ids, ids) for key, entry in self._entries.items()}
        best_key = max(reversed(prefix_lengths), key=prefix_lengths.__getitem__, default=None)  # ties: most recent
        longest = prefix_lengths[best_key] if best_key is not None else 0
        reused = min(longest, len(ids) - 1) // self.block_size * self.block_size  # one token must run
        kv_cache = self.model.new_kv_cache(1)
        if reused:
            entry = self._entries[best_key]
            for layer in range(self.model.config.n_layer):  # (1, n_kv_head, reused, head_dim) per layer
                kv_cache.append(layer, entry.k[layer, None, :, :reused], entry.v[layer, None, :, :reused])
        device = kv_cache.k.device
        logits = self.model(prompt_ids[:, reused:].to(device), kv_cache=kv_cache, last_only=True).logits
        if reused:
            self.hits += 1
            self._entries.move_to_end(best_key)
        else:
            self.misses += 1
        self._store(ids, kv_cache, prefix_lengths)
        return PrefillResult(logits[0, -1].float(), kv_cache, reused)

    def _check_prompt(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Validate a `(1, T)` prompt and return a copy of its ids `(T,)` on the CPU."""
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype != torch.long:
            got = getattr(prompt_ids, "dtype", type(prompt_ids).__name__)
            raise TypeError(f"prompt_ids must be a torch.long tensor of token ids, got {got}")
        if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must have shape (1, T): PromptCache serves batch size 1 only, "
                             f"got shape {tuple(prompt_ids.shape)}")
        length, context, vocab_size = prompt_ids.shape[1], self.model.config.context, self.model.config.vocab_size
        if not 1 <= length <= context:
            raise ValueError(f"prompt_ids must hold 1 to {context} tokens (the model's context), got {length}; "
                             "a prompt is never truncated")
        if prompt_ids.min() < 0 or prompt_ids.max() >= vocab_size:
            raise ValueError(f"prompt_ids must lie in [0, {vocab_size}), found values from "
                             f"{prompt_ids.min().item()} to {prompt_ids.max().item()}")
        return prompt_ids[0].to("cpu", copy=True)  # a copy: the caller may reuse its tensor

    def _store(self, ids: torch.Tensor, kv_cache: KVCache, prefix_lengths: dict[int, int]) -> None:
        """Keep the prompt's K/V unless a stored prompt already starts with it; evict LRU entries to fit."""
        length = len(ids)
        covering = [key for key, shared in prefix_lengths.items() if shared == length]
        if covering:  # the whole prompt is a prefix of a stored one: refresh the most recent such
            self._entries.move_to_end(covering[-1])
            return
        if length > self.max_positions:
            return
        for key, shared in prefix_lengths.items():
            if shared == len(self._entries[key].ids):  # a prefix of the new prompt: the new entry covers it
                self._remove(key)
        while self.stored_positions + length > self.max_positions:
            self._remove(next(iter(self._entries)))  # the least recently used
        k = kv_cache.k[:, 0, :, :length].clone()  # (n_layer, n_kv_head, T, head_dim)
        v = kv_cache.v[:, 0, :, :length].clone()
        self._entries[next(self._keys)] = _Entry(ids, k, v)
        self.stored_positions += length

    def _remove(self, key: int) -> None:
        self.stored_positions -= len(self._entries.pop(key).ids)
