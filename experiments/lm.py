"""Language modelling: attention, RAT (L=16), RNN, attention-SWA and RAT-SWA at equal parameters and tokens.

Trains each architecture from scratch on the token files written by prepare_corpus.py (Shakespeare, the King
James Bible and NLTK's Project Gutenberg selection; byte-level by default) and reports the loss on the
held-out works: nats per token, perplexity per token and bits per byte. Every model has the same width, depth,
heads and training tokens; the FFN width of each is set so that its parameter count matches attention's
(RAT's extra gate and output-gate projections are paid for by a slightly narrower FFN). The hybrids
interleave their two mixers layer by layer (RAT or attention at even layers, sliding-window attention at odd
layers), with a window of a quarter of the context as in the paper (1024 of 4096).

    python experiments/lm.py --out results/lm                 # 5 architectures x 2 seeds, resumable
    python experiments/lm.py --out results/lm --plan
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    count_params,
    environment,
    estimate_seconds,
    int_list,
    match_ffn,
    model_size,
    names_of,
    partial_path,
    resolve_device,
    run_sweep,
    sweep_parser,
    train,
)

ARCHS: dict[str, dict] = {
    "attn": dict(layers="attn"),
    "rat": dict(layers="rat", chunk_size=16),
    "rnn": dict(layers="rnn"),
    "attn-swa": dict(layers="attn,swa"),
    "rat-swa": dict(layers="rat,swa", chunk_size=16),
}
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "corpus"


@dataclass
class TokenData:
    """The train and validation token arrays of a prepared corpus, on the training device."""

    train: torch.Tensor  # [N] int32
    valid: torch.Tensor  # [M] int32
    vocab_size: int
    eos_id: int
    tokens_per_byte: float  # validation tokens per UTF-8 byte, to turn nats/token into bits/byte
    meta: dict

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> TokenData:
        meta_path = Path(directory) / "meta.json"
        if not meta_path.exists():
            sys.exit(f"{meta_path} not found: build the corpus first with experiments/prepare_corpus.py")
        meta = json.loads(meta_path.read_text())

        def read(split: str) -> torch.Tensor:
            array = np.fromfile(Path(directory) / f"{split}.bin", dtype="<u2").astype(np.int32)
            return torch.from_numpy(array).to(device)

        return cls(
            train=read("train"),
            valid=read("valid"),
            vocab_size=meta["vocab_size"],
            eos_id=meta["eos_id"],
            tokens_per_byte=meta["valid_tokens"] / meta["valid_bytes"],
            meta=meta,
        )


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int, eos_id: int):
    """Inputs and targets [B, seq_len] at the given starts; the target right after an EOS is ignored."""
    window = tokens[starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)].long()
    x, y = window[:, :-1], window[:, 1:].clone()
    y[x == eos_id] = IGNORE_INDEX
    return x, y


def random_batches(data: TokenData, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random training windows forever, drawn by gen (on the tokens' device; a resumed run restores it)."""
    high = data.train.numel() - seq_len  # exclusive: the last window ends on the last token
    if high < 1:
        raise ValueError(f"--seq-len {seq_len} needs more than the {data.train.numel()} training tokens")
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=gen, device=data.train.device)
        yield windows(data.train, starts, seq_len, data.eos_id)


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int,
    eos_id: int,
    max_windows: int | None = None,
) -> dict:
    """Loss over consecutive non-overlapping windows of `tokens` (each scored from its own start).

    Returns the mean loss in nats per token and the mean loss at each position of the window (how the
    loss changes with the amount of context, used for length generalisation).
    """
    model.eval()
    device = tokens.device
    starts = torch.arange(0, tokens.numel() - seq_len, seq_len, device=device)
    if starts.numel() == 0:
        raise ValueError(f"a window of {seq_len} tokens needs more than the {tokens.numel()} tokens given")
    if max_windows is not None:
        starts = starts[:max_windows]
    total = torch.zeros(seq_len, device=device, dtype=torch.float64)
    count = torch.zeros(seq_len, device=device, dtype=torch.float64)
    for i in range(0, starts.numel(), batch_size):
        x, y = windows(tokens, starts[i : i + batch_size], seq_len, eos_id)
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(y)
        total += loss.sum(0).double()
        count += (y != IGNORE_INDEX).sum(0).double()
    per_position = (total / count.clamp_min(1)).tolist()
    return {
        "loss": (total.sum() / count.sum()).item(),
        "per_position": per_position,
        "windows": starts.numel(),
    }


def base_config(args: argparse.Namespace, vocab_size: int, **arch) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_groups=args.n_groups,
        d_ffn=4 * args.d_model,
        window=args.window if args.window else args.seq_len // 4,
        context=args.seq_len,
        **arch,
    )


