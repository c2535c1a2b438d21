"""Few-row matrix products for decoding: out = x @ w.T (+ out) for x [M, K], in Triton.

At batch 1 a decode step is a chain of matrix-vector products that only stream their weights, and cuBLAS's
kernels for one row leave bandwidth unused. Here each program streams BN rows of w over the whole of K for
one row of x, accumulating elementwise in fp32 and summing once at the end; the rows of x are a second grid
axis, so a block of w is read from memory once and from L2 by the other rows. With `accumulate`, the product
is added to `out` (read in the same program), as the residual connection of a block wants. Faster than
cuBLAS for one row only (on the H200, M=2 already took 1.2-1.9x cuBLAS's time): `ratlm.ops.linear` uses it
for M = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .pdl import wait_for_previous
from .scan.kernel import round_to


@triton.jit
def _w_tile(rows, k0, n, k, N, K, EVEN: tl.constexpr):
    if EVEN:  # N % BN == 0 and K % BK == 0: no masks
        return tl.load(rows + k0)
    return tl.load(rows + k0, mask=(n[:, None] < N) & ((k0 + k)[None, :] < K), other=0.0)


@triton.jit
def _x_tile(xs, k0, k, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(xs + k0)
    return tl.load(xs + k0, mask=k0 + k < K, other=0.0)


@triton.jit
def _gemv_kernel(
    X, W, OUT, N, K, stride_xm, stride_wn, stride_om,
    BN: tl.constexpr, BK: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr,
    WEIGHT_READY: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    rows = W + n[:, None] * stride_wn + k[None, :]
    xs = X + m * stride_xm + k
    if WEIGHT_READY:  # no kernel still running writes w: its first step loads while the previous one ends
        w = _w_tile(rows, 0, n, k, N, K, EVEN)
        wait_for_previous(PDL)  # x and out may come from the kernel before
    else:
        wait_for_previous(PDL)
        w = _w_tile(rows, 0, n, k, N, K, EVEN)
    acc = w.to(tl.float32) * _x_tile(xs, 0, k, K, EVEN).to(tl.float32)[None, :]
    for k0 in range(BK, K, BK):
        w = _w_tile(rows, k0, n, k, N, K, EVEN)
        acc += w.to(tl.float32) * _x_tile(xs, k0, k, K, EVEN).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    dst = OUT + m * stride_om + n
    if ACCUMULATE:
        y += tl.load(dst, mask=n < N, other=0.0).to(tl.float32)
    tl.store(dst, round_to(y, OUT.dtype.element_ty), mask=n < N)


def gemv_tile(K: int) -> tuple[int, int, int]:
    """(BN, BK, num_warps): 4 rows of w by up to 1024 columns per step on 4 warps. On the H200 this tile was
    within 0.3 us of the best of 28 on every 1.3B decode shape and took 6-31% less time than cuBLAS at M=1
    (benchmarks/gemv_ab.py --sweep; benchmarks/results/gemv_ab-h200-2026-11-29.jsonl)."""
    return 4, min(1024, triton.next_power_of_2(K)), 4


def gemv_triton(
    x: Tensor,
    w: Tensor,
    out: Tensor | None = None,
    accumulate: bool = False,
    tile=None,
    weight_ready: bool = False,
) -> Tensor:
    """x [M, K] @ w.T for w [N, K] (unit stride along K for both), into out [M, N] (unit stride along N; new,
    in x's dtype, when None); with accumulate, out += x @ w.T. The sum is in fp32 and rounded once to out's
    dtype. Raises ValueError for other shapes or strides.

    weight_ready: the caller promises that the kernel just before this one in the stream does not write w
    (a module's parameter in the middle of a forward). With programmatic dependent launch (`ratlm.ops.pdl`)
    the weights' first step then loads while that kernel finishes.
    """
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1] or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(
            f"x [M, K] and w [N, K] with unit strides along K; got x {tuple(x.shape)} strides {x.stride()}, "
            f"w {tuple(w.shape)} strides {w.stride()}"
        )
    (M, K), N = x.shape, w.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an out tensor to add to")
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != (M, N) or out.stride(1) != 1:
        raise ValueError(f"out must be [M, N] = [{M}, {N}] with unit stride along N, got {tuple(out.shape)} "
                         f"strides {out.stride()}")  # fmt: skip
    bn, bk, warps = tile or gemv_tile(K)
    even = N % bn == 0 and K % bk == 0
    _gemv_kernel[(triton.cdiv(N, bn), M)](
        x, w, out, N, K, x.stride(0), w.stride(0), out.stride(0),
        BN=bn, BK=bk, ACCUMULATE=accumulate, EVEN=even, WEIGHT_READY=weight_ready, num_warps=warps,
        **pdl.kernel_options(x),
    )  # fmt: skip
    return out
