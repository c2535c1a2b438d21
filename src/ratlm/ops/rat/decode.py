"""RAT's one-token step: update the running state, attend over the chunk summaries, gate by sigmoid(z).

Positions come from the state's device counter `pos` ([B], one per sequence), so the step can be captured in a
CUDA graph once and replayed at every position. On CUDA: the fused Triton kernels of `decode_triton.py` (one
launch, or a split over the summaries plus a combine when batch x heads is small); elsewhere the plain-PyTorch
twin `decode_naive.py`. The general cached path (`rat_mix_cached`) takes any number of tokens from a host int.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache import RATState
from ..attention.decode import check_step_shapes, ensure_rope, use_triton
from .decode_naive import rat_decode_naive


def rat_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    gate_bias: Tensor,
    z: Tensor,
    state: RATState,
    chunk_size: int,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
) -> Tensor:
    """sigmoid(z) * y for the next token of every sequence, continuing `state` (updated in place).

    Args:
        q, k: [B, G, d] the new token's query and key groups (head j uses group j mod G).
        v: [B, H, d] its values; g: [B, H, d] gate pre-activations (the gate is sigmoid(g + gate_bias),
            computed in fp32); gate_bias: [H * d]; z: [B, H, d] output-gate pre-activations.
        state: the layer's RATState, read at `state.pos`. The running key/value states advance (restarting at
            chunk starts); a token that completes its chunk writes the chunk's summary (key after RoPE at
            the chunk index, value) to slot pos // L; then `pos` and `seen` advance by one.
        chunk_size: L. position: "rope" or "nope". scale: softmax scale, d**-0.5 by default.
    Returns:
        [B, H, d] in v's dtype: sigmoid(z) times the attention of the query over the summaries of the
        sequence's earlier chunks and its own running state.
    """
    check_step_shapes(q, k, v, state.keys)
    if g.shape != v.shape or z.shape != v.shape or gate_bias.numel() != v.shape[1] * v.shape[2]:
        raise ValueError(
            f"g and z must be [B, H, d] = {tuple(v.shape)} and gate_bias [H * d]; got g {tuple(g.shape)}, "
            f"z {tuple(z.shape)}, gate_bias {tuple(gate_bias.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if position not in ("rope", "nope"):
        raise ValueError(f"position must be 'rope' or 'nope', got {position!r}")
    if position == "rope" and not torch.compiler.is_compiling():
        ensure_rope(state, state.keys.shape[2], v.shape[2], rope_base)
    args = (q, k, v, g, gate_bias, z, state, chunk_size, position, rope_base, scale)
    if use_triton(v, v.shape[2]):
        from .decode_triton import rat_decode_triton

        return rat_decode_triton(*args)
    return rat_decode_naive(*args)
