"""split_packed: a projection's output split into pieces whose gradients the RAT kernels write into one
packed tensor, so the backward needs no concatenation; the fallback concatenates like torch's split."""

import pytest
import torch

from ratlm.ops import packed
from ratlm.ops.packed import packed_layout
from ratlm.ops.rat import gpu
from ratlm.ops.rat.masked import rat_mix_masked

SIZES = [12, 12, 12, 6, 6]  # like RAT's z, v, g, q, k: 2 heads of 6 channels, one key group


def split_packed(u, sizes):
    """`ops.packed.split_packed`'s GPU-path split, which it takes only for CUDA tensors."""
    return packed._Split.apply(u, sizes)


def test_split_packed_is_torch_split_off_the_gpu_path():
    u = torch.randn(2, 5, sum(SIZES), requires_grad=True)
    assert all(t.grad_fn.name().startswith("SplitWithSizes") for t in packed.split_packed(u, SIZES))


def test_split_packed_matches_split_forward_and_backward():
    """Unpacked gradients (new tensors, one piece unused) take the concatenating fallback."""
    u = torch.randn(2, 5, sum(SIZES), requires_grad=True)
    pieces = split_packed(u, SIZES)
    for a, b in zip(pieces, u.split(SIZES, dim=-1), strict=True):
        assert torch.equal(a, b)
    weights = [torch.randn_like(p) for p in pieces]
    loss = sum((p * w).sum() for p, w in zip(pieces[:-1], weights, strict=False))  # k unused
    (grad,) = torch.autograd.grad(loss, u)
    expected = torch.cat([*weights[:-1], torch.zeros_like(weights[-1])], dim=-1)
    assert torch.equal(grad, expected)


def test_packed_layout_accepts_a_whole_split_and_refuses_anything_else():
    u = torch.randn(2, 5, sum(SIZES))
    pieces = [t.view(2, 5, -1, 6) for t in u.split(SIZES, dim=-1)]
    shape, stride, dtype, views = packed_layout(*pieces)
    assert shape == (2, 5, 48) and stride == u.stride() and dtype == u.dtype
    assert [v[2] for v in views] == [0, 12, 24, 36, 42]
    assert packed_layout(*pieces[:-1]) is None  # not all of u
    assert packed_layout(*pieces[:-1], torch.randn(2, 5, 1, 6)) is None  # another tensor
    assert packed_layout(pieces[0], pieces[0], *pieces[2:]) is None  # overlapping, a gap
    t = u.t() if u.dim() == 2 else u.transpose(0, 1)
    assert packed_layout(*t.split(SIZES, dim=-1)) is None  # not contiguous


# short-chunk and prefix-scan kernels, partial chunks, batch and groups, RoPE or none
@pytest.mark.parametrize(
    "B, G, L, T, position",
    [(1, 1, 4, 24, "rope"), (2, 2, 4, 21, "rope"), (1, 1, 32, 70, "rope"), (2, 1, 4, 13, "nope")],
)
def test_rat_core_writes_the_gradients_into_one_packed_tensor(
    B, G, L, T, position, device, monkeypatch, poison
):
    """The chunks-as-heads core, given q, k, v, logits and z as views of one projection, writes their
    gradients into one tensor that split_packed hands back as is; the gradient equals the reference's."""
    from ratlm.ops.rat import fused, merge, scan_kernels

    poison(fused, merge, scan_kernels, packed)
    H, d = 4, 8
    D = H * d
    sizes = [D, D, D, G * d, G * d]
    u = torch.randn(B, T, sum(sizes), device=device, requires_grad=True)
    bias = torch.rand(D, device=device).log1p().requires_grad_()
    dy = torch.randn(B, T, H, d, device=device)
    whole = []
    real = packed._as_one
    monkeypatch.setattr(packed, "_as_one", lambda *a: whole.append(real(*a)) or whole[-1])

    def run(split, fn, **kw):
        z, v, g, q, k = (t.view(B, T, -1, d) for t in split(u, sizes))
        y = fn(q, k, v, g, L, position, gate_bias=bias, out_gate=z, **kw)
        return torch.autograd.grad(y, (u, bias), dy)

    got = run(split_packed, gpu.rat_mix_triton, engine="torch")
    assert len(whole) == 1 and whole[0] is not None  # no concatenation
    ref = run(lambda t, s: t.split(s, dim=-1), rat_mix_masked)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scan_backward_refuses_outputs_it_cannot_write(device):
    """rat_scan_bwd writes dv and dg with one set of strides, every output with a unit last stride: other
    `out` tensors are refused before any kernel runs."""
    from ratlm.ops.rat.scan_kernels import rat_scan_bwd

    B, T, H, G, d = 1, 8, 2, 1, 8
    k = torch.randn(B, T, G, d, device=device)
    v, g = torch.randn(B, T, H, d, device=device), torch.rand(B, T, H, d, device=device)
    grads = [torch.randn(B, T, H, d, device=device) for _ in range(3)]
    dq, dk = torch.empty(B, T, G, d, device=device), torch.empty(B, T, G, d, device=device)
    dv = torch.empty(B, T, H, d, device=device)
    args = (k, v, g, 4, False, None, None, grads[0], "bthd", None, "heads", grads[1], grads[2], "bthd")
    rest = (None, None, "bhcd", 1, torch.float32)
    for dg in (
        torch.empty(B, T, 2 * H, d, device=device)[:, :, :H],
        torch.empty(B, T, H, 2 * d, device=device)[..., ::2],
    ):
        with pytest.raises(
            ValueError, match="out's dv and dg need equal strides, and all a unit last stride"
        ):
            rat_scan_bwd(*args, *rest, None, (dq, dk, dv, dg))
