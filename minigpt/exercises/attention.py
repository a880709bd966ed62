"""Checks for the exercises of notebook 02 (attention).

1. `check_attend`: causal scaled dot-product attention for one head, against `minigpt.attention.attention`.
2. `check_decode_mask`: the causal mask of cached decoding (new queries after cached keys), against
   `minigpt.attention.causal_mask`.
3. `check_kv_cache_size`: a KV cache's bytes from a `GPTConfig`, against a real `KVCache` and
   `minigpt.attention.kv_cache_bytes`.
4. `check_online_softmax_step`: one block of the online softmax, fed block by block and compared with
   exact attention (`minigpt.attention.attention`).
5. `check_induction_score`: one head's induction score, against `minigpt.evals.pattern_scores`.

Every expected value is computed here with the package's own code; no hint contains one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from minigpt.attention import KVCache, attention, causal_mask, kv_cache_bytes
from minigpt.evals import pattern_scores
from minigpt.exercises import CheckResult, call, call_for_tensor, close_to, not_yet, right
from minigpt.model import GPTConfig, preset

ATTEND = "Exercise 1 (attention for one head)"
DECODE_MASK = "Exercise 2 (the mask of cached decoding)"
KV_CACHE_SIZE = "Exercise 3 (KV cache bytes)"
ONLINE_SOFTMAX = "Exercise 4 (one online-softmax step)"
INDUCTION_SCORE = "Exercise 5 (an induction score)"


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=atol)


# --- Exercise 1: attention for one head -------------------------------------------------------


def _one_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The package's causal attention on one head: `(T, d)` inputs as `(1, 1, T, d)`, back to `(T, d)`."""
    return attention(q[None, None], k[None, None], v[None, None], causal=True)[0, 0]


