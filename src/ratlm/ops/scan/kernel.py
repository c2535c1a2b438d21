"""Gated linear recurrence as a Triton kernel (the RNN mixer, and any caller of `gated_scan` on CUDA).

One program owns a batch row and a block of channels and walks the sequence in tiles of BT tokens: inside a
tile the recurrence h_t = a_t h_{t-1} + u_t is a parallel prefix scan (tl.associative_scan over pairs
(a, u)), and the state at the tile's last row carries into the next tile. Chunk restarts are folded into
the decay (a_t = 0 where the state restarts). The backward pass walks the tiles in reverse and scans
dh_t = a_{t+1} dh_{t+1} + dout_t the same way; it reads h_{t-1} from the saved forward output instead of
recomputing it.

Reads x and g once and writes h once (forward); the backward reads x, g, h, dout and writes dx, dg.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
_BT = 16 if INTERPRET else 64  # the CPU interpreter is slow per element: small tiles keep tests quick


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x.to(dtype). The CPU interpreter truncates fp32 to bf16 (triton 3.9) where the GPU rounds to nearest
    even; rounding by hand there keeps the tests' error comparisons honest."""
    if INTERPRET and (dtype == tl.bfloat16 and x.dtype == tl.float32):  # older Triton: no A and B and C
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def linear_combine(a1, h1, a2, h2):
    """Composition of two steps h -> a h + u; the first argument is the earlier one."""
    return a1 * a2, h1 * a2 + h2


@triton.jit
def _scan_fwd_kernel(
    X, G, H0, OUT,
    T, N, offset, chunk,
    sxb, sxt, sgb, sgt, sob, sot,
    HAS_H0: tl.constexpr, HAS_CHUNK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    r = tl.arange(0, BT)
    if HAS_H0:
        carry = tl.load(H0 + b * N + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BN], dtype=tl.float32)
    for t0 in range(0, T, BT):
        t = (t0 + r).to(tl.int64)  # t x the token stride passes 2**31 in long sequences (T x 2D channels)
        m = (t < T)[:, None] & n_ok[None, :]
        x = tl.load(X + b * sxb + t[:, None] * sxt + n[None, :], mask=m, other=0.0).to(tl.float32)
        # rows past the end get a = 1, u = 0: the state passes through them unchanged
        g = tl.load(G + b * sgb + t[:, None] * sgt + n[None, :], mask=m, other=1.0).to(tl.float32)
        a = g
        if HAS_CHUNK:
            a = tl.where(((t + offset) % chunk == 0)[:, None], 0.0, g)
        decay, h = tl.associative_scan((a, (1.0 - g) * x), 0, linear_combine)
        h = h + decay * carry[None, :]
        tl.store(OUT + b * sob + t[:, None] * sot + n[None, :], h, mask=m)
        carry = tl.sum(tl.where((r == BT - 1)[:, None], h, 0.0), 0)


