"""Command line: `ratlm train | tokenize | export | plot | generate | info | convert-official | eval | bench`
(the last two are registered by `ratlm.evaluation.cli` and `ratlm.bench.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

import torch

from .checkpoint import DTYPES, dtype_named, note_fp32_on_cuda


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def cmd_train(args: argparse.Namespace) -> None:
    from .config import preset
    from .train import DivergedError, recipe, train

    overrides = {
        k: getattr(args, k) for k in ("chunk_size", "n_layers", "d_model", "context") if getattr(args, k)
    }
    model_config = preset(args.preset, **overrides)
    cfg = recipe(args.preset)
    if args.out:
        cfg.out = args.out
    # explicit counts win over the recipe's token budgets
    if args.max_steps is not None:
        cfg.train_tokens = None
    if args.batch_size is not None:
        cfg.global_batch_tokens = None
    for f in fields(cfg):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("preset", "out"):
            setattr(cfg, f.name, value)
    try:
        train(cfg, model_config)
    except DivergedError as e:
        print(f"ratlm train: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_tokenize(args: argparse.Namespace) -> None:
    from .shards import tokenize

    m = tokenize(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        doc_per=args.doc_per,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(
        f"{m['tokens']:,} tokens in {m['documents']:,} documents from {len(m['sources'])} file(s) -> "
        f"{len(m['shards'])} {m['dtype']} shard(s) in {args.out} ({m['tokenizer']})"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from .trainckpt import export

    print(f"exported {export(args.run, args.out)}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")


def _load(args: argparse.Namespace):
    from . import from_pretrained
    from .distributed import resolve_device

    device = resolve_device(args.device)
    model = from_pretrained(args.model, device=device, dtype=dtype_named(args.dtype))
    note_fp32_on_cuda(model, args.dtype is not None)
    return model, device


def cmd_generate(args: argparse.Namespace) -> None:
    from .generation import generate
    from .tokenizer import load_tokenizer

    model, _ = _load(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}"
        )
    prompts = [tokenizer.encode(p) for p in args.prompt]
    if any(not p for p in prompts):
        raise UsageError("--prompt must not be empty")
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    stream = len(prompts) == 1 and not args.no_stream
    shown: list[int] = []
    printed = [0]  # characters of the completion already on screen

    def show(row: int, token: int) -> None:
        # decode everything so far: a character may span several tokens
        shown.append(token)
        text = tokenizer.decode(shown)
        print(text[printed[0] :], end="", flush=True)
        printed[0] = len(text)

    if stream:
        print(args.prompt[0], end="", flush=True)
    outs = generate(
        model,
        prompts,
        args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=stop,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop or (),
        tokenizer=tokenizer,
        on_token=show if stream else None,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    if stream:
        print(tokenizer.decode(outs[0])[printed[0] :])
        return
    for prompt, out in zip(args.prompt, outs, strict=True):
        if len(args.prompt) > 1:
            print("=" * 20)
        print(prompt + tokenizer.decode(out))


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .config import preset
    from .model import LanguageModel

    config = preset(args.target) if args.preset else load_config(args.target)
    with torch.device("meta"):
        model = LanguageModel(config)
    dtype = dtype_named(args.dtype) or torch.bfloat16
    print(f"model: {args.target}")
    print(f"  layers: {config.n_layers} ({config.layers}), pattern {' '.join(config.pattern)}")
    print(f"  width {config.d_model}, {config.n_heads} heads of {config.head_dim}, FFN {config.d_ffn}")
    if "rat" in config.pattern:
        print(f"  RAT chunk size {config.chunk_size}, {config.n_groups} query/key groups")
    if "swa" in config.pattern:
        print(f"  sliding window {config.window} (+1 keys)")
    print(f"  positions: {config.position}; vocabulary {config.vocab_size}; context {config.context}")
    print(f"  parameters: {model.num_params():,}")
    n = config.context
    cache = model.new_cache(1, n, device="meta", dtype=dtype)
    kv_attention = 2 * config.d_model * config.n_layers * torch.finfo(dtype).bits // 8
    print(
        f"  inference cache ({str(dtype).replace('torch.', '')}) for one sequence of {n} tokens: "
        f"{cache.nbytes / 2**20:.2f} MiB = {cache.nbytes / n:,.0f} bytes/token "
        f"(full attention: {kv_attention:,} bytes/token)"
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert_official

    report = convert_official(args.src, args.dst, tokenizer=args.tokenizer, dtype=dtype_named(args.dtype))
    print(report)


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .distributed import PARALLEL_MODES
    from .train import PRECISIONS, TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="ratlm", description="RAT language models: train, generate, convert."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (embedded corpus, or shards from `ratlm tokenize`)")
    p.add_argument("--preset", default=defaults.preset, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", help="run folder: log, checkpoints, final model (default runs/PRESET)")
    p.add_argument("--data", help="folder of token shards (default: the embedded Shakespeare corpus)")
    p.add_argument("--valid-data", help="folder of validation shards")
    p.add_argument("--tokenizer", help="tokenizer (default: the data folder's, or byte-level)")
    p.add_argument(
        "--ordered",
        dest="shuffle",
        action="store_false",
        default=None,
        help="windows in stream order, unshuffled",
    )
    p.add_argument("--max-steps", type=positive, help=f"optimizer steps (default {defaults.max_steps})")
    p.add_argument("--train-tokens", type=positive, help="tokens to train on (sets --max-steps)")
    p.add_argument("--stop-at", type=positive, help="leave after this step with a checkpoint (resume later)")
    p.add_argument(
        "--batch-size", type=positive, help=f"global batch in sequences (default {defaults.batch_size})"
    )
    p.add_argument("--global-batch-tokens", type=positive, help="global batch in tokens (sets --batch-size)")
    p.add_argument(
        "--micro-batch", type=positive, help="sequences per forward per rank (default: no accumulation)"
    )
    p.add_argument("--seq-len", type=positive, help=f"tokens per sequence (default {defaults.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr}; 8e-4 for 1.3B)")
    p.add_argument("--min-lr", type=float, help=f"end of the cosine decay (default {defaults.min_lr:g})")
    p.add_argument(
        "--warmup", type=float, help=f"fraction of the steps spent warming up (default {defaults.warmup})"
    )
    p.add_argument(
        "--weight-decay", type=float, help=f"AdamW's, on matrices only (default {defaults.weight_decay})"
    )
    p.add_argument(
        "--grad-clip", type=float, help=f"global gradient-norm limit (default {defaults.grad_clip})"
    )
    p.add_argument("--parallel", choices=PARALLEL_MODES, help="data parallelism (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--activation-checkpointing", action="store_true", default=None, help="recompute blocks")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile every block")
    p.add_argument(
        "--ckpt-every", type=int, help="steps between checkpoints, 0: none (default 1000 with --data, else 0)"
    )
    p.add_argument("--keep-checkpoints", type=positive, help="checkpoints kept (default 3)")
    p.add_argument("--ckpt-format", choices=("dcp", "full"), help="sharded DCP (default) or one full file")
    p.add_argument("--resume", help="auto (default: OUT's newest checkpoint), never, or a checkpoint folder")
    p.add_argument(
        "--eval-every",
        type=int,
        help=f"steps between validation estimates, 0: only the final one (default {defaults.eval_every})",
    )
    p.add_argument(
        "--eval-batches",
        type=positive,
        help=f"global batches per estimate (default {defaults.eval_batches})",
    )
    p.add_argument("--final-eval-tokens", type=positive, help="final validation tokens (default all)")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log to OUT/tensorboard")
    p.add_argument("--peak-tflops", type=float, help="per-GPU peak TFLOP/s for MFU (default 989, H100/H200)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help=f"model initialisation and data order (default {defaults.seed})")
    p.add_argument(
        "--sample-tokens",
        type=int,
        help="length of the sample printed at the end (default 300, 0 with --data)",
    )
    p.add_argument("--chunk-size", type=positive, help="override the preset's RAT chunk size")
    p.add_argument("--n-layers", type=positive, help="override the preset's depth")
    p.add_argument("--d-model", type=positive, help="override the preset's width")
    p.add_argument("--context", type=positive, help="override the preset's training context")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tokenize", help="turn text files into token shards for `ratlm train --data`")
    p.add_argument(
        "inputs", nargs="+", help=".txt, .jsonl or .parquet files (optionally .gz/.xz/.bz2), or folders"
    )
    p.add_argument("--out", required=True, help="output folder (shards, manifest.json, tokenizer)")
    p.add_argument("--tokenizer", default="byte", help="byte, a SentencePiece .model or a tokenizer.json")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--doc-per", choices=("file", "line"), default="file", help="what one .txt document is")
    p.add_argument("--shard-tokens", type=positive, default=1 << 28, help="tokens per shard (default 2^28)")
    p.add_argument("--workers", type=positive, default=1, help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("export", help="write a model folder from a training run's newest checkpoint")
    p.add_argument("run", help="run folder, its checkpoints/ folder, or one checkpoint folder")
    p.add_argument("out", help="output model folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="draw a run's training curves to a PNG (needs matplotlib)")
    p.add_argument("run", help="run folder or train_log.jsonl")
    p.add_argument("--out", help="PNG path (default RUN/train_curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("generate", help="continue prompts with a trained model")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's; > 1 discourages repeats")
    p.add_argument("--stop", action="append", help="stop once the output contains this text (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer (default: the one saved in the model directory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (default: as saved)")
    p.add_argument("--no-stream", action="store_true", help="print a single prompt's output only at the end")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA (for debugging)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="architecture, parameter count and cache size of a model or preset")
    p.add_argument("target", help="model directory, or a preset name with --preset")
    p.add_argument("--preset", action="store_true", help="TARGET is a preset name")
    p.add_argument("--dtype", help="cache dtype for the size estimate (default bf16)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert-official", help="convert a checkpoint of the reference code (CLAIRE-Labo/RAT)"
    )
    p.add_argument("src", help="the reference code's .pt checkpoint")
    p.add_argument("dst", help="output model directory")
    p.add_argument("--tokenizer", help="tokenizer to store with the model (e.g. LLaMA's tokenizer.model)")
    p.add_argument("--dtype", help=f"convert the weights to one of {', '.join(DTYPES)}")
    p.set_defaults(func=cmd_convert)

    from .evaluation.cli import add_eval_parser

    add_eval_parser(sub)
    from .bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    # bad input of any kind (UsageError, ConfigError, CheckpointError, DataError, ... are ValueErrors),
    # a missing file or an optional package that is not installed: one line, not a traceback
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"ratlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
