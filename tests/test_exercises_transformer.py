"""Notebook 03's exercise checks (minigpt/exercises/transformer.py) against the worked solutions."""

import math

import pytest
import torch
from conftest import assert_rejected, load_solutions, unsolved

from minigpt.exercises import UNSOLVED_HINT
from minigpt.exercises import transformer as ex
from minigpt.model import GPTConfig

solutions = load_solutions("transformer")


# --- Exercise 1: RMSNorm ----------------------------------------------------------------------


def test_rms_norm_accepts_the_solution():
    assert ex.check_rms_norm(solutions.rms_norm)


@pytest.mark.parametrize("wrong", [
    lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),  # forgot the weight
    lambda x, w, eps: (x - x.mean(-1, keepdim=True))  # LayerNorm without its bias
    * torch.rsqrt((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps) * w,
    lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w,  # eps outside the root
    lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w,  # wrong axis
    lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1) + eps) * w,  # no keepdim: wrong shape or broadcast
])
def test_rms_norm_rejects_typical_mistakes(wrong):
    assert_rejected(ex.check_rms_norm(wrong))


def test_rms_norm_rejects_the_template_and_names_the_mistake():
    verdict = ex.check_rms_norm(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    no_weight = ex.check_rms_norm(lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    assert "weight" in no_weight.hint


@pytest.mark.parametrize("own_eps", [1e-5, 0.0])
def test_rms_norm_rejects_an_eps_of_its_own_and_says_to_use_the_argument(own_eps):
    ignores_eps = lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + own_eps) * w  # noqa: E731
    verdict = ex.check_rms_norm(ignores_eps)
    assert_rejected(verdict)
    assert "eps you are given" in verdict.hint


# --- Exercise 2: temperature ------------------------------------------------------------------


def test_temperature_accepts_the_solution_and_a_tiny_temperature_for_zero():
    assert ex.check_temperature(solutions.apply_temperature)
    assert ex.check_temperature(lambda logits, t: (logits / max(t, 1e-9)).softmax(-1))


@pytest.mark.parametrize("wrong", [
    lambda logits, t: (logits * t).softmax(-1) if t else (logits * 1e9).softmax(-1),  # multiplied by T
    lambda logits, t: logits / t if t else logits,  # no softmax
    lambda logits, t: (logits / t).softmax(0) if t else logits.softmax(0),  # softmax over the wrong axis
    lambda logits, t: (logits / t).softmax(-1),  # temperature 0 divides by zero: nan
    lambda logits, t: (logits / (t or 1)).softmax(-1),  # temperature 0 treated as 1
])
def test_temperature_rejects_typical_mistakes(wrong):
    assert_rejected(ex.check_temperature(wrong))


def _one_hot_in_the_whole_tensor(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Temperature 0 as a single 1 at the argmax of the whole tensor: right for (vocab,), wrong for (B, vocab)."""
    if t:
        return (logits / t).softmax(-1)
    return torch.zeros(logits.numel()).scatter(0, logits.argmax().view(1), 1.0).view_as(logits)


def test_temperature_zero_is_checked_row_by_row_on_a_batch():
    verdict = ex.check_temperature(_one_hot_in_the_whole_tensor)
    assert_rejected(verdict)
    assert "each row" in verdict.hint
    first_row_everywhere = lambda logits, t: (  # noqa: E731  the limit of row 0 copied to every row
        (logits / t).softmax(-1) if t else
        torch.nn.functional.one_hot(logits.reshape(-1, logits.shape[-1])[0].argmax(), logits.shape[-1])
        .float().expand_as(logits).clone())
    assert_rejected(ex.check_temperature(first_row_everywhere))


def test_temperature_rejects_the_template_and_hints_at_the_limit():
    verdict = ex.check_temperature(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
    zero_as_one = ex.check_temperature(lambda logits, t: (logits / (t or 1)).softmax(-1))
    assert "limit" in zero_as_one.hint and "greedy" not in zero_as_one.hint and "argmax" not in zero_as_one.hint


# --- Exercise 3: bits per byte ----------------------------------------------------------------


def test_bits_per_byte_accepts_the_solution():
    assert ex.check_bits_per_byte(solutions.to_bits_per_byte)


@pytest.mark.parametrize("wrong, word", [
    (lambda nats, bpt: nats / bpt, "ln 2"),  # nats per byte
    (lambda nats, bpt: nats * math.log(2) / bpt, "wrong way"),  # the conversion upside down
    (lambda nats, bpt: nats / math.log(2) * bpt, "divide"),  # multiplied by the bytes per token
    (lambda nats, bpt: nats / math.log(10) / bpt, "two steps"),  # the wrong logarithm
])
def test_bits_per_byte_rejects_typical_mistakes(wrong, word):
    expected = [package for _, _, package in ex._bits_per_byte_cases()]
    verdict = ex.check_bits_per_byte(wrong)
    assert_rejected(verdict, *expected)
    assert word in verdict.hint


def test_bits_per_byte_rejects_the_template():
    verdict = ex.check_bits_per_byte(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT


# --- Exercise 4: counting parameters ----------------------------------------------------------


def test_parameter_count_accepts_the_solution():
    assert ex.check_parameter_count(solutions.count_parameters)


def _always_tied(c: GPTConfig) -> int:
    return solutions.count_parameters(GPTConfig(**{**c.__dict__, "tie_embeddings": True}))


def _kv_as_query_heads(c: GPTConfig) -> int:
    return solutions.count_parameters(GPTConfig(**{**c.__dict__, "n_kv_head": c.n_head}))


def _default_width(c: GPTConfig) -> int:
    return solutions.count_parameters(GPTConfig(**{**c.__dict__, "mlp_hidden": 0}))


def _no_norms(c: GPTConfig) -> int:
    return solutions.count_parameters(c) - (2 * c.n_layer + 1) * c.n_embd


@pytest.mark.parametrize("wrong, word", [
    (_always_tied, "untied"),
    (_kv_as_query_heads, "n_kv_head"),
    (_default_width, "config.hidden"),
    (_no_norms, "norms"),
    (lambda c: float(solutions.count_parameters(c)) + 0.5, "whole number"),
])
def test_parameter_count_rejects_typical_mistakes(wrong, word):
    expected = [ex._package_count(config) for _, config in ex._parameter_count_configs()]
    verdict = ex.check_parameter_count(wrong)
    assert_rejected(verdict, *expected)
    assert word in verdict.hint


def test_parameter_count_rejects_the_template():
    verdict = ex.check_parameter_count(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
