"""Where a decode step's time goes: the GPU kernels of CUDA-graph replays, from torch.profiler (issue 5).

Cases: one RAT layer's step (norm, projections, mixer, residual; the benchmark's layer config) at T=4096,
batch 512 and T=131072, batch 1, every replay from T - 4; and a 1.3B model's whole step at its planned
Table 1 batch with the cache at `--position` tokens (random cache contents, as in the throughput benchmark's
sampled steps). Per case: the replay's wall time per step (CUDA events, unprofiled), the kernels' sum, the
GPU's idle time between them, and per kernel its time per step and its launches per step; layer cases also
give the bytes of cache a step reads. JSON in $OUT/profile_decode.json, a table on stdout.

    PYTHONPATH=src python benchmarks/profile_decode.py [--models rat-1.3b] [--position 3584]
    PYTHONPATH=src python benchmarks/profile_decode.py --tiny       # toy sizes on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import torch

from ratlm.bench import decode as bench
from ratlm.bench.layer import by_kernel, idle_gaps, kernel_timeline
from ratlm.cache import move_to, plan_batch
from ratlm.generation import decode_one_token


def profile_steps(step, n: int, states, top: int, at: int | None = None, before=None) -> dict:
    """step() captured n times in a CUDA graph (eager on the CPU), each replay from position `at` (and
    after before()) when given; wall and kernels per step."""
    run = bench.repeated(step, states, n, torch.cuda.is_available(), at=at, before=before)
    run()
    wall = sorted(bench.timed(run) for _ in range(5))[2] / n * 1e3
    timeline = kernel_timeline(run) if torch.cuda.is_available() else []
    rows = by_kernel(timeline)
    for r in rows:
        r["ms"] /= n
        r["calls"] /= n
    idle, gaps = idle_gaps(timeline)
    total = sum(r["ms"] for r in rows)
    out = {"wall_ms": wall, "kernels_ms": total, "idle_ms": idle / n, "gaps": gaps[:5]}
    return {**out, "kernels": rows[:top]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="rat-1.3b", help="1.3B presets profiled at their planned batch")
    p.add_argument("--position", type=int, default=3584, help="tokens in the models' caches")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU")
    args = p.parse_args(argv)
    scale = bench.tiny_scale("cpu") if args.tiny else bench.paper_scale()
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    torch.manual_seed(0)
    n = 8
    max_len = scale.prompt + scale.new
    position = min(args.position, max_len - 20)
    with torch.no_grad():
        for name, T, B in scale.headlines[:2]:
            made = bench.layer_setup(scale, name, T, B, 4 * n)
            if isinstance(made, str):
                results.append({"case": f"layer {name} T{T} B{B}", "skipped": made})
                continue
            step, state, restart = made
            bench.warm_up(step)
            cfg = scale.layer
            slots = {"rat": T // cfg.chunk_size, "attn": T, "swa": cfg.window + 1, "rnn": 0}[name]
            cache = B * cfg.n_heads * slots * cfg.head_dim * 2 * 2
            r = profile_steps(step, n, [state], args.top, at=T - n // 2, before=restart)
            results.append({"case": f"layer {name} T{T} B{B}", "cache_bytes": cache, **r})
            del step, state
            bench.release()
        for name in args.models.split(",") if args.models else []:
            model = bench.build(name, scale)
            B = max(1, plan_batch(model, max_len, scale.prompt, free=scale.free).batch_size)
            cache = model.new_cache(B, max_len)
            bench.randomise(cache.layers)
            for s in cache.layers:
                move_to(s, position)
            token = torch.zeros(B, dtype=torch.long, device=scale.device)

            step = functools.partial(decode_one_token, model, cache, token)
            bench.warm_up(step)
            for s in cache.layers:
                move_to(s, position)
            r = profile_steps(step, 2, cache.layers, args.top)
            results.append({"case": f"model {name} B{B} at {position}", "batch": B, **r})
            del model, cache, step
            bench.release()
    for r in results:
        print(f"\n== {r['case']}: " + (r.get("skipped") or f"{r['wall_ms'] * 1e3:.1f} us/step wall, "
              f"{r['kernels_ms'] * 1e3:.1f} us of kernels, {r['idle_ms'] * 1e3:.1f} us idle"))  # fmt: skip
        for k in r.get("kernels", []):
            print(f"{k['ms'] * 1e3:10.1f} us {k['calls']:6.1f}x  {k['name'][:100]}")
    (out / "profile_decode.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
