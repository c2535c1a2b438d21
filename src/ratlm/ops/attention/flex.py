"""FlexAttention plumbing: block masks built from their block structure, and the compiled kernel.

`create_block_mask` evaluates the mask function on every (query, key) pair unless compiled, which at
T = 131072 is far too much memory; the masks here have a block structure that is easy to write down, so
they are built from boolean [query blocks, key blocks] tables instead (tiny), and cached per shape. The
mask functions are plain closures, not bound methods, which torch 2.11's compiler requires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compiling import with_recompile_room

BLOCK = 128
_MASKS: dict[tuple, object] = {}
_COMPILED = None


def flex_attention_fn(compiled: bool):
    """flex_attention, compiled once per process when `compiled` (on CUDA; eager elsewhere)."""
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED is None:
        _COMPILED = with_recompile_room(torch.compile(flex_attention, dynamic=False))
    return _COMPILED


def _lists(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """[nq, nk] bool -> (count [1, 1, nq], ascending column indices [1, 1, nq, nk]) as int32."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return count[None, None].contiguous(), order[None, None].contiguous()


def block_mask_from_dense_blocks(
    partial: Tensor, full: Tensor, mask_mod, q_len: int, kv_len: int, block: int
):
    """A BlockMask from [nq, nk] tables of partially visible blocks and of entirely visible blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = _lists(partial)
    full_num, full_idx = _lists(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
    )


def _sliding_window(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return mask_mod


def window_block_mask(T: int, window: int, device):
    """Causal sliding window over T tokens: query t sees keys t-W..t (SPEC §2); cached."""
    key = (T, window, str(device))
    if key not in _MASKS:
        if len(_MASKS) > 16:
            _MASKS.clear()
        n = -(-T // BLOCK)
        r0 = (torch.arange(n, device=device) * BLOCK)[:, None]
        r1 = torch.clamp(r0 + BLOCK - 1, max=T - 1)
        k0 = (torch.arange(n, device=device) * BLOCK)[None, :]
        k1 = torch.clamp(k0 + BLOCK - 1, max=T - 1)
        full = (k1 <= r0) & (k0 >= r1 - window)
        partial = (k0 <= r1) & (k1 >= r0 - window) & ~full
        _MASKS[key] = block_mask_from_dense_blocks(partial, full, _sliding_window(window), T, T, BLOCK)
    return _MASKS[key]


# under an outer torch.compile: eager mask building and our own compiled flex_attention
@torch.compiler.disable
def window_attention_flex(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None) -> Tensor:
    """Sliding-window causal self-attention [B, H, T, d] with FlexAttention (compiled on CUDA).

    T is padded up to a multiple of the 128-token block, so that prompts of ragged lengths share a handful
    of compiled shapes instead of compiling once per length; the padded keys come after every real query,
    so the causal mask hides them, and the padded queries' rows are dropped.
    """
    T = q.shape[2]
    padded = -(-T // BLOCK) * BLOCK
    if padded != T:
        q, k, v = (F.pad(t, (0, 0, 0, padded - T)) for t in (q, k, v))
    mask = window_block_mask(padded, window, q.device)
    y = flex_attention_fn(q.is_cuda)(q, k, v, block_mask=mask, scale=scale)
    return y[:, :, :T] if padded != T else y
