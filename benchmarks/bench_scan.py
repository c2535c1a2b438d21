"""RAT's two scan kernels side by side on the GPU: per-chunk loops (scan_seq.py) vs prefix scans.

For the mixer's call of `rat_mix` (bf16 q, k, v, forget-gate logits with their fp32 bias, output gate z;
cuDNN engine) at the benchmark's shapes (16 heads of 128, G 2, 262,144 tokens per call): checks that both
variants give the same output and gradients, then times forward + backward and forward alone (CUDA events,
median of 7 after 2 warm-up calls) and the scan kernels alone from torch.profiler. Writes
$OUT/bench_scan.jsonl and prints a table.

    PYTHONPATH=src python benchmarks/bench_scan.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ratlm.bench.layer import kernel_times, time_ms
from ratlm.ops.rat import gpu, scan_kernels

H, G, d = 16, 2, 128


def leaves(B: int, T: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    q, k = (torch.randn(B, T, G, d, device="cuda").bfloat16() for _ in range(2))
    v, logits, z = (torch.randn(B, T, H, d, device="cuda").bfloat16() for _ in range(3))
    bias = torch.rand(H * d, device="cuda").mul(15).log1p()
    return [t.requires_grad_() for t in (q, k, v, logits, bias, z)]


def call(xs: list[torch.Tensor], L: int) -> torch.Tensor:
    return gpu.rat_mix_triton(*xs[:4], L, gate_bias=xs[4], out_gate=xs[5], engine="cudnn")


def median_ms(fn) -> float:
    """Median of 7 timed calls after 2 warm-up calls."""
    for _ in range(2):
        fn()
    return time_ms(fn, 0.0, cuda=True, min_reps=7, max_reps=7)[0]


def scan_kernel_ms(fn) -> dict[str, float]:
    return {k["name"]: k["ms"] for k in kernel_times(fn) if "scan" in k["name"] or "seq" in k["name"]}


def measure(xs: list[torch.Tensor], dy: torch.Tensor, L: int) -> dict:
    def train():
        torch.autograd.grad(call(xs, L), xs, dy)

    def fwd():
        with torch.no_grad():
            call(xs, L)

    return {"train_ms": median_ms(train), "fwd_ms": median_ms(fwd), "scan_kernels_ms": scan_kernel_ms(train)}


def main() -> None:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = [(131072, 16), (4096, 16)] if os.environ.get("QUICK") else [
        (4096, 16), (131072, 16), (4096, 8), (4096, 1), (32768, 4)]  # fmt: skip
    for T, L in cases:
        B = max(1, 262144 // T)
        xs = leaves(B, T)
        dy = torch.randn(B, T, H, d, device="cuda").bfloat16()
        results = {}
        for variant in ("scan", "seq"):
            scan_kernels.VARIANT = variant
            y = call(xs, L)
            grads = torch.autograd.grad(y, xs, dy)
            results[variant] = [y.detach().float(), *(g.float() for g in grads)]
            row = {"T": T, "B": B, "L": L, "variant": variant, **measure(xs, dy, L)}
            rows.append(row)
            print(json.dumps(row))
        names = ["y", "dq", "dk", "dv", "dlogits", "dbias", "dz"]
        diff = {
            n: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            for n, a, b in zip(names, results["seq"], results["scan"], strict=True)
        }
        row = {"T": T, "B": B, "L": L, "check": "seq vs scan, max abs diff / max abs", **diff}
        rows.append(row)
        print(json.dumps(row))
        del xs, dy, results
        torch.cuda.empty_cache()
    scan_kernels.VARIANT = "auto"
    with open(out / "bench_scan.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
