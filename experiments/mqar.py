"""Multi-query associative recall (MQAR) for attention, RAT (L=16, L=64), an RNN and RAT-SWA.

The task is Zoology's (Arora et al. 2023, "Zoology: measuring and improving recall in efficient language
models"): a sequence opens with K key-value pairs (keys drawn without replacement from the lower half of the
vocabulary, values from the upper half); in the rest of the sequence each key appears once more, at an even
offset whose distance from the pairs follows Zoology's power law p(gap) ~ gap^(a - 1), a = 0.01 (short gaps
are most likely), and every other position holds token 0 (the setting of Zoology's Figure 2; --random-fill
puts random tokens there instead). The model must predict, at each repeated key, the value it was paired
with. Loss and accuracy count those positions only (the logits are computed there only); accuracy is the
fraction of queries whose argmax prediction is the right value, on a test set that is the same for every
model.

Every model has the same width and depth (default 4 layers of width 128, 2 heads); only the token mixer
differs. The output projection is ratlm's tied embedding with its logits scaled to start at unit size
(--head scaled; see MQARModel and experiments/README.md for why). Examples are generated on the fly from a
seeded generator, so a run is reproducible on the same hardware and every step sees fresh data. Each model
is trained at every --lrs in one cell of the grid (--lr-sweep-at, default the first) and at its best rate
there in every other cell. The default vocabulary is 256 rather than Zoology's 8192, so that a grid is
learnable in a few thousand steps (README; the default grid fits one 10-minute GPU call when the models
run side by side, experiments/parallel.sh).

    python experiments/mqar.py --out results/mqar                 # the default grid, resumable
    python experiments/mqar.py --out results/mqar --plan          # list configurations and time estimates
    ./parallel.sh mqar results/mqar                               # one process per model, side by side
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    IGNORE_INDEX,
    Job,
    LanguageModel,
    ModelConfig,
    OptimConfig,
    Resume,
    autocast,
    config_dict,
    environment,
    estimate_seconds,
    float_list,
    int_list,
    model_size,
    partial_path,
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

# The grid of docs/results.md: T from 256 to 4096 at K = 16, and K = 16 and 64 at T = 1024.
DEFAULT_CELLS = [(256, 16), (1024, 16), (1024, 64), (4096, 16)]
DEFAULT_WARMUP = 0.1  # linear warmup over this fraction of the steps, then cosine decay (harness.lr_at)
PRODUCT_SEQ_LENS, PRODUCT_KV_PAIRS = [256, 1024, 4096], [16, 64]  # --seq-lens / --kv-pairs alone
RAT_ANY_L = re.compile(r"rat-l(\d+)")  # any chunk size by name, e.g. "rat-l2", for small checks


def arch_layers(arch: str) -> dict:
    if arch in ARCHS:
        return ARCHS[arch]
    match = RAT_ANY_L.fullmatch(arch)
    if match is None:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)} or rat-l<L>")
    return dict(layers="rat", chunk_size=int(match.group(1)))


HEADS = ("tied", "scaled", "untied")  # MQARModel's output projections


class MQARModel(torch.nn.Module):
    """ratlm's LanguageModel, scored only where MQAR has a target.

    The logits are computed at the query positions only (at vocabulary 8192 and width 128 the output
    projection at every position would be most of the FLOPs). The output projection is the tied embedding, as
    in ratlm and Zoology: as is (head="tied"), or with its logits multiplied by 1 / (init_std sqrt(D))
    (head="scaled"), so that they start with unit standard deviation instead of init_std sqrt(D) (0.23 at
    D = 128), too small to learn from quickly; or (head="untied") a separate matrix initialised like every
    other (N(0, init_std)).
    """

    def __init__(self, cfg: ModelConfig, head: str = "tied"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.lm = LanguageModel(cfg)
        self.head = None
        self.logit_scale = 1.0 / (cfg.init_std * math.sqrt(cfg.d_model)) if head == "scaled" else 1.0
        if head == "untied":
            self.head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            torch.nn.init.normal_(self.head.weight, std=cfg.init_std)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final-norm output [B, T, D]: LanguageModel.forward up to its logits (a test checks this)."""
        lm = self.lm
        h = lm.embed(input_ids)
        for block in lm.blocks:
            h = block(h)
        return lm.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.lm.embed.weight if self.head is None else self.head.weight)
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] at every position."""
        return self.logits(self.hidden(input_ids))

    def query_logits(self, input_ids: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, V] at the positions query_pos [B, K] only."""
        h = self.hidden(input_ids)
        return self.logits(h.gather(1, query_pos[..., None].expand(-1, -1, h.shape[-1])))