def check_attend(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> CheckResult:
    """Exercise 1: `attend(q, k, v)`, with `q, k, v` of shape `(T, d)` for one head, must return the
    causal attention output `(T, d)` of `minigpt.attention.attention`, on heads of 16 and 64 dims
    (wide enough that a missing or wrong scale shows)."""
    generator = torch.Generator().manual_seed(2)
    for T, d in ((6, 16), (11, 64)):
        q, k, v = (torch.randn(T, d, generator=generator) * 1.5 for _ in range(3))
        result, verdict = call_for_tensor(ATTEND, attend, q.clone(), k.clone(), v.clone())
        if verdict is not None:
            return verdict
        if result.shape != (T, d):
            return not_yet(ATTEND, f"for q, k, v of shape {(T, d)} the output has one row per query, shape "
                                   f"{(T, d)}; got {tuple(result.shape)}.")
        if _close(result, _one_head(q, k, v)):
            continue
        scores = q @ k.T  # (T, T) unscaled
        allowed = causal_mask(T, T)
        if _close(result, _one_head(q * math.sqrt(d), k, v)):
            return not_yet(ATTEND, "the scores are too large: they need the scale of section 1.")
        if _close(result, _one_head(q / math.sqrt(d), k, v)):
            return not_yet(ATTEND, "the scale is off: divide the scores by the square root of the head "
                                   "dimension, not by the dimension itself.")
        if _close(result, attention(q[None, None], k[None, None], v[None, None], causal=False)[0, 0]):
            return not_yet(ATTEND, "every query sees every key: the causal mask is missing.")
        after = (scores / math.sqrt(d)).softmax(-1) * allowed  # masked after the softmax
        if _close(result, after @ v):
            return not_yet(ATTEND, "the mask must act before the softmax (scores of future keys set to -inf), "
                                   "so that each row of weights still sums to one.")
        column = (scores / math.sqrt(d)).masked_fill(~allowed, float("-inf")).softmax(0).nan_to_num()
        if _close(result, column @ v):
            return not_yet(ATTEND, "the softmax runs over the wrong axis: each query's weights over the keys "
                                   "(the last axis) must sum to one.")
        return not_yet(ATTEND, "the output is off: scores from queries and keys, scaled, masked, a softmax "
                               "over the keys, then a weighted sum of the values. Check each step's shape.")
    return right(ATTEND)


# --- Exercise 2: the mask of cached decoding -------------------------------------------------


def check_decode_mask(decode_mask: Callable[[int, int], torch.Tensor]) -> CheckResult:
    """Exercise 2: `decode_mask(n_queries, n_keys)` must return the boolean `(n_queries, n_keys)` mask
    of `minigpt.attention.causal_mask`: True where a query may attend, the queries being the last
    `n_queries` of the `n_keys` positions. Tried on training (square), prefill-like, one-token and
    several-token decoding shapes."""
    for n_queries, n_keys in ((5, 5), (1, 7), (3, 8), (2, 6), (4, 4), (6, 9)):
        result, verdict = call_for_tensor(DECODE_MASK, decode_mask, n_queries, n_keys)
        if verdict is not None:
            return verdict
        if result.shape != (n_queries, n_keys):
            return not_yet(DECODE_MASK, f"for {n_queries} queries and {n_keys} keys the mask has one row per "
                                        f"query and one column per key, shape {(n_queries, n_keys)}; got "
                                        f"{tuple(result.shape)}.")
        if result.dtype != torch.bool:
            return not_yet(DECODE_MASK, f"return a boolean tensor (True: may attend), got dtype {result.dtype}; "
                                        "masked_fill and ~ need booleans.")
        expected = causal_mask(n_queries, n_keys)
        if torch.equal(result, expected):
            continue
        if torch.equal(result, ~expected):
            return not_yet(DECODE_MASK, "the mask is inverted: True must mean the query MAY attend to the key.")
        if torch.equal(result, torch.ones(n_queries, n_keys, dtype=torch.bool).tril()):
            return not_yet(DECODE_MASK, f"with {n_queries} queries and {n_keys} keys your first query sees only "
                                        "the first key, as if it stood at position 0; the new queries come "
                                        "after the cached keys. At which position does each stand?")
        if torch.equal(result, torch.ones(n_queries, n_keys, dtype=torch.bool).tril(n_keys - n_queries - 1)):
            return not_yet(DECODE_MASK, "each query must also see its own position (its key is computed "
                                        "from the same token).")
        return not_yet(DECODE_MASK, f"for {n_queries} queries over {n_keys} keys the mask is wrong: query i may "
                                    "see every key at or before its own position. Print yours beside section 2's.")
    return right(DECODE_MASK)


# --- Exercise 3: KV cache bytes ----------------------------------------------------------------


def _kv_cases() -> list[tuple[GPTConfig, int, int, int]]:
    """(config, tokens, bytes per value, expected bytes): `mini` and `nano` measured on a real
    `KVCache`, and a 32-layer model with MHA, GQA and MQA at 1,047,576 tokens from the formula."""
    cases = []
    for name, n_tokens in (("mini", 256), ("nano", 100)):
        config = preset(name)
        cache = KVCache(config.n_layer, 1, config.n_kv_head, config.head_dim, n_tokens, torch.float32)
        cache.lengths = [n_tokens] * config.n_layer  # as if a prompt of n_tokens had been prefilled
        cases.append((config, n_tokens, 4, cache.nbytes()))
    for n_kv_head in (8, 32, 1):
        config = GPTConfig(n_layer=32, n_head=32, n_kv_head=n_kv_head, n_embd=4096, context=1_047_576)
        cases.append((config, 1_047_576, 2, kv_cache_bytes(32, n_kv_head, config.head_dim, 1_047_576, 2)))
    return cases


def check_kv_cache_size(kv_cache_size: Callable[[GPTConfig, int, int], int]) -> CheckResult:
    """Exercise 3: `kv_cache_size(config, n_tokens, bytes_per_value)` must give the bytes of a KV cache
    holding `n_tokens` positions of one sequence: equal to the `nbytes()` of a filled
    `minigpt.attention.KVCache` for `mini` and `nano` in float32, and to
    `minigpt.attention.kv_cache_bytes` for a 32-layer model at 1,047,576 tokens in 16 bits, with 8, 32
    and 1 key/value heads."""
    for config, n_tokens, width, expected in _kv_cases():
        value, verdict = call(KV_CACHE_SIZE, kv_cache_size, config, n_tokens, width)
        if verdict is not None:
            return verdict
        if not close_to(value, expected, rel=1e-9):
            try:
                ratio = float(value) / expected
            except (TypeError, ValueError):
                return not_yet(KV_CACHE_SIZE, f"return a number of bytes (got a {type(value).__name__}).")
            shape = f"{config.n_layer} layers, {config.n_head} query heads, {config.n_kv_head} kv heads"
            if math.isclose(ratio, 0.5):
                return not_yet(KV_CACHE_SIZE, f"half the bytes for {shape}: the cache stores two tensors per "
                                              "position, keys and values.")
            if math.isclose(ratio, config.n_head / config.n_kv_head) and ratio != 1:
                return not_yet(KV_CACHE_SIZE, f"too large for {shape}: under GQA only the key/value heads are "
                                              "cached, not one per query head.")
            if math.isclose(ratio, 1 / width) and width != 1:
                return not_yet(KV_CACHE_SIZE, "that counts numbers, not bytes: each number takes "
                                              "bytes_per_value bytes.")
            if math.isclose(ratio, config.n_head) and config.n_head > 1:
                return not_yet(KV_CACHE_SIZE, "the width of one key/value head is the head dimension, "
                                              "n_embd // n_head, not n_embd.")
            return not_yet(KV_CACHE_SIZE, f"wrong for {shape}, {n_tokens:,} tokens, {width} bytes per value: "
                                          "count the numbers stored per position in one layer first.")
    return right(KV_CACHE_SIZE)


# --- Exercise 4: one online-softmax step --------------------------------------------------------


def _run_online(step: Callable, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, block: int):
    """Feed `step` the blocks of one query's scores; yield (state or verdict, end of block)."""
    d = q.shape[0]
    m, l, a = torch.tensor(float("-inf")), torch.tensor(0.0), torch.zeros(d)
    for start in range(0, K.shape[0], block):
        scores = K[start : start + block] @ q / math.sqrt(d)  # (block,)
        value, verdict = call(ONLINE_SOFTMAX, step, m.clone(), l.clone(), a.clone(), scores,
                              V[start : start + block].clone())
        if verdict is not None:
            yield verdict, start + block
            return
        if not (isinstance(value, (tuple, list)) and len(value) == 3
                and all(isinstance(t, torch.Tensor) for t in value)):
            yield not_yet(ONLINE_SOFTMAX, "return the three new running values as a tuple of tensors "
                                          "(m_new, l_new, a_new)."), start + block
            return
        m, l, a = (t.detach().float() for t in value)
        yield (m, l, a), start + block


def check_online_softmax_step(
    online_softmax_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple]
) -> CheckResult:
    """Exercise 4: `online_softmax_step(m, l, a, scores, values)` updates one query's running maximum
    `m` (0-d), denominator `l` (0-d) and weighted sum `a` `(d,)` with a block of `scores` `(block,)` and
    `values` `(block, d)`. Fed a sequence block by block, from `m = -inf, l = 0, a = 0`, the state after
    every block must be the maximum, softmax denominator and weighted sum of the scores so far, and
    `a / l` at the end must equal `minigpt.attention.attention` for that query. One case has scores in
    the thousands, where exponentials that do not subtract the maximum overflow."""
    generator = torch.Generator().manual_seed(4)
    for T, d, block, size in ((40, 8, 7, 1.0), (64, 16, 16, 3.0), (30, 4, 10, 40.0)):  # the last: scores in the thousands
        q, K, V = torch.randn(d, generator=generator) * size, torch.randn(T, d, generator=generator) * size, \
            torch.randn(T, d, generator=generator)
        all_scores = K @ q / math.sqrt(d)  # (T,) every score, to compare the running state against
        state = None
        for state, end in _run_online(online_softmax_step, q, K, V, block):
            if isinstance(state, CheckResult):
                return state
            m, l, a = state
            seen = all_scores[:end]
            true_m = seen.max()
            weights = torch.exp(seen - true_m)  # (end,)
            if not (torch.isfinite(m) and torch.isfinite(l) and torch.isfinite(a).all()):
                return not_yet(ONLINE_SOFTMAX, "the running values overflowed (inf or nan) on large scores: "
                                               "exponentiate each score minus the running maximum, never a "
                                               "raw score.")
            if not torch.allclose(m, true_m):
                return not_yet(ONLINE_SOFTMAX, "m must be the largest score seen so far, this block included.")
            if not torch.allclose(l, weights.sum(), rtol=1e-4):
                if end > block:
                    return not_yet(ONLINE_SOFTMAX, "after the first block l drifts: when the maximum rises, what "
                                                   "was accumulated against the old maximum must be rescaled.")
                return not_yet(ONLINE_SOFTMAX, "l must be the sum over the scores so far of exp(score - m).")
            if a.shape != (d,) or not torch.allclose(a, weights @ V[:end], rtol=1e-4, atol=1e-5):
                return not_yet(ONLINE_SOFTMAX, "l is right but a is not: a gets the same rescaling as l, plus "
                                               "this block's values weighted by the same exponentials.")
        m, l, a = state
        exact = attention(q[None, None, None], K[None, None], V[None, None], causal=False)[0, 0, 0]  # (d,)
        if not torch.allclose(a / l, exact, rtol=1e-4, atol=1e-5):
            return not_yet(ONLINE_SOFTMAX, "the running values look right but a / l differs from exact "
                                           "attention: check the dtype and shapes you return.")
    return right(ONLINE_SOFTMAX)


