"""One-query-at-a-time reference of (sliding-window) causal attention."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_naive(
    q: Tensor, k: Tensor, v: Tensor, q_start: int = 0, k_start: int = 0, window: int | None = None, scale=None
) -> Tensor:
    """Same contract as `ratlm.ops.attention`, in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_pos = torch.arange(k.shape[2], device=k.device) + k_start
    out = []
    for t in range(q.shape[2]):
        pos = q_start + t
        visible = k_pos <= pos
        if window is not None:
            visible &= k_pos >= pos - window
        keys, values = k[:, :, visible].float(), v[:, :, visible].float()
        p = torch.softmax((keys @ q[:, :, t, :, None].float()).squeeze(-1) * scale, dim=-1)
        out.append((p[..., None] * values).sum(2))
    return torch.stack(out, dim=2).to(v.dtype)
