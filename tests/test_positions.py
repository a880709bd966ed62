"""Tests for minigpt/positions.py: RoPE frequencies, the pair rotation (in each input dtype),
relative positions, the context-extension schemes (position interpolation, NTK-aware, dynamic NTK,
YaRN), and the module's cached table of angles (bit for bit what a fresh computation gives).

The references here are written independently of the module: frequencies from the formula
`base ** (-2i / head_dim)`, and rotations as complex multiplication, reading pair i of a vector as
the complex number `x[2i] + 1j * x[2i+1]` and multiplying it by `exp(1j * p * theta_i)`. Each
scaled frequency is recomputed here with `math`, pair by pair, from its paper's formula.
"""

import dataclasses
import math

import pytest
import torch

from minigpt.positions import (
    SCHEMES,
    RopeScaling,
    RotaryEmbedding,
    apply_rotary,
    attention_factor,
    linear_frequencies,
    rope_frequencies,
    scaled_frequencies,
)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rotary_on_half_precision_rotates_in_float32_and_returns_the_input_dtype(dtype):
    x = torch.randn(2, 3, 6, 16).to(dtype)
    cos, sin = RotaryEmbedding(16)(10, 6)
    got = apply_rotary(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, apply_rotary(x.float(), cos, sin).to(dtype))  # the dtype's default tolerance
    want = reference_rotate(x.float(), list(range(10, 16)), 16)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


def test_apply_rotary_on_float64_input_rotates_in_float64_with_float32_angles():
    # the module's cos and sin are float32: a float64 input is rotated by those values in float64,
    # never rounded through float32 itself
    head_dim = 16
    x = torch.randn(1, 2, 5, head_dim, dtype=torch.float64)
    cos, sin = RotaryEmbedding(head_dim)(3, 5)
    got = apply_rotary(x, cos, sin)
    assert got.dtype == torch.float64
    pairs = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.complex(cos.double(), sin.double())
    want = torch.stack((pairs.real, pairs.imag), dim=-1).flatten(-2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - apply_rotary(x.float(), cos, sin).double()).abs().max().item() > 1e-10  # float32 would show


def test_apply_rotary_on_a_non_contiguous_input_equals_the_contiguous_one():
    # the attention layer rotates q and k straight out of a rearranged projection: views, not copies
    x = torch.randn(2, 5, 3, 16).transpose(1, 2)  # (B, H, T, head_dim), not contiguous
    assert not x.is_contiguous()
    cos, sin = RotaryEmbedding(16)(0, 5)
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary(x.contiguous(), cos, sin))




# ---------------------------------------------------------------------------------------------
# The module's table of angles: computed once, sliced, and bit for bit a fresh computation

TABLE_SCHEMES = ["rope", "linear", "ntk", "yarn", "dynamic-ntk"]
# growing one position at a time, then past the original context of 16 (dynamic NTK: angles that
# depend on the total length), then back inside it
TABLE_CALLS = [(0, 5), *((t, 1) for t in range(5, 14)), (0, 40), (3, 9), (0, 30), (29, 1), (16, 1), (2, 7), (15, 1)]


def table_scaling(scheme: str) -> RopeScaling:
    return RopeScaling(scheme, 4.0, 16)


@pytest.mark.parametrize("scheme", TABLE_SCHEMES)
def test_cached_angles_equal_a_fresh_module_and_a_direct_computation_bit_for_bit(scheme):
    rotary = RotaryEmbedding(16, scaling=table_scaling(scheme))
    for start, length in TABLE_CALLS:
        cos, sin = rotary(start, length)
        assert cos.shape == sin.shape == (length, 8)
        fresh_cos, fresh_sin = RotaryEmbedding(16, scaling=table_scaling(scheme))(start, length)
        direct_cos, direct_sin = rotary._cos_sin(start, start + length, None)
        assert torch.equal(cos, fresh_cos) and torch.equal(sin, fresh_sin), (start, length)
        assert torch.equal(cos, direct_cos) and torch.equal(sin, direct_sin), (start, length)


