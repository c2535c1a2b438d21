"""The Triton one-row product (`gemv_triton`) and its dispatch (`ratlm.ops.linear`).

Runs in Triton's interpreter without CUDA (tests/ops/conftest.py sets TRITON_INTERPRET)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ratlm import LanguageModel
from ratlm.config import ModelConfig
from ratlm.mixers.residual import project
from ratlm.ops import gemv_triton as gemv_module
from ratlm.ops import linear as linear_module
from ratlm.ops.gemv_triton import gemv_triton


def _exact(x, w, base=None):
    return x.double() @ w.double().t() + (0 if base is None else base.double())


def _fp64_error(out, x, w, base=None):
    return (out.double() - _exact(x, w, base)).abs().max().item()


def _rounded_once(out, x, w, base=None) -> bool:
    """Every element within half a unit in the last place of its dtype (plus an fp32 sum's slack) of the
    exact result: the sum was kept in fp32 and rounded once. (For bf16 and fp16 outputs, comparing largest
    errors with torch's own path is noise: both are at most half a unit.)"""
    exact = _exact(x, w, base)
    ulp = torch.finfo(out.dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))))
    slack = 1e-6 * (x.double().abs() @ w.double().abs().t()).max() + 1e-30
    return bool(((out.double() - exact).abs() <= 0.5 * ulp + slack).all())


