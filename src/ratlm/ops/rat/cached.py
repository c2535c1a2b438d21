"""RAT continued from an inference state: any number of new tokens, from any position."""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache import RATState
from ..rope import apply_rope, rope_cos_sin
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
) -> Tensor:
    """Like `rat_mix` on the tokens that follow those already in `state`, which is updated in place.

    The scan starts from the running state of the current chunk; chunks completed by the new tokens
    write their summaries (keys after RoPE at their chunk index, values) into their cache slots, and
    every query attends to the summaries of all its earlier chunks plus its own running state.
    """
    B, T, H, d = v.shape
    L, n0 = chunk_size, state.seen
    scale = d**-0.5 if scale is None else scale
    vs, ks = scan_states(v, k, g, L, offset=n0, initial=(state.v_run, state.k_run))
    state.v_run.copy_(vs[:, -1])
    state.k_run.copy_(ks[:, -1])
    vs = vs.to(v.dtype).transpose(1, 2)  # [B, H, T, d]
    ks = ks.to(v.dtype).transpose(1, 2)
    q = q.repeat(1, 1, H // q.shape[2], 1).transpose(1, 2)
    chunk_ids = (n0 + torch.arange(T, device=v.device)) // L
    if position == "rope":
        cos, sin = rope_cos_sin(chunk_ids, d, rope_base)
        q, ks = apply_rope(q, cos, sin), apply_rope(ks, cos, sin)
    first_end = (L - 1 - n0) % L  # the first new token that closes a chunk
    if first_end < T:
        ends = torch.arange(first_end, T, L, device=v.device)
        slots = (n0 + ends) // L
        state.keys[:, :, slots] = ks[:, :, ends].to(state.keys.dtype)
        state.values[:, :, slots] = vs[:, :, ends].to(state.values.dtype)
    c_last = (n0 + T - 1) // L
    k_sum = state.keys[:, :, :c_last].to(q.dtype)
    v_sum = state.values[:, :, :c_last].to(vs.dtype)
    state.seen = n0 + T
    return chunk_attention_masked(q, ks, vs, k_sum, v_sum, chunk_ids, scale).transpose(1, 2)