def test_dynamic_ntk_past_its_context_neither_uses_nor_spoils_the_table():
    rotary = RotaryEmbedding(16, scaling=table_scaling("dynamic-ntk"))
    rotary(0, 3)
    inside = [rotary(t, 1)[0] for t in range(16)]  # the table, grown 3, 6, 12, then (not 24) 16
    past = rotary(29, 1)[0]  # total length 30: a stretched base
    assert not torch.equal(past, RotaryEmbedding(16)(29, 1)[0])  # so the stretch is really there
    assert torch.equal(past, RotaryEmbedding(16, scaling=table_scaling("dynamic-ntk"))(29, 1)[0])
    plain = RotaryEmbedding(16)  # inside its context dynamic NTK is plain RoPE
    for t in range(16):
        assert torch.equal(rotary(t, 1)[0], inside[t]) and torch.equal(inside[t], plain(t, 1)[0]), t


@pytest.mark.parametrize("new", ["linear", "ntk", "yarn", "dynamic-ntk"])
def test_changing_the_scaling_after_a_call_gives_the_new_schemes_angles(new):
    # what `minigpt.train.rope_scaling_applied` does: swap `rotary.scaling` for some steps, then back
    rotary = RotaryEmbedding(16)
    before = rotary(0, 24)  # past the original context of 16, so dynamic NTK differs from plain RoPE too
    rotary.scaling = table_scaling(new)
    for start, length in [(0, 24), (4, 3), (11, 1), (20, 4)]:
        got = rotary(start, length)
        want = RotaryEmbedding(16, scaling=table_scaling(new))(start, length)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (start, length)
    assert not torch.equal(rotary(0, 24)[0], before[0])  # the schemes differ here: the test can tell
    rotary.scaling = None
    assert torch.equal(rotary(0, 24)[0], before[0]) and torch.equal(rotary(0, 24)[1], before[1])


def test_the_table_grows_by_doubling_and_is_not_rebuilt_within_its_size():
    rotary = RotaryEmbedding(16)
    rotary(0, 3)
    tables = [rotary._table]  # kept alive, so `is` below cannot be fooled by a reused id
    for end in range(4, 101):  # decoding: one position at a time
        rotary(end - 1, 1)
        table = rotary._table
        assert len(table[1]) >= end
        if table is not tables[-1]:
            assert len(table[1]) >= 2 * len(tables[-1][1])  # rebuilt only when too short, then doubled
            tables.append(table)
        elif end <= len(tables[-1][1]):
            assert table is tables[-1]
    assert [len(table[1]) for table in tables] == [3, 6, 12, 24, 48, 96, 192]
    rotary(0, 50, "cpu")  # None and "cpu" are one device: no rebuild
    rotary(7, 2, torch.device("cpu"))
    assert rotary._table is tables[-1]


def test_dynamic_ntk_table_stops_at_the_original_context():
    rotary = RotaryEmbedding(16, scaling=table_scaling("dynamic-ntk"))
    rotary(0, 5)
    for t in range(5, 16):
        rotary(t, 1)
    assert len(rotary._table[1]) == 16  # doubling 5, 10 would reach 20, where the angles depend on the length


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


# ---------------------------------------------------------------------------------------------
# Context extension: the scaling schemes


def theta(i: int, head_dim: int, base: float = 10_000.0) -> float:
    """Plain RoPE frequency of pair i, from math alone."""
    return base ** (-2 * i / head_dim)


def yarn_reference(i: int, head_dim: int, base: float, s: float, L: int, alpha: float, beta: float) -> float:
    """YaRN's frequency of pair i, step by step as in Peng et al. (2023)."""
    wavelength = 2 * math.pi / theta(i, head_dim, base)
    r = L / wavelength  # rotations of pair i over the training context
    gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
    return (1 - gamma) * theta(i, head_dim, base) / s + gamma * theta(i, head_dim, base)


