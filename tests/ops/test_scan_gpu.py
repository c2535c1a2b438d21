"""GPU-only checks of the Triton gated scan and of the sliding-window attention fast path."""

import pytest
import torch

from ratlm.ops import attention, gated_scan
from ratlm.ops.attention import attention_sdpa
from ratlm.ops.backend import use_backend
from ratlm.ops.scan.chunked import gated_scan_chunked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("chunk_size, offset, with_init", [(None, 0, False), (None, 3, True), (16, 5, True)])
def test_scan_matches_pytorch(chunk_size, offset, with_init):
    B, T, N = 2, 5000, 300
    x = torch.randn(B, T, N, device="cuda").bfloat16().requires_grad_()
    g = torch.sigmoid(torch.randn(B, T, N, device="cuda") + 2).requires_grad_()
    h0 = torch.randn(B, N, device="cuda", requires_grad=True) if with_init else None
    leaves = [x, g] + ([h0] if with_init else [])
    out = gated_scan(x, g, chunk_size, h0, offset)
    ref = gated_scan_chunked(x, g, chunk_size, h0, offset)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T, window", [(700, 100), (1024, 1024), (3000, 0)])
def test_sliding_window_flex_matches_sdpa(T, window):
    q, k, v = (torch.randn(2, 4, T, 64, device="cuda").bfloat16().requires_grad_() for _ in range(3))
    out = attention(q, k, v, window=window)
    with use_backend("torch"):
        ref = attention(q, k, v, window=window)
    ref64 = attention_sdpa(*(t.double() for t in (q, k, v)), window=window)
    err, err_ref = (out.double() - ref64).abs().max(), (ref.double() - ref64).abs().max()
    assert err <= 2 * err_ref + 1e-6, (float(err), float(err_ref))
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v])
    grads_ref = torch.autograd.grad((ref * weight).sum(), [q, k, v])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
