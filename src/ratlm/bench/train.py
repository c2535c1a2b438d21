"""`ratlm bench train`: training tokens/s, MFU and peak memory of the 1.3B RAT and attention presets.

Every case runs full optimizer steps through the trainer's own pieces (`distributed.parallelize`,
`train.lm_loss`, `train.build_optimizer`, clipping): FSDP2 with bf16 compute, fp32 master weights and
fp32 gradient reduction (on one GPU a one-rank group), random token ids. A case tries its plans
(micro-batch, activation checkpointing) in order until one fits in memory; OOMs and errors are
recorded, never fatal. The clock starts after warm-up steps (compile time is reported apart), each
case stops early when its share of the time budget is spent, and cases that would not fit in the
remaining budget are skipped. One JSON line per case goes to $OUT/bench_train.jsonl (OUT defaults to
./bench-out); a table goes to stdout.

    PYTHONPATH=src python -m ratlm.bench.train                       # one GPU, about 5 minutes
    torchrun --nproc_per_node=2 -m ratlm.bench.train --distributed   # FSDP over the GPUs of one host
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from .. import distributed as pdist
from ..config import preset
from ..metrics import H100_BF16_TFLOPS, flops_per_token
from ..model import LanguageModel
from ..train import build_optimizer, lm_loss, recipe

# (name, preset, seq_len, plans of (micro-batch, activation checkpointing), compile), most important first
CASES = [
    ("rat-4k", "rat-1.3b", 4096, [(8, False), (4, False), (8, True), (4, True)], False),
    ("attn-4k", "attn-1.3b", 4096, [(8, False), (4, False), (8, True), (4, True)], False),
    ("rat-16k", "rat-1.3b", 16384, [(2, False), (1, False), (2, True), (1, True)], False),
    ("attn-16k", "attn-1.3b", 16384, [(2, False), (1, False), (2, True), (1, True)], False),
    ("rat-64k", "rat-1.3b", 65536, [(1, False), (1, True)], False),
    ("attn-64k", "attn-1.3b", 65536, [(1, False), (1, True)], False),
    ("rat-4k-compiled", "rat-1.3b", 4096, [(8, False), (4, False), (8, True), (4, True)], True),
    ("attn-4k-compiled", "attn-1.3b", 4096, [(8, False), (4, False), (8, True), (4, True)], True),
]
TINY = dict(
    d_model=64, n_layers=2, n_heads=2, d_ffn=128
)  # --tiny: a smoke test of the script, not a benchmark
MIN_CASE_S = {False: 20.0, True: 80.0}  # time a case needs at least (eager / compiled) before it is started


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c[0] for c in CASES)}")
    p.add_argument(
        "--budget-s", type=float, default=230.0, help="start no case after this many seconds (default 230)"
    )
    p.add_argument("--steps", type=int, default=6, help="timed steps per case at most (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--case-s", type=float, default=45.0, help="timed seconds per case at most (default 45)")
    p.add_argument(
        "--parallel", choices=("fsdp", "none"), default="fsdp", help="fsdp (default) or plain autocast"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--distributed", action="store_true", help="FSDP over all torchrun ranks")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="per-GPU peak for MFU (989)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny models, lengths / 64 (CPU works)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ratlm bench train", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    under_torchrun = "WORLD_SIZE" in os.environ
    if under_torchrun and not args.distributed:
        print("under torchrun pass --distributed", file=sys.stderr)
        return 2
    fallback = None
    try:
        rt = pdist.setup(args.device, need_group=args.parallel == "fsdp" or args.distributed)
    except Exception as e:
        if args.distributed:
            raise
        fallback, args.parallel = f"{type(e).__name__}: {e}", "none"
        rt = pdist.setup(args.device)
    out_dir = Path(os.environ.get("OUT", "bench-out"))
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.parallel == "fsdp" and not args.distributed:
        try:  # one GPU: a broken FSDP setup must not cost every case; plain autocast measures the same model
            measure("rat-tiny", 64, 2, False, False, rt, args, 1.0)
        except Exception as e:
            fallback, args.parallel = f"{type(e).__name__}: {e}", "none"
    env = {**environment(rt), **({"fsdp_error": fallback} if fallback else {})}
    if fallback and rt.main:
        print(f"FSDP on one rank failed ({fallback}); measuring with plain autocast", file=sys.stderr)
    wanted = set(args.cases.split(",")) if args.cases else None
    results = []
    try:
        for name, preset_name, seq_len, plans, compiled in CASES:
            if (wanted and name not in wanted) or (compiled and args.no_compile):
                continue
            left = args.budget_s - (time.perf_counter() - start)
            # every rank takes the same decision (a rank skipping alone would hang the collectives)
            left = pdist.broadcast_object(left)
            if args.tiny:
                preset_name, seq_len, plans = (
                    preset_name.replace("-1.3b", "-small"),
                    seq_len // 64,
                    [(2, False)],
                )
            row = {"case": name, "preset": preset_name, "seq_len": seq_len, "compile": compiled, **env}
            if left < MIN_CASE_S[compiled]:
                row.update(status="skipped", reason=f"time guard: {left:.0f} s left of the budget")
            else:
                row.update(
                    run_case(preset_name, seq_len, plans, compiled, rt, args, min(args.case_s, left / 3))
                )
            results.append(row)
            if rt.main:
                with open(out_dir / "bench_train.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(summary_line(row), flush=True)
    finally:
        pdist.teardown(rt)
    if rt.main:
        print_table(results)
        print(f"total {time.perf_counter() - start:.0f} s; results in {out_dir / 'bench_train.jsonl'}")
    return 0


def run_case(preset_name, seq_len, plans, compiled, rt, args, case_s) -> dict:
    attempts = []
    for micro, ac in plans:
        try:
            row = measure(preset_name, seq_len, micro, ac, compiled, rt, args, case_s)
            return {**row, "attempts": attempts}
        except torch.OutOfMemoryError:
            attempts.append({"micro_batch": micro, "activation_checkpointing": ac, "error": "out of memory"})
        except Exception as e:  # recorded, not fatal: the next case still runs
            error = f"{type(e).__name__}: {e}"
            trace = traceback.format_exc()[-2000:]
            plan = {"micro_batch": micro, "activation_checkpointing": ac}
            return {"status": "error", "error": error, "trace": trace, **plan, "attempts": attempts}
        finally:
            if compiled:
                torch._dynamo.reset()  # compiled graphs hold on to the case's modules
            gc.collect()
            if rt.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"status": "oom", "attempts": attempts}


def measure(preset_name, seq_len, micro, ac, compiled, rt, args, case_s) -> dict:
    cfg = preset(preset_name, **(TINY if args.tiny else {}))
    torch.manual_seed(0)
    with torch.device(rt.device):
        model = LanguageModel(cfg)
    fpt, n_params = flops_per_token(model, seq_len), model.num_params()
    mode = "fsdp" if (args.parallel == "fsdp" or args.distributed) else "none"
    model = pdist.parallelize(model, mode, rt, bf16=True, activation_checkpointing=ac, compile=compiled)
    autocast = pdist.needs_autocast(mode, True)
    optimizer = build_optimizer(model, recipe(preset_name))
    batches = [torch.randint(0, cfg.vocab_size, (micro, seq_len + 1), device=rt.device) for _ in range(3)]

    def step(i: int) -> None:
        tokens = batches[i % len(batches)]
        with torch.autocast(rt.device.type, torch.bfloat16, enabled=autocast):
            loss = lm_loss(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    pdist.barrier()
    warm_s = time.perf_counter() - t0
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    times = []
    while len(times) < args.steps and sum(times) < case_s:
        t = time.perf_counter()
        step(len(times))
        sync()
        times.append(time.perf_counter() - t)
        # ranks agree on when to stop: the slowest rank's clock decides
        times[-1] = pdist.all_reduce_max(times[-1])
    step_s = sorted(times)[len(times) // 2]
    tokens = micro * seq_len * rt.world
    gpus = rt.world if rt.device.type == "cuda" else 0
    peak = torch.cuda.max_memory_allocated(rt.device) / 2**30 if rt.device.type == "cuda" else None
    return {
        "status": "ok",
        "parallel": mode,
        "world": rt.world,
        "micro_batch": micro,
        "activation_checkpointing": ac,
        "params": n_params,
        "flops_per_token": fpt,
        "tokens_per_step": tokens,
        "timed_steps": len(times),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "mfu": fpt * tokens / step_s / (args.peak_tflops * 1e12 * gpus) if gpus else None,
        "peak_mem_gib": peak,
        "warmup_s": warm_s,
        "compile_s": max(0.0, warm_s - args.warmup * step_s) if compiled else None,
    }


def environment(rt: pdist.Runtime) -> dict:
    gpu = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    return {
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summary_line(row: dict) -> str:
    if row["status"] != "ok":
        why = row.get("reason") or row.get("error") or row["status"]
        return f"{row['case']}: {row['status']} ({why})"
    mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
    return f"{row['case']}: {row['tokens_per_s']:,.0f} tokens/s{mfu}, step {row['step_s']:.3f} s"


def print_table(rows: list[dict]) -> None:
    head = f"{'case':<18}{'T':>7}{'batch':>6}{'AC':>4}{'tokens/s':>11}{'MFU':>7}{'GiB':>7}{'compile s':>10}"
    print(f"\n{head}  status")
    for r in rows:
        ok = r["status"] == "ok"
        cells = [
            f"{r['case']:<18}{r['seq_len']:>7}",
            f"{r['micro_batch']:>6}{'on' if r['activation_checkpointing'] else 'off':>4}" if ok else " " * 10,
            f"{r['tokens_per_s']:>11,.0f}" if ok else " " * 11,
            f"{r['mfu']:>7.1%}" if ok and r["mfu"] is not None else " " * 7,
            f"{r['peak_mem_gib']:>7.1f}" if ok and r["peak_mem_gib"] is not None else " " * 7,
            f"{r['compile_s']:>10.0f}" if ok and r["compile_s"] is not None else " " * 10,
        ]
        print("".join(cells) + "  " + r["status"])
    speed = {r["case"]: r["tokens_per_s"] for r in rows if r["status"] == "ok"}
    for t in ("4k", "16k", "64k"):
        if f"rat-{t}" in speed and f"attn-{t}" in speed:
            print(f"RAT / attention tokens/s at {t}: {speed[f'rat-{t}'] / speed[f'attn-{t}']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
