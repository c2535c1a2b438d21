"""`ratlm bench decode` and `ratlm bench generate`: decoding speed on one GPU (issue 5), checks first.

Phases, each with its share of the time budget (a case that would not fit is skipped and recorded):
- check: the Triton decode kernels against their PyTorch twins (bf16; error at most twice the twin's against
  an fp32 reference), and CUDA-graph decoding against eager and against the full forward.
- layer: one mixer's decode step (norm, projections, mixer, residual) with T = 4K..128K tokens in the
  cache, batch 1 and 512, the paper's layer shape (D 2048, 16 heads of 128, G 2, L 16, W 1024), replayed
  from a CUDA graph: RAT, attention, sliding window, RNN; a few kernel tilings on the headline cases. Each
  replay resets the positions and times 16 steps at T - 8 .. T + 7, so the cache read is T's however many
  replays run.
- latency: the 1.3B presets at batch 1 after a 3072-token prompt: ms per token through the CUDA-graph
  step (and eager); greedy tokens checked against the full forward.
- throughput: the paper's Table 1 method: a 3072-token prompt, then 1024 greedy tokens at the largest
  batch that fits (`ratlm.cache.plan_batch`); tokens/s = batch x 1024 / decode seconds. One prefill
  forward is timed and its rows copied over the batch (--full-prefill prefills every row); decoding runs
  all 1024 steps when the budget allows, else steps sampled across the 1024 positions are integrated. The
  JSON says which ("decode_method", "prefill_whole_batch_measured").
Random weights, bf16. JSON lines go to $OUT/bench_decode.jsonl (OUT defaults to ./bench-out), a table to
stdout; a failing case is recorded with its error and the run goes on. --tiny runs every code path at toy
sizes, on the CPU too (eager steps there; the kernel checks need TRITON_INTERPRET=1).

    PYTHONPATH=src python -m ratlm.bench.decode            # all phases, about 6 minutes on one H200
    PYTHONPATH=src python -m ratlm.bench.decode --quick    # fewer cases, sampled decoding, about 3
    TRITON_INTERPRET=1 PYTHONPATH=src python -m ratlm.bench.decode --tiny   # a smoke test, no GPU needed
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import (
    KVState,
    RATState,
    WindowState,
    free_bytes,
    move_to,
    plan_batch,
    rope_table,
    row_tensors,
    state_nbytes,
)
from ..config import ModelConfig, preset
from ..generation import DecodeStep, prefill
from ..model import LanguageModel, make_mixer
from ..ops import pdl
from ..ops.backend import use_backend

MODELS = ["rat-1.3b", "attn-1.3b", "rat-swa-1.3b", "attn-swa-1.3b"]
# PERF.md: the reference implementation on an H200 (ms per layer step; tokens/s at its batch)
REF_LAYER_MS = {
    ("rat", 4096, 512): 0.636, ("attn", 4096, 512): 3.829, ("rnn", 4096, 512): 0.453,
    ("rat", 16384, 512): 1.161, ("attn", 16384, 512): 14.80, ("rat", 4096, 1): 0.748,
    ("attn", 4096, 1): 0.446, ("rat", 131072, 1): 0.743, ("attn", 131072, 1): 0.384,
}  # fmt: skip
REF_TOKENS_S = {"rat-1.3b": 53524, "attn-1.3b": 2035, "rat-swa-1.3b": 25867, "attn-swa-1.3b": 4569}
REF_MS_PER_TOKEN = {"rat-1.3b": 26.0, "attn-1.3b": 56.0}
TARGETS = {
    "layer rat T4096 B512 ms": 0.30, "layer rat T131072 B1 ms": 0.040, "rat-1.3b B1 ms/token": 1.5,
    "rat-1.3b tokens/s": 80000, "rat-swa-1.3b tokens/s": 40000,
}  # fmt: skip
TILINGS = [(32, 2), (32, 4), (16, 4), (64, 4)]  # (BLOCK_N, num_warps) tried beside the default on headlines


@dataclass
class Scale:
    """Sizes of one run: the paper's, or toy ones (--tiny) that exercise the same code anywhere."""

    device: str
    prompt: int  # prompt tokens before decoding (throughput and latency)
    new: int  # decoded tokens (throughput)
    layer: ModelConfig  # the layer benchmark's shape
    layer_ts: list[int]
    layer_bs: list[int]
    models: dict = field(default_factory=dict)  # preset overrides
    latency_steps: int = 256
    free: int | None = None  # memory to plan with (default: the device's free memory)
    headlines: tuple = (("rat", 4096, 512), ("rat", 131072, 1), ("attn", 4096, 512))


