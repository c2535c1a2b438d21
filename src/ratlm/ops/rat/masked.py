"""RAT in plain PyTorch, vectorised: chunked scan, then one masked softmax over the chunk summaries.

The token's own running state is an extra key/value column appended to the summaries, so a single
softmax covers both (equivalent to merging two attentions by their log-sum-exp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rope import apply_rope, rope_cos_sin
from ..scan import gated_scan
from .gates import forget_gate, output_gate


def chunk_attention_masked(
    q: Tensor, k: Tensor, v: Tensor, k_sum: Tensor, v_sum: Tensor, chunk_ids: Tensor, scale: float
) -> Tensor:
    C = k_sum.shape[2]
    scores = (q @ k_sum.transpose(-1, -2)).float() * scale  # [B, H, T, C]
    visible = torch.arange(C, device=q.device)[None, :] < chunk_ids[:, None]  # [T, C]
    scores = scores.masked_fill(~visible, float("-inf"))
    own = (q.float() * k.float()).sum(-1, keepdim=True) * scale  # [B, H, T, 1]
    p = torch.softmax(torch.cat([scores, own], dim=-1), dim=-1)
    y = (p[..., :C].to(v_sum.dtype) @ v_sum).float() + p[..., C:] * v.float()
    return y.to(v.dtype)


def scan_states(v: Tensor, k: Tensor, g: Tensor, chunk_size: int, offset: int = 0, initial=None):
    """Running value and key states [B, T, H, d] (fp32) of one chunked scan over both.

    k is [B, T, G, d] and is tiled to the H heads first (head j uses group j mod G).
    initial: optional (v_state, k_state), each [B, H, d], the states before the first token.
    """
    B, T, H, d = v.shape
    kt = k.repeat(1, 1, H // k.shape[2], 1)
    xs = torch.cat([v, kt], dim=-1).reshape(B, T, 2 * H * d)
    gs = torch.cat([g, g], dim=-1).reshape(B, T, 2 * H * d)
    init = None if initial is None else torch.cat([initial[0], initial[1]], dim=-1).reshape(B, 2 * H * d)
    states = gated_scan(xs, gs, chunk_size, init, offset).view(B, T, H, 2 * d)
    return states[..., :d], states[..., d:]


def rat_mix_masked(
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
    B, T, H, d = v.shape
    L = chunk_size
    scale = d**-0.5 if scale is None else scale
    vs, ks = scan_states(v, k, forget_gate(g, gate_bias), L)
    vs = vs.to(v.dtype).transpose(1, 2)  # [B, H, T, d]
    ks = ks.to(v.dtype).transpose(1, 2)
    q = q.repeat(1, 1, H // q.shape[2], 1).transpose(1, 2)  # [B, H, T, d]
    chunk_ids = torch.arange(T, device=v.device) // L
    if position == "rope":
        cos, sin = rope_cos_sin(chunk_ids, d, rope_base)
        q, ks = apply_rope(q, cos, sin), apply_rope(ks, cos, sin)
    y = chunk_attention_masked(q, ks, vs, ks[:, :, L - 1 :: L], vs[:, :, L - 1 :: L], chunk_ids, scale)
    return output_gate(y.transpose(1, 2), out_gate)  # [B, T, H, d]