def model_config(arch: str, args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """The architecture's config, its FFN width matched to the attention model's parameter count."""
    target = count_params(base_config(args, vocab_size, **ARCHS["attn"]))
    return match_ffn(base_config(args, vocab_size, **ARCHS[arch]), target)


def make_jobs(args: argparse.Namespace) -> list[Job]:
    meta_path = Path(args.data) / "meta.json"
    vocab = json.loads(meta_path.read_text())["vocab_size"] if meta_path.exists() else 257
    jobs = []
    for arch in args.archs:
        cfg = model_config(arch, args, vocab)
        train_tokens = args.steps * args.batch_size * args.seq_len
        eval_tokens = 1e6 + args.steps // args.eval_every * 64 * args.seq_len  # final + quick estimates
        estimate = estimate_seconds(cfg, args.seq_len, train_tokens, eval_tokens)
        for seed in args.seeds:
            params = {"arch": arch, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "lr": args.lr, **model_size(args)}  # fmt: skip
            jobs.append(Job(f"{arch}_s{seed}", params, estimate, resumable=True))
    return jobs


def train_model(
    cfg: ModelConfig, data: TokenData, p: dict, args, device, time_limit_s, resume_as: str | None = None
) -> tuple:
    """Train one model as lm.py and length.py both do; returns (model, training record). resume_as: the
    job's name, to save the training state in args.out when time runs out and continue it next time."""
    torch.manual_seed(p["seed"])
    model = LanguageModel(cfg).to(device)
    optim = OptimConfig(steps=p["steps"], lr=p["lr"], warmup=0.05, weight_decay=0.1)
    gen = torch.Generator(device=data.train.device).manual_seed(p["seed"])
    batches = random_batches(data, p["batch_size"], p["seq_len"], gen)
    resume = None if resume_as is None else Resume(partial_path(args.out, resume_as), gen, p)

    def probe(step: int) -> dict:
        if step % args.eval_every and step != p["steps"]:
            return {}
        quick = evaluate(model, data.valid, p["seq_len"], 16, data.eos_id, max_windows=64)
        return {"val_loss_estimate": quick["loss"]}

    trained = train(model, batches, optim, device, time_limit_s, args.log_every, on_log=probe, resume=resume)
    trained["optim"] = vars(optim)
    return model, trained


def run_job(job: Job, time_limit_s: float, args: argparse.Namespace, data: TokenData) -> dict:
    p = job.params
    device = data.train.device
    cfg = model_config(p["arch"], args, data.vocab_size)
    model, trained = train_model(cfg, data, p, args, device, time_limit_s, resume_as=job.name)
    begin = time.perf_counter()
    result = evaluate(model, data.valid, p["seq_len"], 16, data.eos_id)
    loss = result["loss"]
    print(f"  validation loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f}")
    tokens = p["steps"] * p["batch_size"] * p["seq_len"]
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_bits_per_byte": loss * data.tokens_per_byte / math.log(2),
        "val_windows": result["windows"],
        "train_tokens": tokens,
        "epochs": tokens / data.train.numel(),
        "final_train_loss": trained["final_train_loss"],
        "train_seconds": trained["train_seconds"],
        "eval_seconds": time.perf_counter() - begin,
        "tokens_per_second": tokens / trained["train_seconds"],
        "model_params": count_params(cfg),
        "model_config": config_dict(cfg),
        "optim": trained["optim"],
        "corpus": {k: data.meta[k] for k in ("tokenizer", "train_tokens", "valid_tokens", "sha256")},
        "log": trained["log"],
        "env": environment(device),
    }


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory written by prepare_corpus.py")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-groups", type=int, default=2, help="RAT query/key groups (as the paper's G=2)")
    parser.add_argument("--window", type=int, default=0, help="sliding window (0: a quarter of seq-len)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--eval-every", type=int, default=200, help="steps between quick validation estimates"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--archs", type=names_of(ARCHS), default=list(ARCHS), help="comma list")
    parser.add_argument("--seeds", type=int_list, default=[0, 1])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1200)
    return parser.parse_args(argv)


def corpus_sweep(args: argparse.Namespace, make_jobs, run_job) -> int:
    """Run the sweep of lm.py or length.py: the corpus is loaded onto the device unless only planning."""
    jobs = make_jobs(args)
    data = None if args.plan else TokenData.load(Path(args.data), resolve_device(args.device))
    run_sweep(jobs, lambda job, limit: run_job(job, limit, args, data), args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return corpus_sweep(parse_args(argv), make_jobs, run_job)


if __name__ == "__main__":
    raise SystemExit(main())
