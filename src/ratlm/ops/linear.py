"""x @ weight.T for inference, taking the Triton one-row product (`gemv_triton`) where it is faster.

A batch-1 decode step is about a hundred products of one row by a weight matrix. On CUDA, without autograd,
for one row of x in fp16 or bf16 with the weight's dtype (autocast off, or to that same dtype), `linear` and
`addmm_into` use the Triton kernel (3-31% less time per product than cuBLAS on an H200, see `gemv_triton`);
anything else goes to torch (F.linear, addmm_). Not inside torch.compile, nor with RATLM_BACKEND=torch.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from .backend import autocast_dtype, fast_path_wanted

_HALF = (torch.float16, torch.bfloat16)


def gemv_wanted(x: Tensor, weight: Tensor) -> bool:
    """Whether the Triton one-row product takes x [..., K] @ weight.T (weight [N, K])."""
    return (
        not torch.compiler.is_compiling()
        and weight.dim() == 2
        and 0 < x.shape[-1] == weight.shape[1]
        and x.numel() == x.shape[-1]  # one row
        and x.dtype == weight.dtype
        and x.dtype in _HALF
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and autocast_dtype(x.device.type) in (None, x.dtype)
        and fast_path_wanted(x, weight)
        and x.stride(-1) == 1
        and weight.stride(1) == 1
        and not any(_transformed(t) for t in (x, weight))
    )


def _transformed(t: Tensor) -> bool:
    """Whether t carries a forward-mode tangent or is wrapped by torch.func (vmap, jvp, grad): the kernel
    would drop the tangent or cannot read the storage; torch's path handles both."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return fwAD.unpack_dual(t).tangent is not None or (wrapped is not None and wrapped(t))


def linear(x: Tensor, weight: Tensor, weight_ready: bool = False) -> Tensor:
    """F.linear(x, weight) without a bias: [..., N] for x [..., K] and weight [N, K]. weight_ready: the
    kernel just before does not write the weight (see `gemv_triton`)."""
    if gemv_wanted(x, weight):
        from .gemv_triton import gemv_triton

        y = gemv_triton(x.reshape(1, -1), weight, weight_ready=weight_ready)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def addmm_into(out: Tensor, y: Tensor, weight: Tensor, weight_ready: bool = False) -> Tensor:
    """out += y @ weight.T in out's memory (out [..., N] contiguous, y [..., K], weight [N, K]); returns out.
    The sum is rounded once to out's dtype. weight_ready: as for `linear`."""
    one_row = out.numel() == out.shape[-1] == weight.shape[0] and out.stride(-1) == 1
    if one_row and out.dtype == y.dtype and gemv_wanted(y, weight):
        from .gemv_triton import gemv_triton

        gemv_triton(y.reshape(1, -1), weight, out.view(1, -1), accumulate=True, weight_ready=weight_ready)
    else:
        out.view(-1, out.shape[-1]).addmm_(y.reshape(-1, y.shape[-1]), weight.t())
    return out
