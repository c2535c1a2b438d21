"""Merging a token's own running state into the attention over chunk summaries, and its backward.

The attention over summaries (any engine: cuDNN, FlexAttention, Triton) returns, per query, the output O_s
and the log-sum-exp lse_s of its scores. The token's own state is one more key/value with score
s = scale * q.k~_t, so the full softmax is the merge by log-sum-exp:

    lse = logaddexp(lse_s, s),  y = exp(lse_s - lse) O_s + exp(s - lse) v~_t.

The merged (y, lse) are exactly what a standard attention backward needs to return exact gradients of the
summary part (P = exp(S - lse), D = rowsum(dy * y)); the own key's part is per token:

    p = exp(s - lse),  dv~_t = p dy,  ds = p (dy.v~_t - D),  dk~_t = scale ds q,  dq += scale ds k~_t.

With the output gate z (`rat_mix(..., out_gate=z)`), the merge writes sigmoid(z) * y to the token layout and
keeps the ungated y in the engine's buffer; the backward takes the gated output's gradient, returns
dz = dy_gated * y * s (1 - s) with s = sigmoid(z), and goes on with dy = dy_gated * s.

Both kernels take one (batch, head) and BM tokens with the full head vector per row, so the dot products
stay in registers. Chunk 0 sees no summary: y = v~_t there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..scan.kernel import round_to
from .scan_kernels import token_block, token_ptrs, token_strides


@triton.jit
def _merge_fwd_kernel(
    QO, KS, VS, OS, LSE, Z, Y, OWN, T, L, scale, unit,
    so_b, so_c, so_l, so_h, so_off,
    ss_b, ss_c, ss_l, ss_h, ss_off,
    sa_b, sa_c, sa_l, sa_h, sa_off,
    sl_b, sl_c, sl_l, sl_h, sl_off,
    sz_b, sz_c, sz_l, sz_h, sz_off,
    sy_b, sy_c, sy_l, sy_h, sy_off,
    sw_b, sw_c, sw_l, sw_h, sw_off,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, HAS_SUM: tl.constexpr, HAS_Z: tl.constexpr,
    OWN_SCORE: tl.constexpr, KEEP: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    tok, valid, c, l = token_block(T, L, BM)
    e = tl.arange(0, D)[None, :]
    m2 = valid[:, None]
    v = tl.load(token_ptrs(VS, ss_off, ss_b, ss_c, ss_l, ss_h, b, c, l, h)[:, None] + e, mask=m2, other=0.0)
    v = v.to(tl.float32)
    if HAS_SUM:
        if OWN_SCORE:  # written by the scan (inference): no query or key state to read
            s = tl.load(token_ptrs(OWN, sw_off, sw_b, sw_c, sw_l, sw_h, b, c, l, h), mask=valid, other=0.0)
        else:
            p_q = token_ptrs(QO, so_off, so_b, so_c, so_l, so_h, b, c, l, h)[:, None] + e
            p_k = token_ptrs(KS, ss_off, ss_b, ss_c, ss_l, ss_h, b, c, l, h)[:, None] + e
            q = tl.load(p_q, mask=m2, other=0.0)
            k = tl.load(p_k, mask=m2, other=0.0)
            s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * scale
        has = valid & (c >= 1)
        p_lse = token_ptrs(LSE, sl_off, sl_b, sl_c, sl_l, sl_h, b, c, l, h)
        lse_s = tl.load(p_lse, mask=has, other=float("-inf")) * unit
        p_o = token_ptrs(OS, sa_off, sa_b, sa_c, sa_l, sa_h, b, c, l, h)[:, None] + e
        o_s = tl.load(p_o, mask=has[:, None], other=0.0).to(tl.float32)
        mx = tl.maximum(lse_s, s)
        w_s = tl.exp(lse_s - mx)
        w_own = tl.exp(s - mx)
        den = w_s + w_own
        y = (w_s[:, None] * o_s + w_own[:, None] * v) / den[:, None]
        if KEEP:  # for the backward, the summary engine's output and statistic become the merged ones
            tl.store(p_o, round_to(y, OS.dtype.element_ty), mask=has[:, None])
            tl.store(p_lse, (mx + tl.log(den)) / unit, mask=has)
    else:
        y = v
    if HAS_Z:  # the output gate sigmoid(z); the engine's buffer keeps the ungated output for the backward
        p_z = token_ptrs(Z, sz_off, sz_b, sz_c, sz_l, sz_h, b, c, l, h)[:, None] + e
        y = y * tl.sigmoid(tl.load(p_z, mask=m2, other=0.0).to(tl.float32))
    p_y = token_ptrs(Y, sy_off, sy_b, sy_c, sy_l, sy_h, b, c, l, h)[:, None] + e
    tl.store(p_y, round_to(y, Y.dtype.element_ty), mask=m2)


@triton.jit
def _own_bwd_kernel(
    QO, KS, VS, OS, DY, LSE, Z, DOP, DQA, DVS, DKS, DZ, DD, T, L, scale, unit,
    so_b, so_c, so_l, so_h, so_off,
    ss_b, ss_c, ss_l, ss_h, ss_off,
    sa_b, sa_c, sa_l, sa_h, sa_off,
    sl_b, sl_c, sl_l, sl_h, sl_off,
    sd_b, sd_c, sd_l, sd_h, sd_off,
    sz_b, sz_c, sz_l, sz_h, sz_off,
    sp_b, sp_c, sp_l, sp_h, sp_off,
    sg_b, sg_c, sg_l, sg_h, sg_off,
    sw_b, sw_c, sw_l, sw_h, sw_off,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, HAS_SUM: tl.constexpr, HAS_Z: tl.constexpr,
    WRITE_DOP: tl.constexpr, WRITE_DD: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    tok, valid, c, l = token_block(T, L, BM)
    e = tl.arange(0, D)[None, :]
    m2 = valid[:, None]
    q = tl.load(token_ptrs(QO, so_off, so_b, so_c, so_l, so_h, b, c, l, h)[:, None] + e, mask=m2, other=0.0)
    k = tl.load(token_ptrs(KS, ss_off, ss_b, ss_c, ss_l, ss_h, b, c, l, h)[:, None] + e, mask=m2, other=0.0)
    v = tl.load(token_ptrs(VS, ss_off, ss_b, ss_c, ss_l, ss_h, b, c, l, h)[:, None] + e, mask=m2, other=0.0)
    dy = tl.load(token_ptrs(DY, sd_off, sd_b, sd_c, sd_l, sd_h, b, c, l, h)[:, None] + e, mask=m2, other=0.0)
    q = q.to(tl.float32)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    dyf = dy.to(tl.float32)
    if HAS_SUM:
        has = valid & (c >= 1)
        p_o = token_ptrs(OS, sa_off, sa_b, sa_c, sa_l, sa_h, b, c, l, h)[:, None] + e
        y = tl.where(has[:, None], tl.load(p_o, mask=has[:, None], other=0.0).to(tl.float32), v)
    else:  # chunk 0 everywhere: y = v
        y = v
    if HAS_Z:  # dy is the gated output's gradient: z's gradient, then the ungated output's
        p_z = token_ptrs(Z, sz_off, sz_b, sz_c, sz_l, sz_h, b, c, l, h)[:, None] + e
        gate = tl.sigmoid(tl.load(p_z, mask=m2, other=0.0).to(tl.float32))
        p_g = token_ptrs(DZ, sw_off, sw_b, sw_c, sw_l, sw_h, b, c, l, h)[:, None] + e
        tl.store(p_g, round_to(dyf * y * gate * (1.0 - gate), DZ.dtype.element_ty), mask=m2)
        dy = round_to(dyf * gate, DY.dtype.element_ty)  # rounded as a separate multiply would round it
        dyf = dy.to(tl.float32)
    dvv = tl.sum(dyf * v, 1)
    if HAS_SUM:
        s = tl.sum(q * k, 1) * scale
        lse = tl.load(token_ptrs(LSE, sl_off, sl_b, sl_c, sl_l, sl_h, b, c, l, h), mask=has, other=0.0)
        p = tl.where(has, tl.exp(s - lse * unit), 1.0)
        dd = tl.sum(dyf * y, 1)
    else:  # the own key takes all the weight and has no score gradient
        p = tl.full([BM], 1.0, tl.float32)
        dd = dvv
    ds = p * (dvv - dd)
    p_g = token_ptrs(DVS, sg_off, sg_b, sg_c, sg_l, sg_h, b, c, l, h)[:, None] + e
    tl.store(p_g, round_to(p[:, None] * dyf, DVS.dtype.element_ty), mask=m2)
    p_g = token_ptrs(DKS, sg_off, sg_b, sg_c, sg_l, sg_h, b, c, l, h)[:, None] + e
    tl.store(p_g, round_to(scale * ds[:, None] * q, DKS.dtype.element_ty), mask=m2)
    p_g = token_ptrs(DQA, sg_off, sg_b, sg_c, sg_l, sg_h, b, c, l, h)[:, None] + e
    tl.store(p_g, round_to(scale * ds[:, None] * k, DQA.dtype.element_ty), mask=m2)
    if WRITE_DOP:
        p_d = token_ptrs(DOP, sp_off, sp_b, sp_c, sp_l, sp_h, b, c, l, h)[:, None] + e
        tl.store(p_d, round_to(dy, DOP.dtype.element_ty), mask=m2)
    if WRITE_DD:  # [B, H, T], for an engine that wants D = rowsum(dy * y) precomputed
        tl.store(DD + (b * H + h) * T + tok, dd, mask=valid)


def _rows(d: int) -> tuple[int, int]:
    BM = max(16, 4096 // d)
    return BM, 8 if BM * d >= 4096 else 4


def merge_fwd(
    qo, qo_layout, vs, ks, s_layout, o, o_layout, lse, lse_layout, unit, y, L, scale, z=None, own=None,
    keep=True,
):  # fmt: skip
    """y (preallocated [B, T, H, d]) = own state merged with the summary attention (o, lse may be None),
    times sigmoid(z) when z ([B, T, H, d], any strides with a unit last one) is given. With own ([B, T, H]
    fp32, the scan's own scores) the scores are read from there, not computed from qo and ks (None).
    keep: also overwrite o and lse with the merged output and statistic, as `own_bwd` and the engine's
    backward need them (without a backward to come, False saves writing o again)."""
    B, T, H, d = y.shape
    BM, warps = _rows(d)
    has_sum = o is not None
    if has_sum and ks is None and own is None:
        raise ValueError("merge_fwd needs the key states ks or the own scores own to merge a summary part")
    zeros = (0,) * 5
    _merge_fwd_kernel[(triton.cdiv(T, BM), B * H)](
        qo, ks if ks is not None else vs, vs, o if has_sum else vs, lse if has_sum else vs,
        z if z is not None else vs, y, own if own is not None else vs,
        T, L, scale, unit,
        *token_strides(qo, qo_layout, L), *token_strides(vs, s_layout, L),
        *(token_strides(o, o_layout, L) if has_sum else zeros),
        *(token_strides(lse, lse_layout, L) if has_sum else zeros),
        *(token_strides(z, "bthd", L) if z is not None else zeros),
        *token_strides(y, "bthd", L),
        *(token_strides(own, "bthd", L) if own is not None else zeros),
        H=H, D=d, BM=BM, HAS_SUM=has_sum, HAS_Z=z is not None, OWN_SCORE=own is not None, KEEP=keep,
        num_warps=warps,
    )  # fmt: skip


def own_bwd(
    qo, qo_layout, vs, ks, s_layout, o, o_layout, lse, lse_layout, unit, dy, L, scale,
    dop=None, dop_layout="bchld", want_dd=False, z=None, dz=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """Own-key gradients (dq part, dv~, dk~ as [B, T, H, d] in the activation dtype), optionally writing dy
    into dop (the summary engine's layout) and D = rowsum(dy * y) as [B, H, T] fp32.

    With z (the output gate's logits, as given to merge_fwd), dy is the gated output's gradient: z's
    gradient is returned last (else None), written into dz when given ([B, T, H, d], any strides with a
    unit last one), and everything else uses the ungated output's gradient."""
    B, T, H, d = dy.shape
    BM, warps = _rows(d)
    has_sum = o is not None
    dqa, dvs, dks = (torch.empty(B, T, H, d, device=dy.device, dtype=vs.dtype) for _ in range(3))
    dd = torch.empty(B, H, T, device=dy.device, dtype=torch.float32) if want_dd else None
    if z is not None and dz is None:
        dz = torch.empty(B, T, H, d, device=dy.device, dtype=z.dtype)
    zeros = (0,) * 5
    _own_bwd_kernel[(triton.cdiv(T, BM), B * H)](
        qo, ks, vs, o if has_sum else vs, dy, lse if has_sum else vs, z if z is not None else dy,
        dop if dop is not None else dy, dqa, dvs, dks, dz if z is not None else dy, dd if want_dd else dy,
        T, L, scale, unit,
        *token_strides(qo, qo_layout, L), *token_strides(vs, s_layout, L),
        *(token_strides(o, o_layout, L) if has_sum else zeros),
        *(token_strides(lse, lse_layout, L) if has_sum else zeros),
        *token_strides(dy, "bthd", L),
        *(token_strides(z, "bthd", L) if z is not None else zeros),
        *(token_strides(dop, dop_layout, L) if dop is not None else zeros),
        *token_strides(dqa, "bthd", L),
        *(token_strides(dz, "bthd", L) if z is not None else zeros),
        H=H, D=d, BM=BM, HAS_SUM=has_sum, HAS_Z=z is not None, WRITE_DOP=dop is not None, WRITE_DD=want_dd,
        num_warps=warps,
    )  # fmt: skip
    return dqa, dvs, dks, dd, dz