def query_loss(model: MQARModel, input_ids: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]):
    """Cross-entropy of the value at each query; target = (query_pos [B, K], values [B, K]).

    Equal to harness.masked_loss over the full logits and the [B, T] targets (a test checks it), without
    computing the other T - K logits per sequence or a boolean index (a device sync).
    """
    query_pos, values = target
    logits = model.query_logits(input_ids, query_pos)
    return F.cross_entropy(logits.flatten(0, 1).float(), values.flatten())


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
    values: torch.Tensor  # [B, K] the value of pair i (the target at query_pos[:, i])
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
    return Batch(inputs, targets, query_pos, values, query_pos - key_pos)


def batches(task: MQARTask, batch_size: int, gen: torch.Generator, device: torch.device):
    """Fresh examples forever from gen (on `device`; a resumed run restores its state), as
    (inputs, (query_pos, values)): what query_loss takes."""
    while True:
        batch = sample_batch(task, batch_size, gen, device)
        yield batch.inputs, (batch.query_pos, batch.values)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, task: MQARTask, n_examples: int, batch_size: int, seed: int, device: torch.device
) -> dict:
    """Query accuracy on n_examples test examples drawn from `seed`, overall and by query-to-key distance.

    The examples are drawn in one call, so they do not depend on the batch size used to score them.
    """
    model.eval()
    test = sample_batch(task, n_examples, torch.Generator(device=device).manual_seed(seed), device)
    correct = []
    for start in range(0, n_examples, batch_size):
        rows = slice(start, start + batch_size)
        pos = test.query_pos[rows]
        with autocast(device):
            if isinstance(model, MQARModel):
                predicted = model.query_logits(test.inputs[rows], pos).argmax(dim=-1)
            else:  # any model that maps [B, T] ids to [B, T, V] logits (the tests' oracle)
                predicted = model(test.inputs[rows]).argmax(dim=-1).gather(1, pos)
        correct.append((predicted == test.values[rows]).flatten())
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


# Seconds per run besides its steps: model build, evaluation set-up and first-call compilation (the H200 check
# measured 5.1 s for attention and 0.1 s for RAT between the end of training and the result; the layer
# benchmark measured 4-6 s of warm-up, FlexAttention's compilation included, per new shape of a window layer).
RUN_OVERHEAD_S = 5.0


BEST_LR = "best"  # the lr of a configuration outside the sweep cell: the sweep's best for the same arch


def job_name(arch: str, seq_len: int, pairs: int, lr: float | str, seed: int) -> str:
    return f"{arch}_T{seq_len}_K{pairs}_lr{lr if isinstance(lr, str) else format(lr, 'g')}_s{seed}"


