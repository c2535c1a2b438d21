"""The residual connection of every block: x + proj(y), added by the matrix product itself where it can."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.backend import autocast_dtype, fast_path_wanted
from ..ops.linear import addmm_into, linear
from .norm import bypassable, norm_pair

_EPILOGUE_OK: dict[tuple[str, torch.dtype], bool] = {}
_INPLACE_EPILOGUE_OK: dict[tuple[str, torch.dtype], bool] = {}


def _probed(verdicts: dict, device: torch.device, half: torch.dtype, trial) -> bool:
    """trial(device, half) -> bool, run once per device and dtype and remembered in `verdicts`: False when
    torch raises. Not while a CUDA graph is captured (a trial reads its result back), and an out-of-memory
    error is no verdict: both answer False for now and try again next time."""
    key = (str(device), half)
    if key not in verdicts:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            verdicts[key] = trial(device, half)
        except torch.cuda.OutOfMemoryError:
            return False
        except (RuntimeError, TypeError, NotImplementedError):
            verdicts[key] = False
    return verdicts[key]


def _epilogue_trial(device: torch.device, half: torch.dtype) -> bool:
    a = torch.ones(2, 2, device=device, dtype=half)
    x = torch.full((2, 2), 1 + 2**-20, device=device)  # fp32, not representable in half
    out = torch.addmm(x, a, a, out_dtype=torch.float32)
    return out.dtype == torch.float32 and bool((out == 3 + 2**-20).all())


def _inplace_epilogue_trial(device: torch.device, half: torch.dtype) -> bool:
    a = torch.ones(2, 2, device=device, dtype=half)
    x = torch.full((2, 2), 1 + 2**-20, device=device)
    ptr = x.data_ptr()
    out = torch.addmm(x, a, a, out_dtype=torch.float32, out=x)
    return out.data_ptr() == ptr == x.data_ptr() and bool((x == 3 + 2**-20).all())


def _epilogue_supported(device: torch.device, half: torch.dtype) -> bool:
    """Whether torch multiplies `half` matrices into an fp32 output with an fp32 addend here, keeping the
    addend in fp32 (torch.addmm's out_dtype: CUDA only, recent torch)."""
    return _probed(_EPILOGUE_OK, device, half, _epilogue_trial)


def _inplace_epilogue_supported(device: torch.device, half: torch.dtype) -> bool:
    """Whether torch.addmm with out_dtype fp32 also accumulates into its fp32 addend in place (out=addend)
    here, without copying the addend first."""
    return _epilogue_supported(device, half) and _probed(
        _INPLACE_EPILOGUE_OK, device, half, _inplace_epilogue_trial
    )


class _AddProjection(torch.autograd.Function):  # first-order only: double backward raises
    """x + y @ w.T for an fp32 x [N, D], y [N, D_in] in a half dtype and w [D, D_in] (cast to y's dtype): one
    GEMM that adds x in its epilogue and writes fp32, where autocast would write the product in y's dtype and
    add it to x in a second pass. The product is not rounded to the half dtype before the add (the sum is
    rounded once, to fp32); the backward is autocast's linear's followed by the add's."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        wc = w.to(y.dtype)
        ctx.save_for_backward(y, wc)
        ctx.w_dtype = w.dtype
        return torch.addmm(x, y, wc.t(), out_dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        y, wc = ctx.saved_tensors
        d = dout.to(y.dtype)
        dy = d @ wc if ctx.needs_input_grad[1] else None
        dw = (d.t() @ y).to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
        return dout, dy, dw


def plain_linear(proj: nn.Module) -> bool:
    """Whether proj(h) is just h @ proj.weight.T: a plain bias-free nn.Linear with no hooks (`bypassable`)."""
    return bypassable(proj, nn.Linear) and proj.bias is None


def project(proj: nn.Module, h: Tensor) -> Tensor:
    """proj(h); for a `plain_linear`, through `ratlm.ops.linear`, which takes the Triton one-row product in
    batch-1 decoding."""
    # a plain module's parameter: the kernel that computed h did not write it (`ratlm.ops.pdl`)
    return linear(h, proj.weight, weight_ready=True) if plain_linear(proj) else proj(h)


def norm_project(norm: nn.Module, proj: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(proj(norm(x)), x's alias for the residual), the input half of a block x + f(proj(norm(x))): see
    `norm_pair` (the alias carries the residual's gradient) and `project`."""
    h, x = norm_pair(norm, x)
    return project(proj, h), x


def add_projection(x: Tensor, y: Tensor, proj: nn.Linear, inplace: bool = False) -> Tensor:
    """x + proj(y) for x [..., D] and y [..., D_in] with the same leading shape.

    Both fused paths below need a `plain_linear` projection; anything else (a wrapper such as a LoRA layer
    computes more than x @ weight.T) is called: x + proj(y).

    Under half-precision autocast on CUDA with an fp32 residual stream x (mixed-precision training and
    prefill), one GEMM adds x in its epilogue (`_AddProjection`): 0.4 ms less per layer at 262,144 tokens
    and D 2048 on an H200 (torch copies x into the output first). Not under torch.compile (which fuses the
    add itself), with RATLM_BACKEND=torch, or where torch lacks addmm's out_dtype.

    With inplace=True (cached inference: LanguageModel.forward passes it with a cache and without autograd)
    the product is accumulated into x's own memory (one GEMM with beta = 1) and x is returned: one kernel
    instead of a GEMM and an add, which matters when a decode step is a few hundred small kernels (for one
    row, the Triton product of `ratlm.ops.linear.addmm_into`). The result is rounded once instead of
    twice. Not with autograd on, x not contiguous, or dtypes other than one shared dtype or the epilogue
    case above (fp32 x under half autocast: the same GEMM, written into x instead of a copy of it, where
    torch allows out=x with out_dtype).
    """
    if not plain_linear(proj):  # only x @ weight.T can be fused
        return x + proj(y)
    half = autocast_dtype(x.device.type)
    same_dtype = x.dtype == y.dtype == proj.weight.dtype
    into_x = inplace and not torch.is_grad_enabled() and x.is_contiguous()
    if into_x and half is None and same_dtype:
        return addmm_into(x, y, proj.weight, weight_ready=True)
    if (
        half in (torch.bfloat16, torch.float16)
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and fast_path_wanted(x, y)
        and _epilogue_supported(x.device, half)
    ):
        y2 = y.reshape(-1, y.shape[-1]).to(half)
        if into_x and _inplace_epilogue_supported(x.device, half):
            x2 = x.view(-1, x.shape[-1])
            torch.addmm(x2, y2, proj.weight.to(half).t(), out_dtype=torch.float32, out=x2)
            return x
        return _AddProjection.apply(x.reshape(-1, x.shape[-1]), y2, proj.weight).view(x.shape)
    return x + proj(y)
