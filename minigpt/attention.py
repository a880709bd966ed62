"""Attention, written out: scaled dot-product attention with a causal mask, grouped-query heads,
a KV cache for incremental decoding, and chunked attention with an online softmax.

Shapes follow one convention throughout: queries `(B, n_head, T_q, head_dim)`, keys and values
`(B, n_kv_head, T_k, head_dim)`. With grouped-query attention (GQA) `n_kv_head` divides `n_head`
and each key/value head serves `n_head // n_kv_head` consecutive query heads; `n_kv_head ==
n_head` is classic multi-head attention (MHA) and `n_kv_head == 1` multi-query attention (MQA).

Queries are always the *last* `T_q` positions of the `T_k` keys: during a full forward pass
`T_q == T_k`; when decoding with a KV cache, the new queries follow the cached keys.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import repeat


def causal_mask(
    n_queries: int,
    n_keys: int,
    device: torch.device | str | None = None,
    first_query: int | None = None,
    first_key: int = 0,
) -> torch.Tensor:
    """Boolean `(n_queries, n_keys)`, True where a query may look at a key: at or before its position.

    By default query i stands at position `n_keys - n_queries + i` (the queries are the last
    positions), so the mask is lower-triangular, aligned to the bottom-right corner. A block of a
    larger mask gives its queries' and keys' first positions.
    """
    if first_query is None:
        first_query = n_keys - n_queries
    query_positions = torch.arange(n_queries, device=device)[:, None] + first_query
    return torch.arange(n_keys, device=device)[None, :] + first_key <= query_positions


@functools.lru_cache(maxsize=8)
def _shared_causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """`causal_mask`, made once for every layer of a pass that asks for the same shape (never modified)."""
    return causal_mask(n_queries, n_keys, device)


def expand_kv(k: torch.Tensor, v: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each key/value head for the query heads it serves: `(B, n_kv_head, T, D)` to `(B, n_head, T, D)`."""
    group = n_head // k.shape[1]
    return tuple(repeat(t, "b kv t d -> b (kv group) t d", group=group) for t in (k, v))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise a clear error unless q, k, v have compatible shapes and a floating dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, time, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (batch, n_head, n_queries, head_dim), (k_batch, n_kv_head, n_keys, k_dim) = q.shape, k.shape
    if (batch, head_dim) != (k_batch, k_dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch size or head_dim")
    if n_head % n_kv_head:
        raise ValueError(f"n_kv_head ({n_kv_head}) must divide n_head ({n_head}) for grouped-query attention")
    if causal and n_queries > n_keys:
        raise ValueError(f"causal attention needs at least as many keys ({n_keys}) as queries ({n_queries})")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, return_weights: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, step by step: scores, mask, softmax, weighted sum of values.

    Returns the output `(B, n_head, T_q, head_dim)` and, with `return_weights`, the attention
    probabilities `(B, n_head, T_q, T_k)`: what each query looks at, for visualisation.
    """
    check_qkv(q, k, v, causal)
    k, v = expand_kv(k, v, q.shape[1])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T_q, T_k)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    weights = scores.softmax(dim=-1)
    out = weights @ v  # (B, H, T_q, head_dim)
    return (out, weights) if return_weights else out


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The same result as `attention`, computed by PyTorch's fused kernel (no weights returned).

    SDPA's own `is_causal` aligns the mask to the top-left corner, which is only right when
    `T_q == T_k`; cached decoding needs the bottom-right alignment of `causal_mask`.
    """
    check_qkv(q, k, v, causal)
    n_queries, n_keys = q.shape[2], k.shape[2]
    options = {"enable_gqa": k.shape[1] != q.shape[1]}
    if causal and n_queries == n_keys:
        options["is_causal"] = True
    elif causal and n_queries > 1:  # a single new query sees every key: no mask needed
        options["attn_mask"] = _shared_causal_mask(n_queries, n_keys, q.device)
    return F.scaled_dot_product_attention(q, k, v, **options)


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, chunk_size: int = 256
) -> torch.Tensor:
    """Exact attention in blocks with an online softmax (the idea behind FlashAttention).

    Never builds the `(T_q, T_k)` score matrix: for each block of queries it walks over blocks of
    keys, keeping a running maximum `m`, a running softmax denominator `l` and a running weighted
    sum `acc`. When a new block raises the maximum, the old `l` and `acc` are rescaled by
    `exp(m_old - m_new)`, so the result equals the full softmax. Memory is linear in the sequence
    length (plus one `chunk_size x chunk_size` block); with `causal`, key blocks entirely in a
    query block's future are skipped.
    """
    check_qkv(q, k, v, causal)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    n_head, n_queries, n_keys = q.shape[1], q.shape[2], k.shape[2]
    offset = n_keys - n_queries  # position of the first query
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for q_start in range(0, n_queries, chunk_size):
        q_end = min(q_start + chunk_size, n_queries)
        q_block = q[:, :, q_start:q_end] * scale  # (B, H, cq, D)
        m = q_block.new_full((*q_block.shape[:3], 1), float("-inf"))  # running max, (B, H, cq, 1)
        l = torch.zeros_like(m)  # running denominator
        acc = torch.zeros_like(q_block)  # running numerator, (B, H, cq, D)
        visible_keys = offset + q_end if causal else n_keys  # the block's last query sees this far
        for k_start in range(0, visible_keys, chunk_size):
            k_end = min(k_start + chunk_size, visible_keys)
            k_block, v_block = expand_kv(k[:, :, k_start:k_end], v[:, :, k_start:k_end], n_head)
            scores = q_block @ k_block.transpose(-2, -1)  # (B, H, cq, ck)
            if causal and k_end > offset + q_start + 1:  # the block reaches past the diagonal
                mask = causal_mask(q_end - q_start, k_end - k_start, q.device, offset + q_start, k_start)
                scores = scores.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
            p = torch.exp(scores - m_new)
            rescale = torch.exp(m - m_new)
            l = l * rescale + p.sum(dim=-1, keepdim=True)
            acc = acc * rescale + p @ v_block
            m = m_new
        out[:, :, q_start:q_end] = acc / l
    return out


