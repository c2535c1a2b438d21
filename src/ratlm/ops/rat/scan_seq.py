"""RAT's chunked recurrence for short chunks (L <= 16): a thread per (chunk, channel) loops over the chunk.

The tile of a program is [NC chunks, BD channels] from each half of the head vector (RoPE pairs channel i
with i + d/2); at L <= 16 a chunk's recurrence is a short loop over its L tokens in registers, with
no communication between threads, where `scan_kernels.py` runs a parallel prefix scan over a tile of rows
(which needs a layout change through shared memory per scan and ~150 registers). Row l of every chunk is one
[NC, BD] load, BD contiguous channels wide.

Forward: per head of the program's key group, the running value and key states over l = 0..L-1; writes the
states (keys rotated at the chunk index), the chunk summaries and the queries (rotated, tiled to heads) in the
layouts the attention engines read, the same outputs as `scan_kernels._rat_scan_fwd_kernel`.

Backward: per head, a forward loop recomputes the fp32 states before each token and keeps them in a
per-program scratch buffer (a few KiB per program, which stay in cache; 8 bytes per token and key-group
channel in all), then a reverse loop runs the adjoint recurrence,
writes dv and dg (through the sigmoid and the bias partial sums when the gate comes as logits), and adds the
head's key gradient into an fp32 [B, T, G, d] buffer (read-modify-write by the program that owns those
elements; cast afterwards). Each program takes BD channels of one half of the head vector: only the
incoming key gradients mix the halves (the rotation's transpose), and those are loads. The query gradient
needs no recurrence: `_dq_sum_kernel` sums it over the heads of a group in registers and rotates it back.

Tiles (`seq_tile`) come from a sweep on the H200 (`benchmarks/scan_tiles.py`): one warp per program and
several elements per thread along whole 64-channel rows beat one element per thread by about 2x.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..scan.kernel import round_to
from .scan_kernels import _gate_of, token_block, token_ptrs

MAX_CHUNK = 16


@triton.jit
def _rot(x1, x2, cos, sin, ROPE: tl.constexpr, SIGN: tl.constexpr):
    """Rotation of the pair (x1, x2) by the chunk's angle (SIGN = -1: its transpose, for gradients)."""
    if ROPE:
        return x1 * cos - SIGN * x2 * sin, x2 * cos + SIGN * x1 * sin
    else:
        return x1, x2