def paper_scale() -> Scale:
    return Scale("cuda", 3072, 1024, preset("rat-1.3b", window=1024), [4096, 16384, 65536, 131072], [512, 1])


def tiny_scale(device: str) -> Scale:
    small = dict(d_model=64, n_layers=2, n_heads=4, n_groups=2, d_ffn=128, vocab_size=300, window=16)
    layer = preset("rat-1.3b", **small)
    return Scale(device, 40, 12, layer, [64, 200], [3, 1], small, 6, 2**21, (("rat", 64, 3), ("attn", 64, 3)))


class Run:
    """Budget, JSON lines and the final table."""

    def __init__(self, out: Path, budget_s: float, scale: Scale):
        self.t0 = time.perf_counter()
        self.budget_s, self.scale = budget_s, scale
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "bench_decode.jsonl"
        self.file = self.path.open("a")
        self.rows: list[tuple[str, str, str]] = []
        self.records: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, phase: str, case: str, **data) -> dict:
        row = {"phase": phase, "case": case, "elapsed_s": round(self.elapsed(), 1), **data}
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()
        self.records.append(row)
        return row

    def line(self, phase: str, case: str, text: str) -> None:
        self.rows.append((phase, case, text))
        print(f"[{self.elapsed():6.1f}s] {phase:10s} {case:28s} {text}", flush=True)

    def guarded(self, phase: str, case: str, fn, *args, **kwargs):
        """Run one case; an exception is recorded (with its traceback's tail), never fatal."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a benchmark keeps going
            tb = traceback.format_exc()[-3000:]
            self.record(phase, case, status="error", error=repr(e)[:500], traceback=tb)
            self.line(phase, case, f"ERROR {type(e).__name__}: {str(e)[:150]}")
            return None
        finally:
            release()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds fn() keeps the device busy: CUDA events around it, or the host clock on the CPU."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def build(name: str, scale: Scale) -> LanguageModel:
    """A preset with the paper's random init, built on the device and cast to bf16."""
    torch.manual_seed(0)
    with torch.device(scale.device):
        model = LanguageModel(preset(name, **scale.models))
    return model.to(torch.bfloat16).eval()


def randomise(states) -> None:
    """Random numbers in every cached tensor: timing never runs on zeros."""
    for s in states:
        for attr in row_tensors(s):
            getattr(s, attr).normal_()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device copy (bytes read plus written): the ceiling a decode step is held against."""
    x = torch.empty(2**30 if device == "cuda" else 2**24, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * 10 * x.numel() / timed(lambda: [y.copy_(x) for _ in range(10)]) / 1e9


def graph_of(fn, states, steps: int):
    """fn() captured `steps` times in one CUDA graph; the states' host counters are left as they were."""
    seen = [s.seen for s in states]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    for s, n in zip(states, seen, strict=True):
        s.seen = n
    return graph


def repeated(fn, states, n: int, cuda: bool, at: int | None = None, before=None):
    """One callable running fn() n times: a CUDA graph of the n calls, replayed (captured, and replayed once
    here), on CUDA; a loop elsewhere.

    at: each call first puts the states at position `at` (a fill of the device counters, inside the graph),
    so that every call times the steps at positions at .. at + n - 1 however often it runs. before: also
    called first in each call (inside the graph), e.g. to restore an input the steps update in place.
    """

    def steps():
        if at is not None:
            for s in states:
                move_to(s, at)
        if before is not None:
            before()
        for _ in range(n):
            fn()

    if cuda:
        graph = graph_of(steps, states, 1)
        graph.replay()
        return graph.replay
    return steps


def warm_up(fn, n: int = 2) -> None:
    """n eager calls on a side stream (on CUDA), as graph capture wants."""
    if not torch.cuda.is_available():
        for _ in range(n):
            fn()
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def kernels_runnable(device: str) -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    try:
        import triton.language as tl
    except ImportError:
        return "triton is not installed"
    if device != "cuda" and type(tl.sum).__name__ != "InterpretedFunction":
        return "no CUDA and TRITON_INTERPRET=1 was not set before triton was imported"
    return None


