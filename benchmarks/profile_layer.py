"""Where one layer's time goes: the GPU kernels of a training step and a prefill, from torch.profiler.

For RAT (L=16, default engine) and attention at the benchmark's shape (D 2048, 16 heads of 128, G 2,
262,144 tokens per call, bf16 autocast over fp32 weights), at T = 4096 and 131072: per kernel the total
CUDA time and the number of launches, largest first. Writes $OUT/profile_layer.json and a text table to
stdout. Timings come from the profiler (one profiled call after two warm-up calls), so they carry its
overhead; `ratlm bench layer` gives the clean numbers. Each entry also has the call's wall time (median of 5
CUDA-event timings, unprofiled) and the difference to the kernels' sum: time the GPU waits for the host.
`--trace` writes a Chrome trace per configuration ($OUT/trace-<kind>-<T>-<mode>.json) to see where.
Mode "fill" is the cached prefill of `ratlm bench layer --modes fill` (x and a fresh state put back before
each call, outside the timing and the profile).

    PYTHONPATH=src python benchmarks/profile_layer.py [--lengths 4096,131072] [--kinds rat,attention]
        [--modes train,prefill,fill] [--trace]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ratlm.bench.layer import (
    LayerBench,
    _config,
    _layer,
    by_kernel,
    idle_gaps,
    kernel_timeline,
    mode_step,
    time_ms,
)


def profile_one(kind: str, T: int, mode: str, top: int, trace: Path | None = None) -> dict:
    bench = LayerBench()
    B = max(1, bench.tokens // T)
    torch.manual_seed(0)
    layer = _layer(kind, _config(bench, 16, T), "cuda")
    x = torch.randn(B, T, bench.d_model, device="cuda", requires_grad=mode == "train")
    step, setup = mode_step(layer, x, mode)  # fill: setup() (untimed, unprofiled) puts x and the state back
    for _ in range(2):
        if setup is not None:
            setup()
        step()
    torch.cuda.synchronize()
    wall, _ = time_ms(step, 0.0, cuda=True, min_reps=5, max_reps=5, setup=setup)
    if setup is not None:
        setup()
        torch.cuda.synchronize()
    timeline = kernel_timeline(step, trace)
    rows = by_kernel(timeline)
    total = sum(r["ms"] for r in rows)
    idle, gaps = idle_gaps(timeline)
    return {"kind": kind, "T": T, "B": B, "mode": mode, "total_ms": total, "wall_ms": wall,
            "host_wait_ms": wall - total, "idle_ms": idle, "gaps": gaps[:top // 2 or 1],
            "kernels": rows[:top]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,131072")
    p.add_argument("--kinds", default="rat,attention")
    p.add_argument("--modes", default="train,prefill")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per configuration")
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for T in (int(t) for t in args.lengths.split(",")):
        for kind in args.kinds.split(","):
            for mode in args.modes.split(","):
                trace = out / f"trace-{kind}-{T}-{mode}.json" if args.trace else None
                r = profile_one(kind, T, mode, args.top, trace)
                torch.cuda.empty_cache()
                results.append(r)
                print(f"\n== {kind} T={T} B={r['B']} {mode}: {r['total_ms']:.1f} ms of kernels, "
                      f"{r['wall_ms']:.1f} ms wall, {r['idle_ms']:.2f} ms idle when profiled")  # fmt: skip
                for g in r["gaps"][:5]:
                    print(f"   gap {g['us']:8.1f} us after {g['after'][:50]} before {g['before'][:50]}")
                for k in r["kernels"]:
                    print(f"{k['ms']:9.2f} ms {k['calls']:5d}x  {k['name'][:110]}")
    (out / "profile_layer.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
