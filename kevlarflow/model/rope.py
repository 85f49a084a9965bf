"""Rotary position embeddings, including Llama 3's frequency rescaling."""
from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is not None:
        inv_freq = _llama3_rescale(inv_freq, scaling)
    return inv_freq


def _llama3_rescale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3: long wavelengths are slowed down by `factor`, short ones kept,
    and the band between them interpolated smoothly."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)
    interpolated = (1 - blend) * slowed / factor + blend * slowed
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, interpolated, slowed)


class RotaryEmbedding:
    """cos/sin tables for every position, built once in fp32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 device: torch.device | str = "cpu"):
        # Computed on the CPU whatever the device, so that every device rotates
        # by the same bits.
        with torch.device("cpu"):
            inv_freq = inverse_frequencies(head_dim, theta, scaling)
            angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
            table = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = table.cos().to(device), table.sin().to(device)
        self.max_positions = max_positions

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] rotated by each token's position."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
