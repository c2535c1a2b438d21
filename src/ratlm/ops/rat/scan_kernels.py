"""RAT's chunked recurrence as Triton kernels: values and keys in one pass, RoPE at the chunk index.

A program owns a tile of whole chunks (BT rows), one (batch, key group) pair and BD channels of each half
of the head vector (RoPE pairs channel i with i + d/2, so both halves travel together). It loads the group's
keys once and loops over the H/G heads that share them: per head, one parallel prefix scan over the tile
gives the running value and key states (the decay is zeroed at chunk starts, so one scan serves several
short chunks). States are written in the activation dtype; the key states after RoPE. The same program
writes the queries, rotated and tiled to heads, in whatever layout the attention that follows wants, and
the chunk summaries (the states at each chunk's last token).

The backward kernel has the same shape. It recomputes the states before each token (a scan over the
inputs shifted by one row, so no division by the gate), scans the incoming state gradients in reverse,
and sums the key and query gradients of the heads that share a group in registers (no atomics).

Tensors addressed per token take strides (batch, chunk, position in chunk, head) and an element offset,
so one kernel writes [B, T, H, d], [B, H, T, d] or the chunks-as-heads layout [B, C, H, L, d] alike.

With a gate bias the gate input holds logits, and the kernels form sigmoid(logit + bias) themselves (the
backward writes the logits' gradient and per-tile partial sums of the bias's). The launchers `rat_scan_fwd`
and `rat_scan_bwd` send chunks of up to 16 tokens to the per-chunk loops of `scan_seq.py` (faster there) and
longer ones to these kernels; `VARIANT` forces either.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..rope import rope_cos_sin
from ..scan.kernel import round_to

# the CPU interpreter runs a scan one element at a time: small tiles keep the tests quick
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def token_block(T, L, BM: tl.constexpr):
    """The BM tokens of this program's block (grid axis 0): indices, whether each exists (< T), and each one's
    chunk and position in it."""
    tok = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    c = tok // L
    return tok, tok < T, c, tok - c * L


@triton.jit
def token_ptrs(base, off, sb, sc, sl, sh, b, c, l, h):
    """Pointers to the head vectors of tokens (chunk c, position l) of batch row b and head h in a per-token
    tensor with `token_strides` (sb, sc, sl, sh) and element offset off."""
    return base + off + b * sb + c * sc + l * sl + h * sh


@triton.jit
def _combine2(a1, x1, y1, a2, x2, y2):
    """Two recurrences h -> a h + u sharing the decay; the first argument is the earlier step."""
    return a1 * a2, x1 * a2 + x2, y1 * a2 + y2


@triton.jit
def _gate_of(x, mask, bias_ptr, LOGITS: tl.constexpr):
    """The forget gate from loaded values, fp32, zero where masked: the gate, or sigmoid(logit + bias)."""
    x = x.to(tl.float32)
    if LOGITS:
        x = tl.where(mask, tl.sigmoid(x + tl.load(bias_ptr).to(tl.float32)[None, :]), 0.0)
    return x


@triton.jit
def _gate(ptr, mask, bias_ptr, LOGITS: tl.constexpr):
    """The forget gate at ptr (see `_gate_of`)."""
    return _gate_of(tl.load(ptr, mask=mask, other=0.0), mask, bias_ptr, LOGITS)


@triton.jit
def _rat_scan_fwd_kernel(
    Q, K, V, G, BIAS, COS, SIN, QO, VS, KS, VSUM, KSUM,
    T, L, M, C, q_rows,
    sq_b, sq_t, sq_g, sk_b, sk_t, sk_g, sv_b, sv_t, sv_h, sg_b, sg_t, sg_h,
    so_b, so_c, so_l, so_h, so_off,
    ss_b, ss_c, ss_l, ss_h, ss_off,
    su_b, su_c, su_h, su_off,
    H: tl.constexpr, NG: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    ROPE: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_SUM: tl.constexpr, LOGITS: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // NG).to(tl.int64)
    grp = (tl.program_id(1) % NG).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    r = tl.arange(0, BT)
    tok = pid_t * M * L + r
    inside = r < M * L
    valid = inside & (tok < T)
    c = tok // L
    l = tok - c * L
    i = tl.program_id(2) * BD + tl.arange(0, BD)
    m2 = valid[:, None]
    row_k = K + b * sk_b + tok[:, None] * sk_t + grp * sk_g
    k1 = tl.load(row_k + i[None, :], mask=m2, other=0.0).to(tl.float32)
    k2 = tl.load(row_k + HALF + i[None, :], mask=m2, other=0.0).to(tl.float32)
    if ROPE:
        m_cs = (inside & (c < C))[:, None]
        cos = tl.load(COS + c[:, None] * HALF + i[None, :], mask=m_cs, other=1.0)
        sin = tl.load(SIN + c[:, None] * HALF + i[None, :], mask=m_cs, other=0.0)
    if WRITE_Q:
        row_q = Q + b * sq_b + tok[:, None] * sq_t + grp * sq_g
        q1 = tl.load(row_q + i[None, :], mask=m2, other=0.0).to(tl.float32)
        q2 = tl.load(row_q + HALF + i[None, :], mask=m2, other=0.0).to(tl.float32)
        if ROPE:
            q1, q2 = q1 * cos - q2 * sin, q2 * cos + q1 * sin
        q1 = round_to(q1, QO.dtype.element_ty)
        q2 = round_to(q2, QO.dtype.element_ty)
        m_q = (inside & (tok < q_rows))[:, None]  # padding rows of a partial last chunk, if any, get zeros
    end = valid & (l == L - 1) & (c < C - 1)  # summaries of chunks that a later chunk reads
    for j in range(H // NG):
        h = grp + j * NG
        row_g = G + b * sg_b + tok[:, None] * sg_t + h * sg_h
        row_v = V + b * sv_b + tok[:, None] * sv_t + h * sv_h
        g1 = _gate(row_g + i[None, :], m2, BIAS + h * 2 * HALF + i, LOGITS)
        g2 = _gate(row_g + HALF + i[None, :], m2, BIAS + h * 2 * HALF + HALF + i, LOGITS)
        v1 = tl.load(row_v + i[None, :], mask=m2, other=0.0).to(tl.float32)
        v2 = tl.load(row_v + HALF + i[None, :], mask=m2, other=0.0).to(tl.float32)
        a1 = tl.where((l == 0)[:, None], 0.0, g1)
        a2 = tl.where((l == 0)[:, None], 0.0, g2)
        _, sv1, sk1 = tl.associative_scan((a1, (1.0 - g1) * v1, (1.0 - g1) * k1), 0, _combine2)
        _, sv2, sk2 = tl.associative_scan((a2, (1.0 - g2) * v2, (1.0 - g2) * k2), 0, _combine2)
        if ROPE:
            sk1, sk2 = sk1 * cos - sk2 * sin, sk2 * cos + sk1 * sin
        sv1 = round_to(sv1, VS.dtype.element_ty)
        sv2 = round_to(sv2, VS.dtype.element_ty)
        sk1 = round_to(sk1, KS.dtype.element_ty)
        sk2 = round_to(sk2, KS.dtype.element_ty)
        row_s = ss_off + b * ss_b + c[:, None] * ss_c + l[:, None] * ss_l + h * ss_h + i[None, :]
        tl.store(VS + row_s, sv1, mask=m2)
        tl.store(VS + row_s + HALF, sv2, mask=m2)
        tl.store(KS + row_s, sk1, mask=m2)
        tl.store(KS + row_s + HALF, sk2, mask=m2)
        if WRITE_SUM:
            row_u = su_off + b * su_b + c[:, None] * su_c + h * su_h + i[None, :]
            m_u = end[:, None]
            tl.store(VSUM + row_u, sv1, mask=m_u)
            tl.store(VSUM + row_u + HALF, sv2, mask=m_u)
            tl.store(KSUM + row_u, sk1, mask=m_u)
            tl.store(KSUM + row_u + HALF, sk2, mask=m_u)
        if WRITE_Q:
            row_o = so_off + b * so_b + c[:, None] * so_c + l[:, None] * so_l + h * so_h + i[None, :]
            tl.store(QO + row_o, q1, mask=m_q)
            tl.store(QO + row_o + HALF, q2, mask=m_q)


@triton.jit
def _rat_scan_bwd_kernel(
    K, V, G, BIAS, COS, SIN, DQA, DQB, DVS, DKS, DVSUM, DKSUM, DQ, DK, DV, DG, DBIAS,
    T, L, M, C, n_sum,
    sk_b, sk_t, sk_g, sv_b, sv_t, sv_h, sg_b, sg_t, sg_h,
    sa_b, sa_c, sa_l, sa_h, sa_off,
    sb_b, sb_c, sb_l, sb_h, sb_off,
    ss_b, ss_c, ss_l, ss_h, ss_off,
    su_b, su_c, su_h, su_off,
    H: tl.constexpr, NG: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    ROPE: tl.constexpr, HAS_DQB: tl.constexpr, HAS_SUM: tl.constexpr, LOGITS: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // NG).to(tl.int64)
    grp = (tl.program_id(1) % NG).to(tl.int64)  # head offsets of head-major buffers can pass 2**31
    r = tl.arange(0, BT)
    tok = pid_t * M * L + r
    inside = r < M * L
    valid = inside & (tok < T)
    c = tok // L
    l = tok - c * L
    i = tl.program_id(2) * BD + tl.arange(0, BD)
    m2 = valid[:, None]
    m_prev = (valid & (l > 0))[:, None]  # the token before, inside the same chunk
    m_next = (valid & (l < L - 1) & (tok + 1 < T))[:, None]  # the token after, inside the same chunk
    row_k = K + b * sk_b + tok[:, None] * sk_t + grp * sk_g + i[None, :]
    k1 = tl.load(row_k, mask=m2, other=0.0).to(tl.float32)
    k2 = tl.load(row_k + HALF, mask=m2, other=0.0).to(tl.float32)
    k1p = tl.load(row_k - sk_t, mask=m_prev, other=0.0).to(tl.float32)
    k2p = tl.load(row_k - sk_t + HALF, mask=m_prev, other=0.0).to(tl.float32)
    if ROPE:
        m_cs = (inside & (c < C))[:, None]
        cos = tl.load(COS + c[:, None] * HALF + i[None, :], mask=m_cs, other=1.0)
        sin = tl.load(SIN + c[:, None] * HALF + i[None, :], mask=m_cs, other=0.0)
    end = valid & (l == L - 1) & (c < n_sum)
    dk1 = tl.zeros([BT, BD], dtype=tl.float32)
    dk2 = tl.zeros([BT, BD], dtype=tl.float32)
    dq1 = tl.zeros([BT, BD], dtype=tl.float32)
    dq2 = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(H // NG):
        h = grp + j * NG
        row_g = G + b * sg_b + tok[:, None] * sg_t + h * sg_h + i[None, :]
        row_v = V + b * sv_b + tok[:, None] * sv_t + h * sv_h + i[None, :]
        bias = BIAS + h * 2 * HALF + i
        g1 = _gate(row_g, m2, bias, LOGITS)
        g2 = _gate(row_g + HALF, m2, bias + HALF, LOGITS)
        v1 = tl.load(row_v, mask=m2, other=0.0).to(tl.float32)
        v2 = tl.load(row_v + HALF, mask=m2, other=0.0).to(tl.float32)
        # states before each token: scan of the inputs shifted down one row (zero at chunk starts)
        g1p = _gate(row_g - sg_t, m_prev, bias, LOGITS)
        g2p = _gate(row_g - sg_t + HALF, m_prev, bias + HALF, LOGITS)
        v1p = tl.load(row_v - sv_t, mask=m_prev, other=0.0).to(tl.float32)
        v2p = tl.load(row_v - sv_t + HALF, mask=m_prev, other=0.0).to(tl.float32)
        _, hv1, hk1 = tl.associative_scan((g1p, (1.0 - g1p) * v1p, (1.0 - g1p) * k1p), 0, _combine2)
        _, hv2, hk2 = tl.associative_scan((g2p, (1.0 - g2p) * v2p, (1.0 - g2p) * k2p), 0, _combine2)

        row_s = ss_off + b * ss_b + c[:, None] * ss_c + l[:, None] * ss_l + h * ss_h + i[None, :]
        dv1 = tl.load(DVS + row_s, mask=m2, other=0.0).to(tl.float32)
        dv2 = tl.load(DVS + row_s + HALF, mask=m2, other=0.0).to(tl.float32)
        dr1 = tl.load(DKS + row_s, mask=m2, other=0.0).to(tl.float32)
        dr2 = tl.load(DKS + row_s + HALF, mask=m2, other=0.0).to(tl.float32)
        if HAS_SUM:
            row_u = su_off + b * su_b + c[:, None] * su_c + h * su_h + i[None, :]
            m_u = end[:, None]
            dv1 += tl.load(DVSUM + row_u, mask=m_u, other=0.0).to(tl.float32)
            dv2 += tl.load(DVSUM + row_u + HALF, mask=m_u, other=0.0).to(tl.float32)
            dr1 += tl.load(DKSUM + row_u, mask=m_u, other=0.0).to(tl.float32)
            dr2 += tl.load(DKSUM + row_u + HALF, mask=m_u, other=0.0).to(tl.float32)
        if ROPE:  # gradient through the rotation: its transpose
            dr1, dr2 = dr1 * cos + dr2 * sin, dr2 * cos - dr1 * sin
        g1n = _gate(row_g + sg_t, m_next, bias, LOGITS)
        g2n = _gate(row_g + sg_t + HALF, m_next, bias + HALF, LOGITS)
        _, dhv1, dhk1 = tl.associative_scan((g1n, dv1, dr1), 0, _combine2, reverse=True)
        _, dhv2, dhk2 = tl.associative_scan((g2n, dv2, dr2), 0, _combine2, reverse=True)

        row_dv = DV + b * T * H * 2 * HALF + tok[:, None] * H * 2 * HALF + h * 2 * HALF + i[None, :]
        tl.store(row_dv, round_to((1.0 - g1) * dhv1, DV.dtype.element_ty), mask=m2)
        tl.store(row_dv + HALF, round_to((1.0 - g2) * dhv2, DV.dtype.element_ty), mask=m2)
        row_dg = DG + b * T * H * 2 * HALF + tok[:, None] * H * 2 * HALF + h * 2 * HALF + i[None, :]
        dg1 = dhv1 * (hv1 - v1) + dhk1 * (hk1 - k1)
        dg2 = dhv2 * (hv2 - v2) + dhk2 * (hk2 - k2)
        if LOGITS:  # through the sigmoid; the bias gradient summed over this tile's rows
            dg1 = tl.where(m2, dg1 * g1 * (1.0 - g1), 0.0)
            dg2 = tl.where(m2, dg2 * g2 * (1.0 - g2), 0.0)
            row_db = DBIAS + (pid_t * (tl.num_programs(1) // NG) + b) * H * 2 * HALF
            tl.store(row_db + h * 2 * HALF + i, tl.sum(dg1, 0))
            tl.store(row_db + h * 2 * HALF + HALF + i, tl.sum(dg2, 0))
        tl.store(row_dg, round_to(dg1, DG.dtype.element_ty), mask=m2)
        tl.store(row_dg + HALF, round_to(dg2, DG.dtype.element_ty), mask=m2)
        dk1 += (1.0 - g1) * dhk1
        dk2 += (1.0 - g2) * dhk2

        row_a = sa_off + b * sa_b + c[:, None] * sa_c + l[:, None] * sa_l + h * sa_h + i[None, :]
        dq1 += tl.load(DQA + row_a, mask=m2, other=0.0).to(tl.float32)
        dq2 += tl.load(DQA + row_a + HALF, mask=m2, other=0.0).to(tl.float32)
        if HAS_DQB:
            row_b = sb_off + b * sb_b + c[:, None] * sb_c + l[:, None] * sb_l + h * sb_h + i[None, :]
            m_b = (valid & (c >= 1))[:, None]
            dq1 += tl.load(DQB + row_b, mask=m_b, other=0.0).to(tl.float32)
            dq2 += tl.load(DQB + row_b + HALF, mask=m_b, other=0.0).to(tl.float32)
    if ROPE:
        dq1, dq2 = dq1 * cos + dq2 * sin, dq2 * cos - dq1 * sin
    row_q = b * T * NG * 2 * HALF + tok[:, None] * NG * 2 * HALF + grp * 2 * HALF + i[None, :]
    tl.store(DQ + row_q, round_to(dq1, DQ.dtype.element_ty), mask=m2)
    tl.store(DQ + row_q + HALF, round_to(dq2, DQ.dtype.element_ty), mask=m2)
    tl.store(DK + row_q, round_to(dk1, DK.dtype.element_ty), mask=m2)
    tl.store(DK + row_q + HALF, round_to(dk2, DK.dtype.element_ty), mask=m2)


def token_strides(x: Tensor, layout: str, L: int) -> tuple[int, int, int, int, int]:
    """(batch, chunk, position-in-chunk, head) strides and element offset of a per-token tensor.

    layout: "bthd" [B, T, H, d]; "bhtd" [B, H, T, d]; "bchld" [B, C, H, L, d] (chunks as heads);
    "heads" a [B, H*L, C-1, d] or [B, H*L, C-1] view whose query row c holds chunk c + 1 (a chunks-as-heads
    engine's output or statistic), addressed by the chunk itself; "bht" a [B, H, T] statistic.
    """
    s = x.stride()
    if layout == "bthd":
        return s[0], L * s[1], s[1], s[2], 0
    if layout == "bhtd":
        return s[0], L * s[2], s[2], s[1], 0
    if layout == "bchld":
        return s[0], s[1], s[3], s[2], 0
    if layout == "heads":
        return s[0], s[2], s[1], L * s[1], -s[2]
    if layout == "bht":
        return s[0], L * s[2], s[2], s[1], 0
    raise ValueError(f"unknown layout {layout!r}")


def chunk_strides(x: Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, chunk, head) strides and offset of summaries: "bchd" [B, C, H, d] or "bhcd" [B, H, C, d]."""
    s = x.stride()
    if layout == "bchd":
        return s[0], s[1], s[2], 0
    if layout == "bhcd":
        return s[0], s[2], s[1], 0
    raise ValueError(f"unknown layout {layout!r}")


_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def rope_tables(C: int, d: int, base: float, device) -> tuple[Tensor, Tensor]:
    """cos and sin [C, d/2] at chunk indices 0..C-1, the reference's own numbers, cached per size."""
    key = (C, d, base, str(device))
    if key not in _TABLES:
        if len(_TABLES) > 32:
            _TABLES.clear()
        cos, sin = rope_cos_sin(torch.arange(C, device=device), d, base)
        _TABLES[key] = (cos[:, : d // 2].contiguous(), sin[:, : d // 2].contiguous())
    return _TABLES[key]


def tile_shape(L: int, d: int, budget: int) -> tuple[int, int, int]:
    """Rows per tile (a power of two holding M whole chunks), chunks per tile M, channels per half BD."""
    M = max(1, (16 if INTERPRET else 64) // L)
    BT = triton.next_power_of_2(M * L)
    BD = max(1, min(d // 2, budget // BT))
    return BT, M, BD


# which kernels run the scans: "auto" (the per-chunk loops of scan_seq.py up to its MAX_CHUNK, else the
# prefix scans of this module), "seq" or "scan" (forced, for benchmarks and tests)
VARIANT = "auto"


def _use_seq(L: int) -> bool:
    from .scan_seq import MAX_CHUNK

    if VARIANT not in ("auto", "seq", "scan"):
        raise ValueError(f"scan_kernels.VARIANT must be 'auto', 'seq' or 'scan', got {VARIANT!r}")
    return VARIANT != "scan" and L <= MAX_CHUNK


def own_score_supported(L: int, C: int, d: int) -> bool:
    """Whether `rat_scan_fwd` can write the own scores (`own`) for chunk size L, C chunks, head width d:
    the sequential kernel with the whole head vector in one program."""
    from .scan_seq import seq_tile

    return _use_seq(L) and seq_tile(C, d, INTERPRET)[1] == d // 2


def rat_scan_fwd(
    q, k, v, g, L, rope, cos, sin, qo, qo_layout, vs, ks, s_layout, vsum, ksum, sum_layout, gate_bias=None,
    own=None, scale=1.0,
):  # fmt: skip
    """Launch the forward scan; outputs are preallocated (qo, vsum and ksum may be None).

    g holds the forget gates, or with gate_bias ([H * d]) their logits: the gate is sigmoid(g + gate_bias).
    own ([B, T, H] fp32, for inference): instead of the key states ks (None then), each token's own score
    scale * q.k~ as the merge computes it from the stored query and key (needs qo and
    `own_score_supported`).
    """
    B, T, H, d = v.shape
    G = k.shape[2]
    C = triton.cdiv(T, L)
    if own is not None and (qo is None or not own_score_supported(L, C, d)):
        raise ValueError(f"own scores need the queries written and the sequential scan (L {L}, d {d})")
    if own is None and ks is None:
        raise ValueError("ks is needed unless the own scores are written")
    pointers = (
        q, k, v, g, gate_bias if gate_bias is not None else v, cos if rope else v, sin if rope else v,
        qo if qo is not None else v, vs, ks if ks is not None else vs,
        vsum if vsum is not None else v, ksum if ksum is not None else v,
    )  # fmt: skip
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), g.stride(2),
        *(token_strides(qo, qo_layout, L) if qo is not None else (0,) * 5),
        *token_strides(vs, s_layout, L),
        *(chunk_strides(vsum, sum_layout) if vsum is not None else (0,) * 4),
    )  # fmt: skip
    q_rows = C * L if qo_layout == "bchld" else T
    flags = dict(H=H, NG=G, HALF=d // 2, ROPE=rope, WRITE_Q=qo is not None, WRITE_SUM=vsum is not None,
                 LOGITS=gate_bias is not None)  # fmt: skip
    if _use_seq(L):
        from .scan_seq import _rat_seq_fwd_kernel, seq_tile

        NC, BD, warps = seq_tile(C, d, INTERPRET)
        grid = (triton.cdiv(C, NC), B * G, d // 2 // BD)
        own_strides = token_strides(own, "bthd", L) if own is not None else (0,) * 5
        _rat_seq_fwd_kernel[grid](
            *pointers, own if own is not None else v, T, C, q_rows, scale, *strides, *own_strides,
            L=L, NC=NC, BD=BD, num_warps=warps, OWN_SCORE=own is not None, **flags,
        )  # fmt: skip
    else:
        BT, M, BD = tile_shape(L, d, 2048)
        grid = (triton.cdiv(C, M), B * G, d // 2 // BD)
        warps = 4 if BT * BD <= 1024 else 8
        _rat_scan_fwd_kernel[grid](
            *pointers, T, L, M, C, q_rows, *strides, BT=BT, BD=BD, num_warps=warps, **flags
        )


def rat_scan_bwd(
    k, v, g, L, rope, cos, sin, dqa, dqa_layout, dqb, dqb_layout, dvs, dks, s_layout,
    dvsum, dksum, sum_layout, n_sum, q_dtype, gate_bias=None, out=None,
):  # fmt: skip
    """Launch the backward scan; returns dq, dk [B, T, G, d], dv, dg [B, T, H, d] and the gate bias's
    gradient (None without gate_bias; then g holds gates, with it logits, and dg is the logits').

    The four are new contiguous tensors, or the tensors of `out` = (dq, dk, dv, dg) written in place (any
    strides with a unit last one; dv and dg with the same strides), e.g. views of one packed gradient."""
    B, T, H, d = v.shape
    G = k.shape[2]
    C = triton.cdiv(T, L)
    logits = gate_bias is not None
    seq = _use_seq(L)
    if seq:
        from .scan_seq import _dq_sum_kernel, _rat_seq_bwd_kernel, seq_tile

        NC, BD, warps = seq_tile(C, d, INTERPRET, "bwd")
        grid = (triton.cdiv(C, NC), B * G, d // BD)  # BD channels of one half per program
    else:
        BT, M, BD = tile_shape(L, d, 1024)
        grid = (triton.cdiv(C, M), B * G, d // 2 // BD)  # BD channels of each half per program
        warps = 4 if BT * BD <= 512 else 8
    if out is None:
        out = (
            torch.empty(B, T, G, d, device=v.device, dtype=q_dtype),
            torch.empty(B, T, G, d, device=v.device, dtype=k.dtype),
            torch.empty(B, T, H, d, device=v.device, dtype=v.dtype),
            torch.empty(B, T, H, d, device=v.device, dtype=g.dtype),
        )
    elif out[2].stride() != out[3].stride() or any(t.stride(-1) != 1 for t in out):
        raise ValueError("rat_scan_bwd: out's dv and dg need equal strides, and all a unit last stride")
    if seq:  # dq, dv and dg written in place with their strides; the heads of a group add into an fp32 dk
        dq, dv, dg = out[0], out[2], out[3]
        dk = torch.empty(B, T, G, d, device=v.device, dtype=torch.float32)
    else:  # the prefix-scan kernel writes contiguous tensors (copied into `out` after, if it is not)
        dense = all(t.is_contiguous() for t in out)
        dq, dk, dv, dg = (
            out if dense else (torch.empty_like(t, memory_format=torch.contiguous_format) for t in out)
        )
    # per (tile of chunks, batch row): the bias gradient of those rows, summed afterwards (no atomics)
    dbias = torch.empty(grid[0] * B, H * d, device=v.device, dtype=torch.float32) if logits else None
    tables = (cos if rope else v, sin if rope else v)
    dq_strides = (*token_strides(dqa, dqa_layout, L),
                  *(token_strides(dqb, dqb_layout, L) if dqb is not None else (0,) * 5))  # fmt: skip
    state_strides = (
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        *token_strides(dvs, s_layout, L),
        *(chunk_strides(dvsum, sum_layout) if dvsum is not None else (0,) * 4),
    )  # fmt: skip
    sums = (dvsum if dvsum is not None else dvs, dksum if dksum is not None else dvs)
    flags = dict(H=H, NG=G, HALF=d // 2, BD=BD, ROPE=rope, HAS_SUM=dvsum is not None, LOGITS=logits,
                 num_warps=warps)  # fmt: skip
    if seq:
        BQ = 16 if INTERPRET else 32
        _dq_sum_kernel[(triton.cdiv(T, BQ), B * G)](
            dqa, dqb if dqb is not None else dqa, *tables, dq, T, C, *dq_strides, *dq.stride()[:3],
            L=L, H=H, NG=G, HALF=d // 2, BT=BQ, ROPE=rope, HAS_DQB=dqb is not None, num_warps=4,
        )  # fmt: skip
        hist = torch.empty(
            grid[0] * grid[1] * grid[2] * L * 2 * NC * BD, device=v.device, dtype=torch.float32
        )
        _rat_seq_bwd_kernel[grid](
            k, v, g, gate_bias if logits else v, *tables, dvs, dks, *sums,
            dk, dv, dg, dbias if logits else dg, hist, T, C, n_sum,
            *state_strides[:9], *dv.stride()[:3], *state_strides[9:], L=L, NC=NC, **flags,
        )  # fmt: skip
        out[1].copy_(dk)
    else:
        _rat_scan_bwd_kernel[grid](
            k, v, g, gate_bias if logits else v, *tables, dqa, dqb if dqb is not None else dqa, dvs, dks,
            *sums, dq, dk, dv, dg, dbias if logits else dg,
            T, L, M, C, n_sum, *state_strides[:9], *dq_strides, *state_strides[9:],
            BT=BT, HAS_DQB=dqb is not None, **flags,
        )  # fmt: skip
        if not dense:
            for target, t in zip(out, (dq, dk, dv, dg), strict=True):
                target.copy_(t)
    dbias = dbias.sum(0).to(gate_bias.dtype).view(gate_bias.shape) if logits else None
    return (*out, dbias)
