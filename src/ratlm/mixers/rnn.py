"""Gated RNN baseline (SPEC §2): the RAT recurrence over the whole sequence, no attention, no RoPE."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import RNNState, advance, move_to
from ..config import ModelConfig
from ..ops import gated_scan
from .norm import RMSNorm
from .residual import add_projection, norm_project


class RNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model, self.context = cfg.d_model, cfg.context
        D = cfg.d_model
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)  # z, x, g
        self.gate_bias = nn.Parameter(torch.zeros(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    @torch.no_grad()
    def init_gate_bias(self) -> None:
        """Chrono init log U(1, T_train - 1): time scales up to the training context."""
        self.gate_bias.uniform_(1, max(self.context - 1, 1 + 1e-6)).log_()

    def forward(self, x: Tensor, state: RNNState | None = None, *, inplace: bool = False) -> Tensor:
        """x + the mixer's output; inplace: x may be overwritten with it (see `add_projection`)."""
        D, T = self.d_model, x.shape[1]
        u, x = norm_project(self.norm, self.in_proj, x)
        z, v, g = u.split(D, dim=-1)
        g = torch.sigmoid(g.float() + self.gate_bias.float())
        if state is None:
            h = gated_scan(v, g)
        elif T == 1:  # one step, no scan: the same fp32 update, no host-side position (CUDA-graph safe)
            h = g * state.state[:, None] + (1 - g) * v.float()
            state.state.copy_(h[:, 0])
            advance(state)
        else:
            h = gated_scan(v, g, initial_state=state.state)
            state.state.copy_(h[:, -1])
            move_to(state, state.seen + T)
        return add_projection(x, torch.sigmoid(z) * h.to(v.dtype), self.out_proj, inplace)

    def new_state(self, batch_size: int, max_len: int, device, dtype, tables: dict | None = None) -> RNNState:
        """Zeroed fp32 state for batch_size sequences (the RNN's state does not grow with max_len)."""
        return RNNState(state=torch.zeros(batch_size, self.d_model, device=device))
