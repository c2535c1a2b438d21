"""RoPE as one Triton kernel: one read and one write of q or k instead of about ten fp32 passes.

The rotation is computed in fp32 registers and rounded once, as `apply_rope`'s PyTorch path does; the
backward is the same kernel rotating by the opposite angle. The output is contiguous [B, H, T, d], the
layout the attention kernels read best, whatever the input's strides (typically a transposed view of the
input projection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .scan.kernel import unit_last_stride


@triton.jit
def _rope_kernel(
    X, Y, COS, SIN,
    sxb, sxh, sxt, syb, syh, syt,
    H, T,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SIGN: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # b * (batch stride) passes 2**31 at large batches
    b, h = bh // H, bh % H
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < T) & (j[None, :] < HALF)
    x_ptr = X + b * sxb + h * sxh + t[:, None] * sxt + j[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    table = t[:, None] * HALF + j[None, :]
    c = tl.load(COS + table, mask=mask, other=0.0)
    s = tl.load(SIN + table, mask=mask, other=0.0) * SIGN
    y_ptr = Y + b * syb + h * syh + t[:, None] * syt + j[None, :]
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _rotate(x: Tensor, cos_half: Tensor, sin_half: Tensor, sign: int) -> Tensor:
    B, H, T, d = x.shape
    x = unit_last_stride(x)
    y = torch.empty(B, H, T, d, device=x.device, dtype=x.dtype)
    BLOCK_T = 32
    grid = (B * H, triton.cdiv(T, BLOCK_T))
    _rope_kernel[grid](
        x, y, cos_half, sin_half,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        H, T,
        HALF=d // 2, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(d // 2), SIGN=sign,
    )  # fmt: skip
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
        ctx.save_for_backward(cos_half, sin_half)
        return _rotate(x, cos_half, sin_half, 1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        cos_half, sin_half = ctx.saved_tensors
        return _rotate(dy, cos_half, sin_half, -1), None, None


def apply_rope_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rope` for x [B, H, T, d] (any strides) and tables [T, d] whose halves are equal."""
    half = x.shape[-1] // 2
    cos_half = cos[:, :half].float().contiguous()
    sin_half = sin[:, :half].float().contiguous()
    return _RoPE.apply(x, cos_half, sin_half)
