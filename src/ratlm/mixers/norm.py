"""RMSNorm (eps 1e-6 in the paper), computed in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # under autocast the next op is a matmul in the autocast dtype: round to it once, here
        kind = x.device.type
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        out_dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        return rms_norm(x, self.weight, self.eps, out_dtype)
