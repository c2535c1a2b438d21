"""Flash-decoding over a static cache: one query per (sequence, head), positions read on the device.

Kernels -> launcher `attention_decode_triton` (same contract as `attention_decode_naive`). The RAT step in
`ops/rat/decode_triton.py` reuses the split kernel and the helpers here.

A query at slot position n (token position for attention, chunk index for RAT) sees cache slots i < n with
i != n % N (N slots): a growing cache shows slots 0..n-1, a full ring buffer all but the slot its new entry
overwrites. With few (sequence, head) pairs the slots are split across programs (`_split_kernel` writes a
partial max, sum and weighted value per split); the step kernel merges them with the query's own key/value,
writes the output and stores the new entry. With many pairs one launch does it all (SPLIT false).
Vectors are handled as two halves because RoPE rotates half against half.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...cache import KVState, WindowState, advance
from .. import pdl
from ..pdl import wait_for_previous


@triton.jit
def _halves(ptr, offs, mask, HALF: tl.constexpr):
    a = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_halves(ptr, a, b, offs, mask, HALF: tl.constexpr):
    tl.store(ptr + offs, a.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF + offs, b.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x1, x2, rope_row, offs, mask, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """RoPE of (x1, x2) by one table row (cos | sin halves), rounded to DTYPE as `apply_rope` returns it."""
    cos = tl.load(rope_row + offs, mask=mask, other=0.0)
    sin = tl.load(rope_row + HALF + offs, mask=mask, other=0.0)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return y1.to(DTYPE).to(tl.float32), y2.to(DTYPE).to(tl.float32)


@triton.jit
def _query(q_ptr, rope_row, offs, mask, HALF: tl.constexpr, ROPE: tl.constexpr):
    q1, q2 = _halves(q_ptr, offs, mask, HALF)
    if ROPE:
        q1, q2 = _rotate(q1, q2, rope_row, offs, mask, HALF, q_ptr.dtype.element_ty)
    return q1, q2


@triton.jit
def _attend(
    q1, q2, k_ptr, v_ptr, stride_n, lo, hi, skip, scale, offs, mask,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over slots lo..hi-1 except `skip`: max, sum, and the halves of the weighted values.

    The sum and values are relative to the returned max (all zero while it is -inf: no visible slot).
    """
    m = -float("inf")
    l = 0.0
    acc1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        idx = start + rows
        valid = (idx < hi) & (idx != skip)
        ptrs = idx[:, None] * stride_n + offs[None, :]
        tile_mask = valid[:, None] & mask[None, :]
        k1 = tl.load(k_ptr + ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + HALF + ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        s = (tl.sum(k1 * q1[None, :], axis=1) + tl.sum(k2 * q2[None, :], axis=1)) * scale
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # keeps exp() away from -inf - -inf
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref)
        v1 = tl.load(v_ptr + ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        v2 = tl.load(v_ptr + HALF + ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1, axis=0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * v2, axis=0)
        m = m_new
    return m, l, acc1, acc2


@triton.jit
def _merge_splits(
    stat_ptr, acc_ptr, bh, num_splits, offs, mask,
    HALF: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """The splits' partial softmaxes of one (sequence, head) as one (max, sum, value halves)."""
    sp = tl.arange(0, BLOCK_S)
    smask = sp < num_splits
    row = bh * num_splits + sp
    ms = tl.load(stat_ptr + row * 2, mask=smask, other=-float("inf"))
    ls = tl.load(stat_ptr + row * 2 + 1, mask=smask, other=0.0)
    m = tl.max(ms, axis=0)
    w = tl.exp(ms - tl.where(m == -float("inf"), 0.0, m))
    l = tl.sum(ls * w, axis=0)
    ptrs = row[:, None] * (2 * HALF) + offs[None, :]
    tile_mask = smask[:, None] & mask[None, :]
    a1 = tl.sum(tl.load(acc_ptr + ptrs, mask=tile_mask, other=0.0) * w[:, None], axis=0)
    a2 = tl.sum(tl.load(acc_ptr + HALF + ptrs, mask=tile_mask, other=0.0) * w[:, None], axis=0)
    return m, l, a1, a2


@triton.jit
def _with_own(m, l, a1, a2, s_own, v1, v2):
    """Add the query's own key/value (score s_own) to a partial softmax and normalise."""
    m_all = tl.maximum(m, s_own)
    w_cache = tl.exp(m - m_all)
    w_own = tl.exp(s_own - m_all)
    denom = l * w_cache + w_own
    return (a1 * w_cache + v1 * w_own) / denom, (a2 * w_cache + v2 * w_own) / denom


@triton.jit
def _split_kernel(
    q_ptr, stride_qb, rope_ptr, k_ptr, v_ptr, stride_kb, stride_kh, stride_kn, pos_ptr, stat_ptr, acc_ptr,
    scale, H, QH, N, DIV, SPLIT_LEN, num_splits,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (B*H, num_splits): split s of (b, h) attends over slots s*SPLIT_LEN .. (s+1)*SPLIT_LEN - 1."""
    wait_for_previous(PDL)  # the query comes from the kernel before
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = (tl.load(pos_ptr + b) // DIV).to(tl.int32)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    q1, q2 = _query(
        q_ptr + b * stride_qb + (h % QH) * (2 * HALF), rope_ptr + n * (2 * HALF), offs, mask, HALF, ROPE
    )
    lo = s * SPLIT_LEN
    hi = tl.minimum(tl.minimum(lo + SPLIT_LEN, n), N)
    base = b * stride_kb + h * stride_kh
    keys, values = k_ptr + base, v_ptr + base
    m, l, a1, a2 = _attend(
        q1, q2, keys, values, stride_kn, lo, hi, n % N, scale, offs, mask, HALF, BLOCK_H, BLOCK_N
    )
    out = bh * num_splits + s
    tl.store(stat_ptr + out * 2, m)
    tl.store(stat_ptr + out * 2 + 1, l)
    tl.store(acc_ptr + out * (2 * HALF) + offs, a1, mask=mask)
    tl.store(acc_ptr + out * (2 * HALF) + HALF + offs, a2, mask=mask)


@triton.jit
def _attention_step_kernel(
    q_ptr, k_ptr, v_ptr, stride_qb, stride_knb, stride_vnb, rope_ptr,
    ck_ptr, cv_ptr, stride_kb, stride_kh, stride_kn, pos_ptr, stat_ptr, acc_ptr, out_ptr, stride_ob,
    scale, H, N, num_splits,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Grid (B*H,): merge the cache (or the splits) with the new key/value, write y, store the new entry."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    p = tl.load(pos_ptr + b).to(tl.int32)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    col = h * (2 * HALF)
    rope_row = rope_ptr + p * (2 * HALF)
    q1, q2 = _query(q_ptr + b * stride_qb + col, rope_row, offs, mask, HALF, ROPE)
    k1, k2 = _query(k_ptr + b * stride_knb + col, rope_row, offs, mask, HALF, ROPE)
    v1, v2 = _halves(v_ptr + b * stride_vnb + col, offs, mask, HALF)
    s_own = (tl.sum(q1 * k1, axis=0) + tl.sum(q2 * k2, axis=0)) * scale
    slot = p % N
    base = b * stride_kb + h * stride_kh
    keys, values = ck_ptr + base, cv_ptr + base
    if not SPLIT:
        hi = tl.minimum(p, N)
        m, l, a1, a2 = _attend(
            q1, q2, keys, values, stride_kn, 0, hi, slot, scale, offs, mask, HALF, BLOCK_H, BLOCK_N
        )
    else:
        m, l, a1, a2 = _merge_splits(stat_ptr, acc_ptr, bh, num_splits, offs, mask, HALF, BLOCK_S)
    y1, y2 = _with_own(m, l, a1, a2, s_own, v1, v2)
    _store_halves(out_ptr + b * stride_ob + col, y1, y2, offs, mask, HALF)
    # the slot read above was masked out, so overwriting it here cannot race with this program's reads
    _store_halves(keys + slot * stride_kn, k1, k2, offs, mask, HALF)
    _store_halves(values + slot * stride_kn, v1, v2, offs, mask, HALF)


# Process-wide overrides of `plan_splits` ("block_n", "num_warps", "splits"); only benchmarks set them.
OVERRIDES: dict = {}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(
    bh: int,
    num_slots: int,
    device: torch.device,
    config: dict | None = None,
    block_n: int = 32,
    programs_per_sm: int = 8,
):
    """(splits, slots per split, BLOCK_N, num_warps) for B*H = bh queries over `num_slots` cache slots.

    Enough programs to fill the card: one per (sequence, head) when there are many, otherwise split the slots
    (at least two tiles per split) until about `programs_per_sm` programs per multiprocessor. Measured on the
    H200 (benchmarks/decode_ab.py --sweep, one layer's step):
    - without a split, tiles of 16 slots on one warp. T=4096, batch 512: sliding window (W 1024) 1003
      against 1350 us with (16, 2), attention 3948 against 5234, RAT 325 against 350
      (bench_decode-sweep-swa-attn-h200-2026-11-29.jsonl).
    - split, tiles of `block_n` slots on two warps, about 8 programs per multiprocessor. Attention at
      T=131072, batch 1: 66 splits of (32, 2) 274 us, against 511 with 33 splits of (16, 2), and 285 to
      515 us for 11 other plans (bench_decode-sweep-attn-long-h200-2026-11-29.jsonl). RAT there: 42.4 us
      against 44.3 with tiles of 64 (bench_decode-final-h200-2026-11-29.jsonl; 42.4 against 44.4 in
      bench_decode-gemv-h200-2026-11-29.jsonl).
    `config` overrides any of "splits", "block_n", "num_warps" (benchmarks use it to compare settings).
    """
    config = {**OVERRIDES, **(config or {})}
    block_n = config.get("block_n") or block_n
    num_warps = config.get("num_warps") or 2
    splits = config.get("splits")
    if splits is None:
        sms = _sm_count(device)
        want = 1 if bh >= 2 * sms else triton.cdiv(programs_per_sm * sms, bh)
        splits = max(1, min(want, triton.cdiv(num_slots, 2 * block_n)))
    if splits == 1 and "block_n" not in config and "num_warps" not in config:
        block_n, num_warps = 16, 1  # one program per (sequence, head): see above
    split_len = triton.cdiv(triton.cdiv(num_slots, splits), block_n) * block_n
    return triton.cdiv(num_slots, split_len), split_len, block_n, num_warps


def split_workspace(bh: int, splits: int, d: int, device) -> tuple[Tensor, Tensor]:
    stats = torch.empty(bh * splits, 2, dtype=torch.float32, device=device)
    acc = torch.empty(bh * splits, d, dtype=torch.float32, device=device)
    return stats, acc


def split_meta(splits: int) -> dict:
    """The step kernel's split arguments; few distinct BLOCK_S values keep Triton's compilations few."""
    return dict(SPLIT=splits > 1, BLOCK_S=max(16, triton.next_power_of_2(splits)) if splits > 1 else 16)


def check_rows(*tensors: Tensor) -> None:
    """The kernels index a head's vector as row b, column head * d + i: contiguous within the row."""
    for t in tensors:
        if t.stride(-1) != 1 or (t.dim() == 3 and t.stride(1) != t.shape[2]):
            raise ValueError(
                f"decode kernels need [B, heads, d] with contiguous rows, got strides {t.stride()}"
            )


def attention_decode_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: KVState | WindowState,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
    config: dict | None = None,
) -> Tensor:
    """Launcher of the attention decode kernels; same contract as `attention_decode_naive`."""
    B, H, d = v.shape
    check_rows(q, k, v)
    scale = d**-0.5 if scale is None else scale
    keys, values = state.keys, state.values
    N = keys.shape[2]
    half = d // 2
    splits, split_len, block_n, num_warps = plan_splits(B * H, N, v.device, config)
    stats, acc = split_workspace(B * H, splits, d, v.device)
    rope = state.rope if position == "rope" else stats  # any pointer when unused
    out = torch.empty(B, H, d, dtype=v.dtype, device=v.device)
    meta = dict(HALF=half, BLOCK_H=triton.next_power_of_2(half), BLOCK_N=block_n, ROPE=position == "rope")
    strides = (keys.stride(0), keys.stride(1), keys.stride(2))
    if splits > 1:
        _split_kernel[(B * H, splits)](
            q, q.stride(0), rope, keys, values, *strides, state.pos, stats, acc,
            scale, H, H, N, 1, split_len, splits, **meta, num_warps=num_warps, **pdl.kernel_options(v),
        )  # fmt: skip
    _attention_step_kernel[(B * H,)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), rope,
        keys, values, *strides, state.pos, stats, acc, out, out.stride(0),
        scale, H, N, splits, **meta, **split_meta(splits), num_warps=num_warps,
    )  # fmt: skip
    advance(state)
    return out
