"""Rotary position embeddings (RoPE): a position becomes a rotation of query and key pairs.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). The head
dimension is read as `head_dim / 2` pairs; pair i of a vector at position p is rotated by the angle
`p * theta_i`, with frequencies `theta_i = base ** (-2i / head_dim)` running from one radian per
position (i = 0) down to about `1 / base`. A dot product of two rotated vectors depends only on
the difference of their angles, so attention scores see *relative* positions:
`<R(p) q, R(s) k> = <R(p - s) q, k>`.

This module holds plain RoPE. Context-extension schemes (position interpolation, NTK-aware
scaling, YaRN) change only the frequencies and the attention temperature, so they slot in here.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


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
    pairs = rearrange(x.to(dtype), "... (half two) -> ... half two", two=2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (B, H, T, head_dim // 2)
    cos, sin = cos.to(dtype), sin.to(dtype)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rearrange(rotated, "... half two -> ... (half two)").type_as(x)


class RotaryEmbedding(nn.Module):
    """Computes the cos and sin of every pair's angle for a run of positions.

    Angles are computed in float64 from freshly computed frequencies (no stored buffer that a
    `model.half()` would round): at position 100,000 float32 frequencies would be off by 1e-3.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        rope_frequencies(head_dim, base)  # validate now rather than at the first forward
        self.head_dim, self.base = head_dim, base

    def forward(
        self, start: int, length: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each `(length, head_dim // 2)` in float32, for positions `start ... start + length - 1`."""
        positions = torch.arange(start, start + length, dtype=torch.float64)
        angles = positions[:, None] * rope_frequencies(self.head_dim, self.base)[None, :]
        return angles.cos().float().to(device), angles.sin().float().to(device)
