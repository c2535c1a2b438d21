"""`ratlm bench layer`: one mixer layer, training (forward + backward) and prefill, the paper's Figure 3.

One call on one GPU, about 6 minutes (`--quick`: about 2):
1. environment (versions, GPU, date) and the card's ceilings measured (bf16 matmul, device copy);
2. correctness: every GPU candidate against the PyTorch path at small shapes, outputs and every gradient,
   with STYLE.md's tolerance rule (error against fp64 at most 2x that of plain PyTorch in bf16), then
   whole layers under bf16 autocast against the layer in fp32;
3. timings at 262,144 tokens per call (batch = 262144 / T): a full layer as `ratlm.mixers` builds it
   (norm, in_proj, gates, core, out_proj, residual; D 2048, 16 heads of 128, G 2), bf16 autocast over fp32
   weights, for RAT at L = 16, 64, 128 with each attention engine ("cudnn", "triton", "flex"; "torch", the
   PyTorch path, at the shortest length only), causal attention (SDPA), sliding window (W 1024) and the
   RNN. Medians of CUDA-event timings after one warm-up call (whose time, compilation included, is
   reported apart), peak memory, achieved TFLOP/s against the measured matmul ceiling.
   Modes: "train" (forward + backward), "prefill" (an inference-mode forward without a cache; the residual
   goes to a new tensor) and, when asked for (`--modes ...,fill`), "fill": the prefill as
   `LanguageModel.forward` runs a prompt with a cache, filling a fresh bf16 state and adding the residual
   into x in place (x and the state are put back between calls, untimed).

Every phase has a time budget; configurations left when it runs out are recorded as skipped, failures
(out of memory, an engine refusing a shape) are recorded and the run goes on. JSON lines go to
$OUT/bench_layer.jsonl (OUT defaults to ./bench-out), a table to stdout, and a plot like Figure 3 to
$OUT/bench_layer.png when matplotlib is there.

FLOP counts (N = B*T tokens, a forward pass; training is 3x that for the projections and 3.5x for
attention, whose backward does five matrix products to the forward's two, as PERF.md counts):
- projections: RAT 2*N*D*(3D + 2*G*d) + 2*N*D*D; attention 2*N*D*3D + 2*N*D*D; RNN the same as attention;
- "rat-core" rows time `rat_mix` alone (scan, attention over summaries, merge) at the longest length;
- RAT's attention over chunk summaries: 4*B*H*T*d * C/2 (each query sees on average half of the C = T/L
  summaries; the own-state key is negligible); causal attention 4*B*H*T*d * (T+1)/2; the sliding window
  4*B*H*T*d * (mean number of visible keys, about W+1). Scans, norms and gates are memory-bound and not
  counted.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cache import clear
from ..config import ModelConfig
from ..model import make_mixer
from ..ops import backend
from ..ops.attention import attention_sdpa
from ..ops.rat.masked import rat_mix_masked

ENGINES = ("cudnn", "triton", "flex")
CANDIDATES = (*ENGINES, "torch")  # RAT engines timed ("torch": the PyTorch path, short lengths only)
BASELINES = ("attention", "swa", "rnn")
MODES = {"train": "forward + backward", "prefill": "prefill (forward)", "fill": "prefill into a cache"}
PERF_MATMUL_TFLOPS = 729.0  # bf16 matmul 8192^3 on the H200, PERF.md


@dataclass
class LayerBench:
    out: Path = Path(os.environ.get("OUT", "bench-out"))
    modes: tuple[str, ...] = ("train", "prefill")
    seq_lens: tuple[int, ...] = (131072, 4096, 16384, 65536, 8192, 32768)  # most wanted first
    chunks: tuple[int, ...] = (16, 64, 128)
    candidates: tuple[str, ...] = CANDIDATES
    baselines: tuple[str, ...] = BASELINES
    tokens: int = 262144
    d_model: int = 2048
    n_heads: int = 16
    n_groups: int = 2
    window: int = 1024
    budget_s: float = 390.0  # the whole run; the phases get fixed shares of it
    rep_s: float = 0.6  # timed seconds per configuration (at least min_reps repetitions, at most 30)
    min_reps: int = 3
    checks: bool = True
    plot: bool = True
    # FlexAttention (sliding window; RAT's "flex" engine at the first chunk size) compiles per shape, about
    # 15 s each: only at these lengths
    flex_lens: tuple[int, ...] = (4096, 131072)
    device: str = "cuda"
    smoke: bool = False  # tiny shapes everywhere: a test of this script (CPU works), not a benchmark
    results: list[dict] = field(default_factory=list)

    def quick_mode(self) -> None:
        self.seq_lens, self.chunks, self.candidates = (131072, 4096), (16,), ENGINES
        self.flex_lens, self.budget_s, self.rep_s = (4096,), 150.0, 0.3

    def smoke_mode(self, device: str) -> None:
        self.device, self.smoke, self.plot = device, True, False
        self.tokens, self.d_model, self.n_heads, self.window = 64, 64, 4, 8
        self.seq_lens, self.flex_lens, self.chunks, self.rep_s, self.min_reps = (16,), (16,), (4,), 0.0, 1

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


def _emit(bench: LayerBench, row: dict) -> None:
    bench.results.append(row)
    with open(bench.out / "bench_layer.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _error(e: BaseException) -> dict:
    return {
        "status": "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "error",
        "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
        "traceback": traceback.format_exc(limit=6)[-2000:],
    }


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(bench: LayerBench) -> dict:
    import triton

    env = {"kind": "env", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if bench.cuda:
        p = torch.cuda.get_device_properties(bench.device)
        env.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    else:
        env.update(gpu=f"none ({bench.device})", sms=0, gpu_mem_gib=0)
    return {
        **env,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "backend_env": os.environ.get("RATLM_BACKEND", ""),
    }


def time_ms(
    fn, reps_s: float, cuda: bool, min_reps: int = 3, max_reps: int = 30, setup=None
) -> tuple[float, list]:
    """Median milliseconds of fn() (already warmed up): CUDA events on the GPU, the host clock elsewhere.
    setup(), when given, runs before every call, untimed."""
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < 1000 * reps_s):
        if setup is not None:
            setup()
            if cuda:  # the setup's kernels finish first: the timed call starts from an idle queue
                torch.cuda.synchronize()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), times


def kernel_timeline(fn, trace: Path | None = None) -> list[tuple[str, float, float]]:
    """GPU kernels of one call of fn under torch.profiler as (name, start us, end us), in start order; with
    `trace`, the call's timeline (host and GPU) is also written there as a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace is not None else [])
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(((ev.name, ev.time_range.start, ev.time_range.end) for ev in events), key=lambda e: e[1])


