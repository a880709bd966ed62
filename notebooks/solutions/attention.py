"""Worked solutions to the exercises of notebook 02 (attention).

Try each exercise in the notebook first; the checks there say whether you are right without giving
the answer away. Each solution's docstring explains the reasoning.
"""

import math

import torch

from minigpt.model import GPTConfig


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exercise 1: causal scaled dot-product attention for one head.

    Row i of `q @ k.T` holds query i's dot product with every key, so the scores are `(T, T)`,
    queries down, keys across. Dividing by sqrt(d) keeps them at unit scale whatever the head width
    (section 1). The mask goes in before the softmax: a score of -inf becomes a weight of exactly 0
    and the weights a query does get still sum to one. The softmax runs over the keys, the last
    axis, and the weighted sum of the values is one more matrix product.
    """
    T, d = q.shape
    scores = q @ k.T / math.sqrt(d)  # (T, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T) key j <= query i
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (T, T)
    return weights @ v  # (T, d)


def decode_mask(n_queries: int, n_keys: int) -> torch.Tensor:
    """Exercise 2: the causal mask when the queries are the last `n_queries` of `n_keys` positions.

    With a KV cache, the `n_keys - n_queries` cached positions come first and the new queries
    follow, so query i stands at position `n_keys - n_queries + i`. It may see key j when
    `j <= n_keys - n_queries + i`: the full mask's bottom rows, a lower triangle shifted right by the
    number of cached positions. With `n_queries == n_keys` (training) the shift is 0, and with one
    query (decoding a token) the single row is all True: the newest token sees everything stored.
    """
    first_query = n_keys - n_queries  # the position of query 0
    query_positions = torch.arange(n_queries)[:, None] + first_query  # (n_queries, 1)
    key_positions = torch.arange(n_keys)[None, :]  # (1, n_keys)
    return key_positions <= query_positions  # (n_queries, n_keys) bool


def kv_cache_size(config: GPTConfig, n_tokens: int, bytes_per_value: int) -> int:
    """Exercise 3: the bytes of a KV cache holding `n_tokens` positions of one sequence.

    Per position and per layer the cache stores one key and one value for every key/value head
    (not every query head: under GQA a group of query heads reads one stored head), each a vector
    of `head_dim = n_embd // n_head` numbers. So a position costs 2 x n_layer x n_kv_head x head_dim
    numbers, and the cache that many times the length and the bytes of one number. For the
    32-layer, 128-dim model with 8 key/value heads in 16 bits that is 128 KiB per token, about
    128 GiB at 1,047,576 tokens.
    """
    numbers_per_position = 2 * config.n_layer * config.n_kv_head * config.head_dim  # K and V
    return numbers_per_position * n_tokens * bytes_per_value


def online_softmax_step(
    m: torch.Tensor, l: torch.Tensor, a: torch.Tensor, scores: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exercise 4: fold one block of scores into the running maximum, denominator and weighted sum.

    The invariant: l is the sum of exp(s - m) over the scores seen so far and a the same weights
    times the values. A new block may raise the maximum to m_new; every term accumulated so far was
    exp(s - m), and exp(s - m_new) = exp(s - m) * exp(m - m_new), so multiplying l and a by
    exp(m - m_new) re-bases them. The block's own terms are then added against m_new. Every exponent
    is at most 0, so nothing overflows; on the first block m = -inf and exp(-inf) = 0 wipes the
    (empty) old state. At the end, a / l is the softmax-weighted sum of the values.
    """
    m_new = torch.maximum(m, scores.max())  # ()
    rescale = torch.exp(m - m_new)  # () what the old terms are multiplied by
    p = torch.exp(scores - m_new)  # (block,)
    return m_new, l * rescale + p.sum(), a * rescale + p @ values


def induction_score(weights: torch.Tensor, length: int) -> float:
    """Exercise 5: one head's induction score on a repeated sequence of half length `length`.

    Token L + i of the second copy is the same as token i; an induction head attends from L + i to
    i + 1, the token that followed the earlier occurrence, i.e. to key (query - L + 1). The last
    query, 2L - 1, is left out: the token after its earlier occurrence (position L - 1) is position
    L, the start of the repeat, not a token the first copy predicts. The score is the mean weight
    on those keys: 1 for a head that does nothing else.
    """
    queries = torch.arange(length, 2 * length - 1)  # the second copy, but the last
    return weights[queries, queries - length + 1].mean().item()
