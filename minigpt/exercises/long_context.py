"""Checks for the exercises of notebook 04 (long context: positions that stretch).

Each check tries the reader's function on cases of its own and compares it with the package's own
code in `minigpt.positions`, so the expected values are computed, never
typed. A wrong answer gets a hint that names the kind of mistake, never the value expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from minigpt.exercises import CheckResult, call, close_to, not_yet, right
from minigpt.positions import apply_rotary, ntk_base, rope_frequencies, yarn_ramp

ROTATE = "Exercise 1 (rotate one RoPE pair)"
NTK = "Exercise 2 (the NTK-aware base)"
RAMP = "Exercise 3 (YaRN's ramp)"
CRITICAL = "Exercise 4 (the critical pair)"


# ---------------------------------------------------------------------------------------------
# Exercise 1: rotate one pair

ROTATE_CASES = [  # (x, y, position, theta)
    (1.0, 0.0, 1, 1.0),
    (0.3, -1.2, 5, 0.1),
    (2.0, 0.5, 100, 0.01),
    (-0.7, 0.4, 10_000, 0.001),
    (0.9, 0.2, 0, 1.0),
    (1.5, -0.3, 7, 0.5),
]


def _package_rotation(x: float, y: float, position: float, theta: float) -> tuple[float, float]:
    """The package's rotation of the pair `(x, y)` at `position`, pair frequency `theta`."""
    pair = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 2)  # (B, H, T, head_dim = 2)
    angle = torch.tensor([[position * theta]], dtype=torch.float64)  # (T, pairs) = (1, 1)
    rotated = apply_rotary(pair, angle.cos(), angle.sin()).view(2)
    return float(rotated[0]), float(rotated[1])


def _two_numbers(value: Any) -> tuple[float, float] | None:
    """`value` as two finite floats, or None if it is not a pair of numbers."""
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().reshape(-1).tolist()
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (first, second) if math.isfinite(first) and math.isfinite(second) else None


