"""(Sliding-window) causal attention through torch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_mask(Tq: int, Tk: int, q_start: int, k_start: int, window: int | None, device) -> Tensor:
    """Boolean [Tq, Tk] mask, True where query q_start+i may see key k_start+j."""
    q_pos = torch.arange(Tq, device=device)[:, None] + q_start
    k_pos = torch.arange(Tk, device=device)[None, :] + k_start
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos >= q_pos - window
    return visible


def attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, q_start: int = 0, k_start: int = 0, window: int | None = None, scale=None
) -> Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    if window is None and q_start == k_start and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if window is None and Tq == 1 and k_start + Tk - 1 <= q_start:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = attention_mask(Tq, Tk, q_start, k_start, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
