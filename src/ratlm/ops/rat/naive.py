"""Token-by-token references of RAT's attention over chunk summaries (SPEC §1.5-1.7)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..rope import apply_rope, rope_cos_sin
from .gates import forget_gate, output_gate


def chunk_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, k_sum: Tensor, v_sum: Tensor, chunk_ids: Tensor, scale: float
) -> Tensor:
    """Same contract as `ratlm.ops.chunk_attention`, one query at a time, in fp32."""
    out = []
    for t in range(q.shape[2]):
        c = int(chunk_ids[t])
        keys = torch.cat([k_sum[:, :, :c], k[:, :, t : t + 1]], dim=2).float()  # [B, H, c+1, d]
        values = torch.cat([v_sum[:, :, :c], v[:, :, t : t + 1]], dim=2).float()
        p = torch.softmax((keys @ q[:, :, t, :, None].float()).squeeze(-1) * scale, dim=-1)
        out.append((p[..., None] * values).sum(2))
    return torch.stack(out, dim=2).to(v.dtype)


def rat_mix_naive(
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
    """Same contract as `ratlm.ops.rat_mix`: recurrence, RoPE and attention written out token by token."""
    B, T, H, d = v.shape
    G = q.shape[2]
    scale = d**-0.5 if scale is None else scale
    g = forget_gate(g, gate_bias)
    head_group = torch.arange(H) % G
    v_state = torch.zeros(B, H, d, device=v.device)
    k_state = torch.zeros(B, H, d, device=v.device)
    k_sums, v_sums, out = [], [], []
    for t in range(T):
        c = t // chunk_size
        if t % chunk_size == 0:
            v_state, k_state = torch.zeros_like(v_state), torch.zeros_like(k_state)
        gt = g[:, t].float()
        v_state = gt * v_state + (1 - gt) * v[:, t].float()
        k_state = gt * k_state + (1 - gt) * k[:, t, head_group].float()
        qt = q[:, t, head_group].float()
        kt = k_state.to(v.dtype).float()
        vt = v_state.to(v.dtype).float()
        if position == "rope":
            cos, sin = rope_cos_sin(torch.tensor([c], device=v.device), d, rope_base)
            qt, kt = apply_rope(qt, cos, sin), apply_rope(kt, cos, sin)
        keys = torch.stack(k_sums + [kt], dim=2)  # [B, H, c+1, d]
        values = torch.stack(v_sums + [vt], dim=2)
        p = torch.softmax((keys @ qt[..., None]).squeeze(-1) * scale, dim=-1)
        out.append((p[..., None] * values).sum(2))
        if t % chunk_size == chunk_size - 1:
            k_sums.append(kt)
            v_sums.append(vt)
    if not out:
        return v.new_zeros(B, 0, H, d)
    return output_gate(torch.stack(out, dim=1).to(v.dtype), out_gate)
