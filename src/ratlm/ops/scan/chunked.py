"""Vectorised gated linear recurrence in plain PyTorch (any device, differentiable by autograd).

The scan h_t = a_t h_{t-1} + u_t runs in blocks of S tokens: a loop over the S positions of a block, done
for all blocks at once, then a loop over the blocks that carries the state across. That is S + T/S small
steps instead of T. Chunk restarts are folded into the decay: a_t = 0 at every chunk start.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _block_size(T: int) -> int:
    return max(8, min(256, 1 << round(math.log2(max(T, 1)) / 2)))


def gated_scan_chunked(
    x: Tensor,
    g: Tensor,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    B, T, N = x.shape
    if T == 0:
        return x.new_zeros(B, 0, N, dtype=torch.float32)
    a = g.float()
    u = (1 - a) * x.float()
    if chunk_size is not None:
        starts = (torch.arange(T, device=x.device) + offset) % chunk_size == 0
        a = a.masked_fill(starts[None, :, None], 0.0)
    S = min(_block_size(T), T)
    nb = -(-T // S)
    pad = nb * S - T
    if pad:  # padding at the end never reaches earlier outputs
        a = torch.nn.functional.pad(a, (0, 0, 0, pad), value=1.0)
        u = torch.nn.functional.pad(u, (0, 0, 0, pad))
    a = a.view(B, nb, S, N)
    u = u.view(B, nb, S, N)

    # within each block, from a zero state: local states and running decay products.
    # unbind (not indexing) keeps autograd from allocating a full-size gradient per step.
    h, decay = u[:, :, 0], a[:, :, 0]
    hs, ds = [h], [decay]
    for a_i, u_i in zip(a.unbind(2)[1:], u.unbind(2)[1:], strict=True):
        h = a_i * h + u_i
        decay = decay * a_i
        hs.append(h)
        ds.append(decay)
    h_local = torch.stack(hs, dim=2)  # [B, nb, S, N]
    decay = torch.stack(ds, dim=2)  # [B, nb, S, N]

    # across blocks: the state entering each block
    carry = torch.zeros(B, N, device=x.device) if initial_state is None else initial_state.float()
    entering = []
    for h_end, decay_end in zip(hs[-1].unbind(1), ds[-1].unbind(1), strict=True):
        entering.append(carry)
        carry = h_end + decay_end * carry
    entering = torch.stack(entering, dim=1)  # [B, nb, N]
    out = h_local + decay * entering[:, :, None]
    return out.reshape(B, nb * S, N)[:, :T]
