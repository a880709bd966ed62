"""Notebook 06's exercise checks (minigpt/exercises/sampler.py) against the worked solutions."""

import math

import pytest
import torch
from conftest import assert_rejected, load_solutions, unsolved

from minigpt.exercises import UNSOLVED_HINT
from minigpt.exercises import sampler as ex

solutions = load_solutions("sampler")


def _raises(*args):
    raise RuntimeError("index out of range in my code")


# --- Exercise 1: top-p -------------------------------------------------------------------------


def _drop_where(logits, drop_sorted_rule):
    sorted_logits, order = logits.sort(descending=True)
    probabilities = sorted_logits.softmax(-1)
    drop = torch.zeros_like(logits, dtype=torch.bool)
    drop[order] = drop_sorted_rule(probabilities)
    return logits.masked_fill(drop, -math.inf)


def _strict_cumulative(logits, top_p):  # drops the token that crosses top_p
    return _drop_where(logits, lambda pr: pr.cumsum(-1) > top_p)


def _inclusive_cumulative(logits, top_p):  # drops the token that reaches top_p
    return _drop_where(logits, lambda pr: pr.cumsum(-1) >= top_p)


def _threshold_each(logits, top_p):  # a per-token threshold, not a nucleus
    return logits.masked_fill(logits.softmax(-1) < 1 - top_p, -math.inf)


def _probabilities(logits, top_p):
    return solutions.top_p(logits, top_p).softmax(-1)


def _left_sorted(logits, top_p):  # the kept logits in sorted order, not put back
    sorted_logits, _ = logits.sort(descending=True)
    probabilities = sorted_logits.softmax(-1)
    return sorted_logits.masked_fill(probabilities.cumsum(-1) - probabilities >= top_p, -math.inf)


def test_top_p_accepts_the_solution():
    assert ex.check_top_p(solutions.top_p)


@pytest.mark.parametrize("wrong, words", [
    (_strict_cumulative, "takes the running total past top_p"),
    (_inclusive_cumulative, "takes the running total past top_p"),  # the same mistake unless a sum equals top_p
    (_threshold_each, "not a threshold on each token"),
    (_probabilities, "not probabilities"),
    (_left_sorted, "back at its token's position"),
    (lambda logits, top_p: logits, "kept set is wrong"),  # no filtering at all
    (lambda logits, top_p: logits[:2], "one logit per token"),
    (unsolved, UNSOLVED_HINT),
    (_raises, "RuntimeError"),
])
def test_top_p_rejects_typical_mistakes(wrong, words):
    verdict = ex.check_top_p(wrong)
    assert_rejected(verdict)
    assert words in verdict.hint


# --- Exercise 2: the speculative acceptance rule -----------------------------------------------


def _inverted_ratio(p, q, token, u):
    if u < min(1.0, (q[token] / p[token]).item()):
        return True
    residual = (p - q).clamp(min=0)
    return residual / residual.sum()


def _unnormalised(p, q, token, u):
    return True if u < min(1.0, (p[token] / q[token]).item()) else (p - q).clamp(min=0)


def _resample_from_target(p, q, token, u):
    return True if u < min(1.0, (p[token] / q[token]).item()) else p


def _absolute_difference(p, q, token, u):
    if u < min(1.0, (p[token] / q[token]).item()):
        return True
    return (p - q).abs() / (p - q).abs().sum()


def _always_keep(p, q, token, u):
    return True


def test_judge_accepts_the_solution():
    assert ex.check_speculative_judge(solutions.judge)


def test_judge_accepts_a_boolean_tensor_for_kept():
    def tensor_kept(p, q, token, u):
        verdict = solutions.judge(p, q, token, u)
        return torch.tensor(True) if verdict is True else verdict
    assert ex.check_speculative_judge(tensor_kept)


@pytest.mark.parametrize("wrong, words", [
    (_inverted_ratio, "p(x) / q(x)"),
    (_unnormalised, "normalised to sum to 1"),
    (_resample_from_target, "not from p"),
    (_absolute_difference, "not |p - q|"),
    (_always_keep, "must be kept less often"),  # on every rejected case it agrees with the inverted ratio
    (unsolved, UNSOLVED_HINT),
    (_raises, "RuntimeError"),
])
def test_judge_rejects_typical_mistakes(wrong, words):
    verdict = ex.check_speculative_judge(wrong)
    assert_rejected(verdict)
    assert words in verdict.hint


# --- Exercise 3: a stop sequence across chunks -------------------------------------------------


def _per_chunk(chunks, stop):  # looks inside each chunk alone
    text = ""
    for chunk in chunks:
        if stop in chunk:
            return text + chunk[: chunk.index(stop)]
        text += chunk
    return text


def _keeps_the_stop(chunks, stop):
    text = "".join(chunks)
    return text[: text.index(stop) + len(stop)] if stop in text else text


def _last_occurrence(chunks, stop):
    text = "".join(chunks)
    return text[: text.rindex(stop)] if stop in text else text


def test_stop_sequence_accepts_the_solution():
    assert ex.check_stop_sequence(solutions.stop_text)


@pytest.mark.parametrize("wrong, words", [
    (_per_chunk, "spans chunks"),
    (_keeps_the_stop, "itself is not returned"),
    (lambda chunks, stop: "".join(chunks), "spans chunks"),
    (lambda chunks, stop: chunks, "as a str"),
    (unsolved, UNSOLVED_HINT),
    (_raises, "RuntimeError"),
])
def test_stop_sequence_rejects_typical_mistakes(wrong, words):
    verdict = ex.check_stop_sequence(wrong)
    assert_rejected(verdict)
    assert words in verdict.hint


def test_stop_sequence_rejects_the_last_occurrence_when_the_stop_repeats():
    chunks, stop = ["a.b", ".c.", "d"], "."
    assert solutions.stop_text(chunks, stop) == "a"
    assert ex.reference_stop_text(chunks, stop) == "a"
    assert _last_occurrence(chunks, stop) != "a"
