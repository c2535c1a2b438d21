"""RMSNorm's Triton kernels against the PyTorch path: outputs and both gradients, dtypes, strides, odd widths.

Runs in Triton's interpreter without CUDA (tests/ops/conftest.py sets TRITON_INTERPRET)."""

import pytest
import torch

from ratlm.mixers import RMSNorm
from ratlm.ops import norm_triton
from ratlm.ops.norm import rms_norm, rms_norm_naive
from ratlm.ops.norm_triton import rms_norm_triton


def _fp64_error(out, x, w, eps):
    exact = rms_norm_naive(x.double(), w.double(), eps)
    return (out.double() - exact).abs().max().item()


def _slack(x, w, eps):
    """A few fp32 rounding steps of the largest output: the PyTorch path's own error may be zero."""
    return 1e-6 * (1 + rms_norm_naive(x.double(), w.double(), eps).abs().max().item())


@pytest.mark.parametrize("shape", [(1, 8), (3, 37, 20), (2, 5, 96), (70, 130)])
@pytest.mark.parametrize(
    "dtype, out_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)]
)
def test_matches_pytorch_outputs_and_gradients(shape, dtype, out_dtype, device, poison):
    poison(norm_triton)
    eps = 1e-6
    x = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    w = (1 + torch.randn(shape[-1], device=device)).requires_grad_()
    y = rms_norm_triton(x, w, eps, out_dtype)
    y_ref = rms_norm_naive(x, w, eps, out_dtype)
    assert y.shape == x.shape and y.dtype == (out_dtype or dtype)
    # STYLE.md: the kernel's error against fp64 at most about twice the PyTorch path's
    assert _fp64_error(y, x, w, eps) <= 2 * _fp64_error(y_ref, x, w, eps) + _slack(x, w, eps)
    dy = torch.randn(shape, device=device).to(y.dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    exact = torch.autograd.grad(
        rms_norm_naive(x.double(), w.double(), eps), (x, w), dy.double(), allow_unused=False
    )
    for got, ref, ex in zip((dx, dw), (dx_ref, dw_ref), exact, strict=True):
        err = (got.double() - ex.double()).abs().max().item()
        err_ref = (ref.double() - ex.double()).abs().max().item()
        assert err <= 2 * err_ref + 1e-5 * ex.abs().max().item(), (err, err_ref)


def test_strided_input_and_zero_rows(device):
    base = torch.randn(4, 6, 64, device=device)
    base[1] = 0  # rows of zeros: rstd = 1/sqrt(eps), output zero, finite gradients
    x = base.transpose(0, 1).requires_grad_()  # not contiguous; rows still unit-stride
    w = torch.rand(64, device=device).requires_grad_()
    y = rms_norm_triton(x, w, 1e-6)
    torch.testing.assert_close(y, rms_norm_naive(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    dx_ref, dw_ref = torch.autograd.grad(rms_norm_naive(x, w, 1e-6).sum(), (x, w))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


def test_module_rounds_once_to_the_autocast_dtype():
    norm = RMSNorm(16)
    x = torch.randn(3, 16)
    assert norm(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rms_norm_naive(x, norm.weight, 1e-6).bfloat16(), rtol=0, atol=0)


def test_module_runs_on_the_meta_device():
    """Shape-only passes (parameter counts, FLOP estimates) build models on the meta device."""
    y = RMSNorm(8).to("meta")(torch.empty(2, 3, 8, device="meta"))
    assert y.shape == (2, 3, 8) and y.is_meta


@pytest.mark.parametrize("use", ["both", "norm only", "residual only"])
def test_pair_adds_the_residual_gradient_in_the_kernel(use, device, poison):
    """(norm(x), x) for a block x + f(norm(x)): x's gradient is the norm's plus the residual's, added by the
    backward kernel, equal to autograd's sum on the PyTorch path; either output may go unused."""
    poison(norm_triton)
    x = (3 * torch.randn(3, 7, 40, device=device)).requires_grad_()
    w = (1 + torch.randn(40, device=device)).requires_grad_()
    f = torch.randn(40, 40, device=device)

    def block(h, res):
        parts = {"both": [res, h @ f], "norm only": [h @ f], "residual only": [2 * res]}[use]
        return sum(parts)

    h, res = norm_triton.rms_norm_pair_triton(x, w, 1e-6, torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(res, x)
    out = block(h.float(), res)
    ref = block(rms_norm_naive(x, w, 1e-6, torch.bfloat16).float(), x)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w), dout, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, (x, w), dout, allow_unused=True)
    for got, want in zip(grads, grads_ref, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_norm_pair_calls_the_module_when_hooked_and_returns_x_without_autograd():
    from ratlm.mixers.norm import norm_pair

    norm = RMSNorm(16)
    x = torch.randn(2, 16)
    with torch.no_grad():
        h, res = norm_pair(norm, x)
    assert res is x and torch.equal(h, norm(x))
    seen = []
    handle = norm.register_forward_hook(lambda m, args, out: seen.append(out))
    h, res = norm_pair(norm, x.requires_grad_())
    handle.remove()
    assert len(seen) == 1 and seen[0] is h and res is x
    h, res = norm_pair(torch.nn.LayerNorm(16), x)  # any other norm is called
    assert res is x and h.shape == x.shape


def test_pair_refuses_double_backward(device):
    """The kernels' backward is first-order: asking for a second derivative raises, never a wrong one."""
    x = torch.randn(3, 32, device=device, requires_grad=True)
    w = torch.ones(32, device=device, requires_grad=True)
    h, res = norm_triton.rms_norm_pair_triton(x, w, 1e-6)
    (gx,) = torch.autograd.grad((h * h).sum() + (res * res).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(gx.sum(), x)