def by_kernel(timeline: list[tuple[str, float, float]]) -> list[dict]:
    """Total ms and launches per kernel name of a `kernel_timeline`, largest first."""
    kernels: dict[str, dict] = {}
    for name, start, end in timeline:
        k = kernels.setdefault(name, {"name": name, "ms": 0.0, "calls": 0})
        k["ms"] += (end - start) / 1e3
        k["calls"] += 1
    return sorted(kernels.values(), key=lambda r: -r["ms"])


def idle_gaps(timeline: list[tuple[str, float, float]]) -> tuple[float, list[dict]]:
    """The GPU's idle time inside the profiled call (ms; no kernel running on any stream) and its gaps,
    longest first, each with the kernels before and after it."""
    gaps, busy_until, last = [], None, None
    for name, start, end in timeline:
        if busy_until is not None and start > busy_until:
            gaps.append({"us": start - busy_until, "after": last[:80], "before": name[:80]})
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    gaps.sort(key=lambda g: -g["us"])
    return sum(g["us"] for g in gaps) / 1e3, gaps


def kernel_times(fn, trace: Path | None = None) -> list[dict]:
    """GPU kernels of one call of fn: name, total ms and launches, largest first (see `kernel_timeline`)."""
    return by_kernel(kernel_timeline(fn, trace))


