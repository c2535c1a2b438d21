"""RULER's needle tasks at small scale: attention, RAT (L=16, L=64) and RAT-SWA, pretrained, then fine-tuned
on needle tasks, evaluated at 1x to 4x the training context.

Each architecture is pretrained as in lm.py (same width, depth, heads and recipe, FFN widths matched to
attention's parameter count; byte-level corpus from prepare_corpus.py, or the embedded Shakespeare with
--data shakespeare) at context N (default 1024), then fine-tuned on the training split of RULER's eight needle
tasks made by `ratlm.evaluation.ruler` at length N (each prompt 80-100% of N, the answer within it), with the
loss on the answer's tokens and the EOS after them only. Then `ratlm.evaluation.ruler.evaluate_ruler` scores
the test split (other seeds, haystacks from the held-out works) at N, 2N, 3N and 4N with greedy decoding.
This follows the protocol of RAT's follow-up work (needle fine-tuning, then RULER at and beyond the training
length) at the scale of the other experiments here.

    python experiments/ruler.py --out results/ruler                # 4 architectures, resumable
    ./parallel.sh ruler results/ruler                             # one process per architecture
    python experiments/ruler.py --out /tmp/r --tiny --device cpu  # the whole pipeline in seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from harness import (
    IGNORE_INDEX,
    Job,
    LanguageModel,
    OptimConfig,
    Resume,
    clear_partial,
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
    write_json,
)
from lm import DEFAULT_DATA, TokenData, add_model_args, base_config, random_batches

from ratlm.corpus import load_split
from ratlm.evaluation import ruler
from ratlm.tokenizer import ByteTokenizer

ARCHS: dict[str, dict] = {
    "attn": dict(layers="attn"),
    "rat-l16": dict(layers="rat", chunk_size=16),
    "rat-l64": dict(layers="rat", chunk_size=64),
    "rat-swa": dict(layers="rat,swa", chunk_size=16),
}
TINY = dict(d_model=32, n_layers=2, n_heads=2, batch_size=2, seq_len=512, pretrain_steps=2, finetune_steps=2,
            samples=1, tasks=["niah_single_1", "niah_multikey_2"], eval_multiples=[1, 2], max_new_tokens=32,
            log_every=1, eval_every=1, data="shakespeare")  # fmt: skip


def model_config(arch: str, args: argparse.Namespace, vocab_size: int):
    """The architecture at the width and depth of the sweep, its FFN matched to attention's parameters."""
    target = count_params(base_config(args, vocab_size, **ARCHS["attn"]))
    cfg = match_ffn(base_config(args, vocab_size, **ARCHS[arch]), target)
    return cfg.replace(position=args.position)


def shakespeare_data(device: torch.device) -> TokenData:
    """The embedded corpus as byte tokens, each work followed by EOS (256): needs no prepared files."""
    tok = ByteTokenizer()
    train_docs, valid_docs = load_split()

    def tokens(docs):
        eos = np.full(1, tok.eos_id, dtype=np.int32)
        parts = [
            p for doc in docs for p in (np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.int32), eos)
        ]
        return torch.from_numpy(np.concatenate(parts)).to(device)

    valid = tokens(valid_docs)
    meta = {"tokenizer": "bytes of the embedded Shakespeare corpus", "train_tokens": 0, "valid_tokens": 0,
            "sha256": None}  # fmt: skip
    return TokenData(tokens(train_docs), valid, tok.vocab_size, tok.eos_id, 1.0, meta)


