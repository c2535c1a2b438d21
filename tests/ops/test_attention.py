"""`attention` (SDPA with a mask) against its one-query-at-a-time twin; the window convention of SPEC §2."""

import pytest
import torch

from ratlm.ops import attention, attention_naive

B, H, d = 2, 3, 8


def qkv(Tq: int, Tk: int, dtype=torch.float64):
    q = torch.randn(B, H, Tq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Tk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Tk, d, dtype=dtype, requires_grad=True)
    return q, k, v


def check_against_naive(Tq, Tk, q_start, k_start, window):
    q, k, v = qkv(Tq, Tk)
    out = attention(q, k, v, q_start, k_start, window)
    ref = attention_naive(q, k, v, q_start, k_start, window)
    assert out.shape == (B, H, Tq, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v])
    grads_ref = torch.autograd.grad((ref * weight).sum(), [q, k, v])
    for name, a, b in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("window", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("T", [1, 2, 9, 17])
def test_self_attention_matches_naive(T, window):
    check_against_naive(T, T, 0, 0, window)


@pytest.mark.parametrize("window", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("k_start", [0, 6])
@pytest.mark.parametrize("Tq, Tk", [(1, 1), (1, 12), (5, 12), (12, 12)])
def test_query_suffix_matches_naive(Tq, Tk, k_start, window):
    """Decoding and chunked prefill: queries are the last Tq of the key positions."""
    check_against_naive(Tq, Tk, k_start + Tk - Tq, k_start, window)


@pytest.mark.parametrize("window", [None, 2])
def test_queries_inside_the_keys_matches_naive(window):
    """Keys after the last query exist but must stay invisible."""
    check_against_naive(4, 12, 7, 3, window)


def uniform_attention_expectation(v, q_pos, k_start, window):
    """With q = 0 every visible key scores the same: the output is the mean of the visible values."""
    rows = []
    for p in q_pos:
        lo = 0 if window is None else p - window
        idx = [j for j in range(v.shape[2]) if lo <= k_start + j <= p]
        rows.append(v[:, :, idx].mean(2))
    return torch.stack(rows, 2)


@pytest.mark.parametrize("fn", [attention, attention_naive], ids=["attention", "naive"])
@pytest.mark.parametrize("window", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("q_start, k_start, Tq, Tk", [(0, 0, 10, 10), (9, 4, 3, 8), (11, 11, 1, 1)])
def test_window_sees_exactly_w_plus_one_keys(fn, window, q_start, k_start, Tq, Tk):
    """Query at position p sees keys p-W .. p: W+1 keys, one more than flash-attn's window convention."""
    v = torch.arange(1.0, Tk + 1, dtype=torch.float64).pow(2)  # distinct, so any other key set differs
    v = v[None, None, :, None].expand(B, H, Tk, d) * torch.randn(1, 1, 1, d, dtype=torch.float64)
    q = torch.zeros(B, H, Tq, d, dtype=torch.float64)
    k = torch.randn(B, H, Tk, d, dtype=torch.float64)
    out = fn(q, k, v, q_start, k_start, window)
    expected = uniform_attention_expectation(v, range(q_start, q_start + Tq), k_start, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # the naive twin runs in fp32


def test_window_boundary_key_is_decisive():
    """Key p-W must be seen and key p-W-1 must not: each one alone changes the answer."""
    W, T = 2, 6
    q = torch.ones(1, 1, T, 1)
    k = torch.zeros(1, 1, T, 1)
    v = torch.zeros(1, 1, T, 1)
    k[0, 0, 2], v[0, 0, 2] = 50.0, 1.0  # a huge score at position 2
    out = attention(q, k, v, window=W)[0, 0, :, 0]
    # queries 2, 3, 4 see position 2 (it is p-W for query 4) and put all weight on it; 5 does not
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_plain_pytorch(dtype):
    """Error against fp64 at most ~2x that of plain PyTorch (softmax(q k^T) v) in the same precision."""
    q64, k64, v64 = (t.detach() for t in qkv(33, 40))
    q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
    ref = attention_naive(q.double(), k.double(), v.double(), 7, 0, 5)
    out = attention(q, k, v, 7, 0, 5)
    mask = torch.ones(33, 40, dtype=torch.bool).tril(7) & ~torch.ones(33, 40, dtype=torch.bool).tril(1)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    plain = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    assert out.dtype == dtype
    err, err_plain = (out.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert err <= 2 * err_plain, (err, err_plain)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, q_start, k_start, window",
    [
        ((B, H, 4, d), (B, H, 4, d + 1), (B, H, 4, d + 1), 0, 0, None),  # head widths differ
        ((B, H, 4, d), (B, H, 4, d), (B, H, 5, d), 0, 0, None),  # k and v lengths differ
        ((B, H + 1, 4, d), (B, H, 4, d), (B, H, 4, d), 0, 0, None),  # heads differ
        ((B, H, 4, d), (B, H, 4, d), (B, H, 4, d), 2, 0, None),  # last query beyond the last key
        ((B, H, 4, d), (B, H, 4, d), (B, H, 4, d), 0, 1, None),  # first query before the first key
        ((B, H, 4, d), (B, H, 4, d), (B, H, 4, d), 0, 0, -1),  # negative window
    ],
)
def test_bad_inputs_raise(q_shape, k_shape, v_shape, q_start, k_start, window):
    with pytest.raises(ValueError):
        attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape), q_start, k_start, window)


def test_compiled_flex_keeps_compiling_past_dynamos_default_limit():
    """Dynamo runs a function eagerly once it holds `recompile_limit` entries: for flex_attention that means
    materialising every score. `with_recompile_room` (what our compiled flex runs under) lifts the limit."""
    import torch._dynamo.config as dynamo_config

    from ratlm.ops.attention.flex import flex_attention_fn
    from ratlm.ops.compiling import with_recompile_room

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    total = "accumulated_" + name
    compiles = []

    def backend(graph, inputs):
        compiles.append(graph)
        return graph.forward

    def plain(x):
        return x * 2

    def roomy(x):
        return x * 3

    torch._dynamo.reset()
    plain_fn = torch.compile(plain, backend=backend, dynamic=False)
    roomy_fn = with_recompile_room(torch.compile(roomy, backend=backend, dynamic=False), limit=8)
    with dynamo_config.patch({name: 1, total: 2}):  # (a monkeypatch would delete the setting when it undoes)
        for n in (2, 3, 4):
            plain_fn(torch.ones(n))
        assert len(compiles) == 1  # the limit: shapes 3 and 4 ran eagerly
        for n in (2, 3, 4):
            torch.testing.assert_close(roomy_fn(torch.ones(n)), torch.full((n,), 3.0))
        assert len(compiles) == 1 + 3  # each shape compiled, past both limits
        assert (getattr(dynamo_config, name), getattr(dynamo_config, total)) == (1, 2)  # restored
    assert flex_attention_fn(False) is not flex_attention_fn(True)
    torch._dynamo.reset()


@pytest.mark.parametrize("T", [1, 130, 256, 300])
def test_flex_window_pads_to_whole_blocks_and_matches_sdpa(T):
    """FlexAttention (eager on the CPU, forward only there) over T padded to a multiple of 128: the real rows
    equal SDPA's sliding window. The GPU tests compare gradients too (tests/ops/test_scan_gpu.py)."""
    from ratlm.ops.attention.flex import window_attention_flex
    from ratlm.ops.attention.sdpa import attention_sdpa

    torch.manual_seed(T)
    q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
    out = window_attention_flex(q, k, v, window=40)
    assert out.shape == (1, 2, T, 16)
    torch.testing.assert_close(out, attention_sdpa(q, k, v, window=40), rtol=1e-5, atol=1e-5)
