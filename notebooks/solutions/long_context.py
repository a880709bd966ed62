"""Worked solutions to the exercises of notebook 04 (long context: positions that stretch).

Each function is one exercise's answer, written with plain Python and `math` so that the reasoning
shows; the checks in `minigpt.exercises.long_context` compare them with the package's own code.
"""

import math


def rotate_pair(x: float, y: float, position: int, theta: float) -> tuple[float, float]:
    """Exercise 1: turn the pair `(x, y)` by the angle `position * theta` (radians).

    RoPE reads a head's vector as pairs and turns pair i at position p by `p * theta_i`: the 2-D
    rotation matrix [[cos a, -sin a], [sin a, cos a]] applied to (x, y). A positive angle turns the
    x axis towards the y axis. Because two rotations compose by adding angles, and a dot product
    is unchanged when both vectors turn together, `rotate(q, p) . rotate(k, s)` equals
    `rotate(q, p - s) . k`: the score sees only the distance `p - s`.
    """
    angle = position * theta
    cos, sin = math.cos(angle), math.sin(angle)
    return x * cos - y * sin, x * sin + y * cos


def ntk_aware_base(base: float, factor: float, head_dim: int) -> float:
    """Exercise 2: the NTK-aware base, `base * factor ** (d / (d - 2))`.

    Pair i turns at `base ** (-2i / d)`. Pair 0 turns at 1 whatever the base, so it keeps its
    speed. The slowest pair, i = d/2 - 1, turns at `base ** (-(d - 2) / d)`; to make it exactly
    `factor` times slower, solve `base' ** (-(d - 2) / d) = base ** (-(d - 2) / d) / factor`:
    raising both sides to the power `-d / (d - 2)` gives `base' = base * factor ** (d / (d - 2))`.
    Every pair between is slowed by a factor between 1 and `factor`, geometrically.
    """
    return base * factor ** (head_dim / (head_dim - 2))


def yarn_ramp_weight(wavelength: float, training_length: int, alpha: float = 1.0, beta: float = 32.0) -> float:
    """Exercise 3: YaRN's gamma for a pair of this wavelength.

    A pair turns `r = training_length / wavelength` times within the training length. Below
    `alpha` turns it never showed the model a full circle, so YaRN interpolates it fully
    (gamma = 0, frequency theta / s, as PI). Above `beta` turns it showed every angle many times,
    so YaRN keeps it (gamma = 1). In between, gamma rises linearly with r, and the new frequency is
    `(1 - gamma) * theta / s + gamma * theta`.
    """
    turns = training_length / wavelength
    return min(max((turns - alpha) / (beta - alpha), 0.0), 1.0)


def critical_pair(head_dim: int, base: float, training_length: int) -> int:
    """Exercise 4: the index of the first pair that does not complete a turn in the training length.

    Pair i turns at `theta_i = base ** (-2i / d)` radians per position, so it repeats every
    `2 pi / theta_i` positions, and wavelengths grow with i. The first pair whose wavelength is
    longer than the training length is the critical one: inside the window the model saw only
    part of its circle, and may rely on its exact angle there (nano's pair 3, 199 tokens against
    128), yet past the window its angles are new.
    """
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi / base ** (-2 * i / head_dim)
        if wavelength > training_length:
            return i
    raise ValueError("every pair completes a turn within the training length")
