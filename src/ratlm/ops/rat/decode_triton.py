"""RAT's one-token step in Triton: recurrence, RoPE, attention over chunk summaries and output gate fused.

Kernels -> launcher `rat_decode_triton` (same contract as `rat_decode_naive`). Per (sequence, head) the step
(`_rat_token`) reads the gate, value, key and z of the new token straight from the input projection, advances
the running states, rotates query and running key by the chunk index, merges the attention over the earlier
chunks' summaries with the token's own state, writes sigmoid(z) * y, and stores the chunk's summary when the
token completes it. With many (sequence, head) pairs one program per pair does it all (`_rat_step_kernel`);
with few, `_rat_split_step_kernel` splits the summaries across programs and the last split of a pair to
finish does the step, so that one launch serves the split too and moves the position counter on.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...cache import RATState, advance
from ..attention.decode_triton import (
    OVERRIDES,
    _attend,
    _halves,
    _merge_splits,
    _query,
    _rotate,
    _split_kernel,
    _split_part,
    _store_halves,
    _with_own,
    check_rows,
    plan_splits,
    split_meta,
    split_workspace,
)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _rat_own(
    b, h, p, q_ptr, k_ptr, x_ptr, g_ptr, z_ptr, bias_ptr, stride_qb, stride_knb, stride_xb, stride_gb,
    stride_zb, rope_ptr, kr_ptr, vr_ptr, run, scale, G, L, offs, mask,
    HALF: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """The new token's own part of the step of head h of sequence b at position p (nothing stored): the
    advanced running states (fp32), its own key (rotated) and value as the general path rounds them, the
    rotated query, the query's score against its own key, and the output gate sigmoid(z)."""
    c = p // L
    j = p - c * L
    col = h * (2 * HALF)  # head h in the [H * d] rows of x, g, z and the gate bias
    gcol = (h % G) * (2 * HALF)  # its query/key group

    # the recurrence, in fp32, restarted at chunk starts: s = g * s + (1 - g) * input
    g1, g2 = _halves(g_ptr + b * stride_gb + col, offs, mask, HALF)
    bias1, bias2 = _halves(bias_ptr + col, offs, mask, HALF)
    g1 = _sigmoid(g1 + bias1)
    g2 = _sigmoid(g2 + bias2)
    x1, x2 = _halves(x_ptr + b * stride_xb + col, offs, mask, HALF)
    kn1, kn2 = _halves(k_ptr + b * stride_knb + gcol, offs, mask, HALF)
    keep = (offs * 0 + j) > 0  # as a vector: masks must be boolean tensors of the block's shape
    vr1, vr2 = _halves(vr_ptr + run, offs, mask & keep, HALF)
    kr1, kr2 = _halves(kr_ptr + run, offs, mask & keep, HALF)
    vr1 = g1 * vr1 + (1 - g1) * x1
    vr2 = g2 * vr2 + (1 - g2) * x2
    kr1 = g1 * kr1 + (1 - g1) * kn1
    kr2 = g2 * kr2 + (1 - g2) * kn2

    # the token's own key and value, in the activation dtype as the general path rounds them
    act = x_ptr.dtype.element_ty
    vs1 = vr1.to(act).to(tl.float32)
    vs2 = vr2.to(act).to(tl.float32)
    ks1 = kr1.to(act).to(tl.float32)
    ks2 = kr2.to(act).to(tl.float32)
    rope_row = rope_ptr + c * (2 * HALF)
    if ROPE:
        ks1, ks2 = _rotate(ks1, ks2, rope_row, offs, mask, HALF, act)
    q1, q2 = _query(q_ptr + b * stride_qb + gcol, rope_row, offs, mask, HALF, ROPE)
    s_own = (tl.sum(q1 * ks1, axis=0) + tl.sum(q2 * ks2, axis=0)) * scale
    z1, z2 = _halves(z_ptr + b * stride_zb + col, offs, mask, HALF)
    return vr1, vr2, kr1, kr2, ks1, ks2, vs1, vs2, q1, q2, s_own, _sigmoid(z1), _sigmoid(z2)


