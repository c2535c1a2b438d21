"""The RoPE kernel against the PyTorch path: outputs and gradients, strided inputs, odd lengths.

Runs in Triton's interpreter without CUDA (tests/ops/conftest.py sets TRITON_INTERPRET)."""

import pytest
import torch

from ratlm.ops.rope import apply_rope_torch, rope_cos_sin
from ratlm.ops.rope_triton import apply_rope_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("T, d, start", [(1, 8, 0), (37, 16, 5), (70, 128, 1000), (33, 20, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_pytorch_outputs_and_gradients(T, d, start, dtype):
    B, H = 2, 3
    # a transposed view of a [B, T, H, d] projection, as in the attention mixer
    base = torch.randn(B, T, H, d, device=DEVICE).to(dtype)
    x = base.transpose(1, 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    cos, sin = rope_cos_sin(torch.arange(start, start + T, device=DEVICE), d)
    y = apply_rope_triton(x, cos, sin)
    y_ref = apply_rope_torch(x_ref, cos, sin)
    assert y.is_contiguous() and y.dtype == dtype
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    w = torch.randn_like(y_ref)
    (g,) = torch.autograd.grad((y.float() * w).sum(), x)
    (g_ref,) = torch.autograd.grad((y_ref.float() * w).sum(), x_ref)
    torch.testing.assert_close(g, g_ref, **tol)


def test_rotation_preserves_norms_and_inverts():
    x = torch.randn(1, 2, 9, 32, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(9, device=DEVICE), 32)
    y = apply_rope_triton(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    back = apply_rope_triton(y, cos, -sin)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
