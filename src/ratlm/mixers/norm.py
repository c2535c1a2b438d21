"""RMSNorm (eps 1e-6 in the paper), computed in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.backend import autocast_dtype
from ..ops.norm import rms_norm, rms_norm_pair


def bypassable(module: nn.Module, cls: type) -> bool:
    """Whether computing `module`'s output from its parameters, without calling it, is what a call would do
    and nobody would miss the call: exactly `cls` (no subclass, no forward replaced on the instance) and no
    forward or backward hooks on it or global ones."""
    g = torch.nn.modules.module
    return (
        type(module) is cls
        and "forward" not in module.__dict__
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not (g._global_forward_hooks or g._global_forward_pre_hooks)
        and not (g._global_backward_hooks or g._global_backward_pre_hooks)
    )


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
        The module is not called: blocks use `norm_pair`, which calls it when hooks are registered."""
        return rms_norm_pair(x, self.weight, self.eps, autocast_dtype(x.device.type) or x.dtype)


def norm_pair(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(x), x) for a block x + f(norm(x)), the second for the residual: `RMSNorm.pair` when the norm is
    a plain RMSNorm, else a call of the norm and x itself."""
    if bypassable(norm, RMSNorm):
        return norm.pair(x)
    return norm(x), x
