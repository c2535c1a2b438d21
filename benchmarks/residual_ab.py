"""A/B of the residual connection x + proj(y) under bf16 autocast with an fp32 residual stream.

"plain": x + F.linear(y, W) (a bf16 GEMM, then an fp32 add); "epilogue": ratlm's `_AddProjection`, one GEMM
with an fp32 output that adds x in its epilogue (torch.addmm with out_dtype=float32, where torch has it).
262,144 tokens, D 2048: checks the output and the gradients of x, y and W against "plain", then times
forward + backward and forward alone (triton.testing.do_bench medians). Then the cached-inference case,
`add_projection(..., inplace=True)` (out=x where the probe allows it): whether the probe allows it, its
forward time, and the kernels each forward launches (a copy of x shows up as a device memcpy). Writes
$OUT/residual_ab.jsonl.

    PYTHONPATH=src python benchmarks/residual_ab.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from ratlm.mixers import residual
from ratlm.mixers.residual import _AddProjection

N, D = 262144, 2048


def plain(x, y, w):
    return x + F.linear(y, w)


def epilogue(x, y, w):
    return _AddProjection.apply(x, y, w)


def main() -> None:
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", requires_grad=True)
    y = torch.randn(N, D, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(D, D, device="cuda") * D**-0.5).requires_grad_()
    dout = torch.randn(N, D, device="cuda")
    rows, ref = [], None
    for name, fn in (("plain", plain), ("epilogue", epilogue)):
        row = {"variant": name}
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = fn(x, y, w)
            grads = torch.autograd.grad(o, (x, y, w), dout)
            got = [o, *grads]
            if ref is None:
                ref = got
            row["dtypes"] = [str(t.dtype) for t in got]
            row["rel_diff"] = [
                float((a.detach().float() - b.float()).abs().max() / b.float().abs().max())
                for a, b in zip(got, ref, strict=True)
            ]

            def train(fn=fn):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    o = fn(x, y, w)
                torch.autograd.grad(o, (x, y, w), dout)

            def forward(fn=fn):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    fn(x, y, w)

            row["train_ms"] = triton.testing.do_bench(train)
            row["forward_ms"] = triton.testing.do_bench(forward)
        except Exception as e:  # an older torch without out_dtype, or no derivative for it
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.append(in_place(x.detach().clone(), y.detach(), w.detach()))
    print(json.dumps(rows[-1]), flush=True)
    with open(out / "residual_ab.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def kernels(fn) -> list[str]:
    """Names of the device activities one call of fn launches (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name[:80] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def in_place(x, y, w) -> dict:
    """Cached inference's residual: x += y @ W.T written into x, against the out-of-place epilogue."""
    proj = torch.nn.Linear(D, D, bias=False, device="cuda")
    proj.weight.data.copy_(w)
    row = {"variant": "in place (cached inference)"}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        row["probe_in_place"] = residual._inplace_epilogue_supported(x.device, torch.bfloat16)
        x0 = x.clone()
        want = _AddProjection.apply(x0, y, w)
        got = residual.add_projection(x, y, proj, inplace=True)
        row["same_storage"] = got.data_ptr() == x.data_ptr()
        row["max_abs_diff"] = float((got - want).abs().max())

        def forward():
            residual.add_projection(x, y, proj, inplace=True)

        def out_of_place():
            _AddProjection.apply(x0, y, w)

        row["forward_ms"] = triton.testing.do_bench(forward)
        row["out_of_place_forward_ms"] = triton.testing.do_bench(out_of_place)
        row["kernels"] = kernels(forward)
        row["out_of_place_kernels"] = kernels(out_of_place)
    return row


if __name__ == "__main__":
    main()
