"""Would two half-batches on two CUDA streams decode faster than one batch on one? (issue 5, throughput)

At rat-1.3b's throughput batch a decode step is two floors one after the other: RAT's step kernel reads the
chunk summaries (memory-bound, about 70% of the step) and the matrix products run at the tensor cores' rate
(about 27%). A decode step split into two half-batches, each its own chain of layers on its own stream, could
let one half's summaries stream while the other half's products run. This measures that upper bound on one
layer's worth of work before anyone builds it:

- one stream, whole batch: per layer, the block's products (input projection, output projection, FFN) and the
  RAT step over the summaries, `--layers` times in a CUDA graph;
- two streams, two halves: stream 1 repeats (step, products) on half 1, stream 2 repeats (products, step) on
  half 2, captured in one graph (the fork/join of the two chains only at the ends, as a pipeline would have).
Per layer, ms for each, the pieces apart, and the ratio. Random bf16 weights and caches at `--position`
tokens (4096-token capacity); every replay starts from that position. JSON in $OUT/overlap_ab.json.

Two streams cannot overlap much when the first kernel's programs fill every multiprocessor: the hardware hands
out one kernel's programs before the next one's. `--green 66,88,110` partitions the multiprocessors
instead (CUDA green contexts, `torch.cuda.green_contexts`): for each S, the step alone on S of them, the
products alone on the others, and both at once, the steps on the S and the products on the rest (eager
launches timed with events: the upper bound of a pipeline that hands each kind of work its own share).

    PYTHONPATH=src python benchmarks/overlap_ab.py                     # about a minute on one H200
    PYTHONPATH=src python benchmarks/overlap_ab.py --tiny              # toy sizes on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ratlm.bench import decode as bench
from ratlm.cache import move_to
from ratlm.config import preset
from ratlm.model import make_mixer
from ratlm.ops.rat.decode import rat_decode


class Half:
    """One (half-)batch of one RAT block: its inputs, its cache at `position`, and its two pieces of work."""

    def __init__(self, cfg, rows: int, position: int, capacity: int, weights: dict, device: str):
        dt = torch.bfloat16
        D, H, d, G = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_groups
        mixer = make_mixer("rat", cfg)
        self.state = mixer.new_state(rows, capacity, device, dt)
        bench.randomise([self.state])
        self.position, self.L, self.w = position, cfg.chunk_size, weights
        self.x = torch.randn(rows, D, device=device, dtype=dt)
        self.y = torch.randn(rows, H * d, device=device, dtype=dt)
        self.q, self.k = (torch.randn(rows, G, d, device=device, dtype=dt) for _ in range(2))
        self.v, self.g, self.z = (torch.randn(rows, H, d, device=device, dtype=dt) for _ in range(3))
        self.bias = torch.zeros(H * d, device=device)

    def step(self) -> None:
        """RAT's one-token step over the chunk summaries (the memory-bound piece)."""
        rat_decode(self.q, self.k, self.v, self.g, self.bias, self.z, self.state, self.L)

    def products(self) -> None:
        """The block's matrix products for one token per row (the compute-bound piece)."""
        F.linear(self.x, self.w["in_proj"])
        F.linear(self.y, self.w["out_proj"])
        u = F.linear(self.x, self.w["fc1"])
        F.linear(u, self.w["fc2"])


