"""The checks of notebook 04's exercises accept the worked solutions and reject typical mistakes."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_rejected, load_solutions, unsolved

from minigpt.exercises import UNSOLVED_HINT
from minigpt.exercises import long_context as ex
from minigpt.positions import ntk_base, rope_frequencies

solutions = load_solutions("long_context")


def test_rotate_pair():
    assert ex.check_rotate_pair(solutions.rotate_pair)
    expected = ex._package_rotation(0.3, -1.2, 5, 0.1)
    clockwise = lambda x, y, p, t: solutions.rotate_pair(x, y, -p, t)  # noqa: E731
    assert_rejected(ex.check_rotate_pair(clockwise), *expected)
    assert "wrong way" in ex.check_rotate_pair(clockwise).hint
    no_position = lambda x, y, p, t: solutions.rotate_pair(x, y, 1, t)  # noqa: E731
    assert_rejected(ex.check_rotate_pair(no_position), *expected)
    degrees = lambda x, y, p, t: solutions.rotate_pair(x, y, 1, math.degrees(p * t))  # noqa: E731
    assert "radians" in ex.check_rotate_pair(degrees).hint
    swapped = lambda x, y, p, t: solutions.rotate_pair(x, y, p, t)[::-1]  # noqa: E731
    assert_rejected(ex.check_rotate_pair(swapped), *expected)
    assert ex.check_rotate_pair(unsolved).hint == UNSOLVED_HINT


def test_ntk_base():
    assert ex.check_ntk_base(solutions.ntk_aware_base)
    expected = ntk_base(32, 10_000.0, 16.0)
    assert_rejected(ex.check_ntk_base(lambda base, s, d: base * s), expected)  # forgot the exponent
    assert_rejected(ex.check_ntk_base(lambda base, s, d: base * s ** ((d - 2) / d)), expected)  # inverted exponent
    assert_rejected(ex.check_ntk_base(lambda base, s, d: base / s), expected)
    assert ex.check_ntk_base(unsolved).hint == UNSOLVED_HINT


def test_yarn_ramp():
    assert ex.check_yarn_ramp(solutions.yarn_ramp_weight)
    def inverted(w, L, a=1.0, b=32.0):
        return solutions.yarn_ramp_weight(L, w, a, b)
    def reversed_(w, L, a=1.0, b=32.0):
        return 1 - solutions.yarn_ramp_weight(w, L, a, b)
    def unclamped(w, L, a=1.0, b=32.0):
        return (L / w - a) / (b - a)
    def over_beta(w, L, a=1.0, b=32.0):
        return min(max((L / w - a) / b, 0.0), 1.0)
    expected = solutions.yarn_ramp_weight(6.28, 128)
    for wrong, word in ((inverted, "other way round"), (reversed_, "wrong way round"), (unclamped, "clamp"),
                        (over_beta, "alpha")):
        verdict = ex.check_yarn_ramp(wrong)
        assert_rejected(verdict, expected)
        assert word in verdict.hint
    assert ex.check_yarn_ramp(unsolved).hint == UNSOLVED_HINT


def test_critical_pair():
    assert ex.check_critical_pair(solutions.critical_pair)
    assert solutions.critical_pair(16, 10_000.0, 128) == 3  # nano's pair 3, the lesson's finding
    def last_turning(d, base, L):
        return solutions.critical_pair(d, base, L) - 1
    def forgot_two_pi(d, base, L):  # compares theta_i with 1 / L
        return next(i for i in range(d // 2) if base ** (-2 * i / d) < 1 / L)
    for wrong in (last_turning, forgot_two_pi):
        verdict = ex.check_critical_pair(wrong)
        assert not verdict and verdict.hint
        assert "3" not in verdict.hint
    assert ex.check_critical_pair(lambda d, b, L: 3.0).hint.startswith("return")
    assert ex.check_critical_pair(lambda d, b, L: True).hint.startswith("return")
    assert ex.check_critical_pair(unsolved).hint == UNSOLVED_HINT


def test_critical_pair_accepts_any_integer_type():
    def with_numpy(d, base, L):  # np.argmax returns np.int64
        wavelengths = 2 * np.pi / base ** (-np.arange(0, d, 2) / d)
        return np.argmax(wavelengths > L)
    assert isinstance(with_numpy(16, 10_000.0, 128), np.integer)
    assert ex.check_critical_pair(with_numpy)
    def with_torch(d, base, L):  # a one-element integer tensor
        wavelengths = 2 * torch.pi / rope_frequencies(d, base)
        return (wavelengths > L).nonzero()[0]
    assert ex.check_critical_pair(with_torch)
    float_tensor = lambda d, b, L: torch.tensor(float(solutions.critical_pair(d, b, L)))  # noqa: E731
    assert ex.check_critical_pair(float_tensor).hint.startswith("return")


@pytest.mark.parametrize("check", [ex.check_rotate_pair, ex.check_ntk_base, ex.check_yarn_ramp,
                                   ex.check_critical_pair])
def test_every_check_explains_itself_and_survives_errors(check):
    assert check.__doc__
    def broken(*args):
        raise ZeroDivisionError("oops")
    assert "ZeroDivisionError" in check(broken).hint