def check_kernels(run: Run) -> None:
    """The Triton decode kernels against their twins, bf16, sequences at scattered positions."""
    from ..ops.attention.decode_naive import attention_decode_naive
    from ..ops.attention.decode_triton import attention_decode_triton
    from ..ops.rat.decode_naive import rat_decode_naive
    from ..ops.rat.decode_triton import rat_decode_triton

    dev = run.scale.device
    reason = kernels_runnable(dev)
    if reason:
        run.record("check", "kernels", status="skipped", reason=reason)
        run.line("check", "kernels", f"skipped: {reason}")
        return
    tiny = dev != "cuda"
    B, H, G, d, L = (3, 2, 2, 16, 4) if tiny else (6, 16, 2, 128, 16)  # positions // L < C below

    def randn(*shape):
        return torch.randn(*shape, device=dev).bfloat16()

    def fp32(obj):
        out = copy.deepcopy(obj)
        for name, value in vars(out).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(out, name, value.float())
        return out

    def compare(case, out, state, twin_out, twin_state, ref_out, ref_state):
        err, err_twin = rel_err(out, ref_out), rel_err(twin_out, ref_out)
        state_errs = {n: rel_err(getattr(state, n), getattr(ref_state, n)) for n in row_tensors(state)}
        # Triton's CPU interpreter rounds fp32 to bf16 by truncation (a GPU to nearest): twice the error
        ok = err <= (2 if dev == "cuda" else 4) * err_twin + 1e-3 and all(
            e < 2e-2 for e in state_errs.values()
        )
        ok = ok and torch.equal(state.pos, twin_state.pos) and bool(torch.isfinite(out).all())
        status = "pass" if ok else "FAIL"
        run.record("check", case, status=status, rel_err=err, twin_rel_err=err_twin, state=state_errs)
        run.line("check", case, f"{status} rel err {err:.1e} (twin {err_twin:.1e})")

    # (summary slots C, positions: chunk starts and ends, the first and last slot)
    rat_cases = (
        [(8, [0, 3, 31])]
        if tiny
        else [(64, [0, 15, 16, 500, 1023, 777]), (4096, [0, 65535, 31, 4000, 2, 47])]
    )
    for C, positions in rat_cases:
        for splits in (None, 1, 3):
            pos = torch.tensor(positions[:B], device=dev)
            k_run, v_run = torch.randn(B, H, d, device=dev), torch.randn(B, H, d, device=dev)
            rope = rope_table(C, d, 10000.0, dev)
            state = RATState(randn(B, H, C, d), randn(B, H, C, d), k_run, v_run, max(positions), pos, rope)
            args = [randn(B, G, d), randn(B, G, d), randn(B, H, d), randn(B, H, d)]  # q, k, v, g
            args += [torch.randn(H * d, device=dev), randn(B, H, d)]  # gate_bias, z
            twin_state, ref_state = copy.deepcopy(state), fp32(state)
            config = None if splits is None else dict(splits=splits)
            out = rat_decode_triton(*args, state, L, config=config)
            twin = rat_decode_naive(*args, twin_state, L)
            ref = rat_decode_naive(*[a.float() for a in args], ref_state, L)
            compare(f"rat C{C} splits {splits}", out, state, twin, twin_state, ref, ref_state)

    kv_cases = [(KVState, 40, [0, 1, 39]), (WindowState, 9, [0, 8, 30])]
    if not tiny:  # a ring buffer fills at position W+1, then wraps
        kv_cases = [
            (KVState, 5000, [0, 1, 4999, 2048, 77, 4096]),
            (WindowState, 1025, [0, 1024, 1025, 4999, 3000, 7]),
        ]
    for cls, N, positions in kv_cases:
        for splits in (None, 1, 3):
            pos = torch.tensor(positions[:B], device=dev)
            rope = rope_table(max(positions) + 1, d, 10000.0, dev)
            state = cls(randn(B, H, N, d), randn(B, H, N, d), max(positions), pos, rope)
            q, k, v = randn(B, H, d), randn(B, H, d), randn(B, H, d)
            twin_state, ref_state = copy.deepcopy(state), fp32(state)
            out = attention_decode_triton(
                q, k, v, state, config=None if splits is None else dict(splits=splits)
            )
            twin = attention_decode_naive(q, k, v, twin_state)
            ref = attention_decode_naive(q.float(), k.float(), v.float(), ref_state)
            compare(f"{cls.__name__} N{N} splits {splits}", out, state, twin, twin_state, ref, ref_state)


