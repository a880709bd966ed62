"""Notebook 02's exercise checks (minigpt/exercises/attention.py) against the worked solutions."""

import math

import pytest
import torch
from conftest import assert_rejected, load_solutions, unsolved

from minigpt.exercises import UNSOLVED_HINT
from minigpt.exercises import attention as ex
from minigpt.model import GPTConfig, preset

solutions = load_solutions("attention")


# --- Exercise 1: attention for one head -------------------------------------------------------


def _attend(q, k, v, scale=None, mask=True, mask_after=False, axis=-1):
    T, d = q.shape
    scores = q @ k.T / (math.sqrt(d) if scale is None else scale)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if mask and not mask_after:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(axis)
    if mask_after:
        weights = weights * allowed
    return weights.nan_to_num() @ v


def test_attend_accepts_the_solution():
    assert ex.check_attend(solutions.attend)


@pytest.mark.parametrize("wrong", [
    lambda q, k, v: _attend(q, k, v, scale=1.0),  # forgot the scale
    lambda q, k, v: _attend(q, k, v, scale=q.shape[1]),  # divided by d, not sqrt(d)
    lambda q, k, v: _attend(q, k, v, mask=False),  # no causal mask
    lambda q, k, v: _attend(q, k, v, mask_after=True),  # masked after the softmax
    lambda q, k, v: _attend(q, k, v, axis=0),  # softmax over the queries
    lambda q, k, v: _attend(q, k, v)[:, :-1],  # wrong shape
])
def test_attend_rejects_typical_mistakes(wrong):
    assert_rejected(ex.check_attend(wrong), "math.sqrt", "masked_fill")


def test_attend_rejects_the_template_and_names_the_mistake():
    verdict = ex.check_attend(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    assert "mask" in ex.check_attend(lambda q, k, v: _attend(q, k, v, mask=False)).hint
    assert "scale" in ex.check_attend(lambda q, k, v: _attend(q, k, v, scale=1.0)).hint


# --- Exercise 2: the mask of cached decoding -------------------------------------------------


def test_decode_mask_accepts_the_solution_and_the_package():
    assert ex.check_decode_mask(solutions.decode_mask)
    assert ex.check_decode_mask(lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq))


@pytest.mark.parametrize("wrong", [
    lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool).tril(),  # aligned top-left, as if no cache
    lambda nq, nk: ~solutions.decode_mask(nq, nk),  # True where masked
    lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq - 1),  # a query cannot see itself
    lambda nq, nk: solutions.decode_mask(nq, nk).int(),  # integers, not booleans
    lambda nq, nk: torch.ones(nk, nk, dtype=torch.bool).tril(),  # the full square mask
    lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq + 1),  # sees one key too many
])
def test_decode_mask_rejects_typical_mistakes(wrong):
    assert_rejected(ex.check_decode_mask(wrong), "n_keys - n_queries", "tril(")


def test_decode_mask_rejects_the_template_and_names_the_alignment():
    verdict = ex.check_decode_mask(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    top_left = ex.check_decode_mask(lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool).tril())
    assert "after the cached keys" in top_left.hint


# --- Exercise 3: KV cache bytes ----------------------------------------------------------------


def test_kv_cache_size_accepts_the_solution_and_matches_the_notebook_figure():
    assert ex.check_kv_cache_size(solutions.kv_cache_size)
    llama_like = GPTConfig(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, context=1_047_576)
    assert solutions.kv_cache_size(llama_like, 1_047_576, 2) / 2**30 == pytest.approx(127.9, abs=0.05)


def _expected_sizes():
    return [expected for *_, expected in ex._kv_cases()]


@pytest.mark.parametrize("wrong", [
    lambda c, n, w: c.n_layer * c.n_kv_head * c.head_dim * n * w,  # keys only
    lambda c, n, w: 2 * c.n_layer * c.n_head * c.head_dim * n * w,  # one per query head
    lambda c, n, w: 2 * c.n_layer * c.n_kv_head * c.head_dim * n,  # numbers, not bytes
    lambda c, n, w: 2 * c.n_layer * c.n_kv_head * c.n_embd * n * w,  # n_embd per head
    lambda c, n, w: 2 * c.n_layer * c.n_kv_head * c.head_dim * (n - 1) * w,  # off by one position
    lambda c, n, w: str(2 * c.n_layer * c.n_kv_head * c.head_dim * n * w) + " bytes",  # a string
])
def test_kv_cache_size_rejects_typical_mistakes(wrong):
    assert_rejected(ex.check_kv_cache_size(wrong), *_expected_sizes())


