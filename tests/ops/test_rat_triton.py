"""RAT's GPU path (Triton scan + attention engines) against the PyTorch reference; CPU: Triton interpreter.

Engines "torch" (chunks as heads with a PyTorch engine: every kernel of the cuDNN path but cuDNN itself)
and "triton" (the fused flash-style kernels) run here; FlexAttention has no CPU backward, so its path is
checked with the scan's autograd function feeding a dense attention, plus one forward through flex.
"""

import math

import pytest
import torch

from ratlm.ops import backend, rat_mix
from ratlm.ops.rat import engines, flash, flex, fused, gpu, merge, scan_kernels
from ratlm.ops.rat.masked import rat_mix_masked
from ratlm.ops.rat.naive import rat_mix_naive

from .test_rat import rat_reference_fp64

H = 4
KERNEL_MODULES = (scan_kernels, merge, fused, flash, flex)


def inputs(B, T, G, d, device, dtype=torch.float32):
    q = torch.randn(B, T, G, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, T, G, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, d, device=device).to(dtype).requires_grad_()
    g = torch.rand(B, T, H, d, device=device).clamp(0.02, 0.98).requires_grad_()  # fp32, as the mixer's
    return q, k, v, g


def check_outputs_and_grads(out, ref, leaves, rtol=1e-5, atol=1e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for name, a, b in zip("qkvg", grads, grads_ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=10 * rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


CASES = [  # B, L, T, G, d, position, rope base, scale
    (1, 32, 70, 2, 16, "rope", 10000.0, None),  # L > 16: always the prefix-scan kernels
    (2, 4, 14, 2, 16, "rope", 10000.0, None),  # several chunks per tile, partial last chunk
    (1, 1, 7, 1, 16, "nope", 10000.0, None),  # L = 1: attention on the gated states
    (1, 16, 9, 2, 16, "rope", 10000.0, None),  # T < L: no summaries at all
    (1, 5, 23, 4, 32, "rope", 500.0, 0.3),  # odd L, G = H, other base and scale
]


@pytest.fixture(params=["auto", "scan"])
def scan_variant(request, monkeypatch):
    """Both scan kernels: the per-chunk loops (L <= 16, "auto") and the prefix scans forced ("scan")."""
    monkeypatch.setattr(scan_kernels, "VARIANT", request.param)
    return request.param


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("B, L, T, G, d, position, base, scale", CASES)
def test_matches_reference_outputs_and_grads(
    engine, B, L, T, G, d, position, base, scale, device, poison, scan_variant
):
    poison(*KERNEL_MODULES)
    leaves = inputs(B, T, G, d, device)
    out = gpu.rat_mix_triton(*leaves, L, position, base, scale, engine=engine)
    ref = rat_mix_masked(*leaves, L, position, base, scale)
    check_outputs_and_grads(out, ref, leaves)


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_bf16_error_within_twice_plain_pytorch(engine, device):
    """STYLE's tolerance rule for the output and every gradient: the error against fp64 is at most ~2x that
    of plain PyTorch in bf16 (the masked path, what `rat_mix` runs on the CPU)."""
    L, T, G, d = 4, 30, 2, 16
    leaves = [t.detach().requires_grad_() for t in inputs(1, T, G, d, device, torch.bfloat16)]
    assert_within_twice_plain(
        lambda xs: rat_reference_fp64(*xs, L),
        lambda xs: gpu.rat_mix_triton(*xs, L, engine=engine),
        lambda xs: rat_mix_masked(*xs, L),
        leaves,
        ["y", "dq", "dk", "dv", "dg"],
    )


def assert_within_twice_plain(exact, fast, plain, leaves, names):
    """STYLE's rule: the output's and every leaf gradient's largest error against exact(fp64 leaves) is at
    most twice plain PyTorch's on the same low-precision leaves."""
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = exact(leaves64)
    weight = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves64)

    def errors(out):
        grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
        return [
            float((a.detach().double() - b.detach()).abs().max())
            for a, b in zip([out, *grads], [ref, *grads_ref], strict=True)
        ]

    errs, errs_plain = errors(fast(leaves)), errors(plain(leaves))
    for name, e, e_plain in zip(names, errs, errs_plain, strict=True):
        assert e <= 2 * e_plain, (name, e, e_plain)


def gated_inputs(B, T, G, d, device, dtype=torch.float32):
    """Leaves of the mixer's call: q, k, v, the forget gates' logits, the gate bias and z, all in dtype
    but the bias (fp32, a parameter)."""
    q, k, v, _ = inputs(B, T, G, d, device, dtype)
    logits = (2 * torch.randn(B, T, H, d, device=device)).to(dtype).requires_grad_()
    bias = torch.rand(H * d, device=device).mul(3).log1p().requires_grad_()  # chrono-like, in (0, 1.4)
    z = torch.randn(B, T, H, d, device=device).to(dtype).requires_grad_()
    return q, k, v, logits, bias, z


def call_gated(fn, leaves, L, *args, **kwargs):
    q, k, v, logits, bias, z = leaves
    return fn(q, k, v, logits, L, *args, gate_bias=bias, out_gate=z, **kwargs)


@pytest.mark.parametrize("engine", ["torch", "triton", "flex"])
@pytest.mark.parametrize("B, L, T, G, d, position, base, scale", CASES)
def test_fused_gates_match_reference(
    engine, B, L, T, G, d, position, base, scale, device, poison, scan_variant
):
    """Forget-gate logits + bias in the scan kernels, the output gate in the merge kernel (heads engines)
    or after the attention (the others): outputs and the gradients of all six inputs."""
    if engine == "flex" and device == "cpu":
        pytest.skip("FlexAttention has no CPU backward")
    poison(*KERNEL_MODULES)
    leaves = gated_inputs(B, T, G, d, device)
    out = call_gated(gpu.rat_mix_triton, leaves, L, position, base, scale, engine=engine)
    ref = call_gated(rat_mix_masked, leaves, L, position, base, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "logits", "bias", "z"], grads, grads_ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_short_chunk_scan_with_the_gpu_tiling(device, monkeypatch, poison):
    """The short-chunk kernels with the tile sizes they get on a GPU (several chunks and 32 channels per
    program, partial program tiles), which the interpreter otherwise never runs: d = 64, both gates."""
    from ratlm.ops.rat import scan_seq

    gpu_tile = scan_seq.seq_tile
    monkeypatch.setattr(scan_seq, "seq_tile", lambda C, d, interpret, kind="fwd": gpu_tile(C, d, False, kind))
    assert scan_seq.seq_tile(12, 64, True) == (4, 32, 1)  # 4 chunks x 32 channels, one warp
    poison(*KERNEL_MODULES)
    leaves = gated_inputs(1, 45, 2, 64, device)
    out = call_gated(gpu.rat_mix_triton, leaves, 4, engine="torch")
    ref = call_gated(rat_mix_masked, leaves, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "logits", "bias", "z"], grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_fused_gates_reference_twins_agree(device):
    """The token-by-token twin forms the gates the same way as the vectorised path."""
    leaves = [t.detach() for t in gated_inputs(1, 11, 2, 16, device)]
    torch.testing.assert_close(
        call_gated(rat_mix_naive, leaves, 4), call_gated(rat_mix_masked, leaves, 4), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_fused_gates_bf16_error_within_twice_plain_pytorch(engine, device, scan_variant):
    """STYLE's tolerance rule with both gates fused, for the output and all six gradients."""
    L, T, G, d = 4, 30, 2, 16
    leaves = [t.detach().requires_grad_() for t in gated_inputs(1, T, G, d, device, torch.bfloat16)]
    assert_within_twice_plain(
        lambda xs: call_gated(rat_mix_masked, xs, L),
        lambda xs: call_gated(gpu.rat_mix_triton, xs, L, engine=engine),
        lambda xs: call_gated(rat_mix_masked, xs, L),
        leaves,
        ["y", "dq", "dk", "dv", "dlogits", "dbias", "dz"],
    )


def test_gate_arguments_are_checked(device):
    q, k, v, logits, bias, z = (t.detach() for t in gated_inputs(1, 9, 2, 16, device))
    with pytest.raises(ValueError, match="gate_bias must have"):
        rat_mix(q, k, v, logits, 4, gate_bias=bias[:-1])
    with pytest.raises(ValueError, match="out_gate must have"):
        rat_mix(q, k, v, logits, 4, out_gate=z[:, :-1])


def test_flex_path_scan_function_with_dense_attention(device, poison):
    """The flex path's scan (queries and [summaries ; own states] straight into FlexAttention's buffers,
    and its backward) with a dense masked softmax standing in for FlexAttention."""
    poison(*KERNEL_MODULES)
    L, T, G, d = 4, 22, 2, 16
    leaves = inputs(2, T, G, d, device)
    mask, Cp = flex.rat_block_mask(T, L, device)
    qt, kx, vx = flex.RatScanExtFunction.apply(*leaves, None, L, True, 10000.0, Cp)
    visible = mask.mask_mod(
        0, 0, torch.arange(T, device=device)[:, None], torch.arange(Cp + T, device=device)
    )
    scores = (qt @ kx.transpose(-1, -2)) * d**-0.5
    out = (torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vx).transpose(1, 2)
    check_outputs_and_grads(out, rat_mix_masked(*leaves, L), leaves)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward(device):
    L, T, G, d = 4, 30, 2, 16
    with torch.no_grad():
        leaves = [t.detach() for t in inputs(1, T, G, d, device)]
        out = gpu.rat_mix_triton(*leaves, L, engine="flex")
        torch.testing.assert_close(out, rat_mix_masked(*leaves, L), rtol=1e-5, atol=1e-5)


def dense_blocks(visible, block=128):
    nq, nk = -(-visible.shape[0] // block), -(-visible.shape[1] // block)
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    padded[: visible.shape[0], : visible.shape[1]] = visible
    blocks = padded.view(nq, block, nk, block)
    return blocks.any(3).any(1), blocks.all(3).all(1)


@pytest.mark.parametrize("T, L", [(5, 4), (300, 16), (1000, 1), (700, 128), (257, 3)])
def test_rat_block_mask_structure(T, L):
    """Every block holding a visible pair is listed, and blocks listed as full are entirely visible."""
    mask, Cp = flex.rat_block_mask(T, L, "cpu")
    assert Cp % 128 == 0 and Cp >= math.ceil(T / L)
    t, j = torch.arange(T)[:, None], torch.arange(Cp + T)[None, :]
    visible = (j < t // L) | (j == t + Cp)
    assert torch.equal(mask.mask_mod(0, 0, t, j), visible)
    any_visible, _ = dense_blocks(visible)
    listed = mask.to_dense()[0, 0].bool()
    assert torch.equal(listed, any_visible)
    n_full = mask.full_kv_num_blocks[0, 0]
    for qb in range(listed.shape[0]):
        for kb in mask.full_kv_indices[0, 0, qb, : n_full[qb]].tolist():
            rows = visible[qb * 128 : (qb + 1) * 128, kb * 128 : (kb + 1) * 128]
            assert rows.all()


def test_cudnn_engine_unavailable_without_cuda():
    assert engines.cudnn_engine(torch.bfloat16, 16, H, 4, "cpu") is None or torch.cuda.is_available()


def test_unsupported_inputs_raise_and_dispatch_falls_back(device):
    q, k, v, g = (t.detach() for t in inputs(1, 9, 2, 12, device))  # head width 12: not a power of two
    with pytest.raises(ValueError, match="head width"):
        gpu.rat_mix_triton(q, k, v, g, 4)
    backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="rat_mix takes its PyTorch path.*head width 12"):
        assert gpu.rat_mix_gpu_or_none(q, k, v, g, 4, "rope", 10000.0, None) is None
    q, k, v, g = (t.detach() for t in inputs(1, 9, 2, 16, device))
    with pytest.raises(ValueError, match="chunk size"):
        gpu.rat_mix_triton(q, k, v, g, 129)
    with pytest.raises(ValueError, match="engine"):
        gpu.rat_mix_triton(q, k, v, g, 4, engine="magic")


def test_costly_fallbacks_warn_once_and_others_only_log(caplog, recwarn):
    backend._warned.clear()
    with caplog.at_level("DEBUG", logger="ratlm.ops"):
        for _ in range(3):
            backend.fallback("op", "why", costly=True)
            backend.fallback("op", "cheap")
    assert [str(w.message).split(" (")[0] for w in recwarn.list] == ["op takes its PyTorch path on CUDA"]
    assert caplog.text.count("op: PyTorch path") == 6
    backend.fallback("op", "another reason", costly=True)
    assert len(recwarn.list) == 2


def test_backend_switch():
    assert backend.get_backend() in backend.BACKENDS
    before = backend.get_backend()
    with backend.use_backend("torch"):
        assert backend.get_backend() == "torch"
        assert not backend.fast_path_wanted(torch.zeros(1))
        with backend.use_backend("flex"):
            assert backend.get_backend() == "flex"
        assert backend.get_backend() == "torch"
    assert backend.get_backend() == before
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("cuda")
    assert backend.get_backend() == before


def test_cpu_tensors_take_the_torch_path():
    q, k, v, g = (t.detach() for t in inputs(1, 9, 2, 16, "cpu"))
    assert not backend.fast_path_wanted(q, k, v, g)
    torch.testing.assert_close(rat_mix(q, k, v, g, 4), rat_mix_masked(q, k, v, g, 4), rtol=0, atol=0)


class CudnnFormatEngine(engines.CudnnHeadsEngine):
    """cuDNN's output format without cuDNN: log-sum-exp as a [B, H, S, 1] buffer in `true_unit`s
    (natural log = raw * true_unit), read back by the backward from that buffer, as cuDNN's does."""

    true_unit = math.log(2.0)

    def forward(self, q, k, v, scale):
        o, lse, _ = engines.TorchHeadsEngine().forward(q, k, v, scale)
        raw = (lse / self.true_unit)[..., None].contiguous()
        return o, raw.squeeze(-1), (raw,)

    def backward(self, do, q, k, v, o, lse, state, scale):
        (raw,) = state
        return engines.TorchHeadsEngine().backward(
            do, q, k, v, o, raw.squeeze(-1) * self.true_unit, None, scale
        )


def test_cudnn_probe_finds_the_log_sum_exp_unit_and_the_merge_writes_it_back(device, poison):
    """The probe detects a log2 statistic; the fused path merges into the engine's own [B, H, S, 1] buffer
    in its units, which the engine's backward then reads: outputs and gradients stay exact."""
    poison(*KERNEL_MODULES)
    engine = engines.cudnn_engine(torch.bfloat16, 16, H, 4, device, make=CudnnFormatEngine)
    assert engine is not None and engine.unit == pytest.approx(math.log(2.0)) and not engine.expand
    leaves = inputs(2, 18, 2, 16, device)
    out = fused.rat_mix_chunk_heads(*leaves, 4, True, 10000.0, 16**-0.5, engine)
    check_outputs_and_grads(out, rat_mix_masked(*leaves, 4), leaves)


def test_inputs_with_any_strides(device):
    """Views of one projection (as the mixer passes them) and a transposed head vector both work."""
    B, T, G, d, L = 1, 11, 2, 16, 4
    proj = torch.randn(B, T, 2 * G * d + H * d, device=device)
    q, k, v = proj.split([G * d, G * d, H * d], dim=-1)
    q, k, v = q.view(B, T, G, d), k.view(B, T, G, d), v.view(B, T, H, d)
    g = torch.rand(B, T, H, d, device=device).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q.stride(-1) == 1 and g.stride(-1) != 1
    out = gpu.rat_mix_triton(q, k, v, g, L, engine="triton")
    torch.testing.assert_close(out, rat_mix_masked(q, k, v, g, L), rtol=1e-5, atol=1e-5)


def test_unknown_scan_variant_is_refused(device, monkeypatch):
    monkeypatch.setattr(scan_kernels, "VARIANT", "fast")
    q, k, v, g = (t.detach() for t in inputs(1, 9, 2, 16, device))
    with pytest.raises(ValueError, match="VARIANT must be 'auto', 'seq' or 'scan', got 'fast'"):
        gpu.rat_mix_triton(q, k, v, g, 4, engine="torch")


@pytest.mark.parametrize(
    "L, T, G, position, logits, engine",
    [(4, 14, 2, "rope", True, "torch"), (4, 16, 2, "rope", False, "torch"),
     (16, 9, 2, "nope", True, "torch"), (32, 70, 1, "rope", True, "torch"),
     (5, 23, 4, "rope", False, "triton"), (4, 4, 2, "rope", True, "torch"),
     (4, 14, 2, "rope", True, "triton")],
)  # fmt: skip
def test_fresh_prefill_fills_the_cache_as_the_pytorch_path(
    device, scan_variant, L, T, G, position, logits, engine
):
    """A fresh prefill on CUDA (`prefill_fresh`) takes its outputs from the GPU path, whose scan hands the
    summaries of chunks 0..C-2 to the cache (the chunks-as-heads engine "torch" from its own scan, the
    "triton" engine by a second one), and a short fp32 scan of the last chunk gives the running states: the
    same outputs, summaries, running states and positions as the PyTorch path."""
    from ratlm.cache import RATState
    from ratlm.ops.rat.cached import prefill_fresh, rat_mix_cached

    torch.manual_seed(T + L)
    B, d = 2, 16
    q, k, v, g = (t.detach() for t in inputs(B, T, G, d, device))
    bias = torch.randn(H * d, device=device) if logits else None
    gate = torch.randn(B, T, H, d, device=device) if logits else g
    z = torch.randn(B, T, H, d, device=device)

    def empty(C=-(-T // L) + 1):
        zeros = [torch.zeros(B, H, *shape, device=device) for shape in ((C, d), (C, d), (d,), (d,))]
        return RATState(*zeros)

    ours, ref = empty(), empty()
    gates = dict(gate_bias=bias, out_gate=z)
    y = prefill_fresh(q, k, v, gate, ours, L, position, **gates, engine=engine)
    with backend.use_backend("torch"):
        y_ref = rat_mix_cached(q, k, v, gate, ref, L, position, **gates)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in ("keys", "values", "k_run", "v_run"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)
    assert ours.seen == ref.seen == T and torch.equal(ours.pos, ref.pos)
    with pytest.raises(ValueError, match="empty state"):  # filled already
        prefill_fresh(q, k, v, gate, ours, L, position, **gates, engine=engine)
    if T >= L:  # a cache without room for the summaries: refused before anything runs, never overrun
        short = empty(T // L - 1)
        with pytest.raises(ValueError, match="room for"):
            prefill_fresh(q, k, v, gate, short, L, position, **gates, engine=engine)
        assert short.seen == 0 and not short.keys.any()


@pytest.mark.parametrize(
    "L, T, dtype", [(4, 14, torch.float32), (16, 37, torch.float32), (4, 9, torch.bfloat16)]
)
def test_forward_without_gradients_takes_the_own_scores_and_agrees(device, L, T, dtype, monkeypatch):
    """Without gradients the chunks-as-heads path has the scan write each token's own score and the merge
    read it (no key states): the same outputs as the forward that keeps everything for a backward."""
    torch.manual_seed(T)
    leaves = gated_inputs(2, T, 2, 16, device, dtype)
    taken = []
    real = fused.merge_fwd
    monkeypatch.setattr(fused, "merge_fwd", lambda *a, **kw: taken.append(kw["own"]) or real(*a, **kw))
    y_train = call_gated(gpu.rat_mix_triton, leaves, L, engine="torch")
    with torch.no_grad():
        y_infer = call_gated(gpu.rat_mix_triton, leaves, L, engine="torch")
    assert taken[0] is None and taken[1] is not None and taken[1].shape == (2, T, H)
    assert not y_infer.requires_grad
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the score summed in two halves, then rounded
    torch.testing.assert_close(y_infer, y_train.detach(), rtol=tol, atol=tol)
    with torch.no_grad():  # under the interpreter as on the GPU: refused without the queries written
        q, k, v, logits, bias, _ = leaves
        vs = torch.empty_like(v)
        own = torch.empty(2, T, H, device=device)
        with pytest.raises(ValueError, match="own scores need the queries"):
            scan_kernels.rat_scan_fwd(q, k, v, logits, L, False, None, None, None, "bchld", vs, None, "bthd",
                                      None, None, "bchd", bias, own=own)  # fmt: skip
        with pytest.raises(ValueError, match="ks is needed unless the own scores"):
            scan_kernels.rat_scan_fwd(q, k, v, logits, L, False, None, None, None, "bthd", vs, None, "bthd",
                                      None, None, "bchd", bias)  # fmt: skip
        with pytest.raises(ValueError, match="needs the key states ks or the own scores"):
            merge.merge_fwd(vs, "bthd", vs, None, "bthd", vs, "heads", vs, "heads", 1.0, vs, L, 0.25)


@pytest.mark.parametrize("grad", [False, True])
def test_summaries_handed_over_once_by_the_engine_that_succeeds(device, grad, monkeypatch):
    """The cached prefill's callback gets the chunk summaries once, from the engine that ran (here a
    chunks-as-heads engine that fails first, then the fused Triton one with its own scan of them), with or
    without gradients; the summaries are those of a scan of their own."""

    tried = []

    class Failing(engines.TorchHeadsEngine):
        def forward(self, *args):
            tried.append(args)
            raise RuntimeError("no plan")

    real = gpu._engine_for
    monkeypatch.setattr(
        gpu, "_engine_for", lambda name, v, L: ("heads", Failing()) if name == "cudnn" else real(name, v, L)
    )
    torch.manual_seed(3)
    leaves = gated_inputs(2, 13, 2, 16, device)
    if not grad:
        leaves = tuple(t.detach() for t in leaves)
    got = []
    y = call_gated(gpu.rat_mix_triton, leaves, 4, summaries=lambda *s: got.append([t.clone() for t in s]))
    assert len(tried) == 1 and gpu.last_engine == "triton" and len(got) == 1 and y.requires_grad == grad
    q, k, v, logits, bias, _ = (t.detach() for t in leaves)
    want = fused.scan_summaries(k, v, logits, 4, True, 10000.0, bias)
    for a, b in zip(got[0], want, strict=True):  # rows 0 .. C-2: the summaries of those chunks
        torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    got.clear()
    call_gated(gpu.rat_mix_triton, leaves, 4, engine="torch", summaries=lambda *s: got.append(s[0][:, :-1]))
    assert len(got) == 1 and torch.equal(got[0], want[0][:, :-1])


def test_pinned_scan_tiles_are_checked(monkeypatch):
    """A benchmark's pinned tile must split each half of the head vector into whole blocks."""
    from ratlm.ops.rat import scan_seq

    monkeypatch.setattr(scan_seq, "TILES", {"bwd": (2, 48, 1)})
    with pytest.raises(ValueError, match=r"TILES\['bwd'\] = \(2, 48, 1\): BD must divide d/2 = 64"):
        scan_seq.seq_tile(100, 128, False, "bwd")
    assert scan_seq.seq_tile(100, 128, False, "fwd") == (2, 64, 1)  # the default: one warp, 64-channel rows


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_second_derivative_raises(engine, device):
    """The kernels' backward is first-order: a second derivative is an error, never silently wrong."""
    leaves = gated_inputs(1, 12, 2, 16, device)
    out = call_gated(gpu.rat_mix_triton, leaves, 4, engine=engine)
    (gq,) = torch.autograd.grad((out * out).sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(gq.sum(), leaves[0])
