"""RAT's attention over chunk summaries as one flash-style Triton kernel, and its backward.

Forward, per (batch, head) and BM query tokens: the online softmax starts from the token's own running
state (running max = own score, running sum = 1, accumulator = v~_t), then streams the summaries in blocks
of BN chunks up to the block's last visible chunk, masking summaries c' >= c per row. It writes y and the
natural-log log-sum-exp of the whole softmax, so nothing needs merging afterwards.

Backward (given the merged y, lse and D = rowsum(dy * y) from the own-state kernel): the standard two
kernels, one per BN summaries accumulating dk, dv over the query blocks that see them, one per BM queries
accumulating dq over the summaries they see. Queries are the rotated, head-tiled ones the scan kernel
wrote; everything is [B, T, H, d] per token and [B, C, H, d] per summary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..scan.kernel import round_to
from .merge import own_bwd
from .scan_kernels import INTERPRET, rat_scan_bwd, rat_scan_fwd, rope_tables


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32. PREC 0: native; 1: exact fp32 (no tf32) for fp32 inputs; 2: operands
    upcast first, for the CPU interpreter, which multiplies bf16 operands as raw integers (triton 3.9)."""
    if PREC == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _flash_fwd_kernel(
    QO, KS, VS, KSUM, VSUM, Y, LSE, T, L, scale,
    st_b, st_t, st_h, su_b, su_c, su_h,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    t0 = tl.program_id(0).to(tl.int64) * BM
    tok = t0 + tl.arange(0, BM)
    valid = tok < T
    c = tok // L
    e = tl.arange(0, D)[None, :]
    rows = (b * st_b + tok * st_t + h * st_h)[:, None] + e
    q = tl.load(QO + rows, mask=valid[:, None], other=0.0)
    k_own = tl.load(KS + rows, mask=valid[:, None], other=0.0).to(tl.float32)
    acc = tl.load(VS + rows, mask=valid[:, None], other=0.0).to(tl.float32)
    log2e = 1.4426950408889634
    m_i = tl.sum(q.to(tl.float32) * k_own, 1) * (scale * log2e)  # base-2 scores from here on
    l_i = tl.full([BM], 1.0, tl.float32)
    n_vis = (tl.minimum(t0 + BM, T) - 1) // L  # summaries 0 .. n_vis-1 are seen by some row
    for n0 in range(0, n_vis, BN):
        n = n0 + tl.arange(0, BN)
        cols = (b * su_b + n * su_c + h * su_h)[:, None] + e
        k = tl.load(KSUM + cols, mask=(n < n_vis)[:, None], other=0.0)
        v = tl.load(VSUM + cols, mask=(n < n_vis)[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PREC)
        s = tl.where(n[None, :] < c[:, None], s * (scale * log2e), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(round_to(p, v.dtype), v, PREC)
        m_i = m_new
    tl.store(Y + rows, round_to(acc / l_i[:, None], Y.dtype.element_ty), mask=valid[:, None])
    tl.store(LSE + (b * H + h) * T + tok, (m_i + tl.log2(l_i)) / log2e, mask=valid)


@triton.jit
def _flash_bwd_kv_kernel(
    QO, DY, LSE, DD, KSUM, VSUM, DKSUM, DVSUM, T, L, n_sum, scale,
    st_b, st_t, st_h, su_b, su_c, su_h, sg_b, sg_c, sg_h,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    n0 = tl.program_id(0).to(tl.int64) * BN
    n = n0 + tl.arange(0, BN)
    n_ok = n < n_sum
    e = tl.arange(0, D)[None, :]
    cols = (b * su_b + n * su_c + h * su_h)[:, None] + e
    k = tl.load(KSUM + cols, mask=n_ok[:, None], other=0.0)
    v = tl.load(VSUM + cols, mask=n_ok[:, None], other=0.0)
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    start = ((n0 + 1) * L // BM) * BM  # the first query block with a token in a chunk after n0
    for t0 in range(start, T, BM):
        tok = t0 + tl.arange(0, BM)
        valid = tok < T
        c = tok // L
        rows = (b * st_b + tok * st_t + h * st_h)[:, None] + e
        q = tl.load(QO + rows, mask=valid[:, None], other=0.0)
        dy = tl.load(DY + rows, mask=valid[:, None], other=0.0)
        lse = tl.load(LSE + (b * H + h) * T + tok, mask=valid, other=0.0)
        dd = tl.load(DD + (b * H + h) * T + tok, mask=valid, other=0.0)
        s = _dot(q, tl.trans(k), PREC)
        seen = (n[None, :] < c[:, None]) & valid[:, None] & n_ok[None, :]
        p = tl.where(seen, tl.exp(s * scale - lse[:, None]), 0.0)
        dv += _dot(tl.trans(round_to(p, dy.dtype)), dy, PREC)
        dp = _dot(dy, tl.trans(v), PREC)
        ds = p * (dp - dd[:, None]) * scale
        dk += _dot(tl.trans(round_to(ds, q.dtype)), q, PREC)
    out = (b * sg_b + n * sg_c + h * sg_h)[:, None] + e
    tl.store(DKSUM + out, round_to(dk, DKSUM.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DVSUM + out, round_to(dv, DVSUM.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _flash_bwd_q_kernel(
    QO, DY, LSE, DD, KSUM, VSUM, DQ, T, L, scale,
    st_b, st_t, st_h, su_b, su_c, su_h, sq_b, sq_t, sq_h,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    t0 = tl.program_id(0).to(tl.int64) * BM
    tok = t0 + tl.arange(0, BM)
    valid = tok < T
    c = tok // L
    e = tl.arange(0, D)[None, :]
    rows = (b * st_b + tok * st_t + h * st_h)[:, None] + e
    q = tl.load(QO + rows, mask=valid[:, None], other=0.0)
    dy = tl.load(DY + rows, mask=valid[:, None], other=0.0)
    lse = tl.load(LSE + (b * H + h) * T + tok, mask=valid, other=0.0)
    dd = tl.load(DD + (b * H + h) * T + tok, mask=valid, other=0.0)
    dq = tl.zeros([BM, D], dtype=tl.float32)
    n_vis = (tl.minimum(t0 + BM, T) - 1) // L
    for n0 in range(0, n_vis, BN):
        n = n0 + tl.arange(0, BN)
        cols = (b * su_b + n * su_c + h * su_h)[:, None] + e
        k = tl.load(KSUM + cols, mask=(n < n_vis)[:, None], other=0.0)
        v = tl.load(VSUM + cols, mask=(n < n_vis)[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PREC)
        dp = _dot(dy, tl.trans(v), PREC)
        seen = (n[None, :] < c[:, None]) & valid[:, None]
        p = tl.where(seen, tl.exp(s * scale - lse[:, None]), 0.0)
        ds = p * (dp - dd[:, None]) * scale
        dq += _dot(round_to(ds, k.dtype), k, PREC)
    out = (b * sq_b + tok * sq_t + h * sq_h)[:, None] + e
    tl.store(DQ + out, round_to(dq, DQ.dtype.element_ty), mask=valid[:, None])


# (BM, BN, warps, stages) of the forward kernel: query rows, summaries per step, any head width
_FWD_BLOCKS = (16, 16, 4, 1) if INTERPRET else (128, 64, 8, 2)


def _bwd_blocks(d: int) -> tuple[int, int, int, int]:
    """(BM, BN, warps, stages) of the backward kernels."""
    if INTERPRET:
        return 16, 16, 4, 1
    return (64, 64, 4, 2) if d <= 64 else (64, 64, 8, 2)


def _precision(dtype: torch.dtype) -> int:
    return 2 if INTERPRET else int(dtype == torch.float32)


def flash_supported(v: Tensor) -> bool:
    """Head widths the kernels' matrix products take (at least 16, at most 256)."""
    return 16 <= v.shape[3] <= 256


def flash_fwd(qo, ks, vs, ksum, vsum, L: int, scale: float) -> tuple[Tensor, Tensor]:
    """y [B, T, H, d] and the natural-log lse [B, H, T] of own state plus summaries (all [B, T, H, d])."""
    B, T, H, d = vs.shape
    y = torch.empty(vs.shape, device=vs.device, dtype=vs.dtype)
    lse = torch.empty(B, H, T, device=vs.device, dtype=torch.float32)
    BM, BN, warps, stages = _FWD_BLOCKS
    _flash_fwd_kernel[(triton.cdiv(T, BM), B * H)](
        qo, ks, vs, ksum, vsum, y, lse, T, L, scale,
        vs.stride(0), vs.stride(1), vs.stride(2), vsum.stride(0), vsum.stride(1), vsum.stride(2),
        H=H, D=d, BM=BM, BN=BN, PREC=_precision(vs.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y, lse


def flash_bwd(qo, ksum, vsum, dy, lse, dd, L: int, scale: float):
    """Summary-part gradients: dq [B, T, H, d] fp32, dk_sum and dv_sum [B, C-1, H, d] fp32."""
    B, T, H, d = qo.shape
    n_sum = triton.cdiv(T, L) - 1
    dq = torch.empty(B, T, H, d, device=qo.device, dtype=torch.float32)
    dksum, dvsum = (torch.empty(B, n_sum, H, d, device=qo.device, dtype=torch.float32) for _ in range(2))
    BM, BN, warps, stages = _bwd_blocks(d)
    strides = (qo.stride(0), qo.stride(1), qo.stride(2), ksum.stride(0), ksum.stride(1), ksum.stride(2))
    prec = _precision(qo.dtype)
    _flash_bwd_kv_kernel[(triton.cdiv(n_sum, BN), B * H)](
        qo, dy, lse, dd, ksum, vsum, dksum, dvsum, T, L, n_sum, scale,
        *strides, dksum.stride(0), dksum.stride(1), dksum.stride(2),
        H=H, D=d, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _flash_bwd_q_kernel[(triton.cdiv(T, BM), B * H)](
        qo, dy, lse, dd, ksum, vsum, dq, T, L, scale,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        H=H, D=d, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dksum, dvsum


class RatFlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, gate_bias, L, rope, rope_base, scale):
        B, T, H, d = v.shape
        C = triton.cdiv(T, L)
        cos, sin = rope_tables(C, d, rope_base, v.device) if rope else (None, None)
        qo, vs, ks = (torch.empty(B, T, H, d, device=v.device, dtype=v.dtype) for _ in range(3))
        vsum, ksum = (torch.empty(B, C, H, d, device=v.device, dtype=v.dtype) for _ in range(2))
        rat_scan_fwd(q, k, v, g, L, rope, cos, sin, qo, "bthd", vs, ks, "bthd", vsum, ksum, "bchd", gate_bias)
        y, lse = flash_fwd(qo, ks, vs, ksum, vsum, L, scale)
        ctx.save_for_backward(k, v, g, gate_bias, qo, vs, ks, vsum, ksum, y, lse)
        ctx.args = (L, rope, rope_base, scale, q.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # Triton kernels: a second derivative raises
    def backward(ctx, dy):
        k, v, g, gate_bias, qo, vs, ks, vsum, ksum, y, lse = ctx.saved_tensors
        L, rope, rope_base, scale, q_dtype = ctx.args
        T, d = v.shape[1], v.shape[3]
        C = triton.cdiv(T, L)
        cos, sin = rope_tables(C, d, rope_base, v.device) if rope else (None, None)
        dy = dy.contiguous()  # the kernels share one set of token strides between qo and dy
        dqa, dvs, dks, dd, _ = own_bwd(qo, "bthd", vs, ks, "bthd", y, "bthd", lse, "bht", 1.0, dy, L, scale,
                                    want_dd=True)  # fmt: skip
        dqb = dksum = dvsum = None
        if C > 1:
            dqb, dksum, dvsum = flash_bwd(qo, ksum, vsum, dy, lse, dd, L, scale)
        dq, dk, dv, dg, dbias = rat_scan_bwd(
            k, v, g, L, rope, cos, sin, dqa, "bthd", dqb, "bthd", dvs, dks, "bthd",
            dvsum, dksum, "bchd", C - 1, q_dtype, gate_bias,
        )  # fmt: skip
        return dq, dk, dv, dg, dbias, None, None, None, None


def rat_mix_flash(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk_size: int, rope: bool, rope_base: float, scale: float,
    gate_bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """RAT's core with the fused Triton attention (inputs validated by the caller). [B, T, H, d].
    With gate_bias, g holds the forget gates' logits (see `rat_mix`)."""
    return RatFlashFunction.apply(q, k, v, g, gate_bias, chunk_size, rope, rope_base, scale)
