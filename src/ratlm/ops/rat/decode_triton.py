"""RAT's one-token step in Triton: recurrence, RoPE, attention over chunk summaries and output gate fused.

Kernel -> launcher `rat_decode_triton` (same contract as `rat_decode_naive`). Per (sequence, head) the step
kernel reads the gate, value, key and z of the new token straight from the input projection, advances the
running states, rotates query and running key by the chunk index, merges the attention over the earlier
chunks' summaries with the token's own state, writes sigmoid(z) * y, and stores the chunk's summary when the
token completes it. With few (sequence, head) pairs the summaries are first split across programs by the
shared flash-decoding `_split_kernel`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...cache import RATState, advance
from .. import pdl
from ..attention.decode_triton import (
    _attend,
    _halves,
    _merge_splits,
    _query,
    _rotate,
    _split_kernel,
    _store_halves,
    _with_own,
    check_rows,
    plan_splits,
    split_meta,
    split_workspace,
)
from ..pdl import wait_for_previous


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _rat_step_kernel(
    q_ptr, k_ptr, x_ptr, g_ptr, z_ptr, bias_ptr, stride_qb, stride_knb, stride_xb, stride_gb, stride_zb,
    rope_ptr, ck_ptr, cv_ptr, stride_kb, stride_kh, stride_kn, kr_ptr, vr_ptr, stride_rb, stride_rh,
    pos_ptr, stat_ptr, acc_ptr, out_ptr, stride_ob,
    scale, H, G, L, num_splits,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if not SPLIT:
        wait_for_previous(PDL)  # the token's inputs come from the kernel before (the input projection)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    p = tl.load(pos_ptr + b).to(tl.int32)
    c = p // L
    j = p - c * L
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    col = h * (2 * HALF)  # head h in the [H * d] rows of x, g, z and the gate bias
    gcol = (h % G) * (2 * HALF)  # its query/key group

    # the recurrence, in fp32, restarted at chunk starts: s = g * s + (1 - g) * input
    g1, g2 = _halves(g_ptr + b * stride_gb + col, offs, mask, HALF)
    bias1, bias2 = _halves(bias_ptr + col, offs, mask, HALF)
    g1 = _sigmoid(g1 + bias1)
    g2 = _sigmoid(g2 + bias2)
    x1, x2 = _halves(x_ptr + b * stride_xb + col, offs, mask, HALF)
    kn1, kn2 = _halves(k_ptr + b * stride_knb + gcol, offs, mask, HALF)
    run = b * stride_rb + h * stride_rh
    keep = (offs * 0 + j) > 0  # as a vector: masks must be boolean tensors of the block's shape
    vr1, vr2 = _halves(vr_ptr + run, offs, mask & keep, HALF)
    kr1, kr2 = _halves(kr_ptr + run, offs, mask & keep, HALF)
    vr1 = g1 * vr1 + (1 - g1) * x1
    vr2 = g2 * vr2 + (1 - g2) * x2
    kr1 = g1 * kr1 + (1 - g1) * kn1
    kr2 = g2 * kr2 + (1 - g2) * kn2
    _store_halves(vr_ptr + run, vr1, vr2, offs, mask, HALF)
    _store_halves(kr_ptr + run, kr1, kr2, offs, mask, HALF)

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

    base = b * stride_kb + h * stride_kh
    keys, values = ck_ptr + base, cv_ptr + base
    if not SPLIT:  # every summary slot below c is visible: no slot to skip
        m, l, a1, a2 = _attend(
            q1, q2, keys, values, stride_kn, 0, c, -1, scale, offs, mask, HALF, BLOCK_H, BLOCK_N
        )
        z1, z2 = _halves(z_ptr + b * stride_zb + col, offs, mask, HALF)
    else:
        # with PDL, all of the above overlapped the split kernel: its query came from the input projection,
        # which that kernel waited for, and the running states it stored are no business of that kernel's
        z1, z2 = _halves(z_ptr + b * stride_zb + col, offs, mask, HALF)
        wait_for_previous(PDL)  # the splits' partials
        m, l, a1, a2 = _merge_splits(stat_ptr, acc_ptr, bh, num_splits, offs, mask, HALF, BLOCK_S)
    y1, y2 = _with_own(m, l, a1, a2, s_own, vs1, vs2)
    _store_halves(out_ptr + b * stride_ob + col, y1 * _sigmoid(z1), y2 * _sigmoid(z2), offs, mask, HALF)

    # a token that completes its chunk leaves the chunk's summary in slot c (read by no one in this launch)
    closes = mask & ((offs * 0 + j) == L - 1)
    _store_halves(keys + c * stride_kn, ks1, ks2, offs, closes, HALF)
    _store_halves(values + c * stride_kn, vs1, vs2, offs, closes, HALF)


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
    launch = dict(num_warps=num_warps, **pdl.kernel_options(v))
    if splits > 1:
        _split_kernel[(B * H, splits)](
            q, q.stride(0), rope, keys, values, *strides, state.pos, stats, acc,
            scale, H, G, C, chunk_size, split_len, splits, **meta, **launch,
        )  # fmt: skip
    _rat_step_kernel[(B * H,)](
        q, k, v, g, z, gate_bias, q.stride(0), k.stride(0), v.stride(0), g.stride(0), z.stride(0),
        rope, keys, values, *strides, state.k_run, state.v_run, state.k_run.stride(0), state.k_run.stride(1),
        state.pos, stats, acc, out, out.stride(0),
        scale, H, G, chunk_size, splits, **meta, **split_meta(splits), **launch,
    )  # fmt: skip
    advance(state)
    return out
