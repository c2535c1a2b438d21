"""RAT on the GPU: Triton scan, attention over chunk summaries by an engine, merge with the own state.

Forward: one scan kernel writes the value and key states (keys rotated at the chunk index), the queries
rotated and tiled to heads as chunks-as-heads queries [B, C, H, L, d], and the chunk summaries; the engine
(cuDNN, or the PyTorch reference engine) attends over the summaries; a merge kernel folds in the own
state and overwrites the engine's output and log-sum-exp with the merged ones.
Without gradients (prefill) the scan writes each token's own score (scale q.k~, from the rounded query and
key that the merge would read) instead of the key states, and the merge reads it: the key states are never
written, and the merge reads neither them nor the queries. A cached prefill also takes the chunk summaries
(`summaries`): the scan's own [B, C, H, d] buffers are handed over, no second scan.
Backward: one kernel computes the own key's gradients and lays dy out as the engine's queries; the engine's
backward, given the merged output and log-sum-exp, returns exact summary-part gradients; the scan's
backward kernel adds everything up, runs the reverse recurrence and sums heads back to key groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from torch import Tensor

from ..packed import packed_layout, packed_views
from ..scan.kernel import unit_last_stride
from .merge import merge_fwd, own_bwd
from .scan_kernels import own_score_supported, rat_scan_bwd, rat_scan_fwd, rope_tables


class RatChunkHeadsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, gate_bias, z, L, rope, rope_base, scale, engine, summaries, grads):
        B, T, H, d = v.shape
        C = triton.cdiv(T, L)
        dev, dt = v.device, v.dtype
        cos, sin = rope_tables(C, d, rope_base, dev) if rope else (None, None)
        # without gradients (prefill) the scan writes each token's own score instead of its key state
        own_scores = not grads and C > 1 and own_score_supported(L, C, d)
        qo = torch.empty(B, C, H, L, d, device=dev, dtype=dt)
        vs = torch.empty(B, T, H, d, device=dev, dtype=dt)
        ks = None if own_scores else torch.empty(B, T, H, d, device=dev, dtype=dt)
        own = torch.empty(B, T, H, device=dev, dtype=torch.float32) if own_scores else None
        vsum, ksum = (torch.empty(B, C, H, d, device=dev, dtype=dt) for _ in range(2))
        states = (vs, ks, "bthd", vsum, ksum, "bchd")
        rat_scan_fwd(q, k, v, g, L, rope, cos, sin, qo, "bchld", *states, gate_bias, own=own, scale=scale)
        y = torch.empty(B, T, H, d, device=dev, dtype=dt)
        o = lse = state = qp = kp = vp = None
        if C > 1:
            qp = qo.view(B, C, H * L, d)[:, 1:].transpose(1, 2)  # [B, H*L, C-1, d]
            kp = ksum[:, : C - 1].transpose(1, 2)  # [B, H, C-1, d]
            vp = vsum[:, : C - 1].transpose(1, 2)
            o, lse, state = engine.forward(qp, kp, vp, scale)
        unit = getattr(engine, "unit", 1.0)
        heads = (o, "heads", lse, "heads", unit)
        merge_fwd(qo, "bchld", vs, ks, "bthd", *heads, y, L, scale, z, own=own, keep=grads)
        if summaries is not None:  # last: an engine that fails above leaves the caller's cache untouched
            summaries(vsum, ksum)
        if not grads:  # nothing to keep for a backward that cannot come
            return y
        ctx.save_for_backward(k, v, g, gate_bias, z, qo, vs, ks, vsum, ksum, o, lse)
        ctx.args = (L, rope, rope_base, scale, engine, state, q.dtype)
        # q, k, v, g and z as slices of one projection's output: the gradients go into one such tensor
        wants = z is not None and any(ctx.needs_input_grad[:6])
        ctx.packed = packed_layout(q, k, v, g, z) if wants else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # Triton kernels: a second derivative raises
    def backward(ctx, dy):
        k, v, g, gate_bias, z, qo, vs, ks, vsum, ksum, o, lse = ctx.saved_tensors
        L, rope, rope_base, scale, engine, state, q_dtype = ctx.args
        B, T, H, d = v.shape
        C = triton.cdiv(T, L)
        cos, sin = rope_tables(C, d, rope_base, v.device) if rope else (None, None)
        dy = unit_last_stride(dy)
        unit = getattr(engine, "unit", 1.0)
        outs = dz = None
        if ctx.packed is not None:
            dq, dk, dv, dg, dz = packed_views(ctx.packed, v.device)
            outs = (dq, dk, dv, dg)
        dop = None
        if C > 1:  # padding rows of a partial last chunk must hold zeros, not garbage, for the engine
            alloc = torch.zeros if T % L else torch.empty
            dop = alloc(B, C, H, L, d, device=v.device, dtype=v.dtype)
        dqa, dvs, dks, _, dz = own_bwd(
            qo, "bchld", vs, ks, "bthd", o, "heads", lse, "heads", unit, dy, L, scale, dop, z=z, dz=dz
        )
        dqb = dkp = dvp = None
        if C > 1:
            qp = qo.view(B, C, H * L, d)[:, 1:].transpose(1, 2)
            kp = ksum[:, : C - 1].transpose(1, 2)
            vp = vsum[:, : C - 1].transpose(1, 2)
            dopp = dop.view(B, C, H * L, d)[:, 1:].transpose(1, 2)
            dqb, dkp, dvp = engine.backward(dopp, qp, kp, vp, o, lse, state, scale)
        dq, dk, dv, dg, dbias = rat_scan_bwd(
            k, v, g, L, rope, cos, sin, dqa, "bthd", dqb, "heads", dvs, dks, "bthd",
            dvp, dkp, "bhcd", C - 1, q_dtype, gate_bias, outs,
        )  # fmt: skip
        return dq, dk, dv, dg, dbias, dz, None, None, None, None, None, None, None


def rat_mix_chunk_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    chunk_size: int,
    rope: bool,
    rope_base: float,
    scale: float,
    engine,
    gate_bias: Tensor | None = None,
    z: Tensor | None = None,
    summaries: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """RAT's core with the chunks-as-heads engine given (inputs validated by the caller). [B, T, H, d].
    With gate_bias, g holds the forget gates' logits; with z the result is gated by sigmoid(z) in the merge
    kernel (see `rat_mix`). summaries(vsum, ksum), when given, is called once, after everything else has
    run, with the scan's summary buffers, [B, C, H, d] in v's dtype, valid only during the call: rows
    0 .. C-2 hold the summaries of those chunks (keys rotated at their chunk index in fp32, then rounded);
    the last chunk's row is not written."""
    leaves = (q, k, v, g, gate_bias, z)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    return RatChunkHeadsFunction.apply(*leaves, chunk_size, rope, rope_base, scale, engine, summaries, grads)


def scan_summaries(
    k: Tensor, v: Tensor, g: Tensor, chunk_size: int, rope: bool, rope_base: float, gate_bias=None
) -> tuple[Tensor, Tensor]:
    """(vsum, ksum) [B, C, H, d] as `rat_mix_chunk_heads` hands them to `summaries`, by a scan of their
    own: for the engines whose kernels keep the summaries to themselves."""
    B, T, H, d = v.shape
    C = triton.cdiv(T, chunk_size)
    cos, sin = rope_tables(C, d, rope_base, v.device) if rope else (None, None)
    vs, ks = (torch.empty(B, T, H, d, device=v.device, dtype=v.dtype) for _ in range(2))  # not kept
    vsum, ksum = (torch.empty(B, C, H, d, device=v.device, dtype=v.dtype) for _ in range(2))
    rat_scan_fwd(k, k, v, g, chunk_size, rope, cos, sin, None, "bthd", vs, ks, "bthd", vsum, ksum, "bchd",
                 gate_bias)  # fmt: skip
    return vsum, ksum
