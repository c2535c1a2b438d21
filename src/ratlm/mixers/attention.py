"""Causal attention with RoPE on token positions, optionally restricted to a sliding window (SPEC §2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import KVState, WindowState, move_to, shared_rope_table
from ..config import ModelConfig
from ..ops import apply_rope, attention, rope_cos_sin
from ..ops.attention.decode import attention_decode
from .norm import RMSNorm
from .residual import add_projection, norm_project


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.window = window
        self.position, self.rope_base = cfg.position, cfg.rope_base
        D = cfg.d_model
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)  # x (values), q, k
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(
        self, x: Tensor, state: KVState | WindowState | None = None, *, inplace: bool = False
    ) -> Tensor:
        """x + the mixer's output; inplace: x may be overwritten with it (see `add_projection`)."""
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim
        u, x = norm_project(self.norm, self.in_proj, x)
        if state is not None and T == 1:
            # one token per sequence, its position read on the device: the path a CUDA graph captures
            v, q, k = (t.view(B, H, d) for t in u[:, 0].split(D, dim=-1))
            y = attention_decode(q, k, v, state, self.position, self.rope_base)
            return add_projection(x, y.view(B, 1, D), self.out_proj, inplace)
        v, q, k = (t.view(B, T, H, d).transpose(1, 2) for t in u.split(D, dim=-1))
        n0 = 0 if state is None else state.seen
        if self.position == "rope":
            cos, sin = rope_cos_sin(torch.arange(n0, n0 + T, device=x.device), d, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is None:
            y = attention(q, k, v, window=self.window)
        elif isinstance(state, KVState):
            state.keys[:, :, n0 : n0 + T] = k.to(state.keys.dtype)
            state.values[:, :, n0 : n0 + T] = v.to(state.values.dtype)
            keys, values = state.keys[:, :, : n0 + T].to(q.dtype), state.values[:, :, : n0 + T].to(v.dtype)
            y = attention(q, keys, values, q_start=n0, window=self.window)
        else:
            y = self._window_step(q, k, v, state)
        if state is not None:
            move_to(state, n0 + T)
        return add_projection(x, y.transpose(1, 2).reshape(B, T, D), self.out_proj, inplace)

    def _window_step(self, q: Tensor, k: Tensor, v: Tensor, state: WindowState) -> Tensor:
        """Attend over the ring buffer's last W positions plus the new ones, then store the newest W+1."""
        W1 = state.keys.shape[2]
        n0, T = state.seen, q.shape[2]
        start = max(0, n0 - (W1 - 1))
        slots = torch.arange(start, n0, device=q.device) % W1
        keys = torch.cat([state.keys[:, :, slots].to(k.dtype), k], dim=2)
        values = torch.cat([state.values[:, :, slots].to(v.dtype), v], dim=2)
        y = attention(q, keys, values, q_start=n0, k_start=start, window=self.window)
        keep = min(T, W1)
        new_slots = torch.arange(n0 + T - keep, n0 + T, device=q.device) % W1
        state.keys[:, :, new_slots] = k[:, :, T - keep :].to(state.keys.dtype)
        state.values[:, :, new_slots] = v[:, :, T - keep :].to(state.values.dtype)
        return y

    def new_state(
        self, batch_size: int, max_len: int, device, dtype, tables: dict | None = None
    ) -> KVState | WindowState:
        """Zeroed state for batch_size sequences of up to max_len tokens; `tables` shares RoPE tables."""
        n = max_len if self.window is None else min(self.window + 1, max_len)
        shape = (batch_size, self.n_heads, n, self.head_dim)
        cls = KVState if self.window is None else WindowState
        rows = max_len if self.position == "rope" else 0  # a ring buffer still sees max_len positions
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            rope=shared_rope_table(tables, rows, self.head_dim, self.rope_base, device),
        )
