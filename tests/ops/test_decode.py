"""One-token decode ops: Triton kernels (interpreted on CPU) against their plain-PyTorch twins, and the twins
(positions read on the device, the whole static cache masked) against the general cached path (host ints)."""

import copy
import importlib
import math

import pytest
import torch

from ratlm.cache import KVState, RATState, WindowState, rope_table
from ratlm.ops import attention_naive, rat_mix_cached
from ratlm.ops.attention.decode import attention_decode
from ratlm.ops.attention.decode_naive import attention_decode_naive
from ratlm.ops.rat.decode import rat_decode
from ratlm.ops.rat.decode_naive import rat_decode_naive

B, H, G = 3, 4, 2
STATE_FIELDS = {
    RATState: ("keys", "values", "k_run", "v_run", "pos"),
    KVState: ("keys", "values", "pos"),
    WindowState: ("keys", "values", "pos"),
}


@pytest.fixture
def kernels(poison):
    """The Triton decode modules (interpreted without CUDA: tests/ops/conftest.py), their outputs and
    workspaces NaN-filled before the kernels write them."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        import triton.language as tl

        if type(tl.sum).__name__ != "InterpretedFunction":
            pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see tests/ops/conftest.py)")
    # import_module, not `import a.b as m`: ratlm.ops.attention is also the name of a function
    modules = [importlib.import_module(f"ratlm.ops.{op}.decode_triton") for op in ("attention", "rat")]
    poison(*modules)
    return modules


def rat_state(positions, L, d, C, dtype=torch.float32, device="cpu", H=H):
    """A state with each row at its own position; summary slots not yet written hold NaN."""
    pos = torch.tensor(positions, device=device)
    keys = torch.randn(B, H, C, d, device=device).to(dtype)
    values = torch.randn(B, H, C, d, device=device).to(dtype)
    unwritten = torch.arange(C, device=device)[None, :] >= (pos // L)[:, None]  # [B, C]
    keys[unwritten[:, None, :, None].expand_as(keys)] = float("nan")
    values[unwritten[:, None, :, None].expand_as(values)] = float("nan")
    k_run, v_run = torch.randn(B, H, d, device=device), torch.randn(B, H, d, device=device)
    rope = rope_table(C, d, 10000.0, device)
    return RATState(
        keys=keys, values=values, k_run=k_run, v_run=v_run, seen=max(positions), pos=pos, rope=rope
    )


def rat_inputs(d, dtype=torch.float32, device="cpu", H=H):
    q, k = (torch.randn(B, G, d, device=device).to(dtype) for _ in range(2))
    v, g, z = (torch.randn(B, H, d, device=device).to(dtype) for _ in range(3))
    return q, k, v, g, torch.randn(H * d, device=device), z


def kv_state(cls, positions, N, d, max_len, dtype=torch.float32, device="cpu", H=H):
    pos = torch.tensor(positions, device=device)
    keys = torch.randn(B, H, N, d, device=device).to(dtype)
    values = torch.randn(B, H, N, d, device=device).to(dtype)
    written = torch.arange(N, device=device)[None, :] < pos[:, None]  # a ring buffer fills up, then wraps
    keys[~written[:, None, :, None].expand_as(keys)] = float("nan")
    values[~written[:, None, :, None].expand_as(values)] = float("nan")
    rope = rope_table(max_len, d, 10000.0, device)
    return cls(keys=keys, values=values, seen=max(positions), pos=pos, rope=rope)


def assert_same_state(a, b, atol):
    assert a.seen == b.seen
    for name in STATE_FIELDS[type(a)]:
        torch.testing.assert_close(
            getattr(a, name).float(), getattr(b, name).float(), rtol=0, atol=atol, equal_nan=True, msg=name
        )


# The interpreter runs each program in Python: two heads (one per query group) keep these tests quick.
# Rows at: the very start, a chunk start, a chunk's last token (which writes a summary), mid-chunk.
@pytest.mark.parametrize(
    "L, positions, position, splits",
    [
        (4, [0, 8, 11], "rope", 1),
        (4, [1, 8, 11], "nope", 3),
        (1, [0, 5, 9], "rope", 3),
        (5, [4, 13, 22], "rope", 1),
    ],
)
def test_rat_kernel_matches_twin(kernels, L, positions, position, splits):
    d, C = 8, max(positions) // L + 2
    state = rat_state(positions, L, d, C, H=2)
    twin_state = copy.deepcopy(state)
    args = rat_inputs(d, H=2)
    out = kernels[1].rat_decode_triton(*args, state, L, position, config=dict(splits=splits, block_n=2))
    expected = rat_decode_naive(*args, twin_state, L, position)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_same_state(state, twin_state, atol=1e-5)


def test_rat_kernel_bf16_within_rounding_of_twin(kernels):
    d, C, L = 16, 6, 4
    state = rat_state([0, 8, 11], L, d, C, torch.bfloat16, H=2)
    twin_state = copy.deepcopy(state)
    args = rat_inputs(d, torch.bfloat16, H=2)
    out = kernels[1].rat_decode_triton(*args, state, L, "rope", config=dict(splits=2, block_n=4))
    expected = rat_decode_naive(*args, twin_state, L, "rope")
    assert out.dtype == torch.bfloat16
    # loose: the interpreter rounds fp32 to bf16 by truncation, a GPU (and the twin) to nearest
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert_same_state(state, twin_state, atol=3e-2)


@pytest.mark.parametrize(
    "cls, N, positions, splits",
    [(KVState, 9, [0, 3, 8], 2), (WindowState, 4, [0, 3, 13], 1), (WindowState, 4, [5, 6, 7], 2)],
)
def test_attention_kernel_matches_twin(kernels, cls, N, positions, splits):
    d = 8
    state = kv_state(cls, positions, N, d, max_len=16, H=2)
    twin_state = copy.deepcopy(state)
    q, k, v = (torch.randn(B, 2, d) for _ in range(3))
    out = kernels[0].attention_decode_triton(q, k, v, state, "rope", config=dict(splits=splits, block_n=2))
    expected = attention_decode_naive(q, k, v, twin_state, "rope")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_same_state(state, twin_state, atol=1e-5)


def test_plan_splits_fills_the_card_only_when_few_queries(kernels):
    plan = kernels[0].plan_splits
    dev = torch.device("cpu")  # plans as for 4 multiprocessors
    assert plan(4096, 256, dev) == (1, 256, 16, 1)  # many pairs: no split, tiles of 16 on one warp
    assert plan(4096, 256, dev, dict(num_warps=4))[2:] == (32, 4)  # a given warp count: the caller's tile
    assert plan(2, 4096, dev) == (16, 256, 32, 2)  # split: 8 programs per multiprocessor, (32, 2) tiles
    assert plan(2, 8, dev)[0] == 1  # too few slots to split
    assert plan(2, 4096, dev, dict(splits=3, block_n=16))[:3] == (3, 1376, 16)


@pytest.mark.parametrize("cls", [KVState, WindowState])
def test_attention_kernel_with_its_default_plan_matches_twin(kernels, cls):
    """No config: 1000 slots for 2 (sequence, head) pairs of each row split in 32-slot tiles."""
    d, N = 8, 1000
    assert kernels[0].plan_splits(B * 2, N, torch.device("cpu"))[0] > 1
    state = kv_state(cls, [3, 400, 999], N, d, max_len=1024, H=2)
    twin_state = copy.deepcopy(state)
    q, k, v = (torch.randn(B, 2, d) for _ in range(3))
    out = kernels[0].attention_decode_triton(q, k, v, state, "rope")
    expected = attention_decode_naive(q, k, v, twin_state, "rope")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_same_state(state, twin_state, atol=1e-5)


def test_rat_kernel_with_its_default_tiles_matches_twin(kernels):
    """No config: the plan splits 1024 summaries (as for 4 multiprocessors)."""
    d, C, L = 8, 1024, 4
    state = rat_state([0, 9, 4000], L, d, C, H=2)
    twin_state = copy.deepcopy(state)
    args = rat_inputs(d, H=2)
    assert kernels[0].plan_splits(B * 2, C, torch.device("cpu"))[0] > 1
    out = kernels[1].rat_decode_triton(*args, state, L, "rope")
    expected = rat_decode_naive(*args, twin_state, L, "rope")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_same_state(state, twin_state, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# device positions (decode path) against host ints (general path)


@pytest.mark.parametrize("position", ["rope", "nope"])
@pytest.mark.parametrize("L", [1, 4, 5])
def test_rat_decode_equals_general_cached_path(L, position):
    """Token after token from a prefix, the decode op and `rat_mix_cached` agree on outputs and states."""
    d, T0, steps = 8, 7, 9
    C = math.ceil((T0 + steps) / L)
    fresh = RATState(
        keys=torch.full((B, H, C, d), float("nan")), values=torch.full((B, H, C, d), float("nan")),
        k_run=torch.zeros(B, H, d), v_run=torch.zeros(B, H, d), rope=rope_table(C, d, 10000.0, "cpu"),
    )  # fmt: skip
    q, k = torch.randn(B, T0 + steps, G, d), torch.randn(B, T0 + steps, G, d)
    v, z = torch.randn(B, T0 + steps, H, d), torch.randn(B, T0 + steps, H, d)
    pre = torch.randn(B, T0 + steps, H, d)
    bias = torch.randn(H * d)
    g = torch.sigmoid(pre + bias.view(H, d))
    general = fresh
    rat_mix_cached(q[:, :T0], k[:, :T0], v[:, :T0], g[:, :T0], general, L, position)
    decode = copy.deepcopy(general)
    for t in range(T0, T0 + steps):
        y_general = (
            torch.sigmoid(z[:, t])
            * rat_mix_cached(*(x[:, t : t + 1] for x in (q, k, v, g)), general, L, position)[:, 0]
        )
        y_decode = rat_decode(q[:, t], k[:, t], v[:, t], pre[:, t], bias, z[:, t], decode, L, position)
        torch.testing.assert_close(y_decode, y_general, rtol=1e-5, atol=1e-5)
        assert decode.seen == general.seen == t + 1 and torch.equal(decode.pos, torch.full((B,), t + 1))
    assert_same_state(decode, general, atol=1e-5)


@pytest.mark.parametrize("window", [None, 2, 5])
def test_attention_decode_equals_full_attention(window):
    """Sequences at different positions: each new token attends exactly to its own positions p-W .. p."""
    d, max_len = 8, 12
    N = max_len if window is None else min(window + 1, max_len)
    cls = KVState if window is None else WindowState
    positions = [0, 4, 9]
    keys, values = torch.randn(B, H, max_len, d), torch.randn(B, H, max_len, d)
    state = cls(
        keys=torch.full((B, H, N, d), float("nan")), values=torch.full((B, H, N, d), float("nan")),
        seen=max(positions), pos=torch.tensor(positions), rope=rope_table(max_len, d, 10000.0, "cpu"),
    )  # fmt: skip
    for b, p in enumerate(positions):  # the cache holds the (already rotated) keys of positions < p
        for s in range(max(0, p - N), p):
            state.keys[b, :, s % N], state.values[b, :, s % N] = keys[b, :, s], values[b, :, s]
    q, k, v = (torch.randn(B, H, d) for _ in range(3))
    out = attention_decode(q, k, v, state, position="nope")
    for b, p in enumerate(positions):
        ks = torch.cat([keys[b : b + 1, :, :p], k[b : b + 1, :, None]], 2)
        vs = torch.cat([values[b : b + 1, :, :p], v[b : b + 1, :, None]], 2)
        expected = attention_naive(q[b : b + 1, :, None], ks, vs, q_start=p, window=window)[:, :, 0]
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.keys[b, :, p % N], k[b])  # the new entry went to its slot
    assert state.seen == 10 and state.pos.tolist() == [1, 5, 10]


def test_bad_shapes_raise():
    state = rat_state([0, 1, 2], 4, 8, 3)
    q, k, v, g, bias, z = rat_inputs(8)
    with pytest.raises(ValueError):
        rat_decode(q, k[:, :1], v, g, bias, z, state, 4)
    with pytest.raises(ValueError):
        rat_decode(q, k, v, g[..., :4], bias, z, state, 4)
    with pytest.raises(ValueError):
        rat_decode(q, k, v, g, bias, z, state, 0)
    kv = kv_state(KVState, [0, 1, 2], 5, 8, 5)
    with pytest.raises(ValueError, match="one query per head"):
        attention_decode(q, k, v, kv)  # query groups are RAT's; attention has a query per head


# ---------------------------------------------------------------------------------------------------------
# on the GPU: the compiled kernels at the paper's head width, bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_rat_kernel_on_cuda_matches_twin(splits):
    from ratlm.ops.rat.decode_triton import rat_decode_triton

    d, L, C = 128, 16, 40
    state = rat_state([0, 300, 639], L, d, C, torch.bfloat16, "cuda")
    twin = copy.deepcopy(state)
    args = rat_inputs(d, torch.bfloat16, "cuda")
    out = rat_decode_triton(*args, state, L, "rope", config=None if splits is None else dict(splits=splits))
    expected = rat_decode_naive(*args, twin, L, "rope")
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert_same_state(state, twin, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [None, 1, 4])
@pytest.mark.parametrize("cls, N", [(KVState, 700), (WindowState, 65)])
def test_attention_kernel_on_cuda_matches_twin(cls, N, splits):
    from ratlm.ops.attention.decode_triton import attention_decode_triton

    d = 128
    state = kv_state(cls, [0, 64, 699], N, d, 700, torch.bfloat16, "cuda")
    twin = copy.deepcopy(state)
    q, k, v = (torch.randn(B, H, d, device="cuda").bfloat16() for _ in range(3))
    out = attention_decode_triton(
        q, k, v, state, "rope", config=None if splits is None else dict(splits=splits)
    )
    expected = attention_decode_naive(q, k, v, twin, "rope")
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert_same_state(state, twin, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs sm90+ (PDL)"
)
@pytest.mark.parametrize("graphed", [False, True])
def test_pdl_changes_no_bit_of_a_rat_block_step(graphed):
    """A RAT block's decode steps at batch 1 over 2048 chunk summaries (norm, one-row products, split
    attention, step, the residual added in place by the output product), 12 in a row, each output the next
    input, through a chunk's end; eagerly or replayed from a CUDA graph: the same bits with programmatic
    dependent launch as without (a kernel reading its predecessor's output too early would differ)."""
    from ratlm.bench.decode import paper_scale, randomise
    from ratlm.cache import move_to
    from ratlm.model import make_mixer
    from ratlm.ops import pdl
    from ratlm.ops.attention.decode_triton import plan_splits

    torch.manual_seed(0)
    cfg = paper_scale().layer.replace(layers="rat")
    mixer = make_mixer("rat", cfg).to("cuda", torch.bfloat16).eval()
    start = mixer.new_state(1, 32768 + 64, "cuda", torch.bfloat16)
    randomise([start])
    move_to(start, 32768 - 8)  # steps 32760..32771: the chunk ending at 32767 is closed and stored
    assert plan_splits(cfg.n_heads, start.keys.shape[2], start.keys.device)[0] > 1  # the split path
    x0 = torch.randn(1, 1, cfg.d_model, device="cuda", dtype=torch.bfloat16)

    def steps(on: bool):
        state, x = copy.deepcopy(start), x0.clone()
        outs = []
        with pdl.enabled_as(on), torch.no_grad():
            if not graphed:
                for _ in range(12):
                    x = mixer(x, state, inplace=True)
                    outs.append(x.clone())
                return outs, state
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                mixer(x.clone(), copy.deepcopy(state), inplace=True)  # compiles the kernels before capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                mixer(x, state, inplace=True)
            for _ in range(12):
                graph.replay()
                outs.append(x.clone())
            return outs, state

    with pdl.enabled_as(True):
        assert pdl.wanted(x0)
    (with_pdl, state_pdl), (without, state_plain) = steps(True), steps(False)
    assert not torch.equal(with_pdl[0], with_pdl[-1])
    for a, b in zip(with_pdl, without, strict=True):
        assert torch.equal(a, b)
    for name in STATE_FIELDS[RATState]:
        assert torch.equal(getattr(state_pdl, name), getattr(state_plain, name)), name


def test_pdl_switch_and_where_it_applies():
    from ratlm.ops import pdl

    assert pdl.launch_options(False) == {} and pdl.launch_options(True) == {"launch_pdl": True}
    assert pdl.kernel_options(torch.zeros(1)) == {"PDL": False}  # a CPU tensor: no PDL, no launch option
    assert not pdl.active("cpu")
    before = pdl.enabled()
    with pdl.enabled_as(not before):
        assert pdl.enabled() is (not before)
    assert pdl.enabled() is before
    if torch.cuda.is_available():
        with pdl.enabled_as(False):
            assert not pdl.wanted(torch.zeros(1, device="cuda"))
        with pdl.enabled_as(True):
            hopper = torch.cuda.get_device_capability()[0] >= 9
            assert pdl.active("cuda") == (hopper and pdl.gdc_wait is not None)
