"""Rotary position embeddings (RoPE) and the schemes that stretch them past the training length.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). The head
dimension is read as `head_dim / 2` pairs; pair i of a vector at position p is rotated by the angle
`p * theta_i`, with frequencies `theta_i = base ** (-2i / head_dim)` running from one radian per
position (i = 0) down to about `1 / base`. A dot product of two rotated vectors depends only on
the difference of their angles, so attention scores see *relative* positions:
`<R(p) q, R(s) k> = <R(p - s) q, k>`.

A model trained on sequences of `L` positions has never seen the angles beyond `L * theta_i`, and
its scores degrade past `L`. Context-extension schemes change only the frequencies (and, for YaRN,
the attention temperature), so the rotation and the relative-position property stay as they are.
`RopeScaling` names a scheme and its scale factor `s` (the target length over `L`):

- `"rope"`: plain RoPE, no extension (the factor is ignored: the baseline to compare against).
- `"linear"`: position interpolation, every frequency divided by `s`.
- `"ntk"`: NTK-aware scaling, a larger base, so fast pairs barely change and slow ones slow by `s`.
- `"dynamic-ntk"`: NTK-aware scaling whose base grows with the current sequence length.
- `"yarn"`: interpolate only the slow pairs, keep the fast ones, and sharpen attention a little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEMES = ("rope", "linear", "ntk", "dynamic-ntk", "yarn")


def rope_frequencies(head_dim: int, base: float = 10_000.0) -> torch.Tensor:
    """The rotation speed of each pair, `theta_i = base ** (-2i / head_dim)`: shape `(head_dim // 2,)`."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions, so head_dim must be even and >= 2, got {head_dim}")
    if base <= 1:
        raise ValueError(f"the RoPE base must be greater than 1, got {base}")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair `(x[2i], x[2i+1])` of `x` `(B, H, T, head_dim)` by the angles behind `cos, sin` `(T, head_dim // 2)`."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # rotate in at least float32
    if x.dtype != dtype or cos.dtype != dtype or sin.dtype != dtype:  # cast only when needed: decoding is per-op bound
        return apply_rotary(x.to(dtype), cos.to(dtype), sin.to(dtype)).type_as(x)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # each (B, H, T, head_dim // 2): the pairs' two halves
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (B, H, T, head_dim // 2, 2)
    return rotated.flatten(-2)  # each pair back in its two dimensions


# ---------------------------------------------------------------------------------------------
# Context extension


@dataclass(frozen=True)
class RopeScaling:
    """Which context-extension scheme to use, and how far to stretch.

    `factor` is the scale factor `s >= 1`: the target context over `original_context`, the length
    `L` the model was trained on (required by every scheme except plain `"rope"`). `yarn_alpha`
    and `yarn_beta` bound YaRN's ramp, in rotations per training context (the paper's 1 and 32).
    """

    scheme: str = "rope"
    factor: float = 1.0
    original_context: int = 0
    yarn_alpha: float = 1.0
    yarn_beta: float = 32.0

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown RoPE scaling scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if not 1 <= self.factor < math.inf:  # also rejects NaN
            raise ValueError(f"the scale factor must be >= 1 and finite (1 means no extension), got {self.factor}")
        if self.scheme != "rope" and not (isinstance(self.original_context, int) and self.original_context > 0):
            raise ValueError(
                f"scheme {self.scheme!r} needs original_context, the training context length, "
                f"as a positive int, got {self.original_context!r}"
            )
        if not 0 <= self.yarn_alpha < self.yarn_beta:
            raise ValueError(
                f"YaRN's ramp needs 0 <= yarn_alpha < yarn_beta, got yarn_alpha={self.yarn_alpha}, "
                f"yarn_beta={self.yarn_beta}"
            )


def linear_frequencies(head_dim: int, base: float, factor: float) -> torch.Tensor:
    """Position interpolation: `theta_i / s`, shape `(head_dim // 2,)`.

    Chen et al., "Extending Context Window of Large Language Models via Positional Interpolation"
    (2023). Position `s * p` gets the angles that position `p` had in training, so the angles stay
    in the trained range, at the price of crowding nearby positions `s` times closer together.
    """
    return rope_frequencies(head_dim, base) / factor


def ntk_base(head_dim: int, base: float, factor: float) -> float:
    """NTK-aware base: `base' = base * s ** (d / (d - 2))`, `d = head_dim`.

    bloc97, "NTK-Aware Scaled RoPE allows LLaMA models to have extended (8k+) context size without
    any fine-tuning and minimal perplexity degradation" (reddit r/LocalLLaMA, 2023). With this base
    pair 0 keeps `theta_0 = 1` and the slowest pair `i = d/2 - 1` turns exactly `s` times slower:
    high frequencies are extrapolated, low ones interpolated, with a smooth geometric blend between.
    """
    if head_dim <= 2:
        raise ValueError(f"NTK-aware scaling needs head_dim > 2 (it divides by head_dim - 2), got {head_dim}")
    return base * factor ** (head_dim / (head_dim - 2))


def ntk_frequencies(head_dim: int, base: float, factor: float) -> torch.Tensor:
    """NTK-aware frequencies `base' ** (-2i / d)` with `base'` from `ntk_base`: `theta_i * s ** (-2i / (d - 2))`."""
    return rope_frequencies(head_dim, ntk_base(head_dim, base, factor))


def dynamic_ntk_base(head_dim: int, base: float, factor: float, original_context: int, length: int) -> float:
    """Dynamic NTK base for a sequence of `length` positions `T` (training length `L`, factor `s`).

    emozilla, "Dynamically Scaled RoPE further increases performance of long context LLaMA with zero
    fine-tuning" (reddit r/LocalLLaMA, 2023), in the variant Hugging Face transformers uses
    (`_compute_dynamic_ntk_parameters`): for `T > L`,
    `base' = base * ((s * T / L) - (s - 1)) ** (d / (d - 2))`, and plain `base` for `T <= L`. So the
    model is untouched inside its training length, and the stretch grows smoothly with `T` (at
    `T = L` the bracket is exactly 1).
    """
    if length <= original_context:
        return base
    if head_dim <= 2:
        raise ValueError(f"NTK-aware scaling needs head_dim > 2 (it divides by head_dim - 2), got {head_dim}")
    stretch = factor * length / original_context - (factor - 1)
    return base * stretch ** (head_dim / (head_dim - 2))


def cached_keys_stay_exact(scaling: RopeScaling | None, length: int) -> bool:
    """Whether keys cached at shorter lengths still equal a full recompute at total `length`.

    True for every scheme whose rotation of a position never changes; false for dynamic NTK once
    `length` passes its original context, where the base (so every rotation) grows with the length.
    """
    if scaling is None or scaling.scheme != "dynamic-ntk":
        return True
    return length <= scaling.original_context


def yarn_ramp(ratio: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """YaRN's `gamma(r)`: 0 for `r < alpha`, 1 for `r > beta`, linear in between."""
    return ((ratio - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_frequencies(
    head_dim: int, base: float, factor: float, original_context: int, alpha: float = 1.0, beta: float = 32.0
) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies, shape `(head_dim // 2,)`.

    Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models" (2023). Pair i
    has wavelength `lambda_i = 2 pi / theta_i` and turns `r_i = L / lambda_i` times over the training
    context. Pairs that turn many times (`r > beta`) already saw every angle in training and keep
    their frequency; pairs that turn less than `alpha` times are interpolated like PI; in between,
    `theta'_i = (1 - gamma(r_i)) * theta_i / s + gamma(r_i) * theta_i`.

    Hugging Face ramps linearly in the pair index between rounded boundaries instead; the two agree
    outside the ramp and differ slightly inside it. This follows the paper.
    """
    theta = rope_frequencies(head_dim, base)  # (head_dim // 2,)
    ratio = original_context * theta / (2 * math.pi)  # r_i = L / lambda_i
    gamma = yarn_ramp(ratio, alpha, beta)
    return (1 - gamma) * theta / factor + gamma * theta


def scaled_frequencies(
    head_dim: int, base: float = 10_000.0, scaling: RopeScaling | None = None, length: int | None = None
) -> torch.Tensor:
    """The frequencies of `scaling`'s scheme, float64, shape `(head_dim // 2,)`.

    `length` is the current total sequence length; only `"dynamic-ntk"` reads it (and needs it).
    """
    scheme = "rope" if scaling is None else scaling.scheme
    if scheme == "rope":
        return rope_frequencies(head_dim, base)
    if scheme == "linear":
        return linear_frequencies(head_dim, base, scaling.factor)
    if scheme == "ntk":
        return ntk_frequencies(head_dim, base, scaling.factor)
    if scheme == "dynamic-ntk":
        if length is None:
            raise ValueError("dynamic NTK scales with the current sequence length, so pass length (got None)")
        return rope_frequencies(
            head_dim, dynamic_ntk_base(head_dim, base, scaling.factor, scaling.original_context, length)
        )
    return yarn_frequencies(
        head_dim, base, scaling.factor, scaling.original_context, scaling.yarn_alpha, scaling.yarn_beta
    )


def attention_factor(scaling: RopeScaling | None = None) -> float:
    """YaRN's factor `m = 0.1 * ln(s) + 1` on both q and k (logits times `m ** 2`); 1 for every other scheme.

    Peng et al. (2023) sharpen attention at long context with a temperature `t`, `sqrt(1 / t) = m`:
    longer contexts spread softmax over more keys, and the slightly larger logits undo that.
    """
    if scaling is None or scaling.scheme != "yarn":
        return 1.0
    return 0.1 * math.log(scaling.factor) + 1.0


class RotaryEmbedding(nn.Module):
    """Computes the cos and sin of every pair's angle for a run of positions.

    Angles are computed in float64 from freshly computed frequencies (no stored buffer that a
    `model.half()` would round): at position 100,000 float32 frequencies would be off by 1e-3.
    Their float32 cos and sin are kept in a table (not in the state dict) for the next call.

    With a `scaling`, the frequencies are the scheme's, and the returned cos and sin are multiplied
    by `attention_factor(scaling)` (as Hugging Face does for YaRN): rotating q and k each by those
    scales every q.k logit by `m ** 2`, with no change to the attention code.

    Dynamic NTK pitfall: its frequencies depend on the total length `start + length`, but a KV cache
    holds keys rotated at the length of their own step. Past `original_context` the cached keys and
    the new queries then use different bases, and the scores no longer match a full recompute.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0, scaling: RopeScaling | None = None):
        super().__init__()
        rope_frequencies(head_dim, base)  # validate now rather than at the first forward
        if scaling is not None and scaling.scheme in ("ntk", "dynamic-ntk"):
            ntk_base(head_dim, base, scaling.factor)  # NTK also needs head_dim > 2
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self._table: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (what it was made for, cos, sin)

    def forward(
        self, start: int, length: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each `(length, head_dim // 2)` in float32, for positions `start ... start + length - 1`.

        Decoding asks for one position at a time, so the angles of positions `0 ... end - 1` are kept
        in a table and sliced: the same numbers, computed once. Dynamic NTK past its original
        context changes every angle with the length, and is computed afresh each time.
        """
        end = start + length
        if not cached_keys_stay_exact(self.scaling, end):
            return self._cos_sin(start, end, device)
        made_for = (self.head_dim, self.base, self.scaling, torch.device(device or "cpu"))
        if self._table is None or self._table[0] != made_for or len(self._table[1]) < end:
            longest = 0 if self._table is None or self._table[0] != made_for else len(self._table[1])
            size = max(end, 2 * longest)  # grow by doubling, so a long decode rebuilds it a few times only
            if self.scaling is not None and self.scaling.scheme == "dynamic-ntk":
                size = min(size, self.scaling.original_context)  # where its angles do not depend on the length
            self._table = (made_for, *self._cos_sin(0, size, device))
        _, cos, sin = self._table
        return cos[start:end], sin[start:end]

    def _cos_sin(self, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, end, dtype=torch.float64)
        frequencies = scaled_frequencies(self.head_dim, self.base, self.scaling, end)
        angles = positions[:, None] * frequencies[None, :]  # (end - start, head_dim // 2)
        m = attention_factor(self.scaling)  # exactly 1.0 unless YaRN: cos * 1.0 is cos, bit for bit
        return (angles.cos() * m).float().to(device), (angles.sin() * m).float().to(device)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, scaling={self.scaling}"
