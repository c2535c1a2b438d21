"""A/B runs for the decode step on one GPU (issue 5), one process, JSON lines in OUT/bench_decode.jsonl.

- the residual added by the output projections' GEMMs in place (the model's cached path) against a GEMM
  and an add: RAT layer steps at the two headline shapes and the 1.3B batch-1 latency;
- the split of RAT's summary kernel at T=131072, batch 1 (splits x BLOCK_N x warps), and tiles at T=4096,
  batch 512;
- the model checks of `ratlm bench decode` first (graph step == eager step, cached == full forward);
- with --pdl-ab, only programmatic dependent launch on against off (`ratlm.ops.pdl`).

    PYTHONPATH=src python benchmarks/decode_ab.py --out $OUT      # about 3 minutes on one H200
    PYTHONPATH=src python benchmarks/decode_ab.py --tiny          # toy sizes on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import ratlm.mixers.attention
import ratlm.mixers.ffn
import ratlm.mixers.rat
import ratlm.mixers.rnn
from ratlm.bench import decode as bench
from ratlm.mixers import residual
from ratlm.ops import pdl

MODULES = (ratlm.mixers.rat, ratlm.mixers.attention, ratlm.mixers.rnn, ratlm.mixers.ffn)


@contextlib.contextmanager
def residual_by_add():
    """Every mixer and FFN adds its residual out of place (a GEMM, then an add), as before the change."""

    def out_of_place(x, y, proj, inplace=False):
        return residual.add_projection(x, y, proj, inplace=False)

    saved = [m.add_projection for m in MODULES]
    for m in MODULES:
        m.add_projection = out_of_place
    try:
        yield
    finally:
        for m, f in zip(MODULES, saved, strict=True):
            m.add_projection = f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--splits", default="16,32,64,128,256", help="splits tried at T=131072, batch 1")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--throughput", action="store_true", help="also rat-1.3b tokens/s (sampled, about 30 s)")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU")
    p.add_argument(
        "--sweep",
        metavar="MIXER:T:B",
        action="append",
        help="only sweep the decode tiles of this layer step (repeatable), e.g. swa:4096:512",
    )
    p.add_argument(
        "--tiles",
        default="0x0,16x1,32x1,32x2,64x4,16x4",
        help="BLOCK_NxWARPS or BLOCK_NxWARPSxSPLITS for --sweep (0x0: the default plan)",
    )
    p.add_argument(
        "--pdl-ab",
        action="store_true",
        help="only programmatic dependent launch on and off, alternated (layer steps, batch-1 latency)",
    )
    args = p.parse_args(argv)
    scale = bench.tiny_scale("cpu") if args.tiny else bench.paper_scale()
    run = bench.Run(args.out, 600, scale)
    if args.sweep:
        for spec in args.sweep:
            name, T, B = spec.split(":")
            for tile in args.tiles.split(","):
                tiling = tuple(int(t) for t in tile.split("x"))
                tiling = tiling if any(tiling) else None
                run.guarded(
                    "layer", f"{spec} {tiling}", bench.layer_case, run, name, int(T), int(B), tiling, False
                )
        return 0
    (_, T_big, B_big), (_, T_long, B_long) = scale.headlines[:2]  # batch 512 at 4K; batch 1 at 128K
    if args.pdl_ab:
        shapes = (("rat", T_long, B_long), ("rat", T_big, B_big), ("attn", T_long, B_long))
        for on in (True, False, True, False):  # alternated: drift shows as a difference between repeats
            with pdl.enabled_as(on):
                tag = "pdl" if on else "no pdl"
                for shape in shapes:
                    run.guarded("layer", f"{shape} {tag}", bench.layer_case, run, *shape, None, False)
                if not args.no_latency:
                    run.guarded(
                        "latency", f"rat-1.3b {tag}", bench.latency_case, run, "rat-1.3b", tag=f" {tag}"
                    )
        return 0
    run.guarded("check", "model", bench.check_model, run)
    for shape in (("rat", T_big, B_big), ("rat", T_long, B_long)):
        for inplace in (False, True, False, True):  # alternated: drift shows as a difference between repeats
            run.guarded("layer", str(shape), bench.layer_case, run, *shape, None, False, inplace)
    for splits in (int(s) for s in args.splits.split(",")):
        for block_n, warps in ((16, 2), (32, 4), (64, 4)):
            tiling = (block_n, warps, splits)
            run.guarded("layer", str(tiling), bench.layer_case, run, "rat", T_long, B_long, tiling, False)
    for tiling in ((16, 1), (16, 4), (64, 8)):
        run.guarded("layer", str(tiling), bench.layer_case, run, "rat", T_big, B_big, tiling, False)
    if not args.no_latency:
        for inplace in (False, True):
            if inplace:
                run.guarded("latency", "rat-1.3b", bench.latency_case, run, "rat-1.3b")
            else:
                with residual_by_add():
                    run.guarded("latency", "rat-1.3b add", bench.latency_case, run, "rat-1.3b", tag=" add")
    if args.throughput:
        bench.phase_throughput(run, ["rat-1.3b"], 90, True, False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