@pytest.mark.parametrize(
    "M, N, K, tile",
    [
        (1, 37, 100, None),
        (1, 64, 2048, None),
        (3, 20, 50, (4, 16, 4)),
        (2, 33, 64, (8, 32, 4)),
        (1, 8, 24, (2, 8, 1)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_fp64_like_torch(M, N, K, tile, dtype, device, poison):
    poison(gemv_module)
    x = torch.randn(M, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device).to(dtype)
    out = gemv_triton(x, w, tile=tile)
    ref = F.linear(x, w)
    assert out.shape == (M, N) and out.dtype == dtype
    if dtype == torch.float32:  # STYLE.md: error against fp64 at most about twice the PyTorch path's
        assert _fp64_error(out, x, w) <= 2 * _fp64_error(ref, x, w) + 1e-6 * ref.abs().max().item()
    else:
        assert _rounded_once(out, x, w)


@pytest.mark.parametrize("weight_ready", [False, True])  # the weights' first step before or after the wait
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_accumulate_adds_into_out_and_rounds_once(dtype, weight_ready, device):
    w = torch.randn(70, 300, device=device).to(dtype)
    x = torch.randn(1, 300, device=device).to(dtype)
    base = (100 * torch.randn(1, 70, device=device)).to(dtype)
    out = base.clone()
    assert gemv_triton(x, w, out, accumulate=True, weight_ready=weight_ready) is out
    if dtype == torch.float32:
        ref = base.clone().addmm_(x, w.t())
        assert (
            _fp64_error(out, x, w, base) <= 2 * _fp64_error(ref, x, w, base) + 1e-6 * ref.abs().max().item()
        )
    else:
        assert _rounded_once(out, x, w, base)


def test_accumulate_needs_out():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="accumulate=True needs an out tensor"):
        gemv_triton(x, w, accumulate=True)


@pytest.mark.parametrize(
    "x, w, out",
    [
        (torch.randn(8), torch.randn(4, 8), None),  # x not [M, K]
        (torch.randn(1, 8), torch.randn(4, 6), None),  # K differs
        (torch.randn(1, 16)[:, ::2], torch.randn(4, 8), None),  # x strided along K
        (torch.randn(1, 8), torch.randn(8, 4).t(), None),  # w strided along K
        (torch.randn(1, 8), torch.randn(4, 8), torch.empty(1, 3)),  # out too short
        (torch.randn(1, 8), torch.randn(4, 8), torch.empty(2, 4)),  # out has more rows than x
        (torch.randn(1, 8), torch.randn(4, 8), torch.empty(1, 8)[:, ::2]),  # out strided along N
    ],
)
def test_shapes_and_strides_are_checked(x, w, out):
    with pytest.raises(ValueError, match="unit stride"):
        gemv_triton(x, w, out)


@pytest.fixture
def fast_here(monkeypatch):
    """Let the dispatch take the Triton path on the CPU (the interpreter runs it)."""
    monkeypatch.setattr(linear_module, "fast_path_wanted", lambda *tensors: True)


def test_dispatch_takes_one_half_precision_row_without_autograd(fast_here):
    wanted = linear_module.gemv_wanted
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    assert wanted(x, w)
    assert not wanted(torch.randn(2, 32, dtype=torch.bfloat16), w)  # two rows: cuBLAS
    assert not wanted(x.float(), w.float())  # fp32: cuBLAS
    assert not wanted(x.half(), w)  # dtypes differ
    assert not wanted(torch.randn(1, 64, dtype=torch.bfloat16)[:, ::2], w)  # strided row
    assert not wanted(x, w.requires_grad_())  # autograd would need a backward
    with torch.no_grad():
        assert wanted(x, w)


def test_dispatch_off_under_autocast_to_another_dtype_and_for_empty_rows(fast_here):
    wanted = linear_module.gemv_wanted
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wanted(torch.randn(1, 32, dtype=torch.bfloat16), w)  # autocast to the same dtype: no change
        assert not wanted(torch.randn(1, 32, dtype=torch.float16), w.half())  # autocast would cast to bf16
    assert not wanted(torch.randn(1, 0, dtype=torch.bfloat16), torch.randn(16, 0, dtype=torch.bfloat16))


def test_addmm_into_leaves_other_outs_to_torch(fast_here):
    """A strided or many-row out is not the kernel's: torch's addmm_ computes it, as before."""
    w = torch.randn(8, 40, dtype=torch.bfloat16)
    y = torch.randn(1, 40, dtype=torch.bfloat16)
    buf = torch.randn(1, 16, dtype=torch.bfloat16)
    expected = buf[:, ::2].clone().addmm_(y, w.t())
    linear_module.addmm_into(buf[:, ::2], y, w)
    torch.testing.assert_close(buf[:, ::2], expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # torch refuses one row added into two, as before the kernel
        linear_module.addmm_into(torch.zeros(2, 4, dtype=torch.bfloat16), y, w[:4])


def test_forward_mode_and_torch_func_take_torch_path(fast_here):
    """A tangent is carried (the kernel would drop it) and torch.func's wrappers work (the kernel cannot read
    their storage)."""
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(16, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    t = torch.randn(1, 32, dtype=torch.bfloat16)
    with torch.no_grad(), fwAD.dual_level():
        out = linear_module.linear(fwAD.make_dual(x, t), w)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, F.linear(t, w))
    with torch.no_grad():
        _, jvp_out = torch.func.jvp(lambda a: linear_module.linear(a, w), (x,), (t,))
    torch.testing.assert_close(jvp_out, F.linear(t, w))


def test_dispatch_off_the_gpu_without_the_patch():
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    assert not linear_module.gemv_wanted(torch.randn(1, 32, dtype=torch.bfloat16), w)


def test_linear_and_addmm_into_match_torch_on_the_triton_path(fast_here):
    w = torch.randn(24, 40, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 40, dtype=torch.bfloat16)
    out = linear_module.linear(x, w)
    assert out.shape == (1, 1, 24)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-2, atol=1e-2)
    base = torch.randn(1, 1, 24, dtype=torch.bfloat16)
    acc = linear_module.addmm_into(base.clone(), x, w)
    torch.testing.assert_close(acc, base + F.linear(x, w), rtol=1e-2, atol=2e-2)


def test_project_calls_hooked_or_wrapped_projections(fast_here):
    proj = nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    h = torch.randn(1, 1, 8, dtype=torch.bfloat16)
    calls = []
    proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        project(proj, h)
    assert calls == [1]
    biased = nn.Linear(8, 4).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(project(biased, h), biased(h))  # the bias is not dropped


def test_batch1_decode_with_the_triton_products_matches_torch(fast_here, monkeypatch):
    """A bf16 model's cached one-token steps: every linear layer on the Triton path, logits as with cuBLAS
    (torch's path on the CPU) within bf16 rounding."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, layers="rat,attn", chunk_size=2,
                      n_groups=1, d_ffn=64, context=16)  # fmt: skip
    model = LanguageModel(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (1, 6))
    calls = []
    real = gemv_module.gemv_triton
    monkeypatch.setattr(
        gemv_module, "gemv_triton", lambda *a, **k: calls.append(k.get("accumulate", False)) or real(*a, **k)
    )

    def decode(fast: bool):
        cache = model.new_cache(1, 8)
        with torch.no_grad():
            model(ids[:, :4], cache)
            if not fast:
                monkeypatch.setattr(linear_module, "fast_path_wanted", lambda *tensors: False)
            out = [model(ids[:, t : t + 1], cache)[:, -1] for t in (4, 5)]
            monkeypatch.setattr(linear_module, "fast_path_wanted", lambda *tensors: True)
        return torch.stack(out).float()

    fast = decode(True)
    # per step and block: the input projection and fc1, and the two residual products accumulated; the logits
    assert sorted(calls) == [False] * 2 * (2 * 2 + 1) + [True] * 2 * (2 * 2)
    torch.testing.assert_close(fast, decode(False), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N, K", [(6656, 2048), (2048, 8192), (32000, 2048), (100, 3000)])
def test_cuda_dispatch_and_decode_shapes(N, K, monkeypatch):
    """On CUDA, one bf16 row without autograd goes to the kernel; products and sums rounded once."""
    calls = []
    real = gemv_module.gemv_triton
    monkeypatch.setattr(gemv_module, "gemv_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 1, K, device="cuda").bfloat16()
    w = (torch.randn(N, K, device="cuda") * 0.02).bfloat16()
    base = torch.randn(1, 1, N, device="cuda").bfloat16()
    with torch.no_grad():
        out = linear_module.linear(x, w)
        acc = linear_module.addmm_into(base.clone(), x, w)
        two_rows = linear_module.linear(x.expand(1, 2, K), w)  # cuBLAS
    assert len(calls) == 2
    assert _rounded_once(out[0], x[0], w) and _rounded_once(acc[0], x[0], w, base[0])
    torch.testing.assert_close(two_rows[:, :1], F.linear(x, w), rtol=1e-2, atol=1e-2)
