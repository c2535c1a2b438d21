"""`ratlm bench ...`: the benchmark subcommands (run on a GPU machine; results under $OUT)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def cmd_bench_layer(args: argparse.Namespace) -> None:
    from .layer import BASELINES, CANDIDATES, MODES, LayerBench, run

    bench = LayerBench(out=Path(args.out or os.environ.get("OUT", "bench-out")))
    if args.quick:
        bench.quick_mode()
    for name in ("modes", "seq_lens", "chunks", "candidates", "baselines", "budget_s", "rep_s"):
        value = getattr(args, name)
        if value is not None:
            setattr(bench, name, value)
    bench.checks, bench.plot = not args.no_checks, not args.no_plot
    if args.seq_lens is not None:
        bench.flex_lens = tuple(t for t in bench.seq_lens if t in bench.flex_lens) or bench.seq_lens[:1]
    allowed = {"modes": tuple(MODES), "candidates": CANDIDATES, "baselines": BASELINES}
    for name, names in allowed.items():
        unknown = sorted(set(getattr(bench, name)) - set(names))
        if unknown:
            raise ValueError(f"--{name}: unknown {unknown}; allowed: {', '.join(names)}")
    if run(bench):
        raise SystemExit(2)


def add_bench_parser(sub) -> None:
    """Register `ratlm bench layer | train | decode | generate`."""
    bench = sub.add_parser("bench", help="GPU benchmarks (JSON lines under $OUT)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser("layer", help="one mixer layer: training and prefill over lengths (Figure 3)")
    p.add_argument("--out", help="results folder (default $OUT, else ./bench-out)")
    p.add_argument("--quick", action="store_true", help="T 131072 and 4096, L 16 (about 2.5 min)")
    p.add_argument(
        "--modes", type=_names, help="train,prefill (default both); fill: prefill into a cache, in place"
    )
    p.add_argument("--seq-lens", type=_ints, help="lengths, most wanted first (default 131072,4096,...)")
    p.add_argument("--chunks", type=_ints, help="RAT chunk sizes (default 16,64,128)")
    p.add_argument("--candidates", type=_names, help="RAT engines: cudnn,triton,flex,torch (default all)")
    p.add_argument("--baselines", type=_names, help="attention,swa,rnn (default all)")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run in seconds (default 390)")
    p.add_argument("--rep-s", type=float, help="timed seconds per configuration (default 0.6)")
    p.add_argument("--no-checks", action="store_true", help="skip the correctness phase")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.set_defaults(func=cmd_bench_layer)
    from . import decode, train

    p = kinds.add_parser("train", help="training throughput of the 1.3B presets (ratlm.bench.train)")
    train.add_arguments(p)
    p.set_defaults(func=lambda args: _exit_code(train.run(args)))
    # `ratlm bench decode` and `ratlm bench generate`: phases of ratlm.bench.decode

    for name, (phases, help_text) in decode.SUBCOMMANDS.items():
        p = kinds.add_parser(name, help=help_text)
        decode.add_arguments(p, phases)
        p.set_defaults(func=lambda args: _exit_code(decode.run_benchmark(args)))


def _exit_code(code: int | None) -> None:
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """`python -m ratlm.bench.cli layer ...`: `ratlm bench layer ...` without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m ratlm.bench.cli")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