# --- Exercise 5: an induction score ------------------------------------------------------------


def _induction_cases() -> list[tuple[torch.Tensor, int]]:
    """One head's causal attention `(2L, 2L)` on a repeated sequence: random heads of two lengths and
    a perfect induction head (each second-copy query on the token after its earlier occurrence)."""
    generator = torch.Generator().manual_seed(6)
    cases = []
    for length in (8, 13):
        q, k = (torch.randn(1, 1, 2 * length, 8, generator=generator) * 2 for _ in range(2))
        _, weights = attention(q, k, k, causal=True, return_weights=True)
        cases.append((weights[0, 0], length))
    length = 6
    perfect = torch.eye(2 * length)  # each query on itself outside the second copy
    for i in range(length, 2 * length - 1):
        perfect[i] = 0
        perfect[i, i - length + 1] = 1
    cases.append((perfect, length))
    return cases


def check_induction_score(induction_score: Callable[[torch.Tensor, int], float]) -> CheckResult:
    """Exercise 5: `induction_score(weights, length)`, for one head's attention `weights` `(2L, 2L)` on a
    repeated sequence of half length `L = length`, must return the score of
    `minigpt.evals.pattern_scores(weights, length)["induction"]`: the mean attention from each query
    of the second copy (but the last) to the token after its earlier occurrence. Tried on random
    heads and on a perfect induction head."""
    for weights, length in _induction_cases():
        value, verdict = call(INDUCTION_SCORE, induction_score, weights.clone(), length)
        if verdict is not None:
            return verdict
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return not_yet(INDUCTION_SCORE, f"return one number, the mean; got a tensor of shape "
                                                f"{tuple(value.shape)}.")
            value = value.item()
        scores = pattern_scores(weights, length)
        expected = scores["induction"].item()
        if close_to(value, expected, rel=1e-4, abs_tol=1e-6):
            continue
        second = torch.arange(length, 2 * length)  # query positions in the second copy
        duplicate = (scores["duplicate-token"].item(), weights[second[:-1], second[:-1] - length].mean().item())
        if any(close_to(value, score, rel=1e-4, abs_tol=1e-6) for score in duplicate):
            return not_yet(INDUCTION_SCORE, "that is the duplicate-token score: the induction head looks one "
                                            "token further on than the earlier occurrence.")
        if close_to(value, scores["previous-token"].item(), rel=1e-4, abs_tol=1e-6):
            return not_yet(INDUCTION_SCORE, "that is the previous-token score: an induction head's key lies "
                                            "in the first copy, about L positions back.")
        back_one = weights[second[1:], second[1:] - length - 1].mean().item()  # the token before it
        if close_to(value, back_one, rel=1e-4, abs_tol=1e-6):
            return not_yet(INDUCTION_SCORE, "the key is on the wrong side of the earlier occurrence: the "
                                            "induction key is the token that FOLLOWED it.")
        every_query = weights[second, second - length + 1].mean().item()
        if close_to(value, every_query, rel=1e-4, abs_tol=1e-6):
            return not_yet(INDUCTION_SCORE, "one query too many: the last token's earlier occurrence is followed "
                                            "by the start of the second copy, not by a token of the first; the "
                                            "score leaves that query out.")
        return not_yet(INDUCTION_SCORE, "the score is off: for each query in the second copy (all but the last), "
                                        "take its weight on the token after the earlier occurrence of its own "
                                        "token, then average. Check which queries you include.")
    return right(INDUCTION_SCORE)
