"""RAT continued from an inference state: any number of new tokens, from any position."""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache import RATState, move_to
from ..backend import fallback, fast_path_wanted
from ..rope import apply_rope, rope_cos_sin
from .gates import forget_gate, output_gate
from .masked import chunk_attention_masked, scan_states


def rat_mix_cached(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    state: RATState,
    chunk_size: int,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
    *,
    gate_bias: Tensor | None = None,
    out_gate: Tensor | None = None,
) -> Tensor:
    """Like `rat_mix` on the tokens that follow those already in `state`, which is updated in place.

    The scan starts from the running state of the current chunk; chunks completed by the new tokens
    write their summaries (keys after RoPE at their chunk index, values) into their cache slots, and
    every query attends to the summaries of all its earlier chunks plus its own running state.
    A prefill into an empty state on CUDA takes its outputs from `rat_mix`, whose fast kernels need no cache,
    and fills the cache with `fill_cache_by_scan`.
    """
    from . import rat_mix, rat_mix_check  # the package's dispatcher, which imports this module

    rat_mix_check(q, k, v, g, chunk_size, position, gate_bias, out_gate)
    B, T, H, d = v.shape
    L, n0 = chunk_size, state.seen
    scale = d**-0.5 if scale is None else scale
    if n0 == 0 and fast_path_wanted(q, k, v, g):
        from .gpu import unsupported_reason

        reason = unsupported_reason(q, k, v, g, L, gate_bias, out_gate)
        if reason is None:
            # a fresh prefill: the outputs from the full-sequence op, the cache from the scan kernel
            fill_cache_by_scan(k, v, g, state, L, position, rope_base, gate_bias=gate_bias)
            return rat_mix(q, k, v, g, L, position, rope_base, scale, gate_bias=gate_bias, out_gate=out_gate)
        fallback("rat_mix_cached", reason, costly=True)
    gate = forget_gate(g, gate_bias)
    vs, ks = scan_states(v, k, gate, L, offset=n0, initial=(state.v_run, state.k_run))  # [B, T, H, d] fp32
    state.v_run.copy_(vs[:, -1])
    state.k_run.copy_(ks[:, -1])
    move_to(state, n0 + T)
    chunk_ids = (n0 + torch.arange(T, device=v.device)) // L
    first_end = (L - 1 - n0) % L  # the first new token that closes a chunk
    ends = torch.arange(min(first_end, T), T, L, device=v.device)
    vs = vs.to(v.dtype).transpose(1, 2)  # [B, H, T, d]
    ks = ks.to(v.dtype).transpose(1, 2)
    q = q.repeat(1, 1, H // q.shape[2], 1).transpose(1, 2)
    if position == "rope":
        cos, sin = rope_cos_sin(chunk_ids, d, rope_base)
        q, ks = apply_rope(q, cos, sin), apply_rope(ks, cos, sin)
    _store_summaries(state, ks[:, :, ends], vs[:, :, ends], chunk_ids[ends], "nope", rope_base)
    c_last = (n0 + T - 1) // L
    k_sum = state.keys[:, :, :c_last].to(q.dtype)
    v_sum = state.values[:, :, :c_last].to(vs.dtype)
    y = chunk_attention_masked(q, ks, vs, k_sum, v_sum, chunk_ids, scale).transpose(1, 2)
    return output_gate(y, out_gate)


@torch.compiler.disable  # kernel launches writing into the cache: host logic, as rat_mix_gpu_or_none
def fill_cache_by_scan(
    k: Tensor,
    v: Tensor,
    g: Tensor,
    state: RATState,
    chunk_size: int,
    position: str = "rope",
    rope_base: float = 10000.0,
    *,
    gate_bias: Tensor | None = None,
) -> None:
    """Fill an empty `state` with the T tokens of k [B, T, G, d], v and g [B, T, H, d] (the gate, or its
    logits with gate_bias): what `rat_mix_cached` leaves in it, without its fp32 scan of the whole prompt.

    The Triton scan kernel (as `rat_mix` runs it) writes the summaries of chunks 0 .. C-2 straight into
    the cache slots; the last chunk, complete or not, is scanned in fp32 by PyTorch (at most L tokens) for
    the running states and, when complete, its summary.
    """
    from ..scan.kernel import unit_last_stride
    from .scan_kernels import rat_scan_fwd, rope_tables

    k, v, g = (unit_last_stride(t) for t in (k, v, g))  # the kernels need a unit stride along the head vector
    bias = None if gate_bias is None else gate_bias.reshape(-1).contiguous()
    B, T, H, d = v.shape
    L = chunk_size
    C = -(-T // L)
    rope = position == "rope"
    slots = state.keys.shape[2]
    if state.seen != 0 or slots < T // L:  # the kernel writes by strides: a short cache would be overrun
        raise ValueError(
            f"fill_cache_by_scan needs an empty state with room for {T // L} chunk summaries; it has seen "
            f"{state.seen} tokens and holds {slots} slots"
        )
    if state.keys.shape != state.values.shape or state.keys.stride(-1) != 1 or state.values.stride(-1) != 1:
        raise ValueError("the state's keys and values must be [B, H, C, d] with a unit stride along d")
    if C > 1:
        cos, sin = rope_tables(C, d, rope_base, v.device) if rope else (None, None)
        vs, ks = (torch.empty(B, T, H, d, device=v.device, dtype=v.dtype) for _ in range(2))  # not kept
        summaries = (state.values[:, :, :C], state.keys[:, :, :C], "bhcd")  # views of the cache slots
        rat_scan_fwd(k, k, v, g, L, rope, cos, sin, None, "bthd", vs, ks, "bthd", *summaries, bias)
    t0 = (C - 1) * L
    tail = slice(t0, T)
    vs, ks = scan_states(v[:, tail], k[:, tail], forget_gate(g[:, tail], gate_bias), L, offset=t0)
    state.v_run.copy_(vs[:, -1])
    state.k_run.copy_(ks[:, -1])
    if T - t0 == L:  # the last chunk is complete: its summary too
        last = torch.arange(C - 1, C, device=v.device)  # (built on the device: no host copy, no sync)
        k_end, v_end = (s[:, -1:].to(v.dtype).transpose(1, 2) for s in (ks, vs))
        _store_summaries(state, k_end, v_end, last, position, rope_base)
    move_to(state, T)


def _store_summaries(
    state: RATState, ks: Tensor, vs: Tensor, chunks: Tensor, position: str, rope_base: float
):
    """Write the states at chunk ends ([B, H, n, d]) as the summaries of `chunks`, keys rotated if asked."""
    if chunks.numel() == 0:
        return
    if position == "rope":
        cos, sin = rope_cos_sin(chunks, ks.shape[-1], rope_base)
        ks = apply_rope(ks, cos, sin)
    state.keys[:, :, chunks] = ks.to(state.keys.dtype)
    state.values[:, :, chunks] = vs.to(state.values.dtype)
