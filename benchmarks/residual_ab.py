"""A/B of the residual connection x + proj(y) under bf16 autocast with an fp32 residual stream.

"plain": x + F.linear(y, W) (a bf16 GEMM, then an fp32 add); "epilogue": ratlm's `_AddProjection`, one GEMM
with an fp32 output that adds x in its epilogue (torch.addmm with out_dtype=float32, where torch has it).
262,144 tokens, D 2048: checks the output and the gradients of x, y and W against "plain", then times
forward + backward and forward alone (triton.testing.do_bench medians). Writes $OUT/residual_ab.jsonl.

    PYTHONPATH=src python benchmarks/residual_ab.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

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
    with open(out / "residual_ab.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
