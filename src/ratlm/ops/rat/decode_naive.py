"""Plain-PyTorch twin of RAT's one-token step: the whole static cache, masked by device positions."""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache import RATState, advance
from ..attention.decode_naive import attend_with_own, rope_rows, visible_slots, write_slot
from ..rope import apply_rope


def rat_decode_naive(
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
) -> Tensor:
    """Same contract as `ratlm.ops.rat.decode.rat_decode`."""
    B, H, d = v.shape
    L = chunk_size
    scale = d**-0.5 if scale is None else scale
    heads = torch.arange(H, device=v.device) % q.shape[1]  # head j uses group j mod G
    p = state.pos
    c, j = p // L, p % L
    gate = torch.sigmoid(g.float() + gate_bias.float().view(H, d))
    fresh = (j == 0).view(B, 1, 1)  # the recurrence restarts at every chunk start
    v_run = gate * state.v_run.masked_fill(fresh, 0) + (1 - gate) * v.float()
    k_run = gate * state.k_run.masked_fill(fresh, 0) + (1 - gate) * k[:, heads].float()
    state.v_run.copy_(v_run)
    state.k_run.copy_(k_run)
    vs, ks, qh = v_run.to(v.dtype), k_run.to(v.dtype), q[:, heads]
    if position == "rope":
        cos, sin = rope_rows(state.rope, c)
        qh, ks = apply_rope(qh, cos, sin), apply_rope(ks, cos, sin)
    C = state.keys.shape[2]
    y = attend_with_own(qh, ks, vs, state.keys, state.values, visible_slots(c, C), scale)
    closes = j == L - 1  # this token completes its chunk: its states become the chunk's summary
    slot = c.clamp(max=C - 1)
    write_slot(state.keys, slot, ks, closes)
    write_slot(state.values, slot, vs, closes)
    advance(state)
    return (y * torch.sigmoid(z.float())).to(v.dtype)
