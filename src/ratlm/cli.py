"""Command line: `ratlm train | generate | info | convert-official`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

import torch

from .config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cmd_train(args: argparse.Namespace) -> None:
    from .config import preset
    from .train import TrainConfig, train

    overrides = {
        k: getattr(args, k) for k in ("chunk_size", "n_layers", "d_model", "context") if getattr(args, k)
    }
    model_config = preset(args.preset, **overrides)
    cfg = TrainConfig(preset=args.preset, out=args.out or f"runs/{args.preset}")
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("preset", "out"):
            setattr(cfg, f.name, value)
    train(cfg, model_config)


def _load(args: argparse.Namespace):
    from . import from_pretrained
    from .train import resolve_device

    device = resolve_device(args.device)
    model = from_pretrained(args.model, device=device, dtype=_dtype(args.dtype))
    return model, device


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate
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
    outs = generate(
        model,
        prompts,
        args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=stop,
        seed=args.seed,
    )
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
    dtype = _dtype(args.dtype) or torch.bfloat16
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

    report = convert_official(args.src, args.dst, tokenizer=args.tokenizer, dtype=_dtype(args.dtype))
    print(report)


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .train import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="ratlm", description="RAT language models: train, generate, convert."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on the embedded Shakespeare corpus")
    p.add_argument("--preset", default=defaults.preset, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", help="output model directory (default runs/PRESET)")
    p.add_argument("--max-steps", type=_positive, help=f"optimizer steps (default {defaults.max_steps})")
    p.add_argument("--batch-size", type=_positive, help=f"sequences per step (default {defaults.batch_size})")
    p.add_argument("--seq-len", type=_positive, help=f"tokens per sequence (default {defaults.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument(
        "--eval-every", type=int, help=f"steps between validation estimates (default {defaults.eval_every})"
    )
    p.add_argument("--final-eval-tokens", type=_positive, help="final validation tokens (default all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--sample-tokens", type=int, help="length of the sample printed at the end (0: none)")
    p.add_argument("--chunk-size", type=_positive, help="override the preset's RAT chunk size")
    p.add_argument("--n-layers", type=_positive, help="override the preset's depth")
    p.add_argument("--d-model", type=_positive, help="override the preset's width")
    p.add_argument("--context", type=_positive, help="override the preset's training context")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue prompts with a trained model")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer (default: the one saved in the model directory)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (default: as saved)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .cache import CacheOverflowError
    from .checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, CheckpointError, CacheOverflowError, FileNotFoundError, ValueError) as e:
        print(f"ratlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"ratlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
