"""Length generalisation (the paper's Figure 6): RAT-SWA and attention-SWA, RoPE vs NoPE.

Each hybrid is trained at context N (default 512) on the same corpus, model size and recipe as lm.py, and then
evaluated on the held-out works in windows of N, 2N, 3N and 4N tokens. Besides the mean loss at each length
the result keeps the mean loss at every position of the longest window, so a plot shows where (if anywhere)
the loss rises once a token has more than N tokens of context. With "rope" the RAT layers rotate by chunk
index and the attention layers by token index; with "nope" no layer has any positional encoding (SPEC §2).

    python experiments/length.py --out results/length
    python experiments/length.py --out results/length --plan
"""

from __future__ import annotations

import argparse
import math
import time

from harness import (
    Job,
    config_dict,
    count_params,
    environment,
    estimate_seconds,
    int_list,
    model_size,
    names_of,
    sweep_parser,
)
from lm import TokenData, add_model_args, corpus_sweep, evaluate, model_config, train_model

MODELS: dict[str, tuple[str, str]] = {  # name: (lm.py architecture, position)
    "attn-swa-rope": ("attn-swa", "rope"),
    "attn-swa-nope": ("attn-swa", "nope"),
    "rat-swa-rope": ("rat-swa", "rope"),
    "rat-swa-nope": ("rat-swa", "nope"),
}


def config_for(name: str, args: argparse.Namespace, vocab_size: int):
    arch, position = MODELS[name]
    return model_config(arch, args, vocab_size).replace(position=position)


def make_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    longest = max(args.eval_multiples) * args.seq_len
    for name in args.models:
        cfg = config_for(name, args, 257)
        train_tokens = args.steps * args.batch_size * args.seq_len
        eval_tokens = 1e6 * len(args.eval_multiples) * longest / args.seq_len  # longer windows cost more
        estimate = estimate_seconds(cfg, args.seq_len, train_tokens, eval_tokens)
        for seed in args.seeds:
            params = {"model": name, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "lr": args.lr, "eval_multiples": args.eval_multiples,
                      **model_size(args)}  # fmt: skip
            jobs.append(Job(f"{name}_N{args.seq_len}_s{seed}", params, estimate, resumable=True))
    return jobs


def run_job(job: Job, time_limit_s: float, args: argparse.Namespace, data: TokenData) -> dict:
    p = job.params
    device = data.train.device
    cfg = config_for(p["model"], args, data.vocab_size)
    model, trained = train_model(cfg, data, p, args, device, time_limit_s, resume_as=job.name)
    begin = time.perf_counter()
    by_length = {}
    for multiple in p["eval_multiples"]:
        length = multiple * p["seq_len"]
        batch = max(1, args.eval_tokens_per_batch // length)
        result = evaluate(model, data.valid, length, batch, data.eos_id)
        by_length[str(length)] = {"loss": result["loss"], "perplexity": math.exp(result["loss"])}
        print(f"  eval length {length}: loss {result['loss']:.4f}")
    return {
        "train_length": p["seq_len"],
        "by_length": by_length,
        "per_position_longest": result["per_position"],  # the last (longest) evaluation
        "final_train_loss": trained["final_train_loss"],
        "train_seconds": trained["train_seconds"],
        "eval_seconds": time.perf_counter() - begin,
        "model_params": count_params(cfg),
        "model_config": config_dict(cfg),
        "optim": trained["optim"],
        "log": trained["log"],
        "env": environment(device),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--models", type=names_of(MODELS), default=list(MODELS), help="comma list")
    parser.add_argument("--seeds", type=int_list, default=[0])
    parser.add_argument("--seq-len", type=int, default=512, help="training context N")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-multiples", type=int_list, default=[1, 2, 3, 4])
    parser.add_argument("--eval-tokens-per-batch", type=int, default=32768)
    parser.set_defaults(batch_size=64)  # 64 x 512: the same tokens per step as lm.py's 32 x 1024
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return corpus_sweep(parse_args(argv), make_jobs, run_job)


if __name__ == "__main__":
    raise SystemExit(main())
