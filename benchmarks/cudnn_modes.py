"""Why cuDNN's chunk attention forward looks slower in prefill than in training (issue 4).

The layer profiles (benchmarks/results/profile_layer-*-h200-2026-11-29.txt) show the same cuDNN forward
kernel at about 13.3 ms inside a RAT training step and 15.1 ms inside a prefill (T=131072, batch 2). This
times the engine's forward alone on the views the RAT core passes it, under autograd, no_grad and
inference_mode, interleaved, and on a contiguous copy of the queries; then the whole RAT layer prefill and
training step with the engine's forward time read from the profiler. JSON lines in $OUT/cudnn_modes.jsonl.

    PYTHONPATH=src python benchmarks/cudnn_modes.py
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

from ratlm.bench.layer import LayerBench, _config, _layer, kernel_times, layer_step, time_ms
from ratlm.ops.rat.engines import cudnn_engine


def cuda_ms(fn) -> list[float]:
    """Milliseconds of 5 back-to-back calls, each timed by CUDA events."""
    return time_ms(fn, 0.0, cuda=True, min_reps=5, max_reps=5)[1]


def engine_modes(emit) -> None:
    """The engine's forward alone, on the RAT core's views, in each autograd mode."""
    B, T, H, L, d = 2, 131072, 16, 16, 128
    C = T // L
    dt = torch.bfloat16
    engine = cudnn_engine(dt, d, H, L, torch.device("cuda"))
    if engine is None:
        raise SystemExit("cuDNN's chunk attention is unavailable here (see the ratlm.ops log at DEBUG)")
    qo = torch.randn(B, C, H, L, d, device="cuda", dtype=dt)
    ksum, vsum = (torch.randn(B, C, H, d, device="cuda", dtype=dt) for _ in range(2))
    qp = qo.view(B, C, H * L, d)[:, 1:].transpose(1, 2)
    kp, vp = ksum[:, : C - 1].transpose(1, 2), vsum[:, : C - 1].transpose(1, 2)
    forward = functools.partial(engine.forward, qp, kp, vp, d**-0.5)
    modes = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    for ctx in modes.values():  # warm-up: plans built
        with ctx():
            forward()
    torch.cuda.synchronize()
    for rnd in range(2):
        for name, ctx in modes.items():
            with ctx():
                emit(case="engine forward", mode=name, round=rnd, ms=sorted(cuda_ms(forward)))
    contiguous = functools.partial(engine.forward, qp.contiguous(), kp.contiguous(), vp.contiguous(), d**-0.5)
    contiguous()
    emit(case="engine forward, contiguous q, k, v", mode="grad", ms=sorted(cuda_ms(contiguous)))


def main() -> None:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def emit(**row):
        lines.append(row)
        print(json.dumps(row))

    engine_modes(emit)
    torch.cuda.empty_cache()
    B, T, L = 2, 131072, 16
    bench = LayerBench()
    torch.manual_seed(0)
    layer = _layer("rat", _config(bench, L, T), "cuda")
    for mode in ("prefill", "train", "prefill"):
        x = torch.randn(B, T, bench.d_model, device="cuda", requires_grad=mode == "train")
        step = layer_step(layer, x, torch.randn_like(x) if mode == "train" else None)
        step()
        step()
        torch.cuda.synchronize()
        wall = sorted(cuda_ms(step))
        cudnn = [r for r in kernel_times(step) if "fprop" in r["name"]]
        emit(case="layer", mode=mode, wall_ms=wall, cudnn_fprop_ms=[r["ms"] for r in cudnn])
        del x, step
        torch.cuda.empty_cache()
    (out / "cudnn_modes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