class KVCache:
    """Keys and values of past positions for every layer, preallocated to `max_len` positions.

    Decoding one token at a time, a model without a cache recomputes keys and values for the
    whole prefix at every step; with one it computes them once, appends them here, and attends
    the new query to everything stored. Each layer appends its own keys and values, so all
    layers hold the same number of positions after a forward pass.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * n_layer  # positions stored, per layer

    def __len__(self) -> int:
        """Positions stored (those of the first layer: the others catch up within a forward pass)."""
        return self.lengths[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v` `(B, n_kv_head, T, head_dim)` after the layer's past; return all keys and values so far."""
        start, n_new = self.lengths[layer], k.shape[2]
        if k.ndim != 4 or k.shape[:2] != self.k.shape[1:3] or k.shape[3] != self.k.shape[4] or k.shape != v.shape:
            raise ValueError(
                f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit a cache of "
                f"(batch, n_kv_head, time, head_dim) = {tuple(self.k.shape[1:3])} x time x {self.k.shape[4]}"
            )
        if start + n_new > self.max_len:
            raise ValueError(
                f"KV cache overflow: it holds {self.max_len} positions, {start} are used and {n_new} more "
                "were appended; create the cache with a larger max_len (at most the model's context)"
            )
        self.k[layer, :, :, start : start + n_new] = k
        self.v[layer, :, :, start : start + n_new] = v
        self.lengths[layer] = start + n_new
        return self.k[layer, :, :, : start + n_new], self.v[layer, :, :, : start + n_new]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding drops the rejected drafts)."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= len(self):
            raise ValueError(f"length must be an integer from 0 to the {len(self)} positions stored, got {length!r}")
        self.lengths = [min(stored, length) for stored in self.lengths]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (1-D indices, repeats allowed) in that order: beam search follows its beams."""
        if not isinstance(rows, torch.Tensor) or rows.ndim != 1 or len(rows) != self.k.shape[1]:
            raise ValueError(f"rows must be a 1-D tensor of {self.k.shape[1]} batch indices, got {rows!r}")
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def nbytes(self) -> int:
        """Bytes held by the positions stored so far (keys and values, all layers)."""
        per_position = self.k[:, :, :, 0].numel() * self.k.element_size() * 2
        return per_position * len(self)


def kv_cache_bytes(
    n_layer: int, n_kv_head: int, head_dim: int, context: int, bytes_per_value: int = 2, batch_size: int = 1
) -> int:
    """Bytes a KV cache needs: keys and values for every layer, key/value head and position."""
    return 2 * n_layer * n_kv_head * head_dim * context * bytes_per_value * batch_size
