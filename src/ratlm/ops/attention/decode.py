"""One-token attention step over a static KV cache (full, or a sliding window's ring buffer).

The position of every sequence is read from the state's device counter `pos`, never from a Python int, so the
step can be captured once in a CUDA graph and replayed at every position, and sequences may stand at
different positions. On CUDA it runs the flash-decoding Triton kernels of `decode_triton.py` (split over the
cache when batch x heads is small, then a combine); elsewhere its plain-PyTorch twin `decode_naive.py`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ...cache import KVState, WindowState, rope_table
from ..backend import fast_path_wanted
from .decode_naive import attention_decode_naive


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: Tensor, head_dim: int) -> bool:
    """The Triton decode kernels take CUDA tensors with an even head width (RoPE works on halves), unless
    `ratlm.ops.backend` says "torch"."""
    return fast_path_wanted(t) and head_dim % 2 == 0 and triton_available()


def ensure_rope(state, rows: int, dim: int, base: float) -> Tensor:
    """The state's RoPE table, built here for states made by hand; `new_state` gives each one a full table.

    A table built here has at least `rows` rows; CUDA graphs need a state from `new_state`, whose table covers
    every position the cache can hold.
    """
    if state.rope is None or state.rope.shape[0] < rows or state.rope.shape[1] != dim:
        state.rope = rope_table(rows, dim, base, state.keys.device)
    return state.rope


def check_step_shapes(q: Tensor, k: Tensor, v: Tensor, keys: Tensor) -> None:
    B, H, d = v.shape
    if q.dim() != 3 or k.shape != q.shape or q.shape[0] != B or q.shape[2] != d or H % q.shape[1]:
        raise ValueError(
            f"q, k must be [B, G, d] with G dividing H and v [B, H, d]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if keys.shape[0] != B or keys.shape[1] != H or keys.shape[3] != d:
        raise ValueError(f"cache keys {tuple(keys.shape)} do not match [B, H, N, d] = {(B, H, '.', d)}")


def attention_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: KVState | WindowState,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
) -> Tensor:
    """Attend the new token of every sequence to its cache and itself, then store its key and value.

    Args:
        q, k, v: [B, H, d] the new token's projections, before RoPE.
        state: a KVState (N = max_len slots) or WindowState (ring of N = W+1 slots, position p in slot
            p % N). Read at `state.pos` ([B] on the device); updated in place: the new key (after RoPE) and
            value go to slot pos % N, then `pos` and `seen` advance by one.
        position: "rope" rotates q and k by their token position (rows of `state.rope`); "nope" does not.
        scale: softmax scale, d**-0.5 by default.
    Returns:
        [B, H, d] in v's dtype: query t sees keys t-W..t (all earlier keys without a window).
    """
    check_step_shapes(q, k, v, state.keys)
    if q.shape[1] != v.shape[1]:
        raise ValueError(f"attention needs one query per head: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if position not in ("rope", "nope"):
        raise ValueError(f"position must be 'rope' or 'nope', got {position!r}")
    if position == "rope" and not torch.compiler.is_compiling():
        ensure_rope(state, max(state.keys.shape[2], state.seen + 1), q.shape[2], rope_base)
    if use_triton(v, v.shape[2]):
        from .decode_triton import attention_decode_triton

        return attention_decode_triton(q, k, v, state, position, rope_base, scale)
    return attention_decode_naive(q, k, v, state, position, rope_base, scale)