def ceilings(bench: LayerBench) -> dict:
    """bf16 matmul rate and device-copy bandwidth, measured here (random data, medians)."""
    n, copy_bytes = (256, 2**20) if bench.smoke else (8192, 2**32)
    a = torch.randn(n, n, device=bench.device).bfloat16()
    b = torch.randn(n, n, device=bench.device).bfloat16()
    a @ b
    ms, _ = time_ms(lambda: a @ b, bench.rep_s / 2, bench.cuda, bench.min_reps)
    x = torch.randn(copy_bytes // 4, device=bench.device)
    y = torch.empty_like(x)
    y.copy_(x)
    ms_copy, _ = time_ms(lambda: y.copy_(x), bench.rep_s / 2, bench.cuda, bench.min_reps)
    out = {
        "kind": "ceilings",
        "matmul_bf16_tflops": 2 * n**3 / ms / 1e9,
        "copy_tbps": 2 * x.nbytes / ms_copy / 1e9,
    }
    a = b = x = y = None  # free the 4 GiB before the next phase
    _free()
    return out


def _rat_inputs(B, T, H, G, d, dtype, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q, k, v = rnd(B, T, G, d).to(dtype), rnd(B, T, G, d).to(dtype), rnd(B, T, H, d).to(dtype)
    g = torch.sigmoid(rnd(B, T, H, d) + 1.5)  # fp32 gates as the mixer computes them, mostly long memories
    return [t.requires_grad_() for t in (q, k, v, g)]


def _with_grads(out, leaves, weight) -> list[torch.Tensor]:
    """[out, d(out . weight)/d leaf for each leaf], detached."""
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    return [out.detach(), *grads]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _max_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [float((a.detach().double() - b.detach()).abs().max()) for a, b in zip(got, ref, strict=True)]


def check_rat_engines(bench: LayerBench, deadline: float) -> None:
    from ..ops.rat import gpu

    cases = [  # B, T, H, G, d, L: the timed shapes with partial last chunks (their kernels are compiled
        # once for both phases), then L = 1 (attention) at another head width; odd L and G = H are in the
        # CPU test suite
        (2, 1000, 16, 2, 128, 16),
        (1, 777, 16, 2, 128, 64),
        (1, 1500, 16, 2, 128, 128),
        (2, 200, 4, 2, 64, 1),
    ]
    if bench.smoke:
        cases = [(1, 13, 4, 2, 16, 4)]
    names = ["y", "dq", "dk", "dv", "dg"]
    for i, (B, T, H, G, d, L) in enumerate(cases):
        leaves = _rat_inputs(B, T, H, G, d, torch.bfloat16, i, bench.device)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = rat_mix_masked(*ref_leaves, L)
        # seeded like the inputs: a check that passes or fails does so on every run
        gen = torch.Generator(device=ref.device).manual_seed(1000 + i)
        weight = torch.randn(ref.shape, device=ref.device, dtype=ref.dtype, generator=gen)
        ref = _with_grads(ref, ref_leaves, weight)
        plain = _max_errors(_with_grads(rat_mix_masked(*leaves, L), leaves, weight), ref)
        for engine in ENGINES if i == 0 else ENGINES[:2]:  # FlexAttention compiles per shape: once
            row = {
                "kind": "check",
                "what": "rat_mix bf16",
                "engine": engine,
                "B": B,
                "T": T,
                "H": H,
                "G": G,
                "d": d,
                "L": L,
            }
            if time.perf_counter() > deadline:
                _emit(bench, {**row, "status": "skipped", "reason": "time budget"})
                continue
            try:
                out = gpu.rat_mix_triton(*leaves, L, engine=engine)
                errs = _max_errors(_with_grads(out, leaves, weight), ref)
                ok = all(e <= 2 * p + 1e-6 for e, p in zip(errs, plain, strict=True))
                row.update(
                    status="ok" if ok else "FAIL",
                    errors=dict(zip(names, errs, strict=True)),
                    errors_plain_bf16=dict(zip(names, plain, strict=True)),
                )
            except Exception as e:  # an engine refusing a shape is a result, not a crash
                row.update(_error(e))
            _emit(bench, row)
        del leaves, ref_leaves, ref
    T = 20 if bench.smoke else 500
    for engine in ("triton",):  # fp32: the same function, tightly
        row = {"kind": "check", "what": "rat_mix fp32", "engine": engine, "T": T, "L": 16}
        try:
            leaves = _rat_inputs(2, T, 8, 2, 16 if bench.smoke else 64, torch.float32, 99, bench.device)
            out, ref = gpu.rat_mix_triton(*leaves, 16, engine=engine), rat_mix_masked(*leaves, 16)
            weight = torch.randn_like(out)
            pairs = zip(
                [out, *torch.autograd.grad((out * weight).sum(), leaves)],
                [ref, *torch.autograd.grad((ref * weight).sum(), leaves)],
                strict=True,
            )
            rel = [_rel(a, b) for a, b in pairs]
            row.update(
                status="ok" if max(rel) < 1e-4 else "FAIL", rel_errors=dict(zip(names, rel, strict=True))
            )
        except Exception as e:
            row.update(_error(e))
        _emit(bench, row)


def check_scan_and_window(bench: LayerBench) -> None:
    from ..ops import attention, gated_scan
    from ..ops.scan.chunked import gated_scan_chunked

    T, N, d = (40, 16, 16) if bench.smoke else (5000, 512, 128)
    row = {"kind": "check", "what": "gated_scan (RNN) bf16 x, fp32 g", "engine": "triton"}
    try:
        x = torch.randn(2, T, N, device=bench.device).bfloat16().requires_grad_()
        g = torch.sigmoid(torch.randn(2, T, N, device=bench.device) + 2).requires_grad_()
        out, ref = gated_scan(x, g), gated_scan_chunked(x, g)
        weight = torch.randn_like(out)
        pairs = zip(
            [out, *torch.autograd.grad((out * weight).sum(), [x, g])],
            [ref, *torch.autograd.grad((ref * weight).sum(), [x, g])],
            strict=True,
        )
        rel = [_rel(a, b) for a, b in pairs]
        row.update(
            status="ok" if max(rel) < 1e-2 else "FAIL",
            rel_errors=dict(zip(["h", "dx", "dg"], rel, strict=True)),
        )
    except Exception as e:
        row.update(_error(e))
    _emit(bench, row)

    T, W = (3 * N, N) if bench.smoke else (3000, 1024)
    row = {"kind": "check", "what": "sliding-window attention bf16", "engine": "flex", "T": T, "W": W}
    try:
        q, k, v = (torch.randn(2, 8, T, d, device=bench.device).bfloat16().requires_grad_() for _ in range(3))
        ref64 = attention_sdpa(*(t.detach().double() for t in (q, k, v)), window=W)
        out = attention(q, k, v, window=W)
        with backend.use_backend("torch"):
            plain = attention(q, k, v, window=W)
        err, err_plain = _max_errors([out, plain], [ref64, ref64])
        weight = torch.randn_like(out)
        grads = torch.autograd.grad((out * weight).sum(), [q, k, v])
        grads_plain = torch.autograd.grad((plain * weight).sum(), [q, k, v])
        rel = [_rel(a, b) for a, b in zip(grads, grads_plain, strict=True)]
        row.update(
            status="ok" if err <= 2 * err_plain + 1e-6 and max(rel) < 2e-2 else "FAIL",
            error=err,
            error_plain_bf16=err_plain,
            grad_rel_vs_plain=rel,
        )
    except Exception as e:
        row.update(_error(e))
    _emit(bench, row)


def check_layers(bench: LayerBench) -> None:
    """Whole RAT layers under bf16 autocast, each engine against the PyTorch path, both against fp32."""
    B, T = (1, 10) if bench.smoke else (2, 600)
    for L in bench.chunks[:1] if bench.smoke else (16, 128):
        cfg = _config(bench, L, T)
        torch.manual_seed(0)
        layer = _layer("rat", cfg, bench.device)
        x = torch.randn(B, T, bench.d_model, device=bench.device)
        dy = torch.randn_like(x)
        device_type = torch.device(bench.device).type

        def run(autocast: bool, layer=layer, x=x, dy=dy, device_type=device_type) -> list[torch.Tensor]:
            xi = x.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                y = layer(xi)
            y.backward(dy)
            return [y.float(), xi.grad] + [p.grad.float() for p in layer.parameters()]

        names = ["y", "dx"] + [n for n, _ in layer.named_parameters()]
        with backend.use_backend("torch"):
            ref = run(False)
            plain = run(True)
        err_plain = [_rel(a, b) for a, b in zip(plain, ref, strict=True)]
        for engine in ENGINES[:2]:
            row = {
                "kind": "check",
                "what": "RAT layer, bf16 autocast vs fp32",
                "engine": engine,
                "T": T,
                "L": L,
            }
            try:
                with backend.use_backend(engine):
                    got = run(True)
                err = [_rel(a, b) for a, b in zip(got, ref, strict=True)]
                ok = all(e <= 2 * p + 1e-4 for e, p in zip(err, err_plain, strict=True))
                row.update(
                    status="ok" if ok else "FAIL",
                    rel_errors=dict(zip(names, err, strict=True)),
                    rel_errors_plain_bf16=dict(zip(names, err_plain, strict=True)),
                )
            except Exception as e:
                row.update(_error(e))
            _emit(bench, row)
        layer = x = dy = None
        _free()


def _config(bench: LayerBench, L: int, T: int) -> ModelConfig:
    layers = "rat,attn,swa,rnn"
    return ModelConfig(
        vocab_size=256,
        d_model=bench.d_model,
        n_layers=4,
        n_heads=bench.n_heads,
        layers=layers,
        chunk_size=L,
        n_groups=bench.n_groups,
        window=bench.window,
        context=T,
    )


def _layer(kind: str, cfg: ModelConfig, device: str) -> torch.nn.Module:
    layer = make_mixer("attn" if kind == "attention" else kind, cfg).to(device)
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, cfg.init_std)
        if hasattr(layer, "init_gate_bias"):
            layer.init_gate_bias()
    return layer


def flops(kind: str, B: int, T: int, cfg: ModelConfig, train: bool) -> float:
    """Matrix-product FLOPs of one call (see the module doc)."""
    N, D, H, d, G = B * T, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_groups
    if kind.startswith("rat"):
        proj = 0 if kind == "rat-core" else 2 * N * D * (3 * D + 2 * G * d) + 2 * N * D * D
        keys = math.ceil(T / cfg.chunk_size) / 2
    else:
        proj = 2 * N * D * 3 * D + 2 * N * D * D
        if kind == "attention":
            keys = (T + 1) / 2
        elif kind == "swa":
            W = cfg.window
            keys = sum(min(t, W) + 1 for t in range(min(T, W + 1))) / T + max(T - W - 1, 0) * (W + 1) / T
        else:
            keys = 0.0
    attn = 4 * B * H * T * d * keys
    return 3 * proj + 3.5 * attn if train else proj + attn


def _jobs(bench: LayerBench, T: int) -> list[tuple[str, int | None, str]]:
    """(layer kind, chunk size, candidate) at length T, most important first: what FlexAttention runs
    comes last, since each new shape costs it a compilation of many seconds."""
    compiled = T in bench.flex_lens
    jobs = [("attention", None, "sdpa")] if "attention" in bench.baselines else []
    for L in bench.chunks:
        jobs += [("rat", L, c) for c in bench.candidates if c in ("cudnn", "triton")]
    if "rnn" in bench.baselines:
        jobs.append(("rnn", None, "triton"))
    if max(bench.seq_lens) == T:  # the core alone, to split the layer's time into core and the rest
        jobs += [("rat-core", bench.chunks[0], c) for c in bench.candidates if c in ("cudnn", "triton")]
    if "torch" in bench.candidates and min(bench.seq_lens) == T:  # its scores are [B, H, T, T/L]
        jobs += [("rat", L, "torch") for L in bench.chunks]
    if "swa" in bench.baselines and compiled:
        jobs.append(("swa", None, "flex"))
    if "flex" in bench.candidates and compiled:
        jobs += [("rat", L, "flex") for L in bench.chunks[:1]]
    return jobs


def layer_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor | None):
    """One call of the layer under bf16 autocast: forward + backward of dy (training), or, without dy,
    an inference-mode forward (prefill)."""
    device_type = x.device.type
    params = list(layer.parameters())

    def train_step():
        for p in params:
            p.grad = None
        x.grad = None
        with torch.autocast(device_type, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy)

    def prefill_step():
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16):
            layer(x)

    return prefill_step if dy is None else train_step