@triton.jit
def _scan_bwd_kernel(
    X, G, H0, OUT, DOUT, DX, DG, DH0,
    T, N, offset, chunk,
    sxb, sxt, sgb, sgt, sob, sot, sdb, sdt, sdxb, sdxt, sdgb, sdgt,
    HAS_H0: tl.constexpr, HAS_CHUNK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    r = tl.arange(0, BT)
    carry = tl.zeros([BN], dtype=tl.float32)  # dh at the first row of the tile after this one
    n_tiles = tl.cdiv(T, BT)
    for i in range(n_tiles):
        t = ((n_tiles - 1 - i) * BT + r).to(tl.int64)
        ok = t < T
        m = ok[:, None] & n_ok[None, :]
        col = n[None, :]
        dout = tl.load(DOUT + b * sdb + t[:, None] * sdt + col, mask=m, other=0.0).to(tl.float32)
        m_next = (t + 1 < T)[:, None] & n_ok[None, :]
        a_next = tl.load(G + b * sgb + (t + 1)[:, None] * sgt + col, mask=m_next, other=0.0).to(tl.float32)
        if HAS_CHUNK:
            a_next = tl.where(((t + 1 + offset) % chunk == 0)[:, None], 0.0, a_next)
        decay, dh = tl.associative_scan((a_next, dout), 0, linear_combine, reverse=True)
        dh = dh + decay * carry[None, :]
        carry = tl.sum(tl.where((r == 0)[:, None], dh, 0.0), 0)

        x = tl.load(X + b * sxb + t[:, None] * sxt + col, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + b * sgb + t[:, None] * sgt + col, mask=m, other=0.0).to(tl.float32)
        m_prev = (ok & (t >= 1))[:, None] & n_ok[None, :]
        h_prev = tl.load(OUT + b * sob + (t - 1)[:, None] * sot + col, mask=m_prev, other=0.0)
        if HAS_H0:
            h0 = tl.load(H0 + b * N + n, mask=n_ok, other=0.0).to(tl.float32)
            h_prev = tl.where((t == 0)[:, None], h0[None, :], h_prev)
        if HAS_CHUNK:
            h_prev = tl.where(((t + offset) % chunk == 0)[:, None], 0.0, h_prev)
        dx = (1.0 - g) * dh
        tl.store(DX + b * sdxb + t[:, None] * sdxt + col, round_to(dx, DX.dtype.element_ty), mask=m)
        tl.store(
            DG + b * sdgb + t[:, None] * sdgt + col, round_to(dh * (h_prev - x), DG.dtype.element_ty), mask=m
        )
    if HAS_H0:
        a0 = tl.load(G + b * sgb + n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_CHUNK:
            a0 = tl.where(offset % chunk == 0, 0.0, a0)
        tl.store(DH0 + b * N + n, round_to(a0 * carry, DH0.dtype.element_ty), mask=n_ok)


def unit_last_stride(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous (views of a projection are), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid_and_block(B: int, N: int):
    # at least a few hundred programs so every multiprocessor has work, wider blocks when there are plenty
    BN = 32 if B * triton.cdiv(N, 32) >= 512 else 16
    return (B, triton.cdiv(N, BN)), BN


def scan_fwd(x: Tensor, g: Tensor, chunk_size: int | None, h0: Tensor | None, offset: int) -> Tensor:
    B, T, N = x.shape
    out = torch.empty(B, T, N, device=x.device, dtype=torch.float32)
    grid, BN = _grid_and_block(B, N)
    _scan_fwd_kernel[grid](
        x, g, h0 if h0 is not None else x, out,
        T, N, offset, chunk_size or 1,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1),
        HAS_H0=h0 is not None, HAS_CHUNK=chunk_size is not None, BT=_BT, BN=BN, num_warps=4,
    )  # fmt: skip
    return out


def scan_bwd(x, g, chunk_size, h0, offset, out, dout):
    B, T, N = x.shape
    dout = unit_last_stride(dout)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dg = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    dh0 = torch.empty(h0.shape, device=h0.device, dtype=h0.dtype) if h0 is not None else None
    grid, BN = _grid_and_block(B, N)
    _scan_bwd_kernel[grid](
        x, g, h0 if h0 is not None else x, out, dout, dx, dg, dh0 if dh0 is not None else x,
        T, N, offset, chunk_size or 1,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1), dg.stride(0), dg.stride(1),
        HAS_H0=h0 is not None, HAS_CHUNK=chunk_size is not None, BT=_BT, BN=BN, num_warps=4,
    )  # fmt: skip
    return dx, dg, dh0


class GatedScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, chunk_size, h0, offset):
        out = scan_fwd(x, g, chunk_size, h0, offset)
        ctx.save_for_backward(x, g, h0, out)
        ctx.chunk_size, ctx.offset = chunk_size, offset
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # Triton kernels: a second derivative raises
    def backward(ctx, dout):
        x, g, h0, out = ctx.saved_tensors
        dx, dg, dh0 = scan_bwd(x, g, ctx.chunk_size, h0, ctx.offset, out, dout)
        return dx, dg, None, dh0, None


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(x: Tensor, g: Tensor, initial_state: Tensor | None) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    tensors = [x, g] + ([initial_state] if initial_state is not None else [])
    if any(t.dtype not in SUPPORTED_DTYPES for t in tensors):
        return f"dtypes {[t.dtype for t in tensors]} (the kernel takes fp16, bf16, fp32)"
    if any(t.device != x.device for t in tensors):
        return "inputs on different devices"
    return None


# under torch.compile this runs eagerly (a graph break), like any op with its own kernels
@torch.compiler.disable
def gated_scan_triton(
    x: Tensor,
    g: Tensor,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """The Triton kernel behind `ratlm.ops.gated_scan`; same contract, returns fp32 states [B, T, N].

    Inputs must be fp16, bf16 or fp32 on one device (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    if x.dim() != 3 or g.shape != x.shape:
        raise ValueError(f"x and g must both be [B, T, N]; got {tuple(x.shape)} and {tuple(g.shape)}")
    reason = unsupported_reason(x, g, initial_state)
    if reason is not None:
        raise ValueError(f"gated_scan_triton: {reason}")
    if x.shape[1] == 0:
        return x.new_zeros(x.shape, dtype=torch.float32)
    x, g = unit_last_stride(x), unit_last_stride(g)
    h0 = initial_state.contiguous() if initial_state is not None else None
    return GatedScanFunction.apply(x, g, chunk_size, h0, offset)
