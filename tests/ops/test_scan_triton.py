"""The Triton gated scan (`gated_scan_triton`) against the token-by-token twin (CPU: Triton interpreter)."""

import pytest
import torch

from ratlm.ops import gated_scan_naive
from ratlm.ops.scan import kernel


def leaves(B, T, N, with_init, device, dtype=torch.float32):
    x = torch.randn(B, T, N, device=device).to(dtype).requires_grad_()
    g = torch.rand(B, T, N, device=device).clamp(0.02, 0.98).requires_grad_()
    h0 = torch.randn(B, N, device=device, requires_grad=True) if with_init else None
    return x, g, h0


@pytest.mark.parametrize(
    "T, chunk_size, offset, with_init",
    [(1, None, 0, False), (37, None, 0, True), (40, 3, 5, True), (35, 16, 0, False), (20, 4, 8, True)],
)
def test_matches_naive_outputs_and_grads(T, chunk_size, offset, with_init, device, poison):
    poison(kernel)
    x, g, h0 = leaves(2, T, 19, with_init, device)  # 19 channels: a partial channel block
    inputs = [x, g] + ([h0] if with_init else [])
    out = kernel.gated_scan_triton(x, g, chunk_size, h0, offset)
    ref = gated_scan_naive(x, g, chunk_size, h0, offset)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * weight).sum(), inputs, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["x", "g", "initial_state"], grads, grads_ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_strided_views_and_bf16(device, poison):
    """Inputs as the RNN mixer passes them: bf16 views of one projection, gates fp32."""
    poison(kernel)
    proj = torch.randn(2, 21, 3 * 16, device=device).bfloat16().requires_grad_()
    x = proj[..., 16:32]
    g = torch.rand(2, 21, 16, device=device).clamp(0.05, 0.95).requires_grad_()
    out = kernel.gated_scan_triton(x, g)
    ref = gated_scan_naive(x, g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    (dp, dg), (dp_ref, dg_ref) = (torch.autograd.grad((o * weight).sum(), [proj, g]) for o in (out, ref))
    assert dp.dtype == torch.bfloat16 and dg.dtype == torch.float32
    torch.testing.assert_close(dp, dp_ref)  # bf16 rounding of the same fp32 values
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_inputs():
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtypes"):
        kernel.gated_scan_triton(x, x.clone())
    with pytest.raises(ValueError):
        kernel.gated_scan_triton(torch.randn(1, 4), torch.rand(1, 4))