def grid_cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (T, K) cells: --cells, or the product of --seq-lens and --kv-pairs with T >= 8 x K, as in every
    Zoology grid: the K queries then take at most a third of the even positions after the pairs, and their
    gaps follow the power law (at T = 4 x K every position is taken and the gaps are a mere permutation)."""
    if args.seq_lens is None and args.kv_pairs is None:
        return list(args.cells or DEFAULT_CELLS)
    seq_lens = args.seq_lens or PRODUCT_SEQ_LENS
    kv_pairs = args.kv_pairs or PRODUCT_KV_PAIRS
    return [(T, K) for T in seq_lens for K in kv_pairs if 8 * K <= T]


def make_jobs(args: argparse.Namespace) -> list[Job]:
    """Every (T, K, arch, seed); all of --lrs in the sweep cell (or everywhere), else the sweep's best lr.

    The sweep cell's jobs come first, so that the best learning rate is known when the others start.
    """
    cells = grid_cells(args)
    sweep_cell = args.lr_sweep_at if len(args.lrs) > 1 else None
    if sweep_cell is not None:
        cells.sort(key=lambda cell: cell != sweep_cell)  # stable: the sweep cell first, the rest in order
    jobs = []
    for seq_len, pairs in cells:
        task = MQARTask(args.vocab, seq_len, pairs, args.power_a, args.random_fill)
        batch_size = batch_size_for(seq_len, args)
        lrs = args.lrs if sweep_cell in (None, (seq_len, pairs)) else [BEST_LR]
        for arch in args.archs:
            cfg = model_config(arch, task, args)
            probes = args.steps // args.log_every
            eval_batches = math.ceil(args.test_examples / batch_size)  # evaluated in training-size batches
            eval_batches += probes * math.ceil(args.probe_examples / batch_size)
            estimate = estimate_seconds(
                cfg,
                seq_len,
                train_tokens=args.steps * batch_size * seq_len,
                eval_tokens=(args.test_examples + probes * args.probe_examples) * seq_len,
                steps=args.steps + eval_batches,
                logit_fraction=pairs / seq_len,
                fixed_s=RUN_OVERHEAD_S,
            )
            step_s = estimate_seconds(  # one training step, for runs that stop early
                cfg, seq_len, batch_size * seq_len, steps=1, logit_fraction=pairs / seq_len, fixed_s=0.0
            )
            for lr in lrs:
                for seed in args.seeds:
                    params = {
                        "arch": arch, "seq_len": seq_len, "num_pairs": pairs, "vocab": args.vocab,
                        "power_a": args.power_a, "random_fill": args.random_fill, "head": args.head,
                        "lr": lr, "seed": seed, "steps": args.steps, "stop_at": args.stop_at,
                        "batch_size": batch_size, "test_examples": args.test_examples,
                        "test_seed": args.test_seed, **model_size(args),
                    }  # fmt: skip
                    if args.warmup != DEFAULT_WARMUP:  # only then: results of the default keep their params
                        params["warmup"] = args.warmup
                    if lr == BEST_LR:
                        params["lr_sweep"] = {"seq_len": sweep_cell[0], "num_pairs": sweep_cell[1],
                                              "lrs": args.lrs}  # fmt: skip
                    jobs.append(Job(job_name(arch, seq_len, pairs, lr, seed), params, estimate, step_s, True))
    return jobs


def best_lr(p: dict, out: Path) -> tuple[float, dict]:
    """The learning rate of the sweep cell's best run of p's arch and seed, and every sweep result by lr.

    Best: solved (test accuracy >= stop_at) in the fewest steps, else the highest test accuracy. Runs that
    did not finish (timeout, error) do not count; with none finished, the middle learning rate is used.
    """
    sweep = p["lr_sweep"]
    scores = {}
    for lr in sweep["lrs"]:
        path = out / f"{job_name(p['arch'], sweep['seq_len'], sweep['num_pairs'], lr, p['seed'])}.json"
        if path.exists():
            result = json.loads(path.read_text())
            if result["status"] == "ok":
                scores[lr] = {"accuracy": result["accuracy"], "steps_run": result["steps_run"]}
    if not scores:
        return sorted(sweep["lrs"])[len(sweep["lrs"]) // 2], scores

    def rank(lr: float) -> tuple:
        solved = scores[lr]["accuracy"] >= p["stop_at"]
        return (solved, -scores[lr]["steps_run"] if solved else scores[lr]["accuracy"])

    return max(scores, key=rank), scores


def run_job(job: Job, time_limit_s: float, args: argparse.Namespace) -> dict:
    p = job.params
    device = resolve_device(args.device)
    task = MQARTask(p["vocab"], p["seq_len"], p["num_pairs"], p["power_a"], p["random_fill"])
    cfg = model_config(p["arch"], task, args)
    torch.manual_seed(p["seed"])
    model = MQARModel(cfg, p["head"]).to(device)
    lr, sweep_scores = (p["lr"], None) if p["lr"] != BEST_LR else best_lr(p, Path(args.out))
    if sweep_scores is not None:
        print(f"  learning rate {lr:g}, the sweep's best (test accuracy by lr: {sweep_scores})")
    optim = OptimConfig(steps=p["steps"], lr=lr, warmup=p.get("warmup", DEFAULT_WARMUP), weight_decay=0.1)
    gen = torch.Generator(device=device).manual_seed(p["seed"])
    data = batches(task, p["batch_size"], gen, device)
    # evaluation in batches of the training shape: FlexAttention (RAT-SWA's window) is compiled per shape
    eval_batch = p["batch_size"]

    def probe(step: int) -> dict:  # accuracy on a small held-out set, for learning curves
        probed = evaluate(model, task, args.probe_examples, eval_batch, p["test_seed"] + 1, device)
        return {"probe_accuracy": probed["accuracy"]}

    def solved(record: dict) -> bool:
        return record["probe_accuracy"] >= args.stop_at

    resume = Resume(partial_path(args.out, job.name), gen, p)  # continued by the next invocation
    logged = dict(on_log=probe, stop=solved, loss_fn=query_loss, resume=resume)
    trained = train(model, data, optim, device, time_limit_s, args.log_every, **logged)
    evaluated = time.perf_counter()
    result = evaluate(model, task, p["test_examples"], eval_batch, p["test_seed"], device)
    print(f"  accuracy {result['accuracy']:.4f} on {result['queries']} queries")
    return {
        **result,
        "final_train_loss": trained["final_train_loss"],
        "train_seconds": trained["train_seconds"],
        "eval_seconds": time.perf_counter() - evaluated,
        "steps_run": trained["steps"],
        "tokens_per_second": trained["steps"] * p["batch_size"] * p["seq_len"] / trained["train_seconds"],
        "lr_used": lr,
        "lr_sweep_scores": sweep_scores,
        "model_params": sum(param.numel() for param in model.parameters()),
        "model_config": config_dict(cfg),
        "optim": vars(optim),
        "log": trained["log"],
        "env": environment(device),
    }


def cell(text: str) -> tuple[int, int] | str | None:
    """An argparse type: "T:K" (sequence length, pairs), "first" (the grid's first cell), or "all"."""
    if text in ("all", "first"):
        return None if text == "all" else text
    seq_len, pairs = text.split(":")
    return int(seq_len), int(pairs)


def cell_list(text: str) -> list[tuple[int, int]]:
    """An argparse type: comma-separated distinct "T:K" cells, each with K >= 1 and T >= 8 x K."""
    cells = []
    for item in text.split(","):
        parsed = cell(item)
        if not isinstance(parsed, tuple):
            raise argparse.ArgumentTypeError(f"a cell is T:K (sequence length:pairs), got '{item}'")
        if parsed[1] < 1 or 8 * parsed[1] > parsed[0]:
            raise argparse.ArgumentTypeError(f"cell {item}: K must be at least 1 and T at least 8 x K")
        if parsed in cells:
            raise argparse.ArgumentTypeError(f"cell {item} is given twice")
        cells.append(parsed)
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(__doc__)
    parser.add_argument("--archs", type=str_list, default=list(ARCHS), help="comma list")
    parser.add_argument("--cells", type=cell_list, help=f"T:K,... (length:pairs; default {DEFAULT_CELLS})")
    parser.add_argument("--seq-lens", type=int_list, help=f"or: these (default {PRODUCT_SEQ_LENS}) ...")
    parser.add_argument("--kv-pairs", type=int_list, help=f"... x these (default {PRODUCT_KV_PAIRS}), 8K<=T")
    parser.add_argument("--vocab", type=int, default=256, help="Zoology's figures: 8192 (see the README)")
    parser.add_argument("--power-a", type=float, default=0.01)
    parser.add_argument("--random-fill", action="store_true", help="random tokens between the queries")
    parser.add_argument("--head", choices=HEADS, default="scaled", help="output projection (MQARModel)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--n-groups", type=int, default=2, help="RAT query/key groups (divides n-heads)")
    parser.add_argument("--window", type=int, default=64, help="sliding window of RAT-SWA's attention layers")
    parser.add_argument("--steps", type=int, default=2000, help="at most this many steps ...")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, help="fraction of --steps warming up")
    parser.add_argument("--stop-at", type=float, default=0.99, help="... stopping when the probe reaches it")
    parser.add_argument("--tokens-per-step", type=int, default=65536, help="batch = this / seq_len ...")
    parser.add_argument("--min-batch", type=int, default=16, help="... but at least this many sequences")
    parser.add_argument("--lrs", type=float_list, default=[1e-3, 3e-3], help="swept ...")
    parser.add_argument("--lr-sweep-at", type=cell, default="first", help="... in the cell T:K, or 'all'")
    parser.add_argument("--seeds", type=int_list, default=[0])
    parser.add_argument("--test-examples", type=int, default=1024, help="a multiple of the batch sizes")
    parser.add_argument("--test-seed", type=int, default=12345, help="same test set for every model")
    parser.add_argument("--probe-examples", type=int, default=256, help="held-out examples per log line")
    parser.set_defaults(log_every=50)  # the early-stopping probe
    args = parser.parse_args(argv)
    if args.cells and (args.seq_lens or args.kv_pairs):
        parser.error("give either --cells or --seq-lens/--kv-pairs, not both")
    if args.lr_sweep_at == "first":
        args.lr_sweep_at = next(iter(grid_cells(args)), None)
    if args.lr_sweep_at is not None:
        T, K = args.lr_sweep_at
        if (T, K) not in grid_cells(args):
            parser.error(f"--lr-sweep-at {T}:{K} is not a cell of the grid ({grid_cells(args)})")
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
