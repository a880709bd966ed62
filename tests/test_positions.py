"""Tests for minigpt/positions.py: RoPE frequencies, the pair rotation, and relative positions.

The references here are written independently of the module: frequencies from the formula
`base ** (-2i / head_dim)`, and rotations as complex multiplication, reading pair i of a vector as
the complex number `x[2i] + 1j * x[2i+1]` and multiplying it by `exp(1j * p * theta_i)`.
"""

import math

import pytest
import torch

from minigpt.positions import RotaryEmbedding, apply_rotary, rope_frequencies


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_rotate(x: torch.Tensor, positions, head_dim: int, base: float = 10_000.0) -> torch.Tensor:
    """Rotate `x` `(..., T, head_dim)` at `positions` (length T) by complex multiplication, in complex128."""
    x = x.double()
    pairs = torch.complex(x[..., 0::2], x[..., 1::2])  # (..., T, head_dim // 2)
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    theta = torch.tensor([base ** (-2 * j / head_dim) for j in i.tolist()], dtype=torch.float64)
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * theta[None, :]
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = rotated.real, rotated.imag
    return out


def exact_cos_sin(positions, head_dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos and sin `(T, head_dim // 2)` of `p * base ** (-2i / head_dim)`, from math alone."""
    angles = torch.tensor(
        [[p * base ** (-2 * i / head_dim) for i in range(head_dim // 2)] for p in positions], dtype=torch.float64
    )
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------------------------------------
# Frequencies


@pytest.mark.parametrize("head_dim, base", [(16, 10_000.0), (64, 10_000.0), (8, 500_000.0), (2, 10.0)])
def test_rope_frequencies_follow_the_formula(head_dim, base):
    freqs = rope_frequencies(head_dim, base)
    assert freqs.shape == (head_dim // 2,)
    assert freqs[0].item() == 1.0
    for i in sorted({0, 1, head_dim // 4, head_dim // 2 - 1} & set(range(head_dim // 2))):
        assert freqs[i].item() == pytest.approx(base ** (-2 * i / head_dim), rel=1e-12)
    assert torch.all(freqs[1:] < freqs[:-1])  # each pair turns slower than the one before


def test_rope_frequencies_last_pair_turns_at_about_one_over_base():
    freqs = rope_frequencies(128, 10_000.0)
    assert freqs[-1].item() == pytest.approx(10_000.0 ** (-126 / 128), rel=1e-12)
    assert 1 / 10_000.0 < freqs[-1].item() < 2 / 10_000.0


def test_rotary_embedding_returns_cos_sin_of_the_requested_positions():
    rotary = RotaryEmbedding(16, 10_000.0)
    cos, sin = rotary(5, 7)
    assert cos.shape == sin.shape == (7, 8)
    assert cos.dtype == sin.dtype == torch.float32
    want_cos, want_sin = exact_cos_sin(range(5, 12), 16)
    torch.testing.assert_close(cos.double(), want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), want_sin, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The rotation against complex multiplication


@pytest.mark.parametrize("positions", [[0, 1, 2, 3], [7, 31, 100, 1000], [12_345]])
def test_apply_rotary_equals_complex_multiplication(positions):
    head_dim = 16
    x = torch.randn(2, 3, len(positions), head_dim)
    cos, sin = exact_cos_sin(positions, head_dim)
    got = apply_rotary(x, cos, sin)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), reference_rotate(x, positions, head_dim), rtol=0, atol=1e-6)


def test_apply_rotary_with_the_module_angles_equals_complex_multiplication():
    head_dim, start, length = 32, 40, 9
    x = torch.randn(1, 2, length, head_dim)
    cos, sin = RotaryEmbedding(head_dim)(start, length)
    want = reference_rotate(x, list(range(start, start + length)), head_dim)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), want, rtol=0, atol=1e-5)


def test_apply_rotary_pairs_are_interleaved_not_halves():
    # a vector with only x[0] = 1 is pair 0 = (1, 0): rotated by angle p it becomes (cos p, sin p)
    head_dim, p = 8, 1
    x = torch.zeros(1, 1, 1, head_dim)
    x[..., 0] = 1.0
    cos, sin = exact_cos_sin([p], head_dim)
    got = apply_rotary(x, cos, sin)[0, 0, 0]
    want = torch.zeros(head_dim)
    want[0], want[1] = math.cos(p), math.sin(p)  # pair 0 turns one radian per position
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_apply_rotary_keeps_half_precision_dtype():
    x = torch.randn(1, 2, 4, 8).to(torch.bfloat16)
    cos, sin = RotaryEmbedding(8)(0, 4)
    got = apply_rotary(x, cos, sin)
    assert got.dtype == torch.bfloat16
    want = reference_rotate(x.float(), [0, 1, 2, 3], 8)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


# ---------------------------------------------------------------------------------------------
# Rotation invariants


def test_rotation_preserves_norms():
    x = torch.randn(2, 4, 50, 16)
    cos, sin = RotaryEmbedding(16)(3, 50)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    # and every pair keeps its own length: a rotation, not just an orthogonal mix
    pair_norms = lambda t: t.unflatten(-1, (8, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norms(rotated), pair_norms(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rotated, x, atol=1e-3)  # it did rotate


def test_position_zero_is_the_identity():
    cos, sin = RotaryEmbedding(16)(0, 1)
    assert torch.equal(cos, torch.ones(1, 8))
    assert torch.equal(sin, torch.zeros(1, 8))
    x = torch.randn(3, 2, 1, 16)
    assert torch.equal(apply_rotary(x, cos, sin), x)


# ---------------------------------------------------------------------------------------------
# Relative positions: attention scores depend only on p - s


def _rotated_dot(q, k, p, s, head_dim, dtype=torch.float64):
    """`<R(p) q, R(s) k>` with cos/sin from the exact formula in `dtype`."""
    cos_p, sin_p = (t.to(dtype) for t in exact_cos_sin([p], head_dim))
    cos_s, sin_s = (t.to(dtype) for t in exact_cos_sin([s], head_dim))
    return (apply_rotary(q, cos_p, sin_p) * apply_rotary(k, cos_s, sin_s)).sum()


@pytest.mark.parametrize("p, s", [(0, 0), (5, 2), (2, 5), (17, 3)])
@pytest.mark.parametrize("shift", [1, 7, 1000, 100_000])
def test_scores_depend_only_on_relative_position_in_float64(p, s, shift):
    head_dim = 16
    # float32-representable values in float64 tensors: the arithmetic runs in float64 throughout
    q = torch.randn(1, 1, 1, head_dim).double()
    k = torch.randn(1, 1, 1, head_dim).double()
    base = _rotated_dot(q, k, p, s, head_dim)
    shifted = _rotated_dot(q, k, p + shift, s + shift, head_dim)
    assert shifted.item() == pytest.approx(base.item(), abs=1e-9)
    # and equals rotating q alone by the difference: <R(p - s) q, k>
    assert _rotated_dot(q, k, p - s, 0, head_dim).item() == pytest.approx(base.item(), abs=1e-9)


def test_scores_change_with_relative_distance():
    # the property above must not hold vacuously: a different distance gives a different score
    head_dim = 16
    q, k = torch.randn(1, 1, 1, head_dim).double(), torch.randn(1, 1, 1, head_dim).double()
    assert abs(_rotated_dot(q, k, 5, 2, head_dim) - _rotated_dot(q, k, 6, 2, head_dim)) > 1e-3


@pytest.mark.parametrize("shift", [1_000, 100_000, 1_000_000])
def test_module_keeps_relative_scores_accurate_at_large_positions(shift):
    """The module's float32 cos/sin at position ~100,000 still give the scores of positions near 0.

    Angles computed in float32 would be off by up to half a float32 step at 100,000 (about 0.004
    rad) and miss this tolerance by far; the module computes them in float64.
    """
    head_dim, length = 64, 8
    rotary = RotaryEmbedding(head_dim)
    q = torch.randn(1, 1, length, head_dim)
    k = torch.randn(1, 1, length, head_dim)

    def scores(start):
        cos, sin = rotary(start, length)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1)  # (1, 1, T, T)

    near, far = scores(0), scores(shift)
    scale = q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]  # |q| |k| per score
    assert ((far - near).abs() / scale).max().item() < 2e-6


def test_module_angles_are_computed_in_float64_from_its_frequencies():
    rotary = RotaryEmbedding(64)
    start, length = 100_000, 3
    cos, sin = rotary(start, length)
    frequencies = rope_frequencies(64)
    assert frequencies.dtype == torch.float64
    angles = torch.arange(start, start + length, dtype=torch.float64)[:, None] * frequencies
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-7)


def test_module_cos_sin_match_the_formula_at_large_positions():
    head_dim, start, length = 64, 100_000, 4
    cos, sin = RotaryEmbedding(head_dim)(start, length)
    want_cos, want_sin = exact_cos_sin(range(start, start + length), head_dim)
    torch.testing.assert_close(cos.double(), want_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), want_sin, rtol=0, atol=1e-5)


def test_apply_rotary_keeps_float64_accuracy():
    head_dim = 8
    x = torch.randn(1, 1, 3, head_dim, dtype=torch.float64)
    cos, sin = exact_cos_sin([0, 1, 2], head_dim)
    got = apply_rotary(x, cos, sin)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_rotate(x, [0, 1, 2], head_dim), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("head_dim", [3, 7, 1, 0, -2])
def test_bad_head_dim_is_rejected(head_dim):
    with pytest.raises(ValueError, match=rf"head_dim must be even and >= 2, got {head_dim}"):
        rope_frequencies(head_dim)
    with pytest.raises(ValueError, match=r"head_dim must be even"):
        RotaryEmbedding(head_dim)


@pytest.mark.parametrize("base", [1.0, 0.5, 0.0, -10.0])
def test_base_not_above_one_is_rejected(base):
    with pytest.raises(ValueError, match=r"base must be greater than 1"):
        rope_frequencies(16, base)
    with pytest.raises(ValueError, match=r"base must be greater than 1"):
        RotaryEmbedding(16, base)
