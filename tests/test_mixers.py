"""Mixers (SPEC §1-2): the forward follows the spec; a state fed in pieces gives the full forward."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from pieces import piece_sizes

import ratlm.mixers.rat
import ratlm.mixers.rnn
from ratlm.cache import KVState, RATState, RNNState, WindowState
from ratlm.config import ModelConfig
from ratlm.mixers import FFN, RAT, RNN, Attention
from ratlm.model import make_mixer
from ratlm.ops import apply_rope, attention_naive, gated_scan_naive, rat_mix_naive, rope_cos_sin

B, D, H, G = 2, 32, 4, 2
d = D // H


def config(**changes) -> ModelConfig:
    base = dict(vocab_size=50, d_model=D, n_layers=1, n_heads=H, n_groups=G, d_ffn=4 * D, context=32)
    return ModelConfig(**{**base, **changes})


def mixer(name: str, chunk_size: int = 4, window: int = 3, position: str = "rope"):
    m = make_mixer(name, config(layers=name, chunk_size=chunk_size, window=window, position=position))
    if isinstance(m, (RAT, RNN)):
        m.init_gate_bias()
    return m.eval()


def poisoned_state(m, max_len: int):
    """A fresh state with NaN in every key/value slot: a slot read before it is written poisons the output."""
    state = m.new_state(B, max_len, "cpu", torch.float32)
    for name in ("keys", "values"):
        if hasattr(state, name):
            getattr(state, name).fill_(float("nan"))
    return state


# (mixer, chunk size L, window W, tokens T): prompts shorter than a chunk, T % L != 0, W below and above T
CACHE_CASES = [
    ("rat", 8, 3, 5),
    ("rat", 4, 3, 11),
    ("rat", 1, 3, 6),
    ("rat", 4, 3, 12),
    ("attn", 4, 3, 11),
    ("swa", 4, 0, 9),
    ("swa", 4, 3, 11),
    ("swa", 4, 20, 11),
    ("rnn", 4, 3, 11),
]


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("extra_room", [0, 5])
@pytest.mark.parametrize("how", ["whole", "tokens", "random"])
@pytest.mark.parametrize("name, L, W, T", CACHE_CASES)
def test_state_in_pieces_equals_full_forward(name, L, W, T, how, extra_room, position):
    m = mixer(name, L, W, position)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        full = m(x)
        state = poisoned_state(m, T + extra_room)
        tensors = [f.name for f in dataclasses.fields(state) if f.name != "seen"]
        buffers = {name: getattr(state, name).data_ptr() for name in tensors}
        outs, p = [], 0
        for n in piece_sizes(T, how):
            outs.append(m(x[:, p : p + n], state))
            p += n
            assert state.seen == p
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    # static shapes: the state was updated in place, never reallocated
    assert buffers == {k: getattr(state, k).data_ptr() for k in buffers}


@pytest.mark.parametrize(
    "name, L, W, max_len, cls, shape",
    [
        ("rat", 4, 3, 10, RATState, (B, H, 3, d)),  # ceil(10 / 4) chunk summaries: L times smaller
        ("rat", 16, 3, 10, RATState, (B, H, 1, d)),
        ("attn", 4, 3, 10, KVState, (B, H, 10, d)),
        ("swa", 4, 3, 10, WindowState, (B, H, 4, d)),  # W + 1 slots
        ("swa", 4, 20, 10, WindowState, (B, H, 10, d)),  # never more than max_len
    ],
)
def test_new_state_shapes(name, L, W, max_len, cls, shape):
    state = mixer(name, L, W).new_state(B, max_len, "cpu", torch.bfloat16)
    assert isinstance(state, cls) and state.seen == 0
    assert state.keys.shape == state.values.shape == shape
    assert state.keys.dtype == torch.bfloat16
    if cls is RATState:  # running states stay fp32 whatever the storage type
        assert state.k_run.shape == state.v_run.shape == (B, H, d)
        assert state.k_run.dtype == state.v_run.dtype == torch.float32


def test_rnn_state_shape():
    state = mixer("rnn").new_state(B, 10, "cpu", torch.bfloat16)
    assert isinstance(state, RNNState) and state.state.shape == (B, D) and state.state.dtype == torch.float32


def rms_norm(m, x):
    return F.rms_norm(x, (D,), m.norm.weight, 1e-6)


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("L", [1, 4])
def test_rat_forward_follows_spec(L, position):
    """SPEC §1: in_proj split z, x, g, q, k; g = sigmoid(g + gate_bias); y gated by sigmoid(z); residual."""
    m = mixer("rat", L, position=position)
    with torch.no_grad():
        m.gate_bias.normal_()
    h = torch.randn(B, 10, D)
    z, x, g, q, k = m.in_proj(rms_norm(m, h)).split([D, D, D, G * d, G * d], dim=-1)
    g = torch.sigmoid(g.float() + m.gate_bias.float()).view(B, 10, H, d)
    y = rat_mix_naive(q.view(B, 10, G, d), k.view(B, 10, G, d), x.view(B, 10, H, d), g, L, position)
    expected = m.out_proj(torch.sigmoid(z) * y.reshape(B, 10, D)) + h
    torch.testing.assert_close(m(h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("name, window", [("attn", None), ("swa", 2)])
def test_attention_forward_follows_spec(name, window, position):
    """SPEC §2: in_proj split x (values), q, k; RoPE on token positions; no output gate; residual."""
    T = 9
    m = mixer(name, window=2, position=position)
    h = torch.randn(B, T, D)
    x, q, k = (t.view(B, T, H, d).transpose(1, 2) for t in m.in_proj(rms_norm(m, h)).split(D, dim=-1))
    if position == "rope":
        cos, sin = rope_cos_sin(torch.arange(T), d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = attention_naive(q, k, x, window=window).transpose(1, 2).reshape(B, T, D)
    torch.testing.assert_close(m(h), m.out_proj(y) + h, rtol=1e-5, atol=1e-5)


def test_rnn_forward_follows_spec():
    """SPEC §2: in_proj split z, x, g; one recurrence over the whole sequence; sigmoid(z) gate; residual."""
    m = mixer("rnn")
    h = torch.randn(B, 13, D)
    z, x, g = m.in_proj(rms_norm(m, h)).split(D, dim=-1)
    state = gated_scan_naive(x, torch.sigmoid(g.float() + m.gate_bias.float()))
    torch.testing.assert_close(m(h), m.out_proj(torch.sigmoid(z) * state) + h, rtol=1e-5, atol=1e-5)


def test_ffn_follows_spec():
    """SPEC §2: RMSNorm, fc1 D -> d_ffn, exact (erf) GELU, fc2, residual, no biases."""
    m = FFN(config())
    with torch.no_grad():
        m.fc1.weight.mul_(8)  # pre-activations of a few units, where tanh-GELU is off by ~1e-3
        m.norm.weight.uniform_(0.5, 1.5)
    assert m.fc1.bias is None and m.fc2.bias is None and m.fc1.weight.shape == (4 * D, D)
    h = torch.randn(B, 5, D)
    pre = m.fc1(rms_norm(m, h))
    expected = h + m.fc2(0.5 * pre * (1 + torch.erf(pre / 2**0.5)))
    torch.testing.assert_close(m(h), expected, rtol=1e-6, atol=1e-6)


def test_sliding_window_differs_from_full_attention_only_beyond_the_window():
    """Same weights: outputs agree for the first W+1 tokens, then differ."""
    W = 3
    full, local = mixer("attn"), Attention(config(layers="swa", window=W), window=W).eval()
    local.load_state_dict(full.state_dict())
    h = torch.randn(B, 10, D)
    a, b = full(h), local(h)
    torch.testing.assert_close(a[:, : W + 1], b[:, : W + 1], rtol=1e-5, atol=1e-6)
    assert (a[:, W + 1 :] - b[:, W + 1 :]).abs().amax(dim=(0, 2)).min() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name, module, op",
    [("rat", ratlm.ops.rat.masked, "forget_gate"), ("rnn", ratlm.mixers.rnn, "gated_scan")],
)
def test_gate_is_computed_in_fp32(name, module, op, dtype, monkeypatch):
    """SPEC §1.3: g = sigmoid(g + gate_bias) in fp32, also with bf16 weights (e.g. a loaded checkpoint).
    RAT passes the logits and the bias to its op, which forms the gate (on the GPU, in the scan kernels)."""
    m = mixer(name).to(dtype)
    with torch.no_grad():
        m.gate_bias.uniform_(0, 3)  # chrono-like biases, where a bf16 sum loses the most
    seen = {}
    real = getattr(module, op)

    def spy(*args, **kwargs):
        if name == "rat":
            seen["g"] = real(*args, **kwargs)
            return seen["g"]
        seen["g"] = args[1]
        return real(*args, **kwargs)

    monkeypatch.setattr(module, op, spy)
    h = torch.randn(B, 7, D).to(dtype)
    m(h)
    pre = m.in_proj(m.norm(h)).split(D, dim=-1)[2]  # z, x, g: the third D-slice is the gate
    expected = torch.sigmoid(pre.float() + m.gate_bias.float()).view(seen["g"].shape)
    assert seen["g"].dtype == torch.float32
    torch.testing.assert_close(seen["g"], expected, rtol=0, atol=1e-6)


def test_add_projection_in_place_equals_the_plain_residual_and_falls_back_where_it_must():
    from ratlm.mixers.residual import add_projection

    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4, bias=False)
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    expected = x + proj(y).detach()
    with torch.no_grad():
        out = add_projection(x.clone(), y, proj)  # inplace off: a new tensor
        mine = x.clone()
        same = add_projection(mine, y, proj, inplace=True)
    assert same is mine and out is not x
    torch.testing.assert_close(same, expected)
    torch.testing.assert_close(out, expected)
    # autograd on, a bias, a strided x, another dtype, autocast: x + proj(y), x untouched
    kept = x.clone()
    assert add_projection(kept, y, proj, inplace=True) is not kept and torch.equal(kept, x)
    biased = torch.nn.Linear(6, 4)
    strided = torch.randn(2, 4, 3).transpose(1, 2)
    with torch.no_grad():
        for args in ((kept, y, biased), (strided, y, proj), (kept.double(), y, proj)):
            before = args[0].clone()
            assert add_projection(*args, inplace=True) is not args[0] and torch.equal(args[0], before)
        with torch.autocast("cpu", torch.bfloat16):
            assert add_projection(kept, y, proj, inplace=True) is not kept and torch.equal(kept, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_add_projection_in_place_under_autocast_writes_the_epilogue_gemm_into_x():
    """Mixed-precision cached prefill: fp32 x, bf16 autocast, no autograd. Where torch accumulates into x
    itself (out=x with out_dtype), x is the result and holds what the out-of-place epilogue GEMM gives;
    otherwise x is left alone."""
    from ratlm.mixers import residual

    torch.manual_seed(0)
    # one row (a decode step), a block of rows, and few rows with a long K (cuBLAS may split K there)
    for rows, d_in, d_out in ((1, 256, 128), (128, 256, 128), (16, 8192, 2048)):
        proj = torch.nn.Linear(d_in, d_out, bias=False, device="cuda")
        x, y = torch.randn(1, rows, d_out, device="cuda"), torch.randn(1, rows, d_in, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            apart = residual.add_projection(x.clone(), y, proj)
            mine = x.clone()
            out = residual.add_projection(mine, y, proj, inplace=True)
        assert apart.dtype == torch.float32
        if residual._epilogue_supported(x.device, torch.bfloat16):  # then torch allows out=x too
            assert residual._INPLACE_EPILOGUE_OK[("cuda:0", torch.bfloat16)]
            assert out is mine and torch.equal(out, apart), rows
        else:
            assert out is not mine and torch.equal(mine, x) and torch.equal(out, apart)


def test_cached_model_forward_adds_residuals_in_place_only_into_its_own_tensors():
    from ratlm import LanguageModel, ModelConfig

    cfg = ModelConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=2, n_groups=1, d_ffn=32, context=16,
                      layers="rat,attn", chunk_size=4)  # fmt: skip
    model = LanguageModel(cfg).eval()
    ids = torch.randint(0, 31, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 9)
        cached = torch.cat(
            [model(ids[:, :5], cache), *(model(ids[:, t : t + 1], cache) for t in range(5, 9))], 1
        )
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        # a block called on its own keeps its input unless told otherwise
        x = torch.randn(2, 1, 16)
        state = model.blocks[0].mixer.new_state(2, 8, "cpu", torch.float32)
        before = x.clone()
        model.blocks[0](x, state)
        assert torch.equal(x, before)

    # a forward hook anywhere in the blocks (or a global one) sees separate tensors, as without a cache
    def capture(seen):
        return lambda module, args, out: seen.append((args[0].clone(), args[0], out.clone(), out))

    for where in (model.blocks[1], model.blocks[0].mixer.norm, None):
        seen = []
        if where is None:
            handle = torch.nn.modules.module.register_module_forward_hook(capture(seen))
        else:
            handle = where.register_forward_hook(capture(seen))
        with torch.no_grad():
            cache = model.new_cache(2, 9)
            torch.testing.assert_close(model(ids, cache), full, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert seen and all(torch.equal(a, a_now) and torch.equal(o, o_now) for a, a_now, o, o_now in seen)


def test_add_projection_calls_a_wrapped_projection_instead_of_reading_its_weight():
    from ratlm.mixers.residual import add_projection

    class Scaled(torch.nn.Linear):  # computes more than y @ weight.T, like a LoRA layer
        def forward(self, y):
            return 2 * super().forward(y)

    proj = Scaled(6, 4, bias=False)
    x, y = torch.randn(3, 4), torch.randn(3, 6)
    with torch.no_grad():
        out = add_projection(x.clone(), y, proj, inplace=True)
    torch.testing.assert_close(out, x + 2 * (y @ proj.weight.T).detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_add_projection_adds_in_the_gemm_epilogue_under_autocast(half, monkeypatch):
    """Mixed precision on CUDA: one GEMM with an fp32 output adds the fp32 residual; x stays fp32 (it is
    far from 0, so rounding it to half would show), the product equals fp32 arithmetic on the half operands,
    and the gradients of x, y and the weight equal autocast's linear plus add; a hook on the projection, or
    RATLM_BACKEND=torch, gets the plain path."""
    from ratlm.mixers import residual
    from ratlm.ops import backend

    if not residual._epilogue_supported(torch.device("cuda"), half):
        pytest.skip("this torch has no addmm out_dtype")
    proj = torch.nn.Linear(256, 128, bias=False, device="cuda")
    x = (1000 + torch.randn(4, 33, 128, device="cuda")).requires_grad_()
    y = torch.randn(4, 33, 256, device="cuda").to(half).requires_grad_()
    dout = torch.randn(4, 33, 128, device="cuda")
    calls = []
    real = residual._AddProjection.apply
    monkeypatch.setattr(residual._AddProjection, "apply", lambda *a: calls.append(1) or real(*a))

    def run():
        with torch.autocast("cuda", dtype=half):
            out = residual.add_projection(x, y, proj)
        return [out, *torch.autograd.grad(out, (x, y, proj.weight), dout)]

    fused = run()
    assert calls == [1] and fused[0].dtype == torch.float32
    product = y.detach().float() @ proj.weight.detach().to(half).float().T
    torch.testing.assert_close(fused[0].detach() - x.detach(), product, rtol=1e-4, atol=1e-3)
    with torch.autocast("cuda", dtype=half):
        ref = x + proj(y)
    plain = [ref, *torch.autograd.grad(ref, (x, y, proj.weight), dout)]
    for name, a, b in zip(["dx", "dy", "dw"], fused[1:], plain[1:], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for hook in (
        proj.register_forward_hook(lambda *args: None),
        proj.register_full_backward_hook(lambda *a: None),
    ):
        run()
        hook.remove()
    with backend.use_backend("torch"):
        run()
    assert calls == [1]


def test_add_projection_epilogue_is_off_without_cuda_or_autocast(monkeypatch):
    """On the CPU (no addmm out_dtype there) and outside autocast the residual is the plain x + proj(y)."""
    from ratlm.mixers import residual

    monkeypatch.setattr(residual, "_EPILOGUE_OK", {})
    proj = torch.nn.Linear(6, 4, bias=False)
    x, y = torch.randn(3, 4), torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = residual.add_projection(x, y.bfloat16(), proj)
    assert out.dtype == torch.float32 and not residual._EPILOGUE_OK
    torch.testing.assert_close(residual.add_projection(x, y, proj), x + y @ proj.weight.T)


def test_backward_hooks_on_the_norm_and_projection_still_fire():
    """A block that reads its norm's or projection's weights directly calls the module instead when a
    backward hook is registered on it."""
    ffn = FFN(config())
    seen = []
    for name in ("norm", "fc2"):
        getattr(ffn, name).register_full_backward_hook(lambda m, gi, go, n=name: seen.append(n))
    x = torch.randn(B, 5, D, requires_grad=True)
    ffn(x).sum().backward()
    assert sorted(seen) == ["fc2", "norm"]