def fill_step(layer: torch.nn.Module, x: torch.Tensor):
    """(step, setup): a prompt's prefill as `LanguageModel.forward` runs it with a cache, under bf16 autocast:
    the layer fills a fresh bf16 state for the whole of x and adds its residual into x in place. setup()
    (untimed) puts x back and the state at position 0, so every call does the same work."""
    device_type = x.device.type
    x0 = x.detach().clone()
    state = layer.new_state(x.shape[0], x.shape[1], x.device, torch.bfloat16)

    def setup():
        x.copy_(x0)
        clear(state)  # a fresh cache, as `ModelCache.reset` leaves it (the RNN reads its state)

    def step():
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16):
            layer(x, state, inplace=True)

    return step, setup


def mode_step(layer: torch.nn.Module, x: torch.Tensor, mode: str):
    """(step, setup) for one timed call of the layer in `mode` (see MODES): `fill_step` for "fill", else
    `layer_step` (with a random output gradient in training) and no setup."""
    if mode == "fill":
        return fill_step(layer, x)
    return layer_step(layer, x, torch.randn_like(x) if mode == "train" else None), None


def time_one(bench: LayerBench, mode: str, T: int, kind: str, L: int | None, candidate: str) -> dict:
    B = max(1, bench.tokens // T)
    cfg = _config(bench, L or 16, T)
    row = {"kind": "time", "mode": mode, "T": T, "B": B, "layer": kind, "L": L, "candidate": candidate}
    choice = candidate if kind.startswith("rat") else ("auto" if candidate != "torch" else "torch")
    layer = x = None
    try:
        with backend.use_backend(choice):
            torch.manual_seed(0)
            setup = None
            if kind == "rat-core":
                step = _core_step(bench, cfg, B, T, mode == "train")
            else:
                layer = _layer(kind, cfg, bench.device)
                x = torch.randn(B, T, bench.d_model, device=bench.device, requires_grad=mode == "train")
                step, setup = mode_step(layer, x, mode)
            base = torch.cuda.memory_allocated() if bench.cuda else 0
            t0 = time.perf_counter()
            if setup is not None:
                setup()
            step()
            if bench.cuda:
                torch.cuda.synchronize()
            row["warmup_s"] = round(time.perf_counter() - t0, 3)
            if kind.startswith("rat"):
                from ..ops.rat import gpu

                row["engine_ran"] = gpu.last_engine if candidate != "torch" else "torch"
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats()
            ms, times = time_ms(step, bench.rep_s, bench.cuda, bench.min_reps, setup=setup)
            peak = torch.cuda.max_memory_allocated() if bench.cuda else 0
            f = flops(kind, B, T, cfg, mode == "train")
            row.update(
                status="ok",
                ms=round(ms, 3),
                reps=len(times),
                ms_min=round(min(times), 3),
                peak_gib=round(peak / 2**30, 2),
                extra_gib=round((peak - base) / 2**30, 2),
                tflop=float(f"{f / 1e12:.4g}"),
                tflops=float(f"{f / ms / 1e9:.4g}"),
            )
    except Exception as e:
        row.update(_error(e))
    finally:
        layer = x = step = setup = None  # the step holds the output gradient
        _free()
    return row


def _core_step(bench: LayerBench, cfg: ModelConfig, B: int, T: int, train: bool):
    """`rat_mix` alone (no projections or gates): bf16 q, k, v and fp32 gates, as the mixer passes them."""
    from ..ops import rat_mix

    H, d, G, L = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.chunk_size
    leaves = _rat_inputs(B, T, H, G, d, torch.bfloat16, 0, bench.device)
    if not train:
        leaves = [t.detach() for t in leaves]
        return lambda: rat_mix(*leaves, L)
    dy = torch.randn(B, T, H, d, device=bench.device).bfloat16()

    def step():
        for t in leaves:
            t.grad = None
        rat_mix(*leaves, L).backward(dy)

    return step


def run_timings(bench: LayerBench, mode: str, deadline: float, ceiling: float) -> None:
    for T in bench.seq_lens:
        for kind, L, candidate in _jobs(bench, T):
            if mode == "fill" and kind == "rat-core":  # no cache and no residual: the prefill row's twin
                continue
            if time.perf_counter() > deadline:
                _emit(
                    bench,
                    {
                        "kind": "time",
                        "mode": mode,
                        "T": T,
                        "layer": kind,
                        "L": L,
                        "candidate": candidate,
                        "status": "skipped",
                        "reason": "time budget",
                    },
                )
                continue
            row = time_one(bench, mode, T, kind, L, candidate)
            if "tflops" in row:
                row["frac_of_matmul"] = float(f"{row['tflops'] / ceiling:.3g}")  # measured here
                row["frac_of_729"] = float(f"{row['tflops'] / PERF_MATMUL_TFLOPS:.3g}")  # PERF.md's ceiling
            _emit(bench, row)
            print(_line(row), flush=True)


def _line(row: dict) -> str:
    what = f"{row['mode']:7s} T={row['T']:6d} {row['layer']:9s} L={row['L'] or '-':>3} {row['candidate']:6s}"
    if row.get("status") != "ok":
        return f"{what} {row.get('status')}: {row.get('error', row.get('reason', ''))}"
    ran = f" (ran {row['engine_ran']})" if row.get("engine_ran") not in (None, row["candidate"]) else ""
    return (
        f"{what} {row['ms']:9.2f} ms  {row['tflops']:6.1f} TFLOP/s  peak {row['peak_gib']:6.1f} GiB  "
        f"warm-up {row['warmup_s']:.1f} s{ran}"
    )


def check_summary(bench: LayerBench) -> str:
    checks = [r for r in bench.results if r.get("kind") == "check"]
    bad = [r for r in checks if r.get("status") != "ok"]
    lines = [f"checks: {len(checks) - len(bad)} ok, {len(bad)} not ok"]
    for r in bad:
        reason = r.get("error", r.get("reason", ""))
        lines.append(f"  {r['what']} {r.get('engine')} L={r.get('L')}: {r.get('status')} {reason}")
    return "\n".join(lines)


def summary(bench: LayerBench) -> str:
    rows = [r for r in bench.results if r.get("kind") == "time" and r.get("status") == "ok"]
    lines = []
    for mode in bench.modes:
        cols = sorted({(r["layer"], r["L"] or 0, r["candidate"]) for r in rows if r["mode"] == mode})
        if not cols:
            continue
        names = [f"{k}{'-L' + str(L) if L else ''}/{c}" for k, L, c in cols]
        lines.append(f"\n{mode} (ms; x = speed-up over attention)")
        lines.append("T".rjust(7) + "".join(n.rjust(max(len(n), 10) + 2) for n in names))
        for T in sorted({r["T"] for r in rows if r["mode"] == mode}):
            at = {
                (r["layer"], r["L"] or 0, r["candidate"]): r["ms"]
                for r in rows
                if r["mode"] == mode and r["T"] == T
            }
            attn = at.get(("attention", 0, "sdpa"))
            cells = []
            for col, n in zip(cols, names, strict=True):
                ms = at.get(col)
                text = (
                    ""
                    if ms is None
                    else f"{ms:.1f}" + (f" {attn / ms:.1f}x" if attn and col[0] != "attention" else "")
                )
                cells.append(text.rjust(max(len(n), 10) + 2))
            lines.append(str(T).rjust(7) + "".join(cells))
    lines.append(check_summary(bench))
    return "\n".join(lines)


_STYLES = {"cudnn": "-", "triton": "--", "flex": ":", "torch": "-."}
_COLORS = {16: "tab:red", 64: "tab:blue", 128: "tab:green"}
_BASELINES = {
    "attention": ("attention (SDPA)", "black"),
    "swa": ("sliding window 1024", "tab:gray"),
    "rnn": ("RNN", "tab:brown"),
}


def plot_rows(rows: list[dict], modes: list[str], tokens: int, path: Path) -> Path | None:
    """Figure 3 of the paper from timing rows: one panel per mode, ms per call against T (log-log).

    Colour is the layer (RAT's chunk size, or the baseline), line style RAT's attention engine. Rows may
    carry a "series" suffix (e.g. a later run) that is appended to their label.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [
        r for r in rows if r.get("kind") == "time" and r.get("status") == "ok" and r["layer"] != "rat-core"
    ]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        series: dict[str, tuple[list, dict]] = {}
        for r in rows:
            if r["mode"] != mode:
                continue
            if r["layer"] in _BASELINES:
                label, color = _BASELINES[r["layer"]]
                style = {"color": color, "linestyle": "-", "linewidth": 2.0}
            else:
                label = f"RAT L={r['L']} ({r['candidate']})"
                style = {
                    "color": _COLORS.get(r["L"], "tab:purple"),
                    "linestyle": _STYLES.get(r["candidate"], "-"),
                }
            if r.get("series"):
                label += f", {r['series']}"
                style = {**style, "marker": "s", "linestyle": "none", "markersize": 8, "fillstyle": "none"}
            series.setdefault(label, ([], style))[0].append((r["T"], r["ms"]))
        for label, (pts, style) in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{"marker": "o", **style})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"sequence length T ({tokens} tokens per call)")
        ax.set_ylabel("ms per call")
        ax.set_title(f"one layer, {MODES[mode]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(bench: LayerBench) -> Path | None:
    return plot_rows(bench.results, bench.modes, bench.tokens, bench.out / "bench_layer.png")


def run(bench: LayerBench) -> int:
    start = time.perf_counter()
    if bench.cuda and not torch.cuda.is_available():
        print("ratlm bench layer: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch import _dynamo

    # FlexAttention compiles once per shape; the grid has more shapes than the default cache allows
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    if hasattr(_dynamo.config, "accumulated_cache_size_limit"):
        limit = _dynamo.config.accumulated_cache_size_limit
        _dynamo.config.accumulated_cache_size_limit = max(limit, 512)
    bench.out.mkdir(parents=True, exist_ok=True)
    env = environment(bench)
    env["settings"] = {
        k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
        for k, v in asdict(bench).items()
        if k != "results"
    }
    _emit(bench, env)
    print(
        f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | cuDNN {env['cudnn']} | {env['date']}"
    )
    ceil = ceilings(bench)
    _emit(bench, ceil)
    print(
        f"ceilings: bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s, copy {ceil['copy_tbps']:.2f} TB/s"
    )
    if bench.checks:
        t0 = time.perf_counter()
        check_rat_engines(bench, deadline=start + 0.2 * bench.budget_s)
        for check, share in ((check_scan_and_window, 0.25), (check_layers, 0.3)):
            if time.perf_counter() < start + share * bench.budget_s:
                torch.manual_seed(0)  # the same random cotangents on every run
                check(bench)
            else:
                _emit(
                    bench,
                    {"kind": "check", "what": check.__name__, "status": "skipped", "reason": "time budget"},
                )
        _emit(bench, {"kind": "phase", "phase": "checks", "s": round(time.perf_counter() - t0, 1)})
        print(check_summary(bench), flush=True)
    for i, mode in enumerate(bench.modes):
        t0 = time.perf_counter()
        last = i == len(bench.modes) - 1  # training gets 60% of what is left, the last mode the rest
        deadline = start + bench.budget_s if last else t0 + 0.6 * (start + bench.budget_s - t0)
        run_timings(bench, mode, deadline=deadline, ceiling=ceil["matmul_bf16_tflops"])
        _emit(bench, {"kind": "phase", "phase": mode, "s": round(time.perf_counter() - t0, 1)})
    path = plot(bench) if bench.plot else None
    print(summary(bench))
    total = time.perf_counter() - start
    _emit(bench, {"kind": "phase", "phase": "total", "s": round(total, 1)})
    print(f"total {total:.0f} s; {bench.out / 'bench_layer.jsonl'}" + (f", {path}" if path else ""))
    return 0
