"""GPU-only checks of RAT's GPU path: every attention engine against the PyTorch path at realistic head
widths, bf16 with the tolerance rule of STYLE.md and fp32 tightly; also the dispatch of `rat_mix`."""

import pytest
import torch

from ratlm.ops import backend, rat_mix
from ratlm.ops.rat import gpu
from ratlm.ops.rat.masked import rat_mix_masked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

H = 4


def inputs(B, T, G, d, dtype):
    q, k = (torch.randn(B, T, G, d, device="cuda").to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, d, device="cuda").to(dtype)
    g = torch.sigmoid(torch.randn(B, T, H, d, device="cuda") + 1.5)  # fp32 gates, as the mixer's
    return [t.requires_grad_() for t in (q, k, v, g)]


def errors(out, leaves, ref, ref_leaves, weight):
    """Max abs error of the output and of every gradient against the fp64 reference."""
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), ref_leaves, retain_graph=True)
    return [
        float((a.detach().double() - b).abs().max())
        for a, b in zip([out, *grads], [ref.detach(), *grads_ref], strict=True)
    ]


@pytest.mark.parametrize("engine", ["cudnn", "triton", "flex"])
@pytest.mark.parametrize(
    "L, T, G, d", [(16, 1000, 2, 128), (1, 300, 2, 64), (64, 777, 1, 128), (5, 333, 4, 64)]
)
def test_bf16_within_twice_plain_pytorch(engine, L, T, G, d):
    leaves = inputs(2, T, G, d, torch.bfloat16)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = rat_mix_masked(*ref_leaves, L)
    weight = torch.randn_like(ref)
    errs = errors(gpu.rat_mix_triton(*leaves, L, engine=engine), leaves, ref, ref_leaves, weight)
    errs_plain = errors(rat_mix_masked(*leaves, L), leaves, ref, ref_leaves, weight)
    for name, e, e_plain in zip(["y", "dq", "dk", "dv", "dg"], errs, errs_plain, strict=True):
        assert e <= 2 * e_plain + 1e-6, (name, e, e_plain)


@pytest.mark.parametrize("engine", ["cudnn", "triton", "flex"])
@pytest.mark.parametrize("L, T, G, d", [(16, 1000, 2, 128), (1, 300, 2, 64), (7, 333, 4, 64)])
def test_fused_gates_bf16_within_twice_plain_pytorch(engine, L, T, G, d):
    """The mixer's call: forget-gate logits + bias (fused into the scan) and the output gate z (fused into
    the merge on cudnn); the output and the gradients of all six inputs."""
    q, k, v, _ = inputs(2, T, G, d, torch.bfloat16)
    logits = (2 * torch.randn(2, T, H, d, device="cuda")).bfloat16().requires_grad_()
    bias = torch.rand(H * d, device="cuda").mul(15).log1p().requires_grad_()
    z = torch.randn(2, T, H, d, device="cuda").bfloat16().requires_grad_()
    leaves = [q, k, v, logits, bias, z]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    def call(fn, xs, **kwargs):
        return fn(*xs[:4], L, gate_bias=xs[4], out_gate=xs[5], **kwargs)

    ref = call(rat_mix_masked, ref_leaves)
    weight = torch.randn_like(ref)
    errs = errors(call(gpu.rat_mix_triton, leaves, engine=engine), leaves, ref, ref_leaves, weight)
    errs_plain = errors(call(rat_mix_masked, leaves), leaves, ref, ref_leaves, weight)
    names = ["y", "dq", "dk", "dv", "dlogits", "dbias", "dz"]
    for name, e, e_plain in zip(names, errs, errs_plain, strict=True):
        assert e <= 2 * e_plain + 1e-6, (name, e, e_plain)


@pytest.mark.parametrize("engine", ["triton", "flex"])
@pytest.mark.parametrize("L, T, position", [(16, 500, "rope"), (3, 100, "nope")])
def test_fp32_matches_pytorch(engine, L, T, position):
    leaves = inputs(2, T, 2, 64, torch.float32)
    out = gpu.rat_mix_triton(*leaves, L, position, engine=engine)
    ref = rat_mix_masked(*leaves, L, position)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for name, a, b in zip("qkvg", grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"grad {n}: {m}")


