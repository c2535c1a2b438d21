"""RAT's two gates in plain PyTorch, for the paths that do not fuse them into kernels (SPEC §1.3, §1.8).

The forget gate is sigmoid(logits + gate_bias) in fp32; the output gate multiplies the mixing core's result
(already in its dtype) by sigmoid(z), computed in fp32 and rounded to that dtype. The GPU merge kernel
rounds once, after the gate, so in bf16 it is the more exact of the two.
"""

from __future__ import annotations

import torch
from torch import Tensor


def forget_gate(g: Tensor, gate_bias: Tensor | None) -> Tensor:
    """The gates from `rat_mix`'s g: g itself without gate_bias, else sigmoid(g + gate_bias) in fp32."""
    if gate_bias is None:
        return g
    return torch.sigmoid(g.float() + gate_bias.float().view(g.shape[-2:]))


def output_gate(y: Tensor, z: Tensor | None) -> Tensor:
    """y times sigmoid(z) (y unchanged without z), in y's dtype."""
    if z is None:
        return y
    return (torch.sigmoid(z.float()) * y.float()).to(y.dtype)
