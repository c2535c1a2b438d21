"""Tile sweep of the short-chunk scan kernels (scan_seq.py) at the layer benchmark's longest shape.

RAT L=16 as the mixer calls it (bf16 q, k, v, forget-gate logits with their fp32 bias, output gate z; cuDNN
engine), B 2, T 131072, 16 heads of 128, G 2. One training call records the exact arguments the scan
kernels get; then each (NC, BD, warps) is checked against the default tiling (largest difference over
every output, relative to its largest value) and timed alone with triton.testing.do_bench (median ms).
Writes $OUT/scan_tiles.jsonl.

    PYTHONPATH=src python benchmarks/scan_tiles.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton

from ratlm.ops.rat import fused, gpu, scan_kernels, scan_seq

H, G, d = 16, 2, 128
B, T, L = 2, 131072, 16


def leaves() -> list[torch.Tensor]:
    torch.manual_seed(0)
    q, k = (torch.randn(B, T, G, d, device="cuda").bfloat16() for _ in range(2))
    v, logits, z = (torch.randn(B, T, H, d, device="cuda").bfloat16() for _ in range(3))
    bias = torch.rand(H * d, device="cuda").mul(15).log1p()
    return [t.requires_grad_() for t in (q, k, v, logits, bias, z)]


def record() -> dict[str, tuple]:
    """The arguments of one call of each scan launcher, from one training call of the core."""
    calls: dict[str, tuple] = {}
    real_fwd, real_bwd = fused.rat_scan_fwd, fused.rat_scan_bwd

    def fwd(*args):
        calls["fwd"] = args
        return real_fwd(*args)

    def bwd(*args):
        calls["bwd"] = args
        return real_bwd(*args)

    fused.rat_scan_fwd, fused.rat_scan_bwd = fwd, bwd
    try:
        xs = leaves()
        y = gpu.rat_mix_triton(*xs[:4], L, gate_bias=xs[4], out_gate=xs[5], engine="cudnn")
        y.backward(torch.randn_like(y))
    finally:
        fused.rat_scan_fwd, fused.rat_scan_bwd = real_fwd, real_bwd
    torch.cuda.synchronize()
    return calls


def fwd_outputs(args) -> list[torch.Tensor]:
    """Run the forward launcher into fresh copies of its output buffers (positions 8, 10, 11, 13, 14);
    the summaries without the last chunk's, which no chunk reads and the kernel leaves unwritten."""
    args = list(args)
    outs = []
    for pos in (8, 10, 11, 13, 14):
        args[pos] = torch.empty_like(args[pos])
        outs.append(args[pos] if pos < 13 else args[pos][:, :-1])
    scan_kernels.rat_scan_fwd(*args)
    return outs


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
        for x, y in zip(a, b, strict=True)
        if x is not None
    )


def tiles() -> list[tuple[int, int, int]]:
    """(NC, BD, warps): 1 to 8 elements per thread, rows of 32 or 64 channels (BD divides d/2 = 64); the
    first is the tile before the sweep of 2026-11-29 (one element per thread)."""
    return [
        (4, 32, 4), (1, 32, 1), (4, 32, 1), (8, 32, 1), (8, 32, 2),
        (1, 64, 1), (2, 64, 1), (4, 64, 1), (2, 64, 2), (4, 64, 2), (8, 64, 2), (8, 64, 4),
    ]  # fmt: skip


def main() -> None:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    calls = record()
    scan_seq.TILES.clear()
    ref_bwd = scan_kernels.rat_scan_bwd(*calls["bwd"])
    ref_fwd = fwd_outputs(calls["fwd"])
    jobs = [(kind, tile) for kind in ("bwd", "fwd") for tile in [None, *tiles()]]
    for kind, tile in jobs:
        scan_seq.TILES.clear()
        if tile is not None:
            scan_seq.TILES[kind] = tile
        row = {"kind": kind, "tile": tile or "default"}
        try:
            if kind == "bwd":
                row["rel_diff"] = rel_diff(scan_kernels.rat_scan_bwd(*calls["bwd"]), ref_bwd)
                row["ms"] = triton.testing.do_bench(lambda: scan_kernels.rat_scan_bwd(*calls["bwd"]))
            else:
                row["rel_diff"] = rel_diff(fwd_outputs(calls["fwd"]), ref_fwd)
                row["ms"] = triton.testing.do_bench(lambda: scan_kernels.rat_scan_fwd(*calls["fwd"]))
        except Exception as e:  # a tile that does not compile (shared memory, registers) is recorded
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    scan_seq.TILES.clear()
    with open(out / "scan_tiles.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for kind in ("bwd", "fwd"):
        best = min((r for r in rows if r["kind"] == kind and "ms" in r), key=lambda r: r["ms"])
        print(f"fastest {kind}: {best}")


if __name__ == "__main__":
    main()
