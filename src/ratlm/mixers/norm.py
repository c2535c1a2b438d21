"""RMSNorm (eps 1e-6 in the paper), computed in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.norm import rms_norm, rms_norm_pair


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

    def pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(self(x), x) for a block x + f(norm(x)): use the second tensor for the residual, so that in
        training on the GPU the norm's backward adds x's two gradients itself (`ops.norm.rms_norm_pair`).
        With hooks on this module (or global ones) it calls the module, so they see the call."""
        hooks = torch.nn.modules.module
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or hooks._global_forward_hooks
            or hooks._global_forward_pre_hooks
        ):
            return self(x), x
        return rms_norm_pair(x, self.weight, self.eps, autocast_dtype(x.device.type) or x.dtype)
