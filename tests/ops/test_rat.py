"""RAT's mixing core (SPEC §1.4-1.7): `rat_mix`, `chunk_attention`, `rat_mix_cached` against their twins."""

import math

import pytest
import torch
from pieces import piece_sizes

from ratlm.cache import RATState
from ratlm.ops import (
    apply_rope,
    attention,
    chunk_attention,
    chunk_attention_naive,
    gated_scan,
    rat_mix,
    rat_mix_cached,
    rat_mix_naive,
    rope_cos_sin,
)

B, H = 2, 4


def lengths(L: int) -> list[int]:
    return sorted({T for T in (1, 5, L - 1, L, L + 1, 3 * L + 2) if T >= 1})


CASES = [(L, T) for L in (1, 4, 16) for T in lengths(L)]


def inputs(T: int, G: int, d: int, dtype=torch.float64, requires_grad=False):
    q = torch.randn(B, T, G, d, dtype=dtype)
    k = torch.randn(B, T, G, d, dtype=dtype)
    v = torch.randn(B, T, H, d, dtype=dtype)
    g = torch.rand(B, T, H, d, dtype=torch.float64).clamp(0.02, 0.98).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g)]


def tile(x, G: int):
    """[B, T, G, d] -> [B, T, H, d]: head j uses group j mod G (SPEC §1.4)."""
    return x[:, :, [j % G for j in range(H)]]


