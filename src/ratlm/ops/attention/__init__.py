"""Causal softmax attention with optional sliding window (SPEC §2: query t sees keys t-W..t)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import fallback, fast_path_wanted
from .naive import attention_naive
from .sdpa import attention_mask, attention_sdpa

__all__ = ["attention", "attention_mask", "attention_naive", "attention_sdpa"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_start: int = 0,
    k_start: int = 0,
    window: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention where the query at position p sees the keys at positions p - window .. p.

    Args:
        q: [B, H, Tq, d] at positions q_start .. q_start + Tq - 1.
        k, v: [B, H, Tk, d] at positions k_start .. k_start + Tk - 1. Every query must see at least
            one key (its own position must be among the keys).
        window: W, or None for full causal attention.
    Returns:
        [B, H, Tq, d].

    Full causal attention is SDPA (cuDNN or FlashAttention on CUDA). A sliding window over a whole
    sequence on CUDA uses FlexAttention with a cached block mask (`ratlm.ops.attention.flex`), unless
    `ratlm.ops.backend` says "torch"; other windowed calls use SDPA with a boolean mask.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B, H, T, d]")
    if not (k_start <= q_start and q_start + Tq <= k_start + Tk):
        raise ValueError(
            f"attention: every query position must be among the key positions; queries at {q_start}.."
            f"{q_start + Tq - 1} (q_start, Tq), keys at {k_start}..{k_start + Tk - 1} (k_start, Tk)"
        )
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    if window is not None and q_start == k_start and Tq == Tk:  # self-attention over a whole sequence
        if window >= Tq - 1:
            window = None  # the window covers every earlier key: plain causal attention, SDPA's fast path
        elif fast_path_wanted(q, k, v):
            reason = _flex_unsupported(q, k, v)
            if reason is None:
                from .flex import window_attention_flex

                return window_attention_flex(q, k, v, window, scale)
            fallback("attention", f"sliding window: {reason}", costly=True)
    return attention_sdpa(q, k, v, q_start, k_start, window, scale)


def _flex_unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    d = q.shape[3]
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if d < 16 or d & (d - 1):
        return f"head width {d} (FlexAttention wants a power of two >= 16)"
    return None
