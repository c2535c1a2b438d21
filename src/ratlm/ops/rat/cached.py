"""RAT continued from an inference state: any number of new tokens, from any position."""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache import RATState, move_to
from ..backend import fast_path_wanted
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
    A prefill into an empty state on CUDA takes the GPU path (`prefill_fresh`).
    """
    from . import rat_mix_check  # the package's checks (the package imports this module)

    rat_mix_check(q, k, v, g, chunk_size, position, gate_bias, out_gate)
    B, T, H, d = v.shape
    L, n0 = chunk_size, state.seen
    scale = d**-0.5 if scale is None else scale
    if n0 == 0 and fast_path_wanted(q, k, v, g):
        gates = dict(gate_bias=gate_bias, out_gate=out_gate)
        y = prefill_fresh(q, k, v, g, state, L, position, rope_base, scale, **gates)
        if y is not None:
            return y
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
def prefill_fresh(
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
    engine: str | None = None,
) -> Tensor | None:
    """`rat_mix_cached` into an empty state through the GPU kernels. None where they cannot run (the reason
    is logged) and the state is left as it was; with `engine` given, that engine's ValueError instead.

    The outputs come from the full-sequence path (`rat_mix_gpu_or_none`, or `rat_mix_triton` with the
    `engine` given). Its scan hands over the summaries of chunks 0 .. C-2 in the activation dtype, which are
    copied into the cache slots: with the chunks-as-heads engines (cuDNN's) one scan of the prompt, not two.
    The scan rotates the fp32 key state and rounds once; the general path and the decode kernels round
    before and after the rotation, so a summary key may differ from theirs in its last bit. The last chunk,
    complete or not, is scanned in fp32 by PyTorch (at most L tokens) for the running states and, when
    complete, its summary.
    """
    from .gpu import rat_mix_gpu_or_none, rat_mix_triton

    T, L = v.shape[1], chunk_size
    slots = state.keys.shape[2]
    if state.seen != 0 or slots < T // L:
        raise ValueError(
            f"prefill_fresh needs an empty state with room for {T // L} chunk summaries; it has seen "
            f"{state.seen} tokens and holds {slots} slots"
        )

    def into_cache(vsum: Tensor, ksum: Tensor) -> None:  # [B, C, H, d]: rows 0 .. C-2 are summaries
        n = ksum.shape[1] - 1
        state.values[:, :, :n] = vsum[:, :n].transpose(1, 2)
        state.keys[:, :, :n] = ksum[:, :n].transpose(1, 2)

    args = (q, k, v, g, L, position, rope_base, scale)
    gates = dict(gate_bias=gate_bias, out_gate=out_gate, summaries=into_cache)
    if engine is None:
        y = rat_mix_gpu_or_none(*args, **gates)
    else:
        y = rat_mix_triton(*args, **gates, engine=engine)
    if y is None:
        return None
    t0 = (T - 1) // L * L  # the last chunk's first token
    tail = slice(t0, T)
    vs, ks = scan_states(v[:, tail], k[:, tail], forget_gate(g[:, tail], gate_bias), L, offset=t0)
    state.v_run.copy_(vs[:, -1])
    state.k_run.copy_(ks[:, -1])
    if T - t0 == L:  # the last chunk is complete: its summary too
        last = torch.arange(t0 // L, t0 // L + 1, device=v.device)  # (built on the device: no host sync)
        k_end, v_end = (s[:, -1:].to(v.dtype).transpose(1, 2) for s in (ks, vs))
        _store_summaries(state, k_end, v_end, last, position, rope_base)
    move_to(state, T)
    return y


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
