"""The residual connection of every block: x + proj(y), optionally added into x by the product itself."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .norm import autocast_dtype


def add_projection(x: Tensor, y: Tensor, proj: nn.Linear, inplace: bool = False) -> Tensor:
    """x + proj(y) for x [..., D] and y [..., D_in] with the same leading shape.

    With inplace=True (cached inference: LanguageModel.forward passes it with a cache and without autograd)
    the product is accumulated into x's own memory (one GEMM with beta = 1) and x is returned: one kernel
    instead of a GEMM and an add, which matters when a decode step is a few hundred small kernels. The
    result is rounded once instead of twice. Falls back to x + proj(y) whenever that cannot be done exactly
    in place: autograd on, autocast on, a bias, another dtype, x not contiguous, or proj not a plain
    nn.Linear (a wrapper such as a LoRA layer computes more than x @ weight.T, so it is called instead).
    """
    if (
        inplace
        and not torch.is_grad_enabled()
        and autocast_dtype(x.device.type) is None
        and type(proj) is nn.Linear
        and proj.bias is None
        and x.is_contiguous()
        and x.dtype == y.dtype == proj.weight.dtype
    ):
        x.view(-1, x.shape[-1]).addmm_(y.reshape(-1, y.shape[-1]), proj.weight.t())
        return x
    return x + proj(y)
