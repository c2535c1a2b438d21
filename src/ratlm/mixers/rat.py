"""The RAT mixer (SPEC §1): gated recurrence inside chunks, softmax attention across chunk summaries."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..cache import RATState, shared_rope_table
from ..config import ModelConfig
from ..ops import rat_mix, rat_mix_cached
from ..ops.packed import split_packed
from ..ops.rat.decode import rat_decode
from .norm import RMSNorm
from .residual import add_projection, norm_project


class RAT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_groups, self.chunk_size = cfg.n_groups, cfg.chunk_size
        self.position, self.rope_base = cfg.position, cfg.rope_base
        self.l1_gate_bias = cfg.rat_l1_gate_bias
        D, Gd = cfg.d_model, cfg.n_groups * cfg.head_dim
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D + 2 * Gd, bias=False)  # z, x, g, q, k
        self.gate_bias = nn.Parameter(torch.zeros(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    @torch.no_grad()
    def init_gate_bias(self) -> None:
        """Chrono init log U(1, L-1): per-channel time scales up to the chunk length."""
        L = self.chunk_size
        if L == 1:
            self.gate_bias.fill_(self.l1_gate_bias)
        else:
            self.gate_bias.uniform_(1, max(L - 1, 1 + 1e-6)).log_()

    def forward(self, x: Tensor, state: RATState | None = None, *, inplace: bool = False) -> Tensor:
        """x + the mixer's output; with a state, the tokens continue it. inplace: x may be overwritten
        with the result (cached inference, see `add_projection`)."""
        B, T, D = x.shape
        d, G = self.head_dim, self.n_groups
        u, x = norm_project(self.norm, self.in_proj, x)
        if state is not None and T == 1:
            return self._step(x, u, state, inplace)
        # split without a concatenation in the backward: the GPU kernels write the five gradients into one
        z, v, g, q, k = (t.view(B, T, -1, d) for t in split_packed(u, [D, D, D, G * d, G * d]))
        # the op applies both gates: sigmoid(g + gate_bias) in fp32 and the output gate sigmoid(z)
        args = (self.chunk_size, self.position, self.rope_base, d**-0.5)
        gates = dict(gate_bias=self.gate_bias, out_gate=z)
        if state is None:
            y = rat_mix(q, k, v, g, *args, **gates)
        else:
            y = rat_mix_cached(q, k, v, g, state, *args, **gates)
        return add_projection(x, y.reshape(B, T, D), self.out_proj, inplace)

    def _step(self, x: Tensor, u: Tensor, state: RATState, inplace: bool) -> Tensor:
        """One token per sequence, its position read on the device: the path a CUDA graph captures."""
        B, D = x.shape[0], self.d_model
        H, d, G = self.n_heads, self.head_dim, self.n_groups
        z, v, g, q, k = u[:, 0].split([D, D, D, G * d, G * d], dim=-1)
        q, k = q.view(B, G, d), k.view(B, G, d)
        v, g, z = v.view(B, H, d), g.view(B, H, d), z.view(B, H, d)
        y = rat_decode(
            q, k, v, g, self.gate_bias, z, state, self.chunk_size, self.position, self.rope_base, d**-0.5
        )
        return add_projection(x, y.view(B, 1, D), self.out_proj, inplace)  # y is gated by sigmoid(z) already

    def new_state(self, batch_size: int, max_len: int, device, dtype, tables: dict | None = None) -> RATState:
        """Zeroed state for batch_size sequences of up to max_len tokens; `tables` shares RoPE tables."""
        B, H, d = batch_size, self.n_heads, self.head_dim
        C = math.ceil(max_len / self.chunk_size)
        rope = shared_rope_table(tables, C if self.position == "rope" else 0, d, self.rope_base, device)
        return RATState(
            keys=torch.zeros(B, H, C, d, device=device, dtype=dtype),
            values=torch.zeros(B, H, C, d, device=device, dtype=dtype),
            k_run=torch.zeros(B, H, d, device=device),
            v_run=torch.zeros(B, H, d, device=device),
            rope=rope,
        )
