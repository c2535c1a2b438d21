"""Multi-query associative recall (MQAR) for attention, RAT (L=16, L=64), an RNN and RAT-SWA.

The task is Zoology's (Arora et al. 2023, "Zoology: measuring and improving recall in efficient language
models"): a sequence opens with K key-value pairs (keys drawn without replacement from the lower half of the
vocabulary, values from the upper half); in the rest of the sequence each key appears once more, at an even
offset whose distance from the pairs follows Zoology's power law p(gap) ~ gap^(a - 1), a = 0.01 (short gaps
are most likely), and every other position holds token 0 (the setting of Zoology's Figure 2; --random-fill
puts random tokens there instead). The model must predict, at each repeated key, the value it was paired
with. Loss and accuracy count those positions only; accuracy is the fraction of queries whose argmax
prediction is the right value, on a test set that is the same for every model.

Every model has the same width and depth (default 4 layers of width 128, 2 heads); only the token mixer
differs. Examples are generated on the fly from a seeded generator, so a run is reproducible on the same
hardware and every step sees fresh data.

    python experiments/mqar.py --out results/mqar                 # the default grid, resumable
    python experiments/mqar.py --out results/mqar --plan          # list configurations and time estimates
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass

import torch
from harness import (
    IGNORE_INDEX,
    Job,
    LanguageModel,
    ModelConfig,
    OptimConfig,
    autocast,
    config_dict,
    count_params,
    environment,
    estimate_seconds,
    float_list,
    int_list,
    model_size,
    resolve_device,
    run_sweep,
    str_list,
    sweep_parser,
    train,
)

ARCHS: dict[str, dict] = {
    "attn": dict(layers="attn"),
    "rat-l16": dict(layers="rat", chunk_size=16),
    "rat-l64": dict(layers="rat", chunk_size=64),
    "rnn": dict(layers="rnn"),
    "rat-swa": dict(layers="rat,swa", chunk_size=16),
}

RAT_ANY_L = re.compile(r"rat-l(\d+)")  # any chunk size by name, e.g. "rat-l2", for small checks


def arch_layers(arch: str) -> dict:
    if arch in ARCHS:
        return ARCHS[arch]
    match = RAT_ANY_L.fullmatch(arch)
    if match is None:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)} or rat-l<L>")
    return dict(layers="rat", chunk_size=int(match.group(1)))


# Query-to-key distance buckets for the accuracy breakdown (upper edges; the last is open).
DISTANCE_EDGES = (64, 256, 1024)


@dataclass(frozen=True)
class MQARTask:
    vocab_size: int  # keys come from [1, V/2), values from [V/2, V)
    seq_len: int  # T, even
    num_pairs: int  # K key-value pairs at the start; each key is queried once
    power_a: float = 0.01  # Zoology's power-law exponent for the query gaps
    random_fill: bool = False  # fill non-query positions with random tokens (True) or with token 0 (False)

    def __post_init__(self) -> None:
        V, T, K = self.vocab_size, self.seq_len, self.num_pairs
        if T % 2:
            raise ValueError(f"seq_len must be even, got {T}")
        if K < 1 or 4 * K > T:
            raise ValueError(f"need 1 <= num_pairs <= seq_len / 4 (room for the queries), got K={K}, T={T}")
        if V // 2 - 1 < K:
            raise ValueError(f"vocab_size {V} has too few keys for {K} distinct pairs")


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] token ids
    targets: torch.Tensor  # [B, T] the value at each query position, IGNORE_INDEX elsewhere
    query_pos: torch.Tensor  # [B, K] position of the query of pair i
    distance: torch.Tensor  # [B, K] query position minus the position of its key


def sample_batch(task: MQARTask, batch_size: int, gen: torch.Generator, device: torch.device) -> Batch:
    """batch_size fresh MQAR examples drawn from gen (which must live on `device`)."""
    V, T, K, B = task.vocab_size, task.seq_len, task.num_pairs, batch_size
    half = V // 2
    # distinct keys and values per example: the first K of a random permutation
    keys = torch.rand(B, half - 1, generator=gen, device=device).argsort(dim=1)[:, :K] + 1
    values = torch.rand(B, V - half, generator=gen, device=device).argsort(dim=1)[:, :K] + half
    if task.random_fill:
        inputs = torch.randint(0, V, (B, T), generator=gen, device=device)
    else:
        inputs = torch.zeros(B, T, dtype=torch.long, device=device)
    inputs[:, 0 : 2 * K : 2] = keys
    inputs[:, 1 : 2 * K : 2] = values
    # K distinct gaps, sampled without replacement from p(gap) ~ gap^(a-1) by the Gumbel top-k trick
    space = (T - 2 * K) // 2
    gap = torch.arange(1, space + 1, device=device, dtype=torch.float32)
    uniform = torch.rand(B, space, generator=gen, device=device).clamp_min(1e-20)
    scores = (task.power_a - 1) * gap.log() - (-uniform.log()).log()
    gaps = scores.topk(K, dim=1).indices  # [B, K] in [0, space)
    query_pos = 2 * K + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets.scatter_(1, query_pos, values)
    key_pos = 2 * torch.arange(K, device=device)
    return Batch(inputs, targets, query_pos, query_pos - key_pos)


def batches(task: MQARTask, batch_size: int, seed: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(seed)
    while True:
        batch = sample_batch(task, batch_size, gen, device)
        yield batch.inputs, batch.targets


@torch.no_grad()
def evaluate(
    model: LanguageModel, task: MQARTask, n_examples: int, batch_size: int, seed: int, device: torch.device
) -> dict:
    """Query accuracy on n_examples test examples drawn from `seed`, overall and by query-to-key distance.

    The examples are drawn in one call, so they do not depend on the batch size used to score them.
    """
    model.eval()
    test = sample_batch(task, n_examples, torch.Generator(device=device).manual_seed(seed), device)
    correct = []
    for start in range(0, n_examples, batch_size):
        rows = slice(start, start + batch_size)
        with autocast(device):
            predicted = model(test.inputs[rows]).argmax(dim=-1)
        pos = test.query_pos[rows]
        correct.append((predicted.gather(1, pos) == test.targets[rows].gather(1, pos)).flatten())
    correct, distance = torch.cat(correct).float(), test.distance.flatten()
    by_distance = {}
    lower = 0
    for upper in (*DISTANCE_EDGES, math.inf):
        inside = (distance >= lower) & (distance < upper)
        if inside.any():
            label = f"{lower}-{upper - 1}" if upper != math.inf else f">={lower}"
            by_distance[label] = {"accuracy": correct[inside].mean().item(), "queries": int(inside.sum())}
        lower = upper
    overall = correct.mean().item()
    return {"accuracy": overall, "queries": correct.numel(), "accuracy_by_distance": by_distance}


def model_config(arch: str, task: MQARTask, args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=task.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_groups=args.n_groups,
        d_ffn=4 * args.d_model,
        window=args.window,
        position="rope",
        context=task.seq_len,  # the RNN's gate-bias init spans the training length
        **arch_layers(arch),
    )


def batch_size_for(seq_len: int, args: argparse.Namespace) -> int:
    return max(args.min_batch, args.tokens_per_step // seq_len)


def make_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for seq_len in args.seq_lens:
        for pairs in args.kv_pairs:
            if 4 * pairs > seq_len:
                continue
            task = MQARTask(args.vocab, seq_len, pairs, args.power_a, args.random_fill)
            batch_size = batch_size_for(seq_len, args)
            for arch in args.archs:
                cfg = model_config(arch, task, args)
                train_tokens = args.steps * batch_size * seq_len
                eval_examples = args.test_examples + args.steps // args.log_every * args.probe_examples
                estimate = estimate_seconds(cfg, seq_len, train_tokens, eval_examples * seq_len)
                for lr in args.lrs:
                    for seed in args.seeds:
                        params = {
                            "arch": arch, "seq_len": seq_len, "num_pairs": pairs, "vocab": args.vocab,
                            "power_a": args.power_a, "random_fill": args.random_fill, "lr": lr, "seed": seed,
                            "steps": args.steps, "stop_at": args.stop_at, "batch_size": batch_size,
                            "test_examples": args.test_examples, "test_seed": args.test_seed,
                            **model_size(args),
                        }  # fmt: skip
                        name = f"{arch}_T{seq_len}_K{pairs}_lr{lr:g}_s{seed}"
                        jobs.append(Job(name, params, estimate))
    return jobs


def run_job(job: Job, time_limit_s: float, args: argparse.Namespace) -> dict:
    p = job.params
    device = resolve_device(args.device)
    task = MQARTask(p["vocab"], p["seq_len"], p["num_pairs"], p["power_a"], p["random_fill"])
    cfg = model_config(p["arch"], task, args)
    torch.manual_seed(p["seed"])
    model = LanguageModel(cfg).to(device)
    optim = OptimConfig(steps=p["steps"], lr=p["lr"], warmup=0.1, weight_decay=0.1)
    data = batches(task, p["batch_size"], p["seed"], device)
    eval_batch = max(1, min(256, 2**16 // p["seq_len"]))  # logits of at most 2^16 tokens at once
    begin = time.perf_counter()

    def probe(step: int) -> dict:  # accuracy on a small held-out set, for learning curves
        probed = evaluate(model, task, args.probe_examples, eval_batch, p["test_seed"] + 1, device)
        return {"probe_accuracy": probed["accuracy"]}

    def solved(record: dict) -> bool:
        return record["probe_accuracy"] >= args.stop_at

    trained = train(model, data, optim, device, time_limit_s, args.log_every, on_log=probe, stop=solved)
    result = evaluate(model, task, p["test_examples"], eval_batch, p["test_seed"], device)
    print(f"  accuracy {result['accuracy']:.4f} on {result['queries']} queries")
    return {
        **result,
        "final_train_loss": trained["final_train_loss"],
        "train_seconds": trained["train_seconds"],
        "eval_seconds": time.perf_counter() - begin - trained["train_seconds"],
        "steps_run": trained["steps"],
        "tokens_per_second": trained["steps"] * p["batch_size"] * p["seq_len"] / trained["train_seconds"],
        "model_params": count_params(cfg),
        "model_config": config_dict(cfg),
        "optim": vars(optim),
        "log": trained["log"],
        "env": environment(device),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(__doc__)
    parser.add_argument("--archs", type=str_list, default=list(ARCHS), help="comma list")
    parser.add_argument("--seq-lens", type=int_list, default=[256, 1024, 4096])
    parser.add_argument("--kv-pairs", type=int_list, default=[16, 64])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--power-a", type=float, default=0.01)
    parser.add_argument("--random-fill", action="store_true", help="random tokens between the queries")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--n-groups", type=int, default=2, help="RAT query/key groups (divides n-heads)")
    parser.add_argument("--window", type=int, default=64, help="sliding window of RAT-SWA's attention layers")
    parser.add_argument("--steps", type=int, default=2000, help="at most this many steps ...")
    parser.add_argument("--stop-at", type=float, default=0.99, help="... stopping when the probe reaches it")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = this / seq_len ...")
    parser.add_argument("--min-batch", type=int, default=16, help="... but at least this many sequences")
    parser.add_argument("--lrs", type=float_list, default=[1e-3])
    parser.add_argument("--seeds", type=int_list, default=[0])
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--test-seed", type=int, default=12345, help="same test set for every model")
    parser.add_argument("--probe-examples", type=int, default=256, help="held-out examples per log line")
    args = parser.parse_args(argv)
    for arch in args.archs:
        try:
            arch_layers(arch)
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_sweep(make_jobs(args), lambda job, limit: run_job(job, limit, args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