def graph_ms(body, halves, layers: int, cuda: bool, reps: int = 5) -> float:
    """ms per layer of body(), replayed from one CUDA graph that first puts the caches back at their
    position (`ratlm.bench.decode.repeated`)."""
    bench.warm_up(body)
    states = [h.state for h in halves]
    run = bench.repeated(body, states, 1, cuda, at=halves[0].position)
    times = sorted(bench.timed(run) for _ in range(reps))
    return times[reps // 2] * 1e3 / layers


def one_batch(whole: Half, n: int, cuda: bool) -> dict:
    """The whole batch on one stream: the step alone, the products alone, and the two in turn, per layer."""

    def in_turn():
        for _ in range(n):
            whole.products()
            whole.step()

    return dict(
        whole_step_ms=graph_ms(lambda: [whole.step() for _ in range(n)], [whole], n, cuda),
        whole_products_ms=graph_ms(lambda: [whole.products() for _ in range(n)], [whole], n, cuda),
        one_stream_ms=graph_ms(in_turn, [whole], n, cuda),
    )


def green_context(sms: int):
    """(a green context of `sms` multiprocessors, whether it has a work queue of its own): torch >= 2.13
    offers the work-queue option; without it every context's streams share the device's queues."""
    make = torch.cuda.green_contexts.GreenContext.create
    try:
        return make(num_sms=sms, device_id=0, workqueue_scope="balanced"), True
    except TypeError:  # an older torch: no work-queue options
        return make(num_sms=sms, device_id=0), False


def interleaved(streams_work, n: int):
    """A callable that issues n rounds of (stream, work) pairs, round by round, each stream after the
    current one's earlier work and the current stream after all of them."""

    def run():
        main = torch.cuda.current_stream()
        for stream, _ in streams_work:
            stream.wait_stream(main)
        for _ in range(n):
            for stream, work in streams_work:
                with torch.cuda.stream(stream):
                    work()
        for stream, _ in streams_work:
            main.wait_stream(stream)

    return run


def concurrency(streams) -> float:
    """Whether kernels on these streams run at once: the time of one spinning one-thread kernel per stream,
    over the time of one (1.0: all at once, len(streams): one after the other)."""

    def spin():
        torch.cuda._sleep(20_000_000)

    def on(group):
        return interleaved([(stream, spin) for stream in group], 1)

    on(streams)()
    return bench.timed(on(streams)) / bench.timed(on(streams[:1]))


def green_case(whole: Half, n: int, sms: int, reps: int = 5) -> dict:
    """ms per layer: the step alone on `sms` multiprocessors, the products alone on the rest, and both at once
    (each on its own green context's stream; eager, and where capture works, one CUDA graph)."""
    total = torch.cuda.get_device_properties(0).multi_processor_count
    (ctx_step, own_queue), (ctx_prod, _) = green_context(sms), green_context(total - sms)
    s_step, s_prod = ctx_step.Stream(), ctx_prod.Stream()
    main = torch.cuda.current_stream()

    def ms(run) -> float:
        move_to(whole.state, whole.position)
        run()
        times = []
        for _ in range(reps):
            move_to(whole.state, whole.position)
            times.append(bench.timed(run))
        return sorted(times)[reps // 2] * 1e3 / n

    both = [(s_step, whole.step), (s_prod, whole.products)]
    row = dict(
        sms_step=sms,
        sms_products=total - sms,
        own_work_queues=own_queue,
        green_streams_concurrent=concurrency([s_step, s_prod]),
        step_ms=ms(interleaved([(s_step, whole.step)], n)),
        products_ms=ms(interleaved([(s_prod, whole.products)], n)),
        both_ms=ms(interleaved(both, n)),
        full_step_ms=ms(interleaved([(main, whole.step)], n)),
        full_products_ms=ms(interleaved([(main, whole.products)], n)),
    )
    try:  # the same in one CUDA graph: do the captured kernels keep their green contexts?
        run = interleaved(both, n)
        bench.warm_up(run)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        row["both_graph_ms"] = ms(graph.replay)
    except Exception as e:
        row["both_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--batch", type=int, default=2556, help="the whole batch (run 6 planned 2556 for rat-1.3b)"
    )
    p.add_argument(
        "--position", type=int, default=3584, help="tokens in the caches (the Table 1 decode's middle)"
    )
    p.add_argument("--layers", type=int, default=8, help="layers' worth of work per graph")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU")
    p.add_argument(
        "--green", default="", help="multiprocessor counts for the steps' green context, e.g. 66,88,110"
    )
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        cfg = preset("rat-small")
        args.batch, args.position, args.layers, capacity = 6, 40, 2, 64
    else:
        cfg, capacity = preset("rat-1.3b"), 4096
    torch.manual_seed(0)
    D, F_, Hd, G = cfg.d_model, cfg.d_ffn, cfg.n_heads * cfg.head_dim, cfg.n_groups * cfg.head_dim
    shapes = dict(in_proj=(3 * Hd + 2 * G, D), out_proj=(D, Hd), fc1=(F_, D), fc2=(D, F_))
    weights = {k: torch.randn(*s, device=device, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
    first = args.batch // 2
    n = args.layers
    out: dict = dict(batch=args.batch, position=args.position, layers=n, device=device)
    with torch.no_grad():
        out.update(one_batch(Half(cfg, args.batch, args.position, capacity, weights, device), n, cuda))
        bench.release()
        a = Half(cfg, first, args.position, capacity, weights, device)
        b = Half(cfg, args.batch - first, args.position, capacity, weights, device)

        side = torch.cuda.Stream() if cuda else None

        def two_streams():
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for _ in range(n):
                    a.step()
                    a.products()
            for _ in range(n):
                b.products()
                b.step()
            if side is not None:
                torch.cuda.current_stream().wait_stream(side)

        out["two_streams_ms"] = graph_ms(two_streams, [a, b], n, cuda)
        if cuda:  # 1.0 when two streams' kernels run at once (CUDA_DEVICE_MAX_CONNECTIONS=1 serialises)
            out["streams_concurrent"] = concurrency([torch.cuda.current_stream(), side])
            out["CUDA_DEVICE_MAX_CONNECTIONS"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        if args.green and cuda:
            whole = Half(cfg, args.batch, args.position, capacity, weights, device)
            out["green"] = []
            for sms in (int(s) for s in args.green.split(",")):
                try:
                    row = green_case(whole, n, sms)
                except (RuntimeError, TypeError, AttributeError) as e:  # no green contexts in this build
                    row = dict(sms_step=sms, error=f"{type(e).__name__}: {e}")
                print("green", json.dumps(row))
                out["green"].append(row)
    out["gain"] = out["one_stream_ms"] / out["two_streams_ms"]
    out["sum_of_pieces_ms"] = out["whole_step_ms"] + out["whole_products_ms"]
    for key, value in out.items():
        print(f"{key:20s} {value:.4f}" if isinstance(value, float) else f"{key:20s} {value}")
    path = Path(os.environ.get("OUT", "bench-out"))
    path.mkdir(parents=True, exist_ok=True)
    (path / "overlap_ab.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