@triton.jit
def _rat_seq_fwd_kernel(
    Q, K, V, G, BIAS, COS, SIN, QO, VS, KS, VSUM, KSUM, OWN,
    T, C, q_rows, scale,
    sq_b, sq_t, sq_g, sk_b, sk_t, sk_g, sv_b, sv_t, sv_h, sg_b, sg_t, sg_h,
    so_b, so_c, so_l, so_h, so_off,
    ss_b, ss_c, ss_l, ss_h, ss_off,
    su_b, su_c, su_h, su_off,
    sw_b, sw_c, sw_l, sw_h, sw_off,
    L: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, HALF: tl.constexpr, NC: tl.constexpr,
    BD: tl.constexpr, ROPE: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_SUM: tl.constexpr,
    LOGITS: tl.constexpr, OWN_SCORE: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // NG).to(tl.int64)
    grp = (tl.program_id(1) % NG).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    c = tl.program_id(0).to(tl.int64) * NC + tl.arange(0, NC)
    i = tl.program_id(2) * BD + tl.arange(0, BD)
    col = i[None, :]
    cos, sin = _rope_of_chunks(COS, SIN, c, C, col, HALF, ROPE)
    is_sum = ((c < C - 1) & ((c + 1) * L <= T))[:, None]  # summaries a later chunk reads
    for j in range(H // NG):
        h = grp + j * NG
        bias = BIAS + h * 2 * HALF + i
        hv1 = tl.zeros([NC, BD], dtype=tl.float32)
        hv2 = tl.zeros([NC, BD], dtype=tl.float32)
        hk1 = tl.zeros([NC, BD], dtype=tl.float32)
        hk2 = tl.zeros([NC, BD], dtype=tl.float32)
        # each row's inputs are loaded one iteration ahead, before this row's stores
        k1n, k2n, g1n, g2n, v1n, v2n, q1n, q2n = _fwd_inputs(
            0, c, b, h, grp, col, T, L, Q, K, V, G, sq_b, sq_t, sq_g, sk_b, sk_t, sk_g,
            sv_b, sv_t, sv_h, sg_b, sg_t, sg_h, HALF, WRITE_Q,
        )  # fmt: skip
        for l in range(L):
            k1, k2, g1, g2, v1, v2, q1, q2 = k1n, k2n, g1n, g2n, v1n, v2n, q1n, q2n
            k1n, k2n, g1n, g2n, v1n, v2n, q1n, q2n = _fwd_inputs(
                l + 1, c, b, h, grp, col, T, L, Q, K, V, G, sq_b, sq_t, sq_g, sk_b, sk_t, sk_g,
                sv_b, sv_t, sv_h, sg_b, sg_t, sg_h, HALF, WRITE_Q,
            )  # fmt: skip
            tok = c * L + l
            m2 = (tok < T)[:, None]
            g1 = _gate_of(g1, m2, bias, LOGITS)
            g2 = _gate_of(g2, m2, bias + HALF, LOGITS)
            k1 = k1.to(tl.float32)
            k2 = k2.to(tl.float32)
            v1 = v1.to(tl.float32)
            v2 = v2.to(tl.float32)
            hv1 = g1 * hv1 + (1.0 - g1) * v1
            hv2 = g2 * hv2 + (1.0 - g2) * v2
            hk1 = g1 * hk1 + (1.0 - g1) * k1
            hk2 = g2 * hk2 + (1.0 - g2) * k2
            sk1, sk2 = _rot(hk1, hk2, cos, sin, ROPE, 1.0)
            sv1 = round_to(hv1, VS.dtype.element_ty)
            sv2 = round_to(hv2, VS.dtype.element_ty)
            sk1 = round_to(sk1, KS.dtype.element_ty)
            sk2 = round_to(sk2, KS.dtype.element_ty)
            row_s = ss_off + b * ss_b + c[:, None] * ss_c + l * ss_l + h * ss_h + col
            tl.store(VS + row_s, sv1, mask=m2)
            tl.store(VS + row_s + HALF, sv2, mask=m2)
            if not OWN_SCORE:
                tl.store(KS + row_s, sk1, mask=m2)
                tl.store(KS + row_s + HALF, sk2, mask=m2)
            if WRITE_SUM & (l == L - 1):
                row_u = su_off + b * su_b + c[:, None] * su_c + h * su_h + col
                tl.store(VSUM + row_u, sv1, mask=is_sum)
                tl.store(VSUM + row_u + HALF, sv2, mask=is_sum)
                tl.store(KSUM + row_u, sk1, mask=is_sum)
                tl.store(KSUM + row_u + HALF, sk2, mask=is_sum)
            if WRITE_Q:  # rotated and tiled to heads; padding rows of a partial last chunk get zeros
                q1, q2 = _rot(q1.to(tl.float32), q2.to(tl.float32), cos, sin, ROPE, 1.0)
                q1 = round_to(q1, QO.dtype.element_ty)
                q2 = round_to(q2, QO.dtype.element_ty)
                m_q = ((tok < q_rows) & (c < C))[:, None]
                row_o = so_off + b * so_b + c[:, None] * so_c + l * so_l + h * so_h + col
                tl.store(QO + row_o, q1, mask=m_q)
                tl.store(QO + row_o + HALF, q2, mask=m_q)
                if OWN_SCORE:  # the merge's own score, from the stored (rounded) query and key; BD = HALF
                    dot = tl.sum(q1.to(tl.float32) * sk1.to(tl.float32), 1)
                    dot += tl.sum(q2.to(tl.float32) * sk2.to(tl.float32), 1)
                    row_w = sw_off + b * sw_b + c * sw_c + l * sw_l + h * sw_h
                    tl.store(OWN + row_w, dot * scale, mask=tok < T)


@triton.jit
def _rat_seq_bwd_kernel(
    K, V, G, BIAS, COS, SIN, DVS, DKS, DVSUM, DKSUM, DK, DV, DG, DBIAS, HIST,
    T, C, n_sum,
    sk_b, sk_t, sk_g, sv_b, sv_t, sv_h, sg_b, sg_t, sg_h, sd_b, sd_t, sd_h,
    ss_b, ss_c, ss_l, ss_h, ss_off,
    su_b, su_c, su_h, su_off,
    L: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, HALF: tl.constexpr, NC: tl.constexpr,
    BD: tl.constexpr, ROPE: tl.constexpr, HAS_SUM: tl.constexpr, LOGITS: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(1) // NG).to(tl.int64)
    grp = (tl.program_id(1) % NG).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    c = tl.program_id(0).to(tl.int64) * NC + tl.arange(0, NC)
    start = tl.program_id(2) * BD
    first = start < HALF
    i = start + tl.arange(0, BD)
    col = i[None, :]
    if first:  # the partner channel of the rotation, and the sign of its term in the transpose
        pair = HALF
        sign = 1.0
    else:
        pair = -HALF
        sign = -1.0
    cos, sin = _rope_of_chunks(COS, SIN, c, C, (i % HALF)[None, :], HALF, ROPE)
    sin = sign * sin
    m_end = ((c < n_sum) & ((c + 1) * L <= T))[:, None]  # chunk ends whose summary a later chunk read
    W = H * 2 * HALF  # elements per token of the bias gradient's partial sums
    WG = NG * 2 * HALF  # and of the [B, T, G, d] ones
    # this program's scratch: the fp32 states before each token of its tile, [L, 2, NC, BD]; it stays in
    # cache and costs no traffic to speak of. The barriers below order its writes before its reads (and a
    # head's stores into DK before the next head reads them back): do not remove them
    pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    tile = tl.arange(0, NC)[:, None] * BD + tl.arange(0, BD)[None, :]
    hist = HIST + pid.to(tl.int64) * (L * 2 * NC * BD) + tile
    for j in range(H // NG):
        h = grp + j * NG
        bias = BIAS + h * 2 * HALF + i
        # forward: the fp32 states before each token, kept for the reverse loop; each row's inputs are
        # loaded one iteration ahead (the stores to the scratch would otherwise hold the next loads back)
        hv = tl.zeros([NC, BD], dtype=tl.float32)
        hk = tl.zeros([NC, BD], dtype=tl.float32)
        g_n, v_n, k_n = _state_inputs(0, c, b, h, grp, col, T, L, G, V, K, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h,
                                      sk_b, sk_t, sk_g)  # fmt: skip
        for l in range(L):
            g_raw, v, k = g_n, v_n, k_n
            g_n, v_n, k_n = _state_inputs(l + 1, c, b, h, grp, col, T, L, G, V, K, sg_b, sg_t, sg_h,
                                          sv_b, sv_t, sv_h, sk_b, sk_t, sk_g)  # fmt: skip
            tl.store(hist + (2 * l) * NC * BD, hv)
            tl.store(hist + (2 * l + 1) * NC * BD, hk)
            g = _gate_of(g_raw, ((c * L + l) < T)[:, None], bias, LOGITS)
            hv = g * hv + (1.0 - g) * v.to(tl.float32)
            hk = g * hk + (1.0 - g) * k.to(tl.float32)
        tl.debug_barrier()
        # reverse: the adjoint recurrence dh_t = dstate_t + g_{t+1} dh_{t+1}, inputs again one row ahead
        dhv = tl.zeros([NC, BD], dtype=tl.float32)
        dhk = tl.zeros([NC, BD], dtype=tl.float32)
        gn = tl.zeros([NC, BD], dtype=tl.float32)
        db = tl.zeros([BD], dtype=tl.float32)
        dv_n, dr_n, drp_n, g_n, v_n, k_n, pv_n, pk_n, dk_n = _grad_inputs(
                L - 1, c, b, h, grp, col, pair, T, L, j, hist, DVS, DKS, G, V, K, DK,
                ss_off, ss_b, ss_c, ss_l, ss_h, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h, sk_b, sk_t, sk_g, WG,
                NC, BD, HALF, ROPE,
            )  # fmt: skip
        if HAS_SUM:  # the last row also takes the summary's gradients
            row_u = su_off + b * su_b + c[:, None] * su_c + h * su_h + col
            dvsum = tl.load(DVSUM + row_u, mask=m_end, other=0.0).to(tl.float32)
            dksum = tl.load(DKSUM + row_u, mask=m_end, other=0.0).to(tl.float32)
            if ROPE:
                dksum_pair = tl.load(DKSUM + row_u + pair, mask=m_end, other=0.0).to(tl.float32)
        for l in range(L - 1, -1, -1):
            dv, dr, drp, g_raw, v, k, pv, pk, dk_acc = dv_n, dr_n, drp_n, g_n, v_n, k_n, pv_n, pk_n, dk_n
            dv_n, dr_n, drp_n, g_n, v_n, k_n, pv_n, pk_n, dk_n = _grad_inputs(
                l - 1, c, b, h, grp, col, pair, T, L, j, hist, DVS, DKS, G, V, K, DK,
                ss_off, ss_b, ss_c, ss_l, ss_h, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h, sk_b, sk_t, sk_g, WG,
                NC, BD, HALF, ROPE,
            )  # fmt: skip
            tok = c * L + l
            m2 = (tok < T)[:, None]
            dv = dv.to(tl.float32)
            dr = dr.to(tl.float32)
            drp = drp.to(tl.float32)
            if HAS_SUM & (l == L - 1):
                dv += dvsum
                dr += dksum
                if ROPE:
                    drp += dksum_pair
            if ROPE:  # the rotation's transpose
                dr = dr * cos + drp * sin
            dhv = dv + gn * dhv
            dhk = dr + gn * dhk
            g = _gate_of(g_raw, m2, bias, LOGITS)
            row_o = b * sd_b + tok[:, None] * sd_t + h * sd_h + col  # dv and dg share their strides
            tl.store(DV + row_o, round_to((1.0 - g) * dhv, DV.dtype.element_ty), mask=m2)
            dg = dhv * (pv - v.to(tl.float32)) + dhk * (pk - k.to(tl.float32))
            if LOGITS:  # through the sigmoid; masked rows add nothing to the bias sums
                dg = tl.where(m2, dg * g * (1.0 - g), 0.0)
                db += tl.sum(dg, 0)
            tl.store(DG + row_o, round_to(dg, DG.dtype.element_ty), mask=m2)
            # this head's key gradient, added into the group's fp32 buffer
            row_q = b * T * WG + tok[:, None] * WG + grp * 2 * HALF + col
            tl.store(DK + row_q, dk_acc + (1.0 - g) * dhk, mask=m2)
            gn = g
        if LOGITS:
            row_db = DBIAS + (tl.program_id(0) * (tl.num_programs(1) // NG) + b) * W + h * 2 * HALF + i
            tl.store(row_db, db)
        tl.debug_barrier()  # the next head reads back what this one stored into DK and the scratch


@triton.jit
def _dq_sum_kernel(
    DQA, DQB, COS, SIN, DQ, T, C,
    sa_b, sa_c, sa_l, sa_h, sa_off,
    sb_b, sb_c, sb_l, sb_h, sb_off,
    sq_b, sq_t, sq_g,
    L: tl.constexpr, H: tl.constexpr, NG: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr,
    ROPE: tl.constexpr, HAS_DQB: tl.constexpr,
):  # fmt: skip
    """dq [B, T, G, d] = the rotation's transpose of the sum over a group's heads of the query gradients
    (own part DQA, summary part DQB, both per head in the layouts their kernels wrote)."""
    b = (tl.program_id(1) // NG).to(tl.int64)
    grp = (tl.program_id(1) % NG).to(tl.int64)
    tok, valid, c, l = token_block(T, L, BT)
    e = tl.arange(0, HALF)[None, :]
    m2 = valid[:, None]
    m_b = (valid & (c >= 1))[:, None]
    acc1 = tl.zeros([BT, HALF], dtype=tl.float32)
    acc2 = tl.zeros([BT, HALF], dtype=tl.float32)
    for j in range(H // NG):
        h = grp + j * NG
        p_a = token_ptrs(DQA, sa_off, sa_b, sa_c, sa_l, sa_h, b, c, l, h)[:, None] + e
        acc1 += tl.load(p_a, mask=m2, other=0.0).to(tl.float32)
        acc2 += tl.load(p_a + HALF, mask=m2, other=0.0).to(tl.float32)
        if HAS_DQB:
            p_b = token_ptrs(DQB, sb_off, sb_b, sb_c, sb_l, sb_h, b, c, l, h)[:, None] + e
            acc1 += tl.load(p_b, mask=m_b, other=0.0).to(tl.float32)
            acc2 += tl.load(p_b + HALF, mask=m_b, other=0.0).to(tl.float32)
    if ROPE:  # the transpose of the rotation at the chunk index
        cos, sin = _rope_of_chunks(COS, SIN, c, C, e, HALF, ROPE)
        acc1, acc2 = acc1 * cos + acc2 * sin, acc2 * cos - acc1 * sin
    row_q = b * sq_b + tok[:, None] * sq_t + grp * sq_g + e
    tl.store(DQ + row_q, round_to(acc1, DQ.dtype.element_ty), mask=m2)
    tl.store(DQ + row_q + HALF, round_to(acc2, DQ.dtype.element_ty), mask=m2)


@triton.jit
def _fwd_inputs(
    l, c, b, h, grp, col, T, L, Q, K, V, G, sq_b, sq_t, sq_g, sk_b, sk_t, sk_g, sv_b, sv_t, sv_h,
    sg_b, sg_t, sg_h, HALF: tl.constexpr, WRITE_Q: tl.constexpr,
):  # fmt: skip
    """Row l's key, gate (or logit), value and query halves, raw; zeros past the chunk or the sequence."""
    g1, v1, k1 = _state_inputs(
        l, c, b, h, grp, col, T, L, G, V, K, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h, sk_b, sk_t, sk_g
    )
    g2, v2, k2 = _state_inputs(
        l, c, b, h, grp, col + HALF, T, L, G, V, K, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h, sk_b, sk_t, sk_g
    )
    tok = c * L + l
    m_q = ((tok < T) & (l < L))[:, None] & WRITE_Q
    row_q = Q + b * sq_b + tok[:, None] * sq_t + grp * sq_g + col
    q1 = tl.load(row_q, mask=m_q, other=0.0)
    q2 = tl.load(row_q + HALF, mask=m_q, other=0.0)
    return k1, k2, g1, g2, v1, v2, q1, q2


@triton.jit
def _rope_of_chunks(COS, SIN, c, C, half_col, HALF: tl.constexpr, ROPE: tl.constexpr):
    """cos and sin [NC, BD] of chunks c at channels half_col (< d/2); 0.0 each without RoPE (unused)."""
    if ROPE:
        m_c = (c < C)[:, None]
        cos = tl.load(COS + c[:, None] * HALF + half_col, mask=m_c, other=1.0)
        sin = tl.load(SIN + c[:, None] * HALF + half_col, mask=m_c, other=0.0)
    else:
        cos = 0.0
        sin = 0.0
    return cos, sin


@triton.jit
def _state_inputs(l, c, b, h, grp, col, T, L, G, V, K, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h, sk_b, sk_t, sk_g):
    """Row l's gate (as stored: gate or logit), value and key, raw; zeros past the chunk or the sequence."""
    tok = c * L + l
    m2 = ((tok < T) & (l < L))[:, None]
    g = tl.load(G + b * sg_b + tok[:, None] * sg_t + h * sg_h + col, mask=m2, other=0.0)
    v = tl.load(V + b * sv_b + tok[:, None] * sv_t + h * sv_h + col, mask=m2, other=0.0)
    k = tl.load(K + b * sk_b + tok[:, None] * sk_t + grp * sk_g + col, mask=m2, other=0.0)
    return g, v, k


@triton.jit
def _grad_inputs(
    l, c, b, h, grp, col, pair, T, L, j, hist, DVS, DKS, G, V, K, DK,
    ss_off, ss_b, ss_c, ss_l, ss_h, sg_b, sg_t, sg_h, sv_b, sv_t, sv_h, sk_b, sk_t, sk_g, WG,
    NC: tl.constexpr, BD: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Everything the reverse loop reads at row l, raw (no arithmetic on the loaded values, so nothing waits
    for them here); zeros for l < 0 and, except the scratch states (unused there), past the sequence. The
    key gradient buffer is read back only after the group's first head (j > 0) has written it."""
    tok = c * L + l
    live = (tok < T) & (l >= 0)
    m2 = live[:, None]
    row_s = ss_off + b * ss_b + c[:, None] * ss_c + l * ss_l + h * ss_h + col
    dv = tl.load(DVS + row_s, mask=m2, other=0.0)
    dr = tl.load(DKS + row_s, mask=m2, other=0.0)
    drp = tl.load(DKS + row_s + pair, mask=m2 & ROPE, other=0.0)
    g = tl.load(G + b * sg_b + tok[:, None] * sg_t + h * sg_h + col, mask=m2, other=0.0)
    v = tl.load(V + b * sv_b + tok[:, None] * sv_t + h * sv_h + col, mask=m2, other=0.0)
    k = tl.load(K + b * sk_b + tok[:, None] * sk_t + grp * sk_g + col, mask=m2, other=0.0)
    m_h = (l >= 0) & (tl.arange(0, NC) >= 0)[:, None]
    pv = tl.load(hist + (2 * l) * NC * BD, mask=m_h, other=0.0)
    pk = tl.load(hist + (2 * l + 1) * NC * BD, mask=m_h, other=0.0)
    row_q = b * T * WG + tok[:, None] * WG + grp * 2 * HALF + col
    dk = tl.load(DK + row_q, mask=m2 & (j > 0), other=0.0)
    return dv, dr, drp, g, v, k, pv, pk, dk


# benchmarks may pin a tile: {"fwd" or "bwd": (NC, BD, warps)}
TILES: dict[str, tuple[int, int, int]] = {}


def seq_tile(C: int, d: int, interpret: bool, kind: str = "fwd") -> tuple[int, int, int]:
    """(chunks per program NC, channels per block BD, warps) of the forward or backward kernel ("fwd",
    "bwd"), unless `TILES` pins one: one warp, rows of up to 64 channels, 128 elements per program.

    The forward takes BD channels from each half of the head vector, the backward BD channels of one half.
    """
    if kind in TILES and not interpret:
        NC, BD, warps = TILES[kind]
        if BD < 1 or (d // 2) % BD or NC < 1 or warps < 1:
            raise ValueError(f"scan_seq.TILES[{kind!r}] = {TILES[kind]}: BD must divide d/2 = {d // 2}")
        return NC, BD, warps
    if interpret:
        return max(1, min(2, triton.next_power_of_2(C))), min(d // 2, 8), 1
    BD = min(d // 2, 64)
    return max(1, min(128 // BD, triton.next_power_of_2(C))), BD, 1
