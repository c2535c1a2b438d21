"""cuBLAS against the Triton few-row product (`ratlm.ops.gemv_triton`) on the 1.3B presets' decode shapes.

Per (N, K) weight shape and M rows of x: the product's error against fp32, and the time per call inside a
CUDA graph of many calls that cycle through enough weight copies (over 400 MB) that no call finds its
weight in L2, as in a decode step. Variants: torch (F.linear, or addmm_ accumulating into out), Triton
with its planned tile, and a tile sweep. JSON lines in $OUT/gemv_ab.jsonl and a table on stdout.

    PYTHONPATH=src python benchmarks/gemv_ab.py              # about a minute on one H200
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ratlm.ops.gemv_triton import gemv_tile, gemv_triton

SHAPES = {  # (N, K): the linear layers of rat-1.3b / attn-1.3b (D 2048, FFN 8192, vocab 32000)
    "rat in_proj": (6656, 2048),
    "attention in_proj": (6144, 2048),
    "out_proj": (2048, 2048),
    "ffn fc1": (8192, 2048),
    "ffn fc2": (2048, 8192),
    "lm_head": (32000, 2048),
}
TILES = [
    (bn, bk, w) for bn in (2, 4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8) if bn * bk <= 16384
]


def per_call_us(fn_of, weights, reps: int = 3) -> float:
    """Median over `reps` replays of a graph of one call per weight (plus warm-up), microseconds per call."""
    for w in weights[:2]:
        fn_of(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn_of(w)
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(weights))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--sweep", action="store_true", help="also every tile in TILES (M=1 only)")
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    dev = torch.device("cuda")
    for name, (N, K) in SHAPES.items():
        copies = max(4, (400 << 20) // (N * K * 2))
        weights = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            o = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            ref = x.float() @ weights[0].float().t()
            scale = float(ref.norm())
            err_tri = float((gemv_triton(x, weights[0]).float() - ref).norm()) / scale
            err_torch = float((F.linear(x, weights[0]).float() - ref).norm()) / scale
            acc_ref = o.float() + ref
            acc = o.clone()
            gemv_triton(x, weights[0], acc, accumulate=True)
            err_acc = float((acc.float() - acc_ref).norm() / acc_ref.norm())
            gb = N * K * 2 / 1e3  # bytes of w per microsecond -> GB/s
            row = dict(
                shape=name, N=N, K=K, M=M, err_triton=err_tri, err_torch=err_torch, err_accumulate=err_acc
            )
            row["torch_us"] = per_call_us(lambda w: F.linear(x, w), weights)  # noqa: B023
            row["torch_addmm_us"] = per_call_us(lambda w: o.addmm_(x, w.t()), weights)  # noqa: B023
            row["triton_tile"] = gemv_tile(K)
            row["triton_us"] = per_call_us(lambda w: gemv_triton(x, w, o), weights)  # noqa: B023
            row["triton_acc_us"] = per_call_us(lambda w: gemv_triton(x, w, o, True), weights)  # noqa: B023
            if args.sweep and M == 1:
                row["sweep_us"] = {
                    str(t): per_call_us(lambda w: gemv_triton(x, w, o, tile=t), weights)  # noqa: B023
                    for t in TILES
                }
            lines.append(row)
            best = min(row.get("sweep_us", {"-": float("inf")}).items(), key=lambda kv: kv[1])
            print(
                f"{name:18s} M={M} torch {row['torch_us']:6.1f} us ({gb / row['torch_us']:5.0f} GB/s) "
                f"addmm_ {row['torch_addmm_us']:6.1f}  "
                f"triton {row['triton_us']:6.1f} ({gb / row['triton_us']:5.0f}) "
                f"acc {row['triton_acc_us']:6.1f}  best {best}  err {err_tri:.1e} vs {err_torch:.1e}"
            )
        del weights
        torch.cuda.empty_cache()
    (out / "gemv_ab.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
