"""The residual connection around a sublayer's output projection: x + proj(y).

Without autograd (generation, evaluation), when x, y and the projection's weight share a dtype and autocast
is off (a bf16 model decoding, fp32 on the CPU), this is one `torch.addmm`: the add happens in the matrix
product's epilogue instead of a separate kernel (two per layer: 48 launches per decoded token of a 24-layer
model) and the sum is rounded once. Otherwise it is the plain expression: under autocast a bf16 branch joins
an fp32 residual stream, which keeps its dtype; and in training the fused form would return a view of the
product, which FSDP2 warns about for a block's output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def add_projection(x: Tensor, y: Tensor, proj: nn.Linear) -> Tensor:
    """x + proj(y) for x [..., D_out] and y [..., D_in] with the same leading shape."""
    weight = proj.weight
    training = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or weight.requires_grad)
    fusable = (
        not training
        and proj.bias is None
        and x.dtype == y.dtype == weight.dtype
        and x.is_contiguous()
        and not torch.is_autocast_enabled(x.device.type)
    )
    if not fusable:
        return x + proj(y)
    out = torch.addmm(x.view(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), weight.t())
    return out.view(x.shape)
