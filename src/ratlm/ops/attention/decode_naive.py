"""Plain-PyTorch twin of the one-token attention step: the whole static cache, masked by device positions."""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache import KVState, WindowState, advance
from ..rope import apply_rope


def rope_rows(table: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, d] of one table row per sequence (tables hold the cos | sin halves)."""
    half = table.shape[1] // 2
    t = table[rows]  # [B, d]
    cos, sin = t[:, :half], t[:, half:]
    return torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]


def visible_slots(n: Tensor, num_slots: int) -> Tensor:
    """[B, N] True where slot i is visible to a query at slot position n: i < n and i != n % N.

    A growing cache (n < N) shows slots 0..n-1; a full ring buffer every slot but the one about to be
    overwritten, which holds the position that just left the window.
    """
    i = torch.arange(num_slots, device=n.device)[None, :]
    return (i < n[:, None]) & (i != (n % num_slots)[:, None])


def attend_with_own(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float
):
    """One softmax of q [B, H, d] over the visible cache slots plus its own k, v; fp32, [B, H, d]."""
    hidden = ~visible[:, None, :, None]  # unwritten slots may hold anything, NaN included
    keys = keys.to(q.dtype).masked_fill(hidden, 0)
    values = values.float().masked_fill(hidden, 0)
    scores = (keys @ q[..., None]).squeeze(-1).float() * scale  # [B, H, N]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    own = (q.float() * k.float()).sum(-1, keepdim=True) * scale  # [B, H, 1]
    p = torch.softmax(torch.cat([scores, own], dim=-1), dim=-1)
    N = keys.shape[2]
    return (p[..., :N, None] * values).sum(2) + p[..., N:] * v.float()


def write_slot(buf: Tensor, slot: Tensor, new: Tensor, where: Tensor | None = None) -> None:
    """buf[b, :, slot[b]] = new[b] for every sequence b (only where `where[b]`), without host syncs."""
    B, H, _, d = buf.shape
    idx = slot.view(B, 1, 1, 1).expand(B, H, 1, d)
    new = new.to(buf.dtype)[:, :, None]
    if where is not None:
        new = torch.where(where.view(B, 1, 1, 1), new, buf.gather(2, idx))
    buf.scatter_(2, idx, new)


def attention_decode_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: KVState | WindowState,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
) -> Tensor:
    """Same contract as `ratlm.ops.attention.decode.attention_decode`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = state.pos
    if position == "rope":
        cos, sin = rope_rows(state.rope, p)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    N = state.keys.shape[2]
    y = attend_with_own(q, k, v, state.keys, state.values, visible_slots(p, N), scale)
    write_slot(state.keys, p % N, k)
    write_slot(state.values, p % N, v)
    advance(state)
    return y.to(v.dtype)