def needle_batches(args, length: int, count: int, seed: int, gen: torch.Generator):
    """Batches of needle training samples forever: inputs [B, length] and targets that are IGNORE_INDEX
    except on the answer and the EOS after it. `count` samples are made once (fresh ones for every
    fine-tuning step unless the run is longer), then drawn with gen (saved with a resumed run)."""
    tok = ByteTokenizer()
    per_task = -(-count // len(args.tasks))
    made = ruler.make_samples(tok, args.tasks, [length], per_task, "train", seed, args.max_new_tokens)
    rows = torch.full((len(made), length + 1), tok.eos_id, dtype=torch.long)
    targets = torch.full((len(made), length), IGNORE_INDEX, dtype=torch.long)
    for i, sample in enumerate(made):
        prompt, answer = tok.encode(sample.input), [*tok.encode(sample.answer), tok.eos_id]
        rows[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        # the logits at position p predict token p + 1: the answer's tokens are predicted from the prompt's
        # last token on
        start = len(prompt) - 1
        targets[i, start : start + len(answer)] = torch.tensor(answer)
    device = gen.device
    rows, targets = rows.to(device), targets.to(device)
    while True:
        pick = torch.randint(0, len(made), (args.batch_size,), generator=gen, device=device)
        yield rows[pick, :-1], targets[pick]


def make_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for arch in args.archs:
        cfg = model_config(arch, args, 257)
        tokens = (args.pretrain_steps + args.finetune_steps) * args.batch_size * args.seq_len
        lengths = [m * args.seq_len for m in args.eval_multiples]
        eval_tokens = args.samples * len(args.tasks) * sum(lengths)
        estimate = estimate_seconds(cfg, args.seq_len, tokens, eval_tokens, fixed_s=60.0)
        params = {"arch": arch, "seed": args.seed, "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "pretrain_steps": args.pretrain_steps, "pretrain_lr": args.lr,
                  "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
                  "tasks": args.tasks, "samples": args.samples, "eval_multiples": args.eval_multiples,
                  "max_new_tokens": args.max_new_tokens, "position": args.position, "data": str(args.data),
                  **model_size(args)}  # fmt: skip
        jobs.append(Job(f"{arch}_N{args.seq_len}_s{args.seed}", params, estimate, resumable=True))
    return jobs


def load_data(args: argparse.Namespace, device: torch.device) -> TokenData:
    if args.data == "shakespeare":
        return shakespeare_data(device)
    return TokenData.load(Path(args.data), device)


def run_job(job: Job, time_limit_s: float, args: argparse.Namespace) -> dict:
    p, began = job.params, time.perf_counter()
    device = resolve_device(args.device)
    data = load_data(args, device)
    cfg = model_config(p["arch"], args, data.vocab_size)
    torch.manual_seed(p["seed"])
    model = LanguageModel(cfg).to(device)
    out = Path(args.out)
    pretrained = out / f"{job.name}.pretrained.pt"
    if pretrained.exists():
        model.load_state_dict(torch.load(pretrained, map_location=device, weights_only=True))
        pretrain = json.loads(pretrained.with_suffix(".json").read_text())
        print(f"  pretrained weights from {pretrained}")
    else:
        optim = OptimConfig(steps=p["pretrain_steps"], lr=p["pretrain_lr"], warmup=0.05, weight_decay=0.1)
        gen = torch.Generator(device=data.train.device).manual_seed(p["seed"])
        batches = random_batches(data, p["batch_size"], p["seq_len"], gen)
        resume = Resume(partial_path(out, f"{job.name}-pretrain"), gen, p)
        print(f"  pretraining {p['pretrain_steps']} steps")
        pretrain = train(model, batches, optim, device, time_limit_s, args.log_every, resume=resume)
        torch.save(model.state_dict(), pretrained)
        write_json(pretrained.with_suffix(".json"), {k: pretrain[k] for k in ("log", "train_seconds")})
        clear_partial(out, f"{job.name}-pretrain")
    optim = OptimConfig(steps=p["finetune_steps"], lr=p["finetune_lr"], warmup=0.05, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(p["seed"] + 1)
    batches = needle_batches(args, p["seq_len"], p["finetune_steps"] * p["batch_size"], p["seed"], gen)
    resume = Resume(partial_path(out, f"{job.name}-finetune"), gen, p)
    print(f"  fine-tuning {p['finetune_steps']} steps on {', '.join(p['tasks'])}")
    left_s = max(0.0, time_limit_s - (time.perf_counter() - began))
    finetune = train(model, batches, optim, device, left_s, args.log_every, resume=resume)
    clear_partial(out, f"{job.name}-finetune")

    eval_began = time.perf_counter()
    model = model.eval().to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    lengths = [m * p["seq_len"] for m in p["eval_multiples"]]
    examples: dict[str, list] = {}  # the first two answers of every task and length, to see what went wrong

    def keep(sample, answer: str, score: float) -> None:
        shown = examples.setdefault(f"{sample.task}@{sample.length}", [])
        if len(shown) < 2:
            shown.append({"answer": answer, "outputs": sample.outputs, "score": score})

    result = ruler.evaluate_ruler(model, ByteTokenizer(), p["tasks"], lengths, p["samples"], seed=p["seed"],
                                  max_new_tokens=p["max_new_tokens"], on_sample=keep)  # fmt: skip
    print(ruler.format_table(result))
    for path in (pretrained, pretrained.with_suffix(".json")):
        path.unlink(missing_ok=True)  # the result holds what they held; a re-run of the job starts afresh
    return {
        **result,
        "examples": examples,
        "pretrain": {"log": pretrain["log"], "train_seconds": pretrain["train_seconds"]},
        "finetune": {"log": finetune["log"], "train_seconds": finetune["train_seconds"]},
        "eval_seconds": time.perf_counter() - eval_began,
        "model_params": count_params(cfg),
        "model_config": config_dict(cfg),
        "env": environment(device),
    }


def summary_table(out: Path) -> str:
    """Average score (0-100) over the tasks at each length, one row per finished architecture."""
    rows = []
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("status") == "ok" and "average" in result:
            rows.append(result)
    if not rows:
        return "no results yet"
    lengths = rows[0]["lengths"]
    head = f"{'model':<24}" + "".join(f"{n:>9}" for n in lengths)
    lines = [f"RULER needle tasks, average score over tasks (trained at {rows[0]['training_context']})", head]
    for r in rows:
        lines.append(f"{r['name']:<24}" + "".join(f"{r['average'][str(n)]:9.2f}" for n in lengths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--archs", type=names_of(ARCHS), default=list(ARCHS), help="comma list")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=1024, help="training context N")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--tasks", type=names_of(ruler.TASKS), default=list(ruler.TASKS), help="comma list")
    parser.add_argument("--samples", type=int, default=25, help="test samples per task and length")
    parser.add_argument("--eval-multiples", type=int_list, default=[1, 2, 3, 4])
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer bytes (the longest is ~41)")
    parser.add_argument("--position", choices=("rope", "nope"), default="rope")
    parser.add_argument("--tiny", action="store_true", help="toy sizes for a CPU check of the whole pipeline")
    parser.set_defaults(batch_size=16, data=str(DEFAULT_DATA))
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_sweep(make_jobs(args), lambda job, limit: run_job(job, limit, args), args)
    if not args.plan:
        print(summary_table(Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
