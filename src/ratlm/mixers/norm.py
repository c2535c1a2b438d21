"""RMSNorm (eps 1e-6 in the paper), computed in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.norm import rms_norm


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on this kind of device, or None when autocast is off there."""
    on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    return torch.get_autocast_dtype(device_type) if on else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # under autocast the next op is a matmul in the autocast dtype: round to it once, here
        return rms_norm(x, self.weight, self.eps, autocast_dtype(x.device.type) or x.dtype)