def check_model(run: Run) -> None:
    """A small hybrid: CUDA-graph steps equal eager ones bitwise and follow the full forward."""
    dev = run.scale.device
    torch.manual_seed(0)
    for layers, dtype in (("rat,swa,attn,rnn", torch.float32), ("rat,swa", torch.bfloat16)):
        model = LanguageModel(preset("rat-small", layers=layers, window=64)).to(dev, dtype).eval()
        prompts = [torch.randint(0, 257, (n,)).tolist() for n in (7, 300, 129, 64)]  # ragged
        with torch.no_grad():
            graphed, eager = model.new_cache(4, 400), model.new_cache(4, 400)
            with use_backend("torch"):  # the PyTorch paths for what is not checked here: no compilations
                first = prefill(model, graphed, prompts)
                prefill(model, eager, prompts)
            step_g = DecodeStep(model, graphed, cuda_graph=dev == "cuda")
            step_e = DecodeStep(model, eager, cuda_graph=False)
            tokens, logits, same = [first.argmax(-1)], [], True
            for _ in range(40):
                g, e = step_g(tokens[-1]), step_e(tokens[-1])
                same = same and torch.equal(g, e)
                logits.append(e.float().clone())
                tokens.append(e.argmax(-1))
            errs = []
            for i, p in enumerate(prompts):
                seq = torch.tensor([p + [int(t[i]) for t in tokens[:-1]]], device=dev)
                with use_backend("torch"):
                    full = model(seq)[0, len(p) :].float()
                errs.append(rel_err(torch.stack([x[i] for x in logits]), full))
        tol = 3e-3 if dtype == torch.float32 else 3e-2  # fp32 full forwards may use TF32 matrix units
        ok = same and max(errs) < tol
        case, status = f"model {layers} {str(dtype)[6:]}", "pass" if ok else "FAIL"
        run.record("check", case, status=status, graph_equals_eager=same, rel_err_vs_full=errs)
        run.line("check", case, f"{status} graph==eager {same}, vs full forward {max(errs):.1e}")


def layer_setup(scale: Scale, name: str, T: int, B: int, extra: int, inplace: bool = True):
    """One mixer (bf16, the benchmark's layer config) with a random cache at position T that has room for
    `extra` more tokens: (step, state, restart), step() decoding one token for B sequences (adding the
    residual into its input x when inplace), restart() putting x back as it was; or the reason it does not
    fit on the device."""
    dev, cfg = scale.device, scale.layer.replace(layers=name)
    need = state_nbytes(make_mixer(name, cfg).new_state(B, T + extra, "meta", torch.bfloat16))
    free = free_bytes(dev) if scale.free is None else scale.free
    if need > free - 4 * 2**30 and scale.free is None:
        return f"cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
    mixer = make_mixer(name, cfg).to(dev, torch.bfloat16).eval()
    if hasattr(mixer, "init_gate_bias"):
        mixer.init_gate_bias()
    state = mixer.new_state(B, T + extra, dev, torch.bfloat16)
    randomise([state])
    move_to(state, T)
    x0 = torch.randn(B, 1, cfg.d_model, device=dev, dtype=torch.bfloat16)
    x = x0.clone()

    def one():
        return mixer(x, state, inplace=inplace)

    return one, state, lambda: x.copy_(x0)


