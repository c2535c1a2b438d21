"""Gated linear recurrence h_t = g_t h_{t-1} + (1 - g_t) x_t, optionally restarted at chunk starts."""

from __future__ import annotations

from torch import Tensor

from ..backend import fallback, fast_path_wanted
from .chunked import gated_scan_chunked
from .naive import gated_scan_naive

__all__ = ["gated_scan", "gated_scan_naive", "gated_scan_chunked"]


def gated_scan(
    x: Tensor,
    g: Tensor,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """All states of the gated recurrence, in fp32.

    Args:
        x: inputs [B, T, N].
        g: gates in (0, 1), [B, T, N] (the recurrence runs in fp32 whatever their dtype).
        chunk_size: if set, the state restarts from 0 before every token whose absolute position
            (offset + t) is a multiple of chunk_size (RAT); None runs over the whole sequence (RNN).
        initial_state: [B, N], the state before x[:, 0] (zeros if None).
        offset: absolute position of x[:, 0] (for continuing from a cache).
    Returns:
        h [B, T, N] fp32.

    CUDA tensors take the Triton kernel (`ratlm.ops.scan.kernel`) unless `ratlm.ops.backend` says "torch".
    """
    if x.dim() != 3 or g.shape != x.shape:
        raise ValueError(f"x and g must both be [B, T, N]; got {tuple(x.shape)} and {tuple(g.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if initial_state is not None and initial_state.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"initial_state must be [B, N] = {(x.shape[0], x.shape[2])}, got {tuple(initial_state.shape)}"
        )
    if fast_path_wanted(x, g):
        from .kernel import gated_scan_triton, unsupported_reason

        reason = unsupported_reason(x, g, initial_state)
        if reason is None:
            return gated_scan_triton(x, g, chunk_size, initial_state, offset)
        fallback("gated_scan", reason)
    return gated_scan_chunked(x, g, chunk_size, initial_state, offset)
