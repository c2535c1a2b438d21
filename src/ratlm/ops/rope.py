"""Rotary position embedding, rotate-half convention (SPEC §1.6)."""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import fallback, fast_path_wanted


def rope_cos_sin(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables [len(positions), dim] for integer positions (token or chunk indices).

    Computed in fp32 exactly as the reference code does, so converted checkpoints give the same numbers.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_torch(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., T, d] by per-position tables [T, d]; computed in fp32, returned in x's dtype.

    On CUDA, a 4-d x ([B, H, T, d]) in bf16/fp16/fp32 goes through one Triton kernel (forward and
    backward); its result is contiguous.
    """
    if fast_path_wanted(x):
        if (
            x.dim() == 4
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.shape[-1] % 2 == 0
        ):
            from .rope_triton import apply_rope_triton

            return apply_rope_triton(x, cos, sin)
        fallback("apply_rope", f"shape {tuple(x.shape)}, dtype {x.dtype}")
    return apply_rope_torch(x, cos, sin)