def layer_case(
    run: Run, name: str, T: int, B: int, tiling=None, eager: bool = True, inplace: bool = True
) -> None:
    """One mixer layer's decode step (norm, projections, mixer, residual) at T cached tokens, batch B.

    tiling: (BLOCK_N, num_warps) or (BLOCK_N, num_warps, splits) for the decode kernels instead of their
    defaults (0: the default). inplace: the residual added by the output projection's GEMM, as the model's
    cached forward does (False: a GEMM and an add, as before that change).
    """
    from ..ops.attention import decode_triton

    scale, dev = run.scale, run.scale.device
    cfg = scale.layer.replace(layers=name)
    n = 16  # steps per replay: a graph of a few launches would time the host
    at = T - n // 2  # every replay times the steps at T - 8 .. T + 7, however many replays run
    extra = 32  # room for the warm-up and eager steps past T
    case = f"{name} T{T} B{B}" + (f" tile{tiling}" if tiling else "") + ("" if inplace else " add")
    made = layer_setup(scale, name, T, B, extra, inplace)
    if isinstance(made, str):
        run.record("layer", case, status="skipped", reason=made)
        run.line("layer", case, f"skipped: {made}")
        return
    one, state, restart = made
    decode_triton.OVERRIDES.clear()
    if tiling:
        given = zip(("block_n", "num_warps", "splits"), tiling, strict=False)
        decode_triton.OVERRIDES.update((k, v) for k, v in given if v)  # 0: the planner's choice
    try:
        with torch.no_grad():
            warm_up(one)
            eager_ms = timed(lambda: [one() for _ in range(8)]) / 8 * 1e3 if eager else None
            step = repeated(one, [state], n, dev == "cuda", at=at, before=restart)  # x: no drift
            once = timed(step)
            reps = max(1, int(0.25 / max(once, 1e-6)))
            times = sorted(timed(lambda: [step() for _ in range(reps)]) / (reps * n) * 1e3 for _ in range(3))
        ms = times[1]
    finally:
        decode_triton.OVERRIDES.clear()
    D, Gd, H, d = cfg.d_model, cfg.n_groups * cfg.head_dim, cfg.n_heads, cfg.head_dim
    weights = ((3 * D + 2 * Gd) * D + D * D if name == "rat" else 4 * D * D) * 2
    slots = {"rat": T // cfg.chunk_size, "attn": T, "swa": cfg.window + 1, "rnn": 0}[name]
    moved = weights + B * H * slots * d * 2 * 2 + (B * D * 8 if name == "rnn" else 0)
    ref = REF_LAYER_MS.get((name, T, B))
    result = dict(mixer=name, T=T, batch=B, ms=ms, ms_rounds=times, eager_ms=eager_ms, tiling=tiling)
    result.update(residual_inplace=inplace)
    result.update(bytes_moved=moved, gb_per_s=moved / ms / 1e6, ref_ms=ref, steps_timed=3 * reps * n)
    result.update(positions=[at, at + n - 1], pdl=pdl.active(dev))
    run.record("layer", case, status="ok", **result)
    text = f"{ms * 1e3:8.1f} us/step {moved / ms / 1e6:6.0f} GB/s"
    text += f"  eager {eager_ms * 1e3:.0f} us" if eager_ms else ""
    text += f"  (ref {ref * 1e3:.0f} us: {ref / ms:.1f}x)" if ref else ""
    run.line("layer", case, text)


def phase_layer(run: Run, quick: bool, budget_s: float) -> None:
    end = run.elapsed() + budget_s
    scale = run.scale
    ts = scale.layer_ts if not quick else [scale.layer_ts[0], scale.layer_ts[-1]]
    cases = [(m, T, B) for B in scale.layer_bs for T in ts for m in ("rat", "attn", "swa", "rnn")]
    cases = list(scale.headlines) + [c for c in cases if c not in scale.headlines]
    tilings = [(h, t) for h in scale.headlines[:2] for t in (TILINGS[:2] if quick else TILINGS)]
    for name, T, B in cases:
        if run.elapsed() > end:
            run.record("layer", f"{name} T{T} B{B}", status="skipped", reason="layer phase budget spent")
            continue
        run.guarded("layer", f"{name} T{T} B{B}", layer_case, run, name, T, B)
    for (name, T, B), tiling in tilings:
        if run.elapsed() < end:
            run.guarded("layer", f"{name} T{T} B{B} tile{tiling}", layer_case, run, name, T, B, tiling, False)


def phase_latency(run: Run, models: list[str], budget_s: float) -> None:
    end = run.elapsed() + budget_s
    for name in models:
        if run.elapsed() > end:
            run.record("latency", name, status="skipped", reason="latency phase budget spent")
            run.line("latency", name, "skipped: budget spent")
            continue
        run.guarded("latency", name, latency_case, run, name)


def latency_case(run: Run, name: str, compile: bool = False, tag: str = "") -> None:
    scale, dev = run.scale, run.scale.device
    steps, P = scale.latency_steps, scale.prompt
    model = build(name, scale)
    prompt = torch.randint(0, model.config.vocab_size, (P,)).tolist()
    with torch.no_grad():
        cache = model.new_cache(1, P + steps + 64)
        start = time.perf_counter()
        with use_backend("torch"):  # prefill speed is the throughput phase's; no compilation here
            logits = prefill(model, cache, [prompt])
        sync()
        prefill_s = time.perf_counter() - start
        step = DecodeStep(model, cache, cuda_graph=dev == "cuda", compile=compile)
        tokens = [logits.argmax(-1)]

        def eager():
            tokens.append(model(tokens[-1][:, None], cache)[:, -1].argmax(-1))

        def graphed():
            tokens.append(step(tokens[-1]).argmax(-1))

        first_s = timed(graphed)  # the eager warm-up step (compiling first with compile=True)
        eager_ms = timed(lambda: [eager() for _ in range(16)]) / 16 * 1e3
        graphed()  # capture
        ms = timed(lambda: [graphed() for _ in range(steps)]) / steps * 1e3
        # greedy consistency: every token is the full forward's argmax after the tokens before it
        seq = torch.tensor([prompt + [int(t) for t in tokens[:-1]]], device=dev)
        with use_backend("torch"):
            full = model(seq)[0, P - 1 :].argmax(-1)
        agree = float((full == torch.cat(tokens)).float().mean())
    ref = REF_MS_PER_TOKEN.get(name)
    case = name + (" compiled" if compile else "") + tag
    result = dict(ms_per_token=ms, eager_ms_per_token=eager_ms, prefill_s=prefill_s, prompt=P)
    result.update(graph=dev == "cuda", compiled=compile, first_step_s=first_s, steps_timed=steps)
    result.update(greedy_agreement_with_full_forward=agree, ref_ms_per_token=ref, pdl=pdl.active(dev))
    run.record("latency", case, status="ok", **result)
    text = f"{ms:6.2f} ms/token graph, {eager_ms:6.2f} eager"
    text += f"; greedy agreement {agree:.3f}" + (f"; first step {first_s:.1f} s" if compile else "")
    run.line("latency", case, text + (f"  (ref {ref} ms)" if ref else ""))


def phase_throughput(run: Run, models: list[str], budget_s: float, sampled: bool, full_prefill: bool) -> None:
    end = run.elapsed() + budget_s
    weight = {"rat-1.3b": 3, "rat-swa-1.3b": 3}  # RAT's runs get the time to decode all 1024 steps
    for i, name in enumerate(models):
        share = (end - run.elapsed()) * weight.get(name, 2) / sum(weight.get(m, 2) for m in models[i:])
        if share < 15 and run.scale.device == "cuda":
            run.record("throughput", name, status="skipped", reason="throughput phase budget spent")
            run.line("throughput", name, "skipped: budget spent")
            continue
        args = (run, name, share, sampled, full_prefill)
        if run.guarded("throughput", name, throughput_case, *args) == "oom":
            run.guarded("throughput", name, throughput_case, *args, shrink=0.9)


def throughput_case(
    run: Run, name: str, budget_s: float, sampled: bool, full_prefill: bool, shrink: float = 1.0
) -> str | None:
    t_case = time.perf_counter()
    model = build(name, run.scale)
    release()
    try:
        left = budget_s - (time.perf_counter() - t_case)
        throughput_run(run, name, model, left, sampled, full_prefill, shrink)
    except torch.cuda.OutOfMemoryError as e:
        run.record("throughput", name, status="oom", shrink=shrink, error=str(e)[:500])
        run.line("throughput", name, f"out of memory at {shrink:.0%} of the planned batch")
        return "oom" if shrink == 1.0 else None
    return None


def throughput_run(run: Run, name, model, budget_s: float, sampled: bool, full_prefill: bool, shrink: float):
    t_case = time.perf_counter()
    scale, dev = run.scale, run.scale.device
    P, NEW = scale.prompt, scale.new
    max_len = P + NEW
    plan = plan_batch(model, max_len, P, free=scale.free, reserve=0 if scale.free else None)
    B = max(1, int(plan.batch_size * shrink))
    run.line("throughput", name, f"plan: {plan}" + (f"; using {B} after an OOM" if shrink < 1 else ""))
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache(B, max_len)
    randomise(cache.layers)  # prefill overwrites what it writes
    rows = min(plan.prefill_rows, B)
    prompts = torch.randint(0, model.config.vocab_size, (B if full_prefill else rows, P), device=dev)
    with torch.no_grad():
        # untimed first: the fast paths compile; a row view starts at position 0 again
        model(prompts[:rows], cache.rows(0, rows), last_only=True)
        sync()
        before = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
        logits = []
        prefill_s = timed(
            lambda: logits.append(model(prompts[:rows], cache.rows(0, rows), last_only=True)[:, -1])
        )
        prefill_peak = torch.cuda.max_memory_allocated() - before if dev == "cuda" else None
        if full_prefill:

            def the_rest():
                for a in range(rows, B, rows):
                    b = min(a + rows, B)
                    logits.append(model(prompts[a:b], cache.rows(a, b), last_only=True)[:, -1])

            prefill_all_s = prefill_s + timed(the_rest)
        else:  # copy the prefilled rows over the batch: a decode step costs the same whatever they hold
            for s in cache.layers:
                for attr in row_tensors(s):
                    t = getattr(s, attr)
                    for a in range(rows, B, rows):
                        t[a : min(a + rows, B)] = t[: min(rows, B - a)]
            prefill_all_s = prefill_s * B / rows
        cache.set_positions([P] * B)
        token = torch.cat(logits).argmax(-1)
        token = token.repeat(B // token.shape[0] + 1)[:B]
        step = DecodeStep(model, cache, cuda_graph=dev == "cuda")

        def decode(n: int) -> float:
            nonlocal token

            def steps():
                nonlocal token
                for _ in range(n):
                    token = step(token).argmax(-1)

            return timed(steps)

        setup_s = decode(2)  # the eager warm-up step, then the capture
        probe = min(16, NEW // 8)
        probe_s = decode(probe)
        done = 2 + probe
        step_s = probe_s / probe
        left_s = budget_s - (time.perf_counter() - t_case) - 5
        growth = 1.15 if "attn" in model.config.pattern else 1.02  # attention steps grow with position
        if not sampled and step_s * (NEW - done) * growth < left_s:
            decode_s = probe_s + decode(NEW - done) + 2 * step_s  # the set-up steps at the probed speed
            method, segments = "full", None
        else:  # steps sampled at four positions, integrated over the whole decode (trapezoid)
            segments = [(P + 2, step_s)]
            for at in (P + NEW // 3, P + 2 * NEW // 3, P + NEW - probe):
                for s in cache.layers:
                    move_to(s, at)
                segments.append((at, decode(probe) / probe))
            xs = [P] + [p for p, _ in segments] + [P + NEW]
            ys = [segments[0][1]] + [t for _, t in segments] + [segments[-1][1]]
            decode_s = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
            method = f"sampled: {probe} steps at each of {[p for p, _ in segments]}, trapezoid over {NEW}"
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    tokens_s = B * NEW / decode_s
    ref = REF_TOKENS_S.get(name)
    result = dict(batch=B, tokens_per_s=tokens_s, decode_s=decode_s, decode_method=method, segments=segments)
    result.update(ms_per_step_first=step_s * 1e3, setup_s=setup_s, peak_bytes=peak, shrink=shrink)
    result.update(prefill_rows=rows, prefill_s_rows=prefill_s, prefill_tokens_per_s=rows * P / prefill_s)
    result.update(prefill_s_whole_batch=prefill_all_s, prefill_whole_batch_measured=full_prefill)
    result.update(prefill_peak_bytes=prefill_peak, prefill_estimate_bytes=plan.prefill_bytes)
    run.record("throughput", name, status="ok", plan=plan.as_dict(), ref_tokens_per_s=ref, **result)
    text = f"{tokens_s:9,.0f} tok/s  batch {B}  {decode_s:5.1f} s ({method.split(':')[0]})"
    text += f"; prefill {rows * P / prefill_s:,.0f} tok/s" + (
        f"; peak {peak / 2**30:.0f} GiB" if peak else ""
    )
    run.line("throughput", name, text + (f"  (ref {ref:,})" if ref else ""))


PHASES = "check,layer,latency,throughput"  # also "compiled": rat-1.3b's latency through torch.compile
SUBCOMMANDS = {  # `ratlm bench NAME`: (phases, help); `python -m ratlm.bench.decode` runs them all
    "decode": ("check,layer", "decode kernels checked, one layer's decode step: RAT vs attention, SWA, RNN"),
    "generate": ("latency,throughput", "1.3B generation: batch-1 ms/token and Table 1 tokens/s"),
}


def add_arguments(p: argparse.ArgumentParser, phases: str = PHASES) -> None:
    p.add_argument("--phases", default=phases, help=f"comma-separated subset of: {PHASES} (default {phases})")
    p.add_argument("--quick", action="store_true", help="fewer layer cases, sampled decoding (about 3 min)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test of the script, CPU too")
    p.add_argument("--budget-s", type=float, help="seconds for the whole run (default 330, quick 170)")
    p.add_argument("--models", default=",".join(MODELS), help="presets for latency and throughput")
    p.add_argument("--full-prefill", action="store_true", help="prefill every row, not one forward")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="output folder (default $OUT)")


def run_benchmark(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("ratlm bench: needs a CUDA device (or --tiny for a smoke test)")
        return 2
    scale = tiny_scale(device) if args.tiny else paper_scale()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    budget = args.budget_s or (170.0 if args.quick else 330.0)
    layer_share = 0.25 if args.quick else 0.22
    shares = {"check": 0.08, "layer": layer_share, "latency": 0.12, "throughput": 0.55, "compiled": 0.1}
    run = Run(Path(args.out), budget, scale)
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)
    env.update(python=platform.python_version(), argv=vars(args), free_gib=free_bytes(device) / 2**30)
    env.update(date=datetime.datetime.now().isoformat(timespec="seconds"))
    if device == "cuda":
        env.update(sms=torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["copy_gb_per_s"] = copy_bandwidth(device)
    release()
    run.record("env", "env", **env)
    versions = f"torch {env['torch']}, triton {env['triton']}, copy {env['copy_gb_per_s']:.0f} GB/s"
    run.line("env", env["device"], versions)
    for phase in phases:
        phase_s = budget * shares[phase] / sum(shares[p] for p in phases)
        if phase == "check":
            run.guarded("check", "kernels", check_kernels, run)
            run.guarded("check", "model", check_model, run)
        elif phase == "layer":
            phase_layer(run, args.quick, phase_s)
        elif phase == "latency":
            phase_latency(run, models, phase_s)
        elif phase == "throughput":
            phase_throughput(run, models, budget - run.elapsed(), args.quick, args.full_prefill)
        elif phase == "compiled":
            run.guarded("latency", "rat-1.3b compiled", latency_case, run, "rat-1.3b", compile=True)
        else:
            print(f"unknown phase {phase!r}; phases: {PHASES}")
    summarise(run)
    return 0


def summarise(run: Run) -> None:
    rows = [r for r in run.records if r.get("status") == "ok"]
    layer = {
        (r["mixer"], r["T"], r["batch"]): r["ms"]
        for r in rows
        if r["phase"] == "layer" and not r["tiling"] and r.get("residual_inplace", True)
    }
    tput = {r["case"]: r["tokens_per_s"] for r in rows if r["phase"] == "throughput"}
    lat = {r["case"]: r["ms_per_token"] for r in rows if r["phase"] == "latency"}
    got = {
        "layer rat T4096 B512 ms": layer.get(("rat", 4096, 512)),
        "layer rat T131072 B1 ms": layer.get(("rat", 131072, 1)),
        "rat-1.3b B1 ms/token": lat.get("rat-1.3b"),
        "rat-1.3b tokens/s": tput.get("rat-1.3b"),
        "rat-swa-1.3b tokens/s": tput.get("rat-swa-1.3b"),
    }
    summary = {k: {"value": v, "target": TARGETS[k]} for k, v in got.items()}
    if layer.get(("rat", 4096, 512)) and layer.get(("attn", 4096, 512)):
        summary["layer speed-up over attention, T4096 B512"] = (
            layer[("attn", 4096, 512)] / layer[("rat", 4096, 512)]
        )
    if tput.get("rat-1.3b") and tput.get("attn-1.3b"):
        summary["1.3B decode speed-up over attention"] = tput["rat-1.3b"] / tput["attn-1.3b"]
    checks = [r for r in run.records if r["phase"] == "check" and r.get("status") in ("pass", "FAIL")]
    summary["checks failed"] = [r["case"] for r in checks if r["status"] == "FAIL"]
    run.record("summary", "targets", **summary)
    print("\n| phase | case | result |\n| --- | --- | --- |")
    for phase, case, text in run.rows:
        print(f"| {phase} | {case} | {text} |")
    print("\ntargets (value vs target):")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(f"\nwall {run.elapsed():.0f} s; JSON lines in {run.path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratlm.bench.decode", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_benchmark(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
