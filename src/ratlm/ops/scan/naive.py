"""Token-by-token reference of the gated linear recurrence."""

from __future__ import annotations

import torch
from torch import Tensor


def gated_scan_naive(
    x: Tensor,
    g: Tensor,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """h_t = g_t * h_{t-1} + (1 - g_t) * x_t in fp32; same contract as `ratlm.ops.gated_scan`."""
    B, T, N = x.shape
    h = torch.zeros(B, N, device=x.device) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        if chunk_size is not None and (offset + t) % chunk_size == 0:
            h = torch.zeros_like(h)
        gt = g[:, t].float()
        h = gt * h + (1 - gt) * x[:, t].float()
        out.append(h)
    return torch.stack(out, dim=1) if out else x.new_zeros(B, 0, N, dtype=torch.float32)