def test_rat_mix_dispatches_to_the_gpu_and_the_switch_forces_pytorch(monkeypatch):
    calls = []
    original = gpu.rat_mix_triton

    def spy(*args, **kwargs):
        calls.append(kwargs.get("engine"))
        return original(*args, **kwargs)

    monkeypatch.setattr(gpu, "rat_mix_triton", spy)
    leaves = [t.detach() for t in inputs(1, 64, 2, 64, torch.bfloat16)]
    fast = rat_mix(*leaves, 16)
    assert calls == ["auto"]
    with backend.use_backend("torch"):
        slow = rat_mix(*leaves, 16)
    assert calls == ["auto"]
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("engine", ["cudnn", "triton"])
@pytest.mark.parametrize("L, T, G, d", [(16, 1000, 2, 128), (16, 4096, 2, 128), (7, 333, 4, 64)])
def test_inference_bf16_within_twice_plain_pytorch_and_fills_the_cache(engine, L, T, G, d, monkeypatch):
    """Without gradients (cudnn: the scan writes the own scores, the merge reads them) the mixer's call is
    within twice plain PyTorch's error, and a cached prefill through it leaves the PyTorch path's cache."""
    from ratlm.cache import RATState
    from ratlm.ops.rat import fused
    from ratlm.ops.rat.cached import prefill_fresh, rat_mix_cached

    own = []
    real = fused.merge_fwd
    monkeypatch.setattr(fused, "merge_fwd", lambda *a, **kw: own.append(kw["own"]) or real(*a, **kw))

    torch.manual_seed(T)
    q, k, v, _ = (t.detach() for t in inputs(2, T, G, d, torch.bfloat16))
    logits = (2 * torch.randn(2, T, H, d, device="cuda")).bfloat16()
    bias = torch.rand(H * d, device="cuda").mul(15).log1p()
    z = torch.randn(2, T, H, d, device="cuda").bfloat16()
    xs = [q, k, v, logits, bias, z]
    with torch.no_grad():
        ref = rat_mix_masked(*[t.double() for t in xs[:4]], L, gate_bias=bias.double(), out_gate=z.double())
        ours = gpu.rat_mix_triton(*xs[:4], L, gate_bias=bias, out_gate=z, engine=engine)
        plain = rat_mix_masked(*xs[:4], L, gate_bias=bias, out_gate=z)
    assert gpu.last_engine == engine
    if engine == "cudnn":  # the chunks-as-heads path took the own scores (the flash engine merges itself)
        assert len(own) == 1 and own[0] is not None
    else:
        assert own == []
    e, e_plain = ((y.double() - ref).abs().max().item() for y in (ours, plain))
    assert e <= 2 * e_plain + 1e-6, (e, e_plain)

    def empty():
        C = T // L + 1
        return RATState(
            *(torch.zeros(2, H, *s, device="cuda", dtype=torch.bfloat16) for s in ((C, d), (C, d))),
            *(torch.zeros(2, H, d, device="cuda") for _ in range(2)),
        )

    fast, slow = empty(), empty()
    with torch.no_grad():
        y_fast = prefill_fresh(*xs[:4], fast, L, gate_bias=bias, out_gate=z, engine=engine)
        with backend.use_backend("torch"):
            y_slow = rat_mix_cached(*xs[:4], slow, L, gate_bias=bias, out_gate=z)
    torch.testing.assert_close(y_fast, ours, rtol=0, atol=0)  # the same kernels, the same bits
    for name in ("keys", "values"):  # bf16 summaries: keys rounded once by the scan, twice by PyTorch
        a, b = getattr(fast, name).float(), getattr(slow, name).float()
        assert (a - b).abs().max() <= 2**-7 * b.abs().max(), name
    for name in ("k_run", "v_run"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-5)
    assert fast.seen == slow.seen == T
    assert (y_slow.double() - ref).abs().max().item() <= 2 * e_plain + 1e-6
