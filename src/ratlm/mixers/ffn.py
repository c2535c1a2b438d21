"""Feed-forward block: pre-norm, fc1, exact GELU, fc2, residual; no biases (SPEC §2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .norm import RMSNorm
from .residual import add_projection, norm_project


class FFN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.d_ffn, cfg.d_model, bias=False)

    def forward(self, x: Tensor, *, inplace: bool = False) -> Tensor:
        """x + fc2(gelu(fc1(norm(x)))); inplace: x may be overwritten with it (see `add_projection`)."""
        u, x = norm_project(self.norm, self.fc1, x)
        return add_projection(x, F.gelu(u), self.fc2, inplace)
