"""RAT's token mixing core: chunked recurrence, then softmax attention over chunk summaries."""

from __future__ import annotations

from torch import Tensor

from ..backend import fast_path_wanted
from .cached import rat_mix_cached
from .masked import chunk_attention_masked, rat_mix_masked
from .naive import chunk_attention_naive, rat_mix_naive

__all__ = [
    "rat_mix",
    "rat_mix_check",
    "rat_mix_cached",
    "rat_mix_naive",
    "rat_mix_masked",
    "chunk_attention",
    "chunk_attention_naive",
    "chunk_attention_masked",
]


def chunk_attention(
    q: Tensor, k: Tensor, v: Tensor, k_sum: Tensor, v_sum: Tensor, chunk_ids: Tensor, scale: float
) -> Tensor:
    """Each query attends to the summaries of its earlier chunks and to its own running state.

    Args:
        q, k, v: [B, H, T, d] queries and the running key/value states at the same tokens (after RoPE).
        k_sum, v_sum: [B, H, C, d] chunk summaries (the states at each chunk's last token).
        chunk_ids: [T] chunk index of each query; query t sees summaries c < chunk_ids[t].
        scale: softmax scale.
    Returns:
        [B, H, T, d] in v's dtype.
    """
    return chunk_attention_masked(q, k, v, k_sum, v_sum, chunk_ids, scale)


def rat_mix(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    chunk_size: int,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
    *,
    gate_bias: Tensor | None = None,
    out_gate: Tensor | None = None,
) -> Tensor:
    """RAT's mixing core over a whole sequence (training and prefill without a cache).

    Args:
        q, k: [B, T, G, d] query and key groups; head j uses group j mod G.
        v: [B, T, H, d] values; g: [B, T, H, d] forget gates in (0, 1) (fp32 recommended), or their
            logits when gate_bias is given.
        chunk_size: L >= 1. Any T is accepted; the last chunk may be partial.
        position: "rope" rotates queries and key states by their chunk index; "nope" does not.
        scale: softmax scale, d**-0.5 by default.
        gate_bias: optional [H * d]: the forget gate is sigmoid(g + gate_bias), computed in fp32 (inside the
            scan kernels on the GPU, so no fp32 gate tensor is ever stored).
        out_gate: optional z [B, T, H, d]: the result is multiplied by sigmoid(z) (inside the merge kernel
            with the chunks-as-heads engines, cuDNN's for bf16/fp16 and d <= 128; as a separate op after the
            "triton" and "flex" engines).
    Returns:
        y [B, T, H, d] in v's dtype (times sigmoid(out_gate) if given), for the mixer's output projection.

    CUDA tensors take the GPU path (Triton scan, attention over chunk summaries by cuDNN, Triton or
    FlexAttention; `ratlm.ops.rat.gpu`) unless `ratlm.ops.backend` says "torch"; see docs/kernels.md.
    """
    rat_mix_check(q, k, v, g, chunk_size, position, gate_bias, out_gate)
    gates = dict(gate_bias=gate_bias, out_gate=out_gate)
    if fast_path_wanted(q, k, v, g):  # CUDA: Triton scan + fused attention (ratlm.ops.backend)
        from .gpu import rat_mix_gpu_or_none

        y = rat_mix_gpu_or_none(q, k, v, g, chunk_size, position, rope_base, scale, **gates)
        if y is not None:
            return y
    return rat_mix_masked(q, k, v, g, chunk_size, position, rope_base, scale, **gates)


def rat_mix_check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    chunk_size: int,
    position: str,
    gate_bias: Tensor | None = None,
    out_gate: Tensor | None = None,
) -> None:
    """Raise ValueError unless the arguments follow `rat_mix`'s contract."""
    B, T, H, d = v.shape
    if q.shape != k.shape or q.shape[:2] != (B, T) or q.shape[3] != d or H % q.shape[2]:
        raise ValueError(
            f"q, k must be [B, T, G, d] with G dividing H; got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    if g.shape != v.shape:
        raise ValueError(f"g must have v's shape {tuple(v.shape)}, got {tuple(g.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if position not in ("rope", "nope"):
        raise ValueError(f"position must be 'rope' or 'nope', got {position!r}")
    if gate_bias is not None and gate_bias.numel() != H * d:
        raise ValueError(f"gate_bias must have H * d = {H * d} elements, got {tuple(gate_bias.shape)}")
    if out_gate is not None and out_gate.shape != v.shape:
        raise ValueError(f"out_gate must have v's shape {tuple(v.shape)}, got {tuple(out_gate.shape)}")