def rotated_scores(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """All scores `<R(p) q_p, R(s) k_s>` `(T, T)` for q, k `(1, 1, T, head_dim)` rotated by the rows of cos, sin."""
    cos, sin = cos.double(), sin.double()
    return (apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1))[0, 0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_factor_one_is_plain_rope_for_every_scheme(scheme):
    head_dim, L = 32, 64
    scaling = RopeScaling(scheme, 1.0, L)
    frequencies = scaled_frequencies(head_dim, 10_000.0, scaling, length=L)  # dynamic NTK at T = L
    assert frequencies.shape == (head_dim // 2,) and frequencies.dtype == torch.float64
    torch.testing.assert_close(frequencies, rope_frequencies(head_dim), rtol=1e-15, atol=0)
    assert attention_factor(scaling) == 1.0
    cos, sin = RotaryEmbedding(head_dim, scaling=scaling)(10, L - 10)  # positions 10..63, total length L
    plain_cos, plain_sin = RotaryEmbedding(head_dim)(10, L - 10)
    torch.testing.assert_close(cos, plain_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, plain_sin, rtol=0, atol=1e-7)


@pytest.mark.parametrize("scaling", [None, RopeScaling(), RopeScaling("rope", 8.0), RopeScaling("rope", 4.0, 128)])
def test_no_scaling_and_the_rope_scheme_return_exactly_plain_rope(scaling):
    head_dim, start, length = 16, 100, 12
    cos, sin = RotaryEmbedding(head_dim, 10_000.0, scaling)(start, length)
    # plain RoPE as the module computed it before scaling existed: float64 angles, cast to float32
    angles = torch.arange(start, start + length, dtype=torch.float64)[:, None] * rope_frequencies(head_dim)
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())
    assert attention_factor(scaling) == 1.0


@pytest.mark.parametrize("s", [2.0, 4.0, 16.0])
def test_linear_interpolation_divides_every_frequency_by_the_factor(s):
    head_dim, base = 32, 10_000.0
    got = scaled_frequencies(head_dim, base, RopeScaling("linear", s, 128))
    for i in (0, 1, 7, head_dim // 2 - 1):
        assert got[i].item() == pytest.approx(theta(i, head_dim, base) / s, rel=1e-12)


@pytest.mark.parametrize("p", [0, 3, 17, 1000])
def test_linear_interpolation_at_position_s_p_is_plain_rope_at_p(p):
    head_dim, s = 32, 4.0
    cos, sin = RotaryEmbedding(head_dim, scaling=RopeScaling("linear", s, 64))(int(s * p), 1)
    want_cos, want_sin = exact_cos_sin([p], head_dim)
    torch.testing.assert_close(cos.double(), want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), want_sin, rtol=0, atol=1e-6)
    if p:  # the same position without interpolation sits elsewhere
        plain_cos, _ = RotaryEmbedding(head_dim)(int(s * p), 1)
        assert (plain_cos.double() - want_cos).abs().max() > 1e-2


@pytest.mark.parametrize("head_dim, s", [(16, 4.0), (64, 8.0), (128, 16.0)])
def test_ntk_follows_the_formula_keeps_pair_zero_and_slows_the_last_pair_by_s(head_dim, s):
    base = 10_000.0
    got = scaled_frequencies(head_dim, base, RopeScaling("ntk", s, 256))
    new_base = base * s ** (head_dim / (head_dim - 2))
    for i in (0, 1, head_dim // 4, head_dim // 2 - 1):
        assert got[i].item() == pytest.approx(new_base ** (-2 * i / head_dim), rel=1e-12)
    assert got[0].item() == 1.0  # the fastest pair is untouched
    last = head_dim // 2 - 1
    assert got[last].item() == pytest.approx(theta(last, head_dim, base) / s, rel=1e-12)
    # in between, the slowdown grows smoothly from 1 to s
    slowdown = rope_frequencies(head_dim, base) / got
    assert torch.all(slowdown[1:] > slowdown[:-1]) and 1 < slowdown[1] and slowdown[-1] < s * (1 + 1e-12)


@pytest.mark.parametrize("s", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("T", [1, 40, 64])
def test_dynamic_ntk_inside_the_training_length_is_plain_rope(s, T):
    got = scaled_frequencies(32, 10_000.0, RopeScaling("dynamic-ntk", s, 64), length=T)
    assert torch.equal(got, rope_frequencies(32))


@pytest.mark.parametrize("s, T", [(4.0, 192), (4.0, 65), (1.0, 128), (16.0, 1024), (16.0, 4096)])
def test_dynamic_ntk_follows_the_hugging_face_formula_past_the_training_length(s, T):
    head_dim, base, L = 32, 10_000.0, 64
    got = scaled_frequencies(head_dim, base, RopeScaling("dynamic-ntk", s, L), length=T)
    new_base = base * (s * T / L - (s - 1)) ** (head_dim / (head_dim - 2))
    for i in (0, 1, 9, head_dim // 2 - 1):
        assert got[i].item() == pytest.approx(new_base ** (-2 * i / head_dim), rel=1e-12)
    assert got[-1].item() < theta(head_dim // 2 - 1, head_dim, base)  # really scaled


def test_dynamic_ntk_equals_static_ntk_where_its_stretch_reaches_s():
    head_dim, L, s = 32, 64, 4.0
    T = int(2 * L - L / s)  # s * T / L - (s - 1) = 2 s - 1 - (s - 1) = s
    dynamic = scaled_frequencies(head_dim, 10_000.0, RopeScaling("dynamic-ntk", s, L), length=T)
    static = scaled_frequencies(head_dim, 10_000.0, RopeScaling("ntk", s, L))
    torch.testing.assert_close(dynamic, static, rtol=1e-13, atol=0)


def test_yarn_follows_the_formula_in_all_three_regions():
    head_dim, base, s, L, alpha, beta = 64, 10_000.0, 16.0, 4096, 1.0, 32.0
    got = scaled_frequencies(head_dim, base, RopeScaling("yarn", s, L, alpha, beta))
    ratios = [L * theta(i, head_dim, base) / (2 * math.pi) for i in range(head_dim // 2)]
    # the chosen sizes put pairs in every region: kept (r > beta), ramped, interpolated (r < alpha)
    assert any(r > beta for r in ratios) and any(alpha < r < beta for r in ratios) and any(r < alpha for r in ratios)
    for i in range(head_dim // 2):
        assert got[i].item() == pytest.approx(yarn_reference(i, head_dim, base, s, L, alpha, beta), rel=1e-12)


@pytest.mark.parametrize("alpha, beta", [(1.0, 32.0), (2.0, 8.0)])
def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones(alpha, beta):
    head_dim, base, s, L = 64, 10_000.0, 16.0, 4096
    got = scaled_frequencies(head_dim, base, RopeScaling("yarn", s, L, alpha, beta))
    plain = rope_frequencies(head_dim, base)
    ratio = L / (2 * math.pi / plain)
    fast, slow = ratio > beta, ratio < alpha
    assert fast.any() and slow.any()
    assert torch.equal(got[fast], plain[fast])  # extrapolated: unchanged
    torch.testing.assert_close(got[slow], linear_frequencies(head_dim, base, s)[slow], rtol=1e-15, atol=0)
    middle = ~fast & ~slow  # ramped: strictly between the two
    assert middle.any()
    assert torch.all(got[middle] < plain[middle]) and torch.all(got[middle] > plain[middle] / s)


@pytest.mark.parametrize("s", [1.0, 2.0, 32.0])
def test_yarn_attention_factor(s):
    assert attention_factor(RopeScaling("yarn", s, 64)) == pytest.approx(0.1 * math.log(s) + 1, rel=1e-15)
    for scheme in ("rope", "linear", "ntk", "dynamic-ntk"):
        assert attention_factor(RopeScaling(scheme, s, 64)) == 1.0


def test_yarn_attention_factor_for_s_16():
    assert attention_factor(RopeScaling("yarn", 16.0, 4096)) == pytest.approx(0.1 * math.log(16) + 1, rel=1e-15)
    assert attention_factor(RopeScaling("yarn", 16.0, 4096)) == pytest.approx(1.2772588722, rel=1e-9)


def test_yarn_module_scales_every_logit_by_m_squared():
    head_dim, length, L, s = 64, 6, 4096, 16.0
    scaling = RopeScaling("yarn", s, L)
    m = 0.1 * math.log(s) + 1
    cos, sin = RotaryEmbedding(head_dim, scaling=scaling)(200, length)
    squared_radius = cos.double() ** 2 + sin.double() ** 2  # (length, head_dim // 2), m^2 everywhere
    torch.testing.assert_close(squared_radius, torch.full((length, head_dim // 2), m * m, dtype=torch.float64))
    # the same angles without the factor give scores m^2 times smaller
    frequencies = scaled_frequencies(head_dim, 10_000.0, scaling)
    angles = torch.arange(200, 200 + length, dtype=torch.float64)[:, None] * frequencies
    q, k = torch.randn(1, 1, length, head_dim).double(), torch.randn(1, 1, length, head_dim).double()
    with_m = rotated_scores(q, k, cos, sin)
    without_m = rotated_scores(q, k, angles.cos(), angles.sin())
    torch.testing.assert_close(with_m, m * m * without_m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["rope", "linear", "ntk", "yarn"])
@pytest.mark.parametrize("shift", [1, 300, 5_000])
def test_relative_positions_survive_each_static_scheme(scheme, shift):
    head_dim, distance, p = 32, 5, 9
    rotary = RotaryEmbedding(head_dim, scaling=RopeScaling(scheme, 8.0, 512))
    q, k = torch.randn(1, 1, 1, head_dim).double(), torch.randn(1, 1, 1, head_dim).double()

    def score(query_pos, key_pos):
        qc, qs = rotary(query_pos, 1)
        kc, ks = rotary(key_pos, 1)
        return (apply_rotary(q, qc.double(), qs.double()) * apply_rotary(k, kc.double(), ks.double())).sum().item()

    scale = (q.norm() * k.norm()).item() * attention_factor(rotary.scaling) ** 2
    assert abs(score(p + shift, p + shift - distance) - score(p, p - distance)) < 1e-5 * scale
    assert abs(score(p, p - distance - 1) - score(p, p - distance)) > 1e-3 * scale  # distance matters


@pytest.mark.parametrize("T", [64, 256])
def test_relative_positions_survive_dynamic_ntk_at_a_fixed_total_length(T):
    head_dim, L, distance = 32, 64, 5
    cos, sin = RotaryEmbedding(head_dim, scaling=RopeScaling("dynamic-ntk", 4.0, L))(0, T)  # one length: one base
    q = torch.randn(1, 1, 1, head_dim).double().expand(1, 1, T, head_dim)  # the same q and k at every position
    k = torch.randn(1, 1, 1, head_dim).double().expand(1, 1, T, head_dim)
    scores = rotated_scores(q, k, cos, sin)
    band = torch.stack([scores[p, p - distance] for p in range(distance, T)])  # all pairs at that distance
    scale = (q[0, 0, 0].norm() * k[0, 0, 0].norm()).item()
    assert (band - band[0]).abs().max().item() < 1e-5 * scale
    assert abs(scores[T - 1, T - 1 - distance] - scores[T - 1, T - 2 - distance]).item() > 1e-3 * scale


def test_dynamic_ntk_rotates_the_same_position_differently_at_different_lengths():
    """The pitfall: keys cached while the sequence was short no longer match a recompute once it is long."""
    head_dim, L, s = 16, 64, 4.0
    rotary = RotaryEmbedding(head_dim, scaling=RopeScaling("dynamic-ntk", s, L))
    cached_cos, cached_sin = rotary(0, L)  # keys 0..L-1, rotated at total length L (plain base)
    long_cos, long_sin = rotary(0, 4 * L)  # the same positions recomputed at total length 4 L
    assert (cached_cos - long_cos[:L]).abs().max().item() > 0.1  # e.g. position 32 moves by radians
    assert (cached_cos[32] - long_cos[32]).abs().max().item() > 0.1
    # a query at the last position sees different scores against the cached keys than against a recompute
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, L, head_dim)
    q_cos, q_sin = rotary(4 * L - 1, 1)  # total length 4 L
    query = apply_rotary(q, q_cos, q_sin)
    cached = query @ apply_rotary(k, cached_cos, cached_sin).transpose(-2, -1)
    recomputed = query @ apply_rotary(k, long_cos[:L], long_sin[:L]).transpose(-2, -1)
    assert (cached - recomputed).abs().max().item() > 0.1 * q.norm().item() * k.norm(dim=-1).max().item()
    # a static scheme has no such pitfall: the cache equals the recompute
    static = RotaryEmbedding(head_dim, scaling=RopeScaling("ntk", s, L))
    assert torch.equal(static(0, L)[0], static(0, 4 * L)[0][:L])


def test_dynamic_ntk_needs_the_current_length():
    with pytest.raises(ValueError, match=r"dynamic NTK scales with the current sequence length, so pass length"):
        scaled_frequencies(16, 10_000.0, RopeScaling("dynamic-ntk", 2.0, 64))


def test_rope_scaling_is_frozen_and_defaults_to_plain_rope():
    scaling = RopeScaling()
    assert (scaling.scheme, scaling.factor, scaling.yarn_alpha, scaling.yarn_beta) == ("rope", 1.0, 1.0, 32.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scaling.factor = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("factor", [0.5, 0.0, -2.0, float("nan"), float("inf")])
def test_scale_factor_below_one_is_rejected(factor):
    with pytest.raises(ValueError, match=r"scale factor must be >= 1"):
        RopeScaling("linear", factor, 64)


@pytest.mark.parametrize("scheme", ["ntk-aware", "NTK", "pi", ""])
def test_unknown_scheme_is_rejected_with_the_allowed_ones(scheme):
    allowed = "rope, linear, ntk, dynamic-ntk, yarn"
    with pytest.raises(ValueError, match=rf"unknown RoPE scaling scheme '{scheme}'; choose one of {allowed}"):
        RopeScaling(scheme, 2.0, 64)


@pytest.mark.parametrize("alpha, beta", [(32.0, 32.0), (40.0, 1.0), (-1.0, 32.0)])
def test_yarn_ramp_bounds_out_of_order_are_rejected(alpha, beta):
    with pytest.raises(ValueError, match=r"0 <= yarn_alpha < yarn_beta"):
        RopeScaling("yarn", 4.0, 64, alpha, beta)


@pytest.mark.parametrize("scheme", ["linear", "ntk", "dynamic-ntk", "yarn"])
@pytest.mark.parametrize("original_context", [0, -64, 64.0])
def test_missing_original_context_is_rejected(scheme, original_context):
    with pytest.raises(ValueError, match=rf"scheme '{scheme}' needs original_context, the training context length"):
        RopeScaling(scheme, 2.0, original_context)


@pytest.mark.parametrize("scheme", ["ntk", "dynamic-ntk"])
def test_ntk_on_a_single_pair_is_rejected(scheme):
    with pytest.raises(ValueError, match=r"NTK-aware scaling needs head_dim > 2"):
        RotaryEmbedding(2, scaling=RopeScaling(scheme, 2.0, 64))