def test_kv_cache_size_rejects_the_template_and_names_the_mistake():
    verdict = ex.check_kv_cache_size(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    keys_only = ex.check_kv_cache_size(lambda c, n, w: c.n_layer * c.n_kv_head * c.head_dim * n * w)
    assert "keys and values" in keys_only.hint
    per_query = ex.check_kv_cache_size(lambda c, n, w: 2 * c.n_layer * c.n_head * c.head_dim * n * w)
    assert "key/value heads" in per_query.hint
    assert preset("mini").n_head != preset("mini").n_kv_head  # the case that tells these mistakes apart


# --- Exercise 4: one online-softmax step --------------------------------------------------------


def _no_rescale(m, l, a, s, v):
    m_new = torch.maximum(m, s.max())
    p = torch.exp(s - m_new)
    return m_new, l + p.sum(), a + p @ v


def _rescale_l_only(m, l, a, s, v):
    m_new = torch.maximum(m, s.max())
    p = torch.exp(s - m_new)
    return m_new, l * torch.exp(m - m_new) + p.sum(), a + p @ v


def _no_max(m, l, a, s, v):
    p = torch.exp(s)
    return torch.zeros(()), l + p.sum(), a + p @ v


def _inverted_rescale(m, l, a, s, v):
    m_new = torch.maximum(m, s.max())
    p = torch.exp(s - m_new)
    factor = torch.exp(m_new - m).nan_to_num(posinf=0.0)
    return m_new, l * factor + p.sum(), a * factor + p @ v


def test_online_softmax_step_accepts_the_solution():
    assert ex.check_online_softmax_step(solutions.online_softmax_step)


@pytest.mark.parametrize("wrong", [
    _no_rescale,
    _rescale_l_only,
    _no_max,
    _inverted_rescale,
    lambda m, l, a, s, v: solutions.online_softmax_step(m, l, a, s, v)[:2],  # forgot a
])
def test_online_softmax_step_rejects_typical_mistakes(wrong):
    assert_rejected(ex.check_online_softmax_step(wrong), "exp(m - m_new)", "torch.maximum")


def test_online_softmax_step_rejects_the_template_and_names_the_mistake():
    verdict = ex.check_online_softmax_step(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    assert "rescaled" in ex.check_online_softmax_step(_no_rescale).hint
    assert "a is not" in ex.check_online_softmax_step(_rescale_l_only).hint


# --- Exercise 5: an induction score ------------------------------------------------------------


def _score(weights, length, offset, include_last=False, start=None):
    start = length if start is None else start
    stop = 2 * length if include_last else 2 * length - 1
    queries = torch.arange(start, stop)
    return weights[queries, queries - offset].mean().item()


def test_induction_score_accepts_the_solution():
    assert ex.check_induction_score(solutions.induction_score)


@pytest.mark.parametrize("wrong", [
    lambda w, L: _score(w, L, offset=L),  # the duplicate-token score
    lambda w, L: _score(w, L, offset=L + 1, start=L + 1),  # the token before the earlier occurrence
    lambda w, L: _score(w, L, offset=L - 1, include_last=True),  # the last query included
    lambda w, L: _score(w, L, offset=1, start=1, include_last=True),  # the previous-token score
    lambda w, L: torch.tensor([_score(w, L, offset=L - 1)] * 2),  # not one number
])
def test_induction_score_rejects_typical_mistakes(wrong):
    expected = [round(ex.pattern_scores(w, L)["induction"].item(), 4) for w, L in ex._induction_cases()]
    assert_rejected(ex.check_induction_score(wrong), *expected)


def test_induction_score_rejects_the_template_and_names_the_mistake():
    verdict = ex.check_induction_score(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    duplicate = ex.check_induction_score(lambda w, L: _score(w, L, offset=L))
    assert "duplicate-token" in duplicate.hint