def rat_reference_fp64(q, k, v, g, L, position="rope"):
    """SPEC §1.4-1.7 in fp64, one query at a time, sharing no code with the package."""
    q, k, v, g = (t.double() for t in (q, k, v, g))
    T, d = v.shape[1], v.shape[3]
    G = q.shape[2]
    qh, kh = tile(q, G), tile(k, G)
    vs, ks = torch.zeros_like(v), torch.zeros_like(v)  # all states [B, T, H, d]
    sv, sk = torch.zeros_like(v[:, 0]), torch.zeros_like(v[:, 0])  # running states [B, H, d]
    for t in range(T):
        if t % L == 0:
            sv, sk = torch.zeros_like(sv), torch.zeros_like(sk)
        sv = g[:, t] * sv + (1 - g[:, t]) * v[:, t]
        sk = g[:, t] * sk + (1 - g[:, t]) * kh[:, t]
        vs[:, t], ks[:, t] = sv, sk
    if position == "rope":
        c = torch.arange(T, dtype=torch.float64) // L
        freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.cat([c[:, None] * freq, c[:, None] * freq], -1)[None, :, None]  # [1, T, 1, d]

        def rot(x):
            return x * ang.cos() + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * ang.sin()

        qh, ks = rot(qh), rot(ks)
    out = torch.empty_like(v)
    for t in range(T):
        c = t // L
        ends = [cc * L + L - 1 for cc in range(c)] + [t]
        p = torch.softmax((ks[:, ends] * qh[:, t : t + 1]).sum(-1) / math.sqrt(d), dim=1)  # [B, c+1, H]
        out[:, t] = (p[..., None] * vs[:, ends]).sum(1)
    return out


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("L, T", CASES)
def test_rat_mix_matches_naive_outputs_and_grads(L, T, G, position):
    d = 8 if (L + T + G) % 2 else 16  # both head widths, spread over the cases
    q, k, v, g = leaves = inputs(T, G, d, requires_grad=True)
    out = rat_mix(q, k, v, g, L, position)
    ref = rat_mix_naive(q, k, v, g, L, position)
    assert out.shape == (B, T, H, d) and out.dtype == v.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for name, a, b in zip("qkvg", grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("L, T, G, d", [(1, 7, 2, 8), (4, 14, 1, 16), (16, 50, 2, 8), (5, 23, 4, 16)])
def test_rat_mix_matches_fp64_spec_reference(L, T, G, d, position):
    q, k, v, g = inputs(T, G, d)
    ref = rat_reference_fp64(q, k, v, g, L, position)
    torch.testing.assert_close(rat_mix(q, k, v, g, L, position), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rat_mix_naive(q, k, v, g, L, position), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunk_size_one_is_causal_attention_on_gated_inputs(G, position):
    """L = 1 is attention (SPEC §1): states (1-g) x and (1-g) k, chunk index = token index."""
    T, d = 11, 8
    q, k, v, g = inputs(T, G, d)
    qh = tile(q, G).transpose(1, 2)  # [B, H, T, d]
    kh = ((1 - g) * tile(k, G)).transpose(1, 2)
    vh = ((1 - g) * v).transpose(1, 2)
    if position == "rope":
        cos, sin = rope_cos_sin(torch.arange(T), d)
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
    expected = attention(qh, kh, vh).transpose(1, 2)
    torch.testing.assert_close(rat_mix(q, k, v, g, 1, position), expected, rtol=1e-5, atol=1e-5)


def test_chunk_size_beyond_length_is_a_gated_rnn():
    """L >= T: one chunk, the output is the running value state itself (SPEC §1.7, chunk 0)."""
    q, k, v, g = inputs(9, 2, 8)
    states = gated_scan(v.flatten(2), g.flatten(2)).view(v.shape)
    torch.testing.assert_close(rat_mix(q, k, v, g, 16), states.double(), rtol=1e-5, atol=1e-6)


def test_heads_use_group_j_mod_g():
    """With G = 2, heads 0 and 2 share queries/keys, heads 0 and 1 do not (tiling, not repeat_interleave)."""
    T, d = 9, 8
    q, k, _, _ = inputs(T, 2, d)
    v = torch.randn(B, T, 1, d, dtype=torch.float64).expand(B, T, H, d)  # same values and gates in all heads
    g = torch.full((B, T, H, d), 0.5, dtype=torch.float64)
    out = rat_mix(q, k, v, g, 4)
    torch.testing.assert_close(out[:, :, 0], out[:, :, 2])
    torch.testing.assert_close(out[:, :, 1], out[:, :, 3])
    assert (out[:, 4:, 0] - out[:, 4:, 1]).abs().max() > 1e-3


def chunk_attention_inputs(T, C, d=8):
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k_sum, v_sum = (torch.randn(B, H, C, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return q, k, v, k_sum, v_sum


@pytest.mark.parametrize("scale", [None, 0.3])
def test_rat_mix_scale_matches_naive(scale):
    q, k, v, g = inputs(13, 2, 8)
    out = rat_mix(q, k, v, g, 4, scale=scale)
    torch.testing.assert_close(out, rat_mix_naive(q, k, v, g, 4, scale=scale), rtol=1e-5, atol=1e-5)
    if scale is not None:
        assert (out - rat_mix(q, k, v, g, 4)).abs().max() > 1e-3


@pytest.mark.parametrize("T, C", [(1, 0), (6, 0), (1, 3), (9, 1), (13, 4)])
def test_chunk_attention_matches_naive(T, C):
    leaves = chunk_attention_inputs(T, C)
    chunk_ids = torch.randint(0, C + 1, (T,))  # any visibility pattern, not only sorted ones
    out = chunk_attention(*leaves, chunk_ids, 0.3)
    ref = chunk_attention_naive(*leaves, chunk_ids, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True, materialize_grads=True)
    grads_ref = torch.autograd.grad((ref * weight).sum(), leaves, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["q", "k", "v", "k_sum", "v_sum"], grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("fn", [chunk_attention, chunk_attention_naive], ids=["masked", "naive"])
@pytest.mark.parametrize("C", [0, 3])
def test_chunk_zero_returns_own_value(fn, C):
    """Queries in chunk 0 see no summary, only their own state: the output is v (SPEC §1.7)."""
    q, k, v, k_sum, v_sum = (t.detach() for t in chunk_attention_inputs(7, C))
    out = fn(q, k, v, k_sum, v_sum, torch.zeros(7, dtype=torch.long), 0.125)
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)


def test_bf16_error_within_twice_the_naive():
    """Tolerance rule: rat_mix's error in bf16 autocast (vs fp64) at most ~2x the naive twin's in bf16."""
    L, T, G, d = 4, 38, 2, 16
    q, k, v, g = inputs(T, G, d, dtype=torch.float32)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()  # g stays fp32, as the mixer computes it
    ref = rat_reference_fp64(q, k, v, g, L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rat_mix(q, k, v, g, L)
        naive = rat_mix_naive(q, k, v, g, L)
    assert out.dtype == torch.bfloat16
    err, err_naive = (out.double() - ref).abs().max(), (naive.double() - ref).abs().max()
    assert err <= 2 * err_naive, (err, err_naive)


def new_rat_state(T: int, L: int, d: int, dtype=torch.float64) -> RATState:
    """A state as RAT.new_state makes it, with the summary slots poisoned: none may be read before written."""
    C = math.ceil(T / L)
    return RATState(
        keys=torch.full((B, H, C, d), float("nan"), dtype=dtype),
        values=torch.full((B, H, C, d), float("nan"), dtype=dtype),
        k_run=torch.zeros(B, H, d),
        v_run=torch.zeros(B, H, d),
    )


@pytest.mark.parametrize("how", ["whole", "tokens", "random"])
@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("L, T, G", [(1, 6, 2), (4, 3, 1), (4, 14, 2), (16, 37, 4), (5, 25, 1)])
def test_rat_mix_cached_in_pieces_equals_whole(L, T, G, position, how):
    d = 8
    q, k, v, g = inputs(T, G, d)
    full = rat_mix(q, k, v, g, L, position)
    state, outs, p = new_rat_state(T, L, d), [], 0
    for n in piece_sizes(T, how, longest=6):
        piece = [t[:, p : p + n] for t in (q, k, v, g)]
        outs.append(rat_mix_cached(*piece, state, L, position))
        p += n
        assert state.seen == p
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)

    # the cache holds the completed chunks' value summaries and the current chunk's running states
    vs = gated_scan(v.flatten(2), g.flatten(2), L).view(v.shape).transpose(1, 2)  # [B, H, T, d]
    done = T // L
    summaries = vs[:, :, L - 1 :: L][:, :, :done].double()
    torch.testing.assert_close(state.values[:, :, :done], summaries, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state.v_run, vs[:, :, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, g_shape",
    [
        ((B, 5, 2, 8), (B, 5, 1, 8), (B, 5, H, 8), (B, 5, H, 8)),  # q and k differ
        ((B, 4, 2, 8), (B, 4, 2, 8), (B, 5, H, 8), (B, 5, H, 8)),  # q shorter than v
        ((B, 5, 2, 4), (B, 5, 2, 4), (B, 5, H, 8), (B, 5, H, 8)),  # head widths differ
        ((B, 5, 3, 8), (B, 5, 3, 8), (B, 5, H, 8), (B, 5, H, 8)),  # G = 3 does not divide H = 4
        ((B, 5, 2, 8), (B, 5, 2, 8), (B, 5, H, 8), (B, 5, H, 4)),  # g not v's shape
    ],
)
def test_bad_shapes_raise(q_shape, k_shape, v_shape, g_shape):
    with pytest.raises(ValueError):
        rat_mix(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape), torch.rand(g_shape), 4)


@pytest.mark.parametrize("chunk_size, position", [(0, "rope"), (-1, "rope"), (4, "alibi"), (4, "Rope")])
def test_bad_options_raise(chunk_size, position):
    q, k, v, g = inputs(5, 2, 8)
    with pytest.raises(ValueError):
        rat_mix(q, k, v, g, chunk_size, position)
    # the cached path too, which once took any position but "rope" for "nope"
    with pytest.raises(ValueError, match="chunk_size" if chunk_size < 1 else "position"):
        rat_mix_cached(q, k, v, g, new_rat_state(5, 4, 8), chunk_size, position)