def _same_pair(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(close_to(u, v, rel=1e-6, abs_tol=1e-9) for u, v in zip(a, b))


def check_rotate_pair(rotate_pair) -> CheckResult:
    """Exercise 1: `rotate_pair(x, y, position, theta)` returns the pair `(x, y)` turned by the angle
    `position * theta`, as RoPE turns one pair of a query or key. Compared with
    `minigpt.positions.apply_rotary` on pairs at positions from 0 to 10,000."""
    for x, y, position, theta in ROTATE_CASES:
        value, verdict = call(ROTATE, rotate_pair, x, y, position, theta)
        if verdict is not None:
            return verdict
        pair = _two_numbers(value)
        if pair is None:
            return not_yet(ROTATE, "return the rotated pair as two numbers, (x', y').")
        if _same_pair(pair, _package_rotation(x, y, position, theta)):
            continue
        if _same_pair(pair, _package_rotation(x, y, -position, theta)):
            return not_yet(ROTATE, "your pair turns the wrong way: a positive angle turns the x axis towards the "
                                   "y axis (counter-clockwise). Look at the signs of the two sin terms.")
        if _same_pair(pair, _package_rotation(x, y, 1, theta)):
            return not_yet(ROTATE, "the angle must grow with the position: pair i turns by position * theta_i.")
        if _same_pair(pair, _package_rotation(x, y, position * theta * 180 / math.pi, 1.0)):
            return not_yet(ROTATE, "torch and math take angles in radians, not degrees.")
        return not_yet(ROTATE, "apply the 2-D rotation matrix of angle a = position * theta to (x, y), and "
                               "check each of its four terms.")
    return right(ROTATE)


# ---------------------------------------------------------------------------------------------
# Exercise 2: the NTK-aware base

NTK_CASES = [  # (base, factor, head_dim)
    (10_000.0, 16.0, 32),
    (10_000.0, 4.0, 16),
    (500_000.0, 8.0, 128),
    (10_000.0, 1.0, 32),
    (10.0, 64.0, 16),
]


def check_ntk_base(ntk_aware_base) -> CheckResult:
    """Exercise 2: `ntk_aware_base(base, factor, head_dim)` returns the larger base that NTK-aware
    scaling uses, so that the fastest pair keeps its speed and the slowest turns exactly `factor`
    times slower. Compared with `minigpt.positions.ntk_base`."""
    for base, factor, head_dim in NTK_CASES:
        value, verdict = call(NTK, ntk_aware_base, base, factor, head_dim)
        if verdict is not None:
            return verdict
        expected = ntk_base(head_dim, base, factor)
        if close_to(value, expected, rel=1e-9):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return not_yet(NTK, "return the new base as one number.")
        if factor == 1.0:
            return not_yet(NTK, "with a factor of 1 nothing is stretched, so the base must stay as it is.")
        slowest = head_dim // 2 - 1
        old = base ** (-2 * slowest / head_dim)
        if not number > 1:
            return not_yet(NTK, "a RoPE base must be a number greater than 1.")
        new = number ** (-2 * slowest / head_dim)
        return not_yet(NTK, f"with your base the slowest pair (i = {slowest}) turns {old / new:.4g} times slower; "
                            "it should turn exactly `factor` times slower. Solve base' ** (-2i/d) = "
                            "base ** (-2i/d) / factor for base' at that i.")
    return right(NTK)


# ---------------------------------------------------------------------------------------------
# Exercise 3: YaRN's ramp

RAMP_CASES = [  # (wavelength, training_length, alpha, beta)
    (6.28, 128, 1.0, 32.0),  # turns about 20 times: on the ramp
    (2.0, 128, 1.0, 32.0),  # 64 turns: kept
    (199.0, 128, 1.0, 32.0),  # less than one turn: interpolated
    (20.0, 256, 1.0, 32.0),
    (50.0, 256, 1.0, 32.0),
    (12.0, 128, 2.0, 16.0),
    (1000.0, 4096, 1.0, 32.0),
]


def check_yarn_ramp(yarn_ramp_weight) -> CheckResult:
    """Exercise 3: `yarn_ramp_weight(wavelength, training_length, alpha, beta)` returns YaRN's gamma for
    one pair: 0 for a pair interpolated fully (fewer than `alpha` turns in the training length), 1
    for a pair kept (more than `beta` turns), linear in the number of turns in between. Compared
    with `minigpt.positions.yarn_ramp`."""
    for wavelength, length, alpha, beta in RAMP_CASES:
        value, verdict = call(RAMP, yarn_ramp_weight, wavelength, length, alpha, beta)
        if verdict is not None:
            return verdict
        turns = length / wavelength
        expected = float(yarn_ramp(torch.tensor(turns, dtype=torch.float64), alpha, beta))
        if close_to(value, expected, rel=1e-9, abs_tol=1e-12):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return not_yet(RAMP, "return gamma as one number between 0 and 1.")
        if not 0.0 <= number <= 1.0:
            return not_yet(RAMP, "gamma must stay between 0 and 1: clamp it outside the ramp.")
        if close_to(number, 1 - expected, rel=1e-9, abs_tol=1e-12):
            return not_yet(RAMP, "your weight is the wrong way round: a pair that turns many times is kept "
                                 "(gamma near 1), a slow pair is interpolated (gamma near 0).")
        inverted = float(yarn_ramp(torch.tensor(wavelength / length, dtype=torch.float64), alpha, beta))
        if close_to(number, inverted, rel=1e-9, abs_tol=1e-12):
            return not_yet(RAMP, "the ramp reads the number of turns in the training length, training length "
                                 "over wavelength, not the other way round.")
        return not_yet(RAMP, "count the turns r = training_length / wavelength, then place r on the line from "
                             "alpha (gamma 0) to beta (gamma 1).")
    return right(RAMP)


# ---------------------------------------------------------------------------------------------
# Exercise 4: the critical pair

CRITICAL_CASES = [  # (head_dim, base, training_length)
    (16, 10_000.0, 128),
    (32, 10_000.0, 256),
    (128, 500_000.0, 8192),
    (64, 10_000.0, 4096),
    (16, 100.0, 64),
]


def _critical_pair(head_dim: int, base: float, training_length: int) -> int:
    """The first pair whose wavelength is longer than the training length (it never completes a turn)."""
    wavelengths = 2 * math.pi / rope_frequencies(head_dim, base)  # (head_dim // 2,), rising
    return int((wavelengths > training_length).nonzero()[0])


def _whole_number(value: Any) -> int | None:
    """`value` as an int if it is a whole number of any integer type (Python, NumPy, or a one-element
    integer tensor), else None. Floats and bools are refused: an index is neither."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_critical_pair(critical_pair) -> CheckResult:
    """Exercise 4: `critical_pair(head_dim, base, training_length)` returns the index of the first pair
    (counting from 0, fastest first) that does not complete one turn within the training length.
    Compared with wavelengths computed from `minigpt.positions.rope_frequencies`."""
    for head_dim, base, length in CRITICAL_CASES:
        value, verdict = call(CRITICAL, critical_pair, head_dim, base, length)
        if verdict is not None:
            return verdict
        expected = _critical_pair(head_dim, base, length)
        index = _whole_number(value)
        if index is None:
            return not_yet(CRITICAL, "return the pair's index as a whole number (an int).")
        if index == expected:
            continue
        if index == expected - 1:
            return not_yet(CRITICAL, "you returned the last pair that still completes a turn; the critical pair "
                                     "is the one after it.")
        if index == expected + 1:
            return not_yet(CRITICAL, "one too far: pairs count from 0, the fastest first.")
        return not_yet(CRITICAL, "compare each pair's wavelength, 2 pi / theta_i (in positions), with the "
                                 "training length.")
    return right(CRITICAL)