@triton.jit
def _rat_finish(
    m, l, a1, a2, vr1, vr2, kr1, kr2, ks1, ks2, vs1, vs2, s_own, zg1, zg2, kr_ptr, vr_ptr, run, keys, values,
    stride_kn, out_ptr, c, closes, offs, mask, HALF: tl.constexpr,
):  # fmt: skip
    """Store the step: the output sigmoid(z) * y (the partial softmax (m, l, a1, a2) over the summaries
    merged with the token's own key/value), the running states, and the chunk's summary in slot c when the
    token closes its chunk (a slot no program of this launch reads)."""
    y1, y2 = _with_own(m, l, a1, a2, s_own, vs1, vs2)
    _store_halves(out_ptr, y1 * zg1, y2 * zg2, offs, mask, HALF)
    _store_halves(vr_ptr + run, vr1, vr2, offs, mask, HALF)
    _store_halves(kr_ptr + run, kr1, kr2, offs, mask, HALF)
    _store_halves(keys + c * stride_kn, ks1, ks2, offs, mask & closes, HALF)
    _store_halves(values + c * stride_kn, vs1, vs2, offs, mask & closes, HALF)


@triton.jit
def _rat_step_kernel(
    q_ptr, k_ptr, x_ptr, g_ptr, z_ptr, bias_ptr, stride_qb, stride_knb, stride_xb, stride_gb, stride_zb,
    rope_ptr, ck_ptr, cv_ptr, stride_kb, stride_kh, stride_kn, kr_ptr, vr_ptr, stride_rb, stride_rh,
    pos_ptr, arrivals_ptr, stat_ptr, acc_ptr, out_ptr, stride_ob, scale, H, G, L, num_splits, BH,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, MOVE_POS: tl.constexpr,
):  # fmt: skip
    """Grid (B*H,): one program per (sequence, head) does the step, attending over the summaries itself or
    (SPLIT) merging the partials of `_split_kernel`."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    p = tl.load(pos_ptr + b).to(tl.int32)
    c = p // L
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    run = b * stride_rb + h * stride_rh
    vr1, vr2, kr1, kr2, ks1, ks2, vs1, vs2, q1, q2, s_own, zg1, zg2 = _rat_own(
        b, h, p, q_ptr, k_ptr, x_ptr, g_ptr, z_ptr, bias_ptr, stride_qb, stride_knb, stride_xb, stride_gb,
        stride_zb, rope_ptr, kr_ptr, vr_ptr, run, scale, G, L, offs, mask, HALF, ROPE,
    )  # fmt: skip
    base = b * stride_kb + h * stride_kh
    keys, values = ck_ptr + base, cv_ptr + base
    if not SPLIT:  # every summary slot below c is visible: no slot to skip
        m, l, a1, a2 = _attend(
            q1, q2, keys, values, stride_kn, 0, c, -1, scale, offs, mask, HALF, BLOCK_H, BLOCK_N
        )
    else:
        m, l, a1, a2 = _merge_splits(stat_ptr, acc_ptr, bh, num_splits, offs, mask, HALF, BLOCK_H, BLOCK_S)
    _rat_finish(
        m, l, a1, a2, vr1, vr2, kr1, kr2, ks1, ks2, vs1, vs2, s_own, zg1, zg2, kr_ptr, vr_ptr, run, keys,
        values, stride_kn, out_ptr + b * stride_ob + h * (2 * HALF), c, (offs * 0 + p - c * L) == L - 1,
        offs, mask, HALF,
    )  # fmt: skip
    if MOVE_POS:  # noqa: SIM102 (a constexpr branch: Triton wants it apart)
        if tl.atomic_add(arrivals_ptr + BH + b, 1, sem="acq_rel", scope="gpu") == H - 1:
            tl.store(arrivals_ptr + BH + b, 0)
            tl.store(pos_ptr + b, (p + 1).to(pos_ptr.dtype.element_ty))


@triton.jit
def _rat_split_step_kernel(
    q_ptr, k_ptr, x_ptr, g_ptr, z_ptr, bias_ptr, stride_qb, stride_knb, stride_xb, stride_gb, stride_zb,
    rope_ptr, ck_ptr, cv_ptr, stride_kb, stride_kh, stride_kn, kr_ptr, vr_ptr, stride_rb, stride_rh,
    pos_ptr, arrivals_ptr, stat_ptr, acc_ptr, out_ptr, stride_ob, scale, H, G, L, C, SPLIT_LEN, num_splits,
    BH,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Grid (B*H, splits): split s of (b, h) attends over its share of the summaries; the last split of
    (b, h) to finish merges the splits and stores the step, and the last head of b to finish moves pos[b]
    on by one. Every split computes the token's own part first (a few loads that overlap the summaries'
    stream), so that the last one's tail is short.

    Arrivals are counted in arrivals_ptr (int32, zero between launches: the last arrival resets its
    counter): entry bh for the splits of (b, h), entry BH + b for the heads of b. Every program reads pos[b]
    before it arrives, so the last head's increment races with no read.
    """
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    b = bh // H
    h = bh % H
    p = tl.load(pos_ptr + b).to(tl.int32)
    c = p // L
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    run = b * stride_rb + h * stride_rh
    vr1, vr2, kr1, kr2, ks1, ks2, vs1, vs2, q1, q2, s_own, zg1, zg2 = _rat_own(
        b, h, p, q_ptr, k_ptr, x_ptr, g_ptr, z_ptr, bias_ptr, stride_qb, stride_knb, stride_xb, stride_gb,
        stride_zb, rope_ptr, kr_ptr, vr_ptr, run, scale, G, L, offs, mask, HALF, ROPE,
    )  # fmt: skip
    base = b * stride_kb + h * stride_kh
    keys, values = ck_ptr + base, cv_ptr + base
    _split_part(
        q1, q2, keys, values, stride_kn, s, SPLIT_LEN, tl.minimum(c, C), -1, scale,
        stat_ptr, acc_ptr, bh * num_splits + s, offs, mask, HALF, BLOCK_H, BLOCK_N,
    )  # fmt: skip
    tl.debug_barrier()  # every thread's partial stored before the arrival is released
    if tl.atomic_add(arrivals_ptr + bh, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        tl.store(arrivals_ptr + bh, 0)
        m, l, a1, a2 = _merge_splits(stat_ptr, acc_ptr, bh, num_splits, offs, mask, HALF, BLOCK_H, BLOCK_S)
        _rat_finish(
            m, l, a1, a2, vr1, vr2, kr1, kr2, ks1, ks2, vs1, vs2, s_own, zg1, zg2, kr_ptr, vr_ptr, run, keys,
            values, stride_kn, out_ptr + b * stride_ob + h * (2 * HALF), c, (offs * 0 + p - c * L) == L - 1,
            offs, mask, HALF,
        )  # fmt: skip
        if tl.atomic_add(arrivals_ptr + BH + b, 1, sem="acq_rel", scope="gpu") == H - 1:
            tl.store(arrivals_ptr + BH + b, 0)
            tl.store(pos_ptr + b, (p + 1).to(pos_ptr.dtype.element_ty))


def rat_decode_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    gate_bias: Tensor,
    z: Tensor,
    state: RATState,
    chunk_size: int,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
    config: dict | None = None,
) -> Tensor:
    """Launcher of the RAT decode kernels; same contract as `rat_decode_naive`."""
    B, H, d = v.shape
    G = q.shape[1]
    check_rows(q, k, v, g, z, state.k_run, state.v_run)
    scale = d**-0.5 if scale is None else scale
    keys, values = state.keys, state.values
    C = keys.shape[2]
    half = d // 2
    splits, split_len, block_n, num_warps = plan_splits(B * H, C, v.device, config)
    stats, acc = split_workspace(B * H, splits, d, v.device)
    rope = state.rope if position == "rope" else stats  # any pointer when unused
    out = torch.empty(B, H, d, dtype=v.dtype, device=v.device)
    meta = dict(HALF=half, BLOCK_H=triton.next_power_of_2(half), BLOCK_N=block_n, ROPE=position == "rope")
    strides = (keys.stride(0), keys.stride(1), keys.stride(2))
    args = (
        q, k, v, g, z, gate_bias, q.stride(0), k.stride(0), v.stride(0), g.stride(0), z.stride(0),
        rope, keys, values, *strides, state.k_run, state.v_run, state.k_run.stride(0), state.k_run.stride(1),
        state.pos,
    )  # fmt: skip
    if splits == 1 or not OVERRIDES.get("fuse", True):
        if splits > 1:
            _split_kernel[(B * H, splits)](
                q, q.stride(0), rope, keys, values, *strides, state.pos, stats, acc,
                scale, H, G, C, chunk_size, split_len, splits, **meta, num_warps=num_warps,
            )  # fmt: skip
        move = OVERRIDES.get("move_pos", True)
        _rat_step_kernel[(B * H,)](
            *args, state.arrivals, stats, acc, out, out.stride(0), scale, H, G, chunk_size, splits, B * H,
            **meta, **split_meta(splits), MOVE_POS=move, num_warps=num_warps,
        )  # fmt: skip
        advance(state, device=not move)
    else:
        _rat_split_step_kernel[(B * H, splits)](
            *args, state.arrivals, stats, acc, out, out.stride(0), scale, H, G, chunk_size, C, split_len,
            splits, B * H, **meta, BLOCK_S=int(os.environ.get("RATLM_BLOCK_S", 16)), num_warps=num_warps,

        )  # fmt: skip
        advance(state, device=False)  # the kernel moved pos
    return out
