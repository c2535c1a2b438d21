"""RAT with FlexAttention: the Triton scan, then one FlexAttention call whose keys are the summaries and
the tokens' own states side by side.

Keys and values are [B, H, Cp + T, d]: the chunk summaries padded to Cp (a multiple of the 128-wide mask
block, padding zeroed), then every token's running state. Query t sees summary j < t // L and key Cp + t,
so one softmax covers both and FlexAttention's own backward gives every gradient. The scan kernel writes
straight into those buffers, and its backward reads the gradients straight out of them.

The block mask is built from its block structure (no [T, T] mask is ever evaluated) and cached per shape.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..attention.flex import BLOCK, block_mask_from_dense_blocks, flex_attention_fn
from .scan_kernels import rat_scan_bwd, rat_scan_fwd, rope_tables

_MASKS: dict[tuple, object] = {}


def _own_and_summaries(L: int, Cp: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < q_idx // L) | (kv_idx == q_idx + Cp)

    return mask_mod


def rat_block_mask(T: int, L: int, device):
    """Block mask of queries [T] against [Cp summaries ; T own states]; cached."""
    Cp = triton.cdiv(triton.cdiv(T, L), BLOCK) * BLOCK
    key = (T, L, str(device))
    if key not in _MASKS:
        if len(_MASKS) > 16:
            _MASKS.clear()
        nq, ns, nk = triton.cdiv(T, BLOCK), Cp // BLOCK, Cp // BLOCK + triton.cdiv(T, BLOCK)
        r0 = torch.arange(nq, device=device) * BLOCK
        r1 = torch.clamp(r0 + BLOCK - 1, max=T - 1)
        c_lo, c_hi = (r0 // L)[:, None], (r1 // L)[:, None]
        j0 = (torch.arange(ns, device=device) * BLOCK)[None, :]
        full = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        part = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        full[:, :ns] = j0 + BLOCK - 1 < c_lo  # every row sees every summary of the block
        part[:, :ns] = (j0 < c_hi) & ~full[:, :ns]
        part[:, ns:] = torch.eye(nq, triton.cdiv(T, BLOCK), dtype=torch.bool, device=device)
        _MASKS[key] = block_mask_from_dense_blocks(part, full, _own_and_summaries(L, Cp), T, Cp + T, BLOCK)
    return _MASKS[key], Cp


class RatScanExtFunction(torch.autograd.Function):
    """Scan into FlexAttention's buffers: queries [B, H, T, d], keys and values [B, H, Cp + T, d]."""

    @staticmethod
    def forward(ctx, q, k, v, g, gate_bias, L, rope, rope_base, Cp):
        B, T, H, d = v.shape
        C = triton.cdiv(T, L)
        cos, sin = rope_tables(C, d, rope_base, v.device) if rope else (None, None)
        qt = torch.empty(B, H, T, d, device=v.device, dtype=v.dtype)
        kx, vx = (torch.empty(B, H, Cp + T, d, device=v.device, dtype=v.dtype) for _ in range(2))
        for x in (kx, vx):  # summary slots no query reads must still be finite (0 * NaN is NaN)
            x[:, :, max(C - 1, 0) : Cp].zero_()
        rat_scan_fwd(
            q, k, v, g, L, rope, cos, sin, qt, "bhtd",
            vx[:, :, Cp:], kx[:, :, Cp:], "bhtd", vx[:, :, :Cp], kx[:, :, :Cp], "bhcd", gate_bias,
        )  # fmt: skip
        ctx.save_for_backward(k, v, g, gate_bias)
        ctx.args = (L, rope, rope_base, Cp, q.dtype)
        return qt, kx, vx

    @staticmethod
    @torch.autograd.function.once_differentiable  # Triton kernels: a second derivative raises
    def backward(ctx, dqt, dkx, dvx):
        k, v, g, gate_bias = ctx.saved_tensors
        L, rope, rope_base, Cp, q_dtype = ctx.args
        T = v.shape[1]
        C = triton.cdiv(T, L)
        cos, sin = rope_tables(C, v.shape[3], rope_base, v.device) if rope else (None, None)
        shape = (v.shape[0], v.shape[2], Cp + T, v.shape[3])
        dqt = dqt if dqt is not None else v.new_zeros(v.shape[0], v.shape[2], T, v.shape[3])
        dkx = dkx if dkx is not None else v.new_zeros(shape)
        dvx = dvx if dvx is not None else v.new_zeros(shape)
        if dkx.stride() != dvx.stride():
            dkx, dvx = dkx.contiguous(), dvx.contiguous()
        dq, dk, dv, dg, dbias = rat_scan_bwd(
            k, v, g, L, rope, cos, sin, dqt, "bhtd", None, "heads", dvx[:, :, Cp:], dkx[:, :, Cp:], "bhtd",
            dvx[:, :, :Cp], dkx[:, :, :Cp], "bhcd", C - 1, q_dtype, gate_bias,
        )  # fmt: skip
        return dq, dk, dv, dg, dbias, None, None, None, None


def rat_mix_flex(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk_size: int, rope: bool, rope_base: float, scale: float,
    gate_bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """RAT's core with FlexAttention (inputs validated by the caller). Returns [B, T, H, d] (a view).
    With gate_bias, g holds the forget gates' logits (see `rat_mix`)."""
    T = v.shape[1]
    mask, Cp = rat_block_mask(T, chunk_size, v.device)
    qt, kx, vx = RatScanExtFunction.apply(q, k, v, g, gate_bias, chunk_size, rope, rope_base, Cp)
    y = flex_attention_fn(qt.is_cuda)(qt, kx, vx, block_mask=mask, scale=scale)
    return y.transpose(1, 2)
