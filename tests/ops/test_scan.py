"""`gated_scan` (blocked, vectorised) against its token-by-token twin and an fp64 reference (SPEC §1.5)."""

import pytest
import torch

from ratlm.ops import gated_scan, gated_scan_naive

B, N = 2, 3


def scan_fp64(x, g, chunk_size=None, initial_state=None, offset=0):
    """SPEC §1.5 written out in fp64: h_t = g_t h_{t-1} + (1 - g_t) x_t, h = 0 at every chunk start."""
    x, g = x.double(), g.double()
    h = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    if initial_state is not None:
        h = initial_state.double()
    out = []
    for t in range(x.shape[1]):
        if chunk_size is not None and (offset + t) % chunk_size == 0:
            h = torch.zeros_like(h)
        h = g[:, t] * h + (1 - g[:, t]) * x[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def leaves(T: int, with_init: bool):
    x = torch.randn(B, T, N, dtype=torch.float64, requires_grad=True)
    g = torch.rand(B, T, N, dtype=torch.float64).clamp(0.02, 0.98).requires_grad_()
    h0 = torch.randn(B, N, dtype=torch.float64, requires_grad=True) if with_init else None
    return x, g, h0


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16, 64])
@pytest.mark.parametrize("T", [1, 2, 7, 16, 33, 100])
def test_matches_naive_outputs_and_grads(T, chunk_size, offset, with_init):
    x, g, h0 = leaves(T, with_init)
    inputs = [x, g] + ([h0] if with_init else [])
    weight = torch.randn(B, T, N)  # a random cotangent, so every output element matters

    out = gated_scan(x, g, chunk_size, h0, offset)
    ref = gated_scan_naive(x, g, chunk_size, h0, offset)
    assert out.dtype == ref.dtype == torch.float32
    assert out.shape == (B, T, N)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), scan_fp64(x, g, chunk_size, h0, offset), rtol=1e-5, atol=1e-6)

    # the naive twin drops initial_state from the graph when position 0 starts a chunk: zero grad
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True, materialize_grads=True)
    grads_ref = torch.autograd.grad((ref * weight).sum(), inputs, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["x", "g", "initial_state"], grads, grads_ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


def test_restart_positions_by_hand():
    """chunk_size 3, offset 5: positions 5, 6, 7, 8 -> the state restarts at position 6 (t = 1) only."""
    x = torch.tensor([[[2.0], [3.0], [5.0], [7.0]]])
    g = torch.full_like(x, 0.5)
    h0 = torch.tensor([[10.0]])
    out = gated_scan(x, g, chunk_size=3, initial_state=h0, offset=5)
    expected = torch.tensor([[[6.0], [1.5], [3.25], [5.125]]])  # 0.5*10+1, restart: 1.5, 0.75+2.5, ...
    torch.testing.assert_close(out, expected)


def test_initial_state_ignored_at_chunk_start():
    x, g, h0 = leaves(9, with_init=True)
    out = gated_scan(x, g, chunk_size=4, initial_state=h0, offset=8)
    (grad_h0,) = torch.autograd.grad(out.sum(), [h0])
    assert torch.equal(grad_h0, torch.zeros_like(h0))
    torch.testing.assert_close(out, gated_scan(x, g, chunk_size=4, offset=8))


def test_empty_sequence():
    x = torch.randn(B, 0, N)
    out = gated_scan(x, x.clone())
    assert out.shape == (B, 0, N) and out.dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_bf16_inputs_run_in_fp32(chunk_size):
    """bf16 in, fp32 out: the error against fp64 on the same (rounded) inputs is fp32-sized."""
    T = 100
    x = torch.randn(B, T, 64).bfloat16()
    g = torch.rand(B, T, 64).clamp(0.5, 0.999).bfloat16()  # long memories accumulate rounding error
    ref = scan_fp64(x, g, chunk_size)

    out = gated_scan(x, g, chunk_size)
    naive = gated_scan_naive(x, g, chunk_size)
    assert out.dtype == torch.float32
    err, err_naive = (out.double() - ref).abs().max(), (naive.double() - ref).abs().max()
    assert err <= 2 * err_naive + 1e-6, (err, err_naive)
    assert err < 1e-5  # a bf16 recurrence would be off by ~1e-2

    h, lowp = torch.zeros(B, 64, dtype=torch.bfloat16), []  # the same recurrence kept in bf16, for scale
    for t in range(T):
        if chunk_size is not None and t % chunk_size == 0:
            h = torch.zeros_like(h)
        h = g[:, t] * h + (1 - g[:, t]) * x[:, t]
        lowp.append(h)
    assert (torch.stack(lowp, 1).double() - ref).abs().max() > 100 * err


@pytest.mark.parametrize(
    "x_shape, g_shape, h0_shape, chunk_size",
    [
        ((B, 5), (B, 5), None, None),  # not 3-d
        ((B, 5, N, 1), (B, 5, N, 1), None, None),
        ((B, 5, N), (B, 4, N), None, None),  # g differs from x
        ((B, 5, N), (B, 5, N), (B, N + 1), None),  # initial_state not [B, N]
        ((B, 5, N), (B, 5, N), (B, 1, N), 4),
        ((B, 5, N), (B, 5, N), None, 0),  # chunk_size < 1
        ((B, 5, N), (B, 5, N), None, -2),
    ],
)
def test_bad_inputs_raise(x_shape, g_shape, h0_shape, chunk_size):
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    with pytest.raises(ValueError):
        gated_scan(torch.randn(x_shape), torch.rand(g_shape), chunk_size, h0)
