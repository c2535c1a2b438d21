"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype.

`rms_norm` takes a Triton kernel on CUDA tensors (one read of x and one write of y forward; one read of x and
dy and one write of dx backward, the weight's gradient summed from per-program partials), and the PyTorch
path `rms_norm_naive` elsewhere, under `RATLM_BACKEND=torch` and inside torch.compile (which fuses the plain
expression itself). Both return `out_dtype` (x's dtype by default): a model under bf16 autocast asks for
bf16 so the fp32 result is rounded once, in the kernel, instead of by a separate cast before the next matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import fast_path_wanted


def rms_norm_naive(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """The PyTorch path: x [..., D] (any float dtype), weight [D]; fp32 arithmetic, result in out_dtype."""
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(out_dtype or x.dtype)


def _triton_wanted(x: Tensor, weight: Tensor) -> bool:
    """Checks weight's shape ([D], ValueError otherwise); whether the Triton kernels take this call."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"weight must be [D] = [{x.shape[-1]}], got {tuple(weight.shape)}")
    return not torch.compiler.is_compiling() and fast_path_wanted(x, weight) and x.numel() > 0


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm over the last dimension of x [..., D] with weight [D], returned in out_dtype (default x's)."""
    if _triton_wanted(x, weight):
        from .norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, out_dtype)
    return rms_norm_naive(x, weight, eps, out_dtype)


def rms_norm_pair(
    x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x, ...), x) for a block x + f(norm(x)): use the second tensor for the residual. When x
    needs a gradient on the Triton path, x's two gradients are then added inside the norm's backward
    kernel; otherwise the second tensor is x itself."""
    if _triton_wanted(x, weight) and torch.is_grad_enabled() and x.requires_grad:
        from .norm_triton import rms_norm_pair_triton

        return rms_norm_pair_triton(x, weight, eps, out_dtype)
    return rms_norm(x, weight, eps, out_dtype), x
