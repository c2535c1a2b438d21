"""RMSNorm as Triton kernels: one program per block of rows, the whole row in registers, fp32 arithmetic.

Forward: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), stored in the output dtype; rstd is kept
(4 bytes a row) for the backward. Backward: with xh = x * rstd and e = dy * w,
dx = rstd * (e - xh * mean(e * xh)); the weight's gradient sum(dy * xh) over rows is accumulated per
program in fp32 and the partials are summed afterwards (deterministic, no atomics).

A block x + f(norm(x)) sends x two gradients, the residual's and the norm's; `rms_norm_pair_triton` hands
back x's alias for the residual, so its backward gets both and adds them in the kernel, not in a separate
pass of autograd (one fp32 read and write of [N, D] less per block).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .pdl import wait_for_previous
from .scan.kernel import INTERPRET, round_to, unit_last_stride


@triton.jit
def _rms_fwd_kernel(
    X, W, Y, RSTD, N, D, sx, sy, eps,
    ROWS: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    m = (rows < N)[:, None] & (cols < D)[None, :]
    wait_for_previous(PDL)  # x, and even the weight, may come from the kernel before
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * sy + cols[None, :], round_to(y, Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _rms_bwd_kernel(
    X, W, DY, RSTD, DRES, DX, DW, N, D, sx, sdy, sdres, sdx, rows_per_program,
    ROWS: tl.constexpr, BD: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    cm = cols < D
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    for r0 in range(0, rows_per_program, ROWS):
        rows = start + r0 + tl.arange(0, ROWS)
        rm = (rows < N) & (r0 + tl.arange(0, ROWS) < rows_per_program)
        m = rm[:, None] & cm[None, :]
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rm, other=0.0)
        xh = x * rstd[:, None]
        e = dy * w[None, :]
        dx = rstd[:, None] * (e - xh * (tl.sum(e * xh, 1) / D)[:, None])
        if HAS_RES:  # the residual's gradient, added here instead of by autograd
            dx += tl.load(DRES + rows[:, None] * sdres + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * sdx + cols[None, :], round_to(dx, DX.dtype.element_ty), mask=m)
        dw += tl.sum(dy * xh, 0)
    tl.store(DW + pid * D + cols, dw, mask=cm)


def _as_rows(x: Tensor) -> Tensor:
    """A 2-D [N, D] view with unit stride along D (a copy only when no such view exists)."""
    return unit_last_stride(x.reshape(-1, x.shape[-1]))


@functools.cache
def _max_programs(device: torch.device) -> int:
    """Programs of the backward: a few per multiprocessor, each summing its rows' weight gradient."""
    if INTERPRET or device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows_per_block(BD: int) -> int:
    return max(1, min(16, 4096 // BD))


def _norm_fwd(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    x2 = _as_rows(x)
    N, D = x2.shape
    BD = triton.next_power_of_2(D)
    ROWS = _rows_per_block(BD)
    y = torch.empty(N, D, device=x.device, dtype=out_dtype)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    _rms_fwd_kernel[(triton.cdiv(N, ROWS),)](
        x2, weight, y, rstd, N, D, x2.stride(0), y.stride(0), eps,
        ROWS=ROWS, BD=BD, num_warps=4 if BD * ROWS <= 4096 else 8, **pdl.kernel_options(x2),
    )  # fmt: skip
    ctx.save_for_backward(x2, weight, rstd)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    return y.view(x.shape)


def _norm_bwd(ctx, dy: Tensor | None, dres: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """x's gradient (the norm's plus dres, when given) and the weight's."""
    x2, weight, rstd = ctx.saved_tensors
    if dy is None:
        return dres, None
    N, D = x2.shape
    dy2 = _as_rows(dy)
    dres2 = None if dres is None else _as_rows(dres)
    BD = triton.next_power_of_2(D)
    ROWS = _rows_per_block(BD)
    programs = min(_max_programs(x2.device), triton.cdiv(N, ROWS))
    per = triton.cdiv(triton.cdiv(N, programs), ROWS) * ROWS
    programs = triton.cdiv(N, per)
    dx = torch.empty(N, D, device=x2.device, dtype=ctx.x_dtype)
    dw = torch.empty(programs, D, device=x2.device, dtype=torch.float32)
    _rms_bwd_kernel[(programs,)](
        x2, weight, dy2, rstd, dy2 if dres2 is None else dres2, dx, dw, N, D,
        x2.stride(0), dy2.stride(0), 0 if dres2 is None else dres2.stride(0), dx.stride(0), per,
        ROWS=ROWS, BD=BD, HAS_RES=dres2 is not None, num_warps=4 if BD * ROWS <= 4096 else 8,
    )  # fmt: skip
    return dx.view(ctx.x_shape), dw.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        return _norm_fwd(ctx, x, weight, eps, out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' backward is not differentiable again
    def backward(ctx, dy: Tensor):
        return *_norm_bwd(ctx, dy, None), None, None


class _RMSNormPair(torch.autograd.Function):
    """(norm(x), x): the second output is x for the residual, so both of x's gradients arrive here."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype):
        return _norm_fwd(ctx, x, weight, eps, out_dtype), x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor | None, dres: Tensor | None):
        return *_norm_bwd(ctx, dy, dres), None, None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """`rms_norm` by the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _RMSNorm.apply(x, weight, eps, out_dtype or x.dtype)


def rms_norm_pair_triton(
    x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """`rms_norm_pair` by the Triton kernels: (norm(x), an alias of x whose gradient the norm's backward
    adds to its own)."""
    return _RMSNormPair.apply(x, weight, eps, out_dtype or x.dtype)
