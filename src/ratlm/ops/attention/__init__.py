"""Causal softmax attention with optional sliding window (SPEC §2: query t sees keys t-W..t)."""

from __future__ import annotations

from torch import Tensor

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
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B, H, T, d]")
    if not (k_start <= q_start and q_start + Tq <= k_start + Tk):
        raise ValueError("attention: every query position must be among the key positions")
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    return attention_sdpa(q, k, v, q_start, k_start, window, scale)
