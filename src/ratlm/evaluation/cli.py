"""`ratlm eval ppl | length | harness` (and `longbench | ruler` from `long_cli`): registered on ratlm's
command line by `add_eval_parser`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import positive

DATA_HELP = (
    "evaluation data, one or more of: .txt (one document) or .jsonl (one per line) files, tokenized with "
    "the model's tokenizer; a `ratlm tokenize` folder; flat .bin token files; .npy arrays"
)


def _lengths(value: str) -> list[int]:
    try:
        lengths = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive lengths, got {value!r}")
    return lengths


def _common(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, nargs="+", help=DATA_HELP)
    p.add_argument("--tokenizer", help="tokenizer for text data (default: the one saved with the model)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--token-dtype", default="uint16", help="dtype of .bin files without a manifest")
    p.add_argument("--max-tokens", type=positive, help="read only the first N tokens of the data")
    p.add_argument(
        "--batch-size", type=positive, default=batch_size, help=f"windows per forward ({batch_size})"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: as saved)")


def _load(args: argparse.Namespace):
    from .inputs import load_model, load_tokens, model_tokenizer

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = model_tokenizer(args.model, args.tokenizer)
    stream = load_tokens(args.data, tokenizer, args.token_dtype, args.text_field, args.max_tokens)
    return model, stream


def _write_json(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def cmd_ppl(args: argparse.Namespace) -> None:
    from .perplexity import evaluate_perplexity

    model, stream = _load(args)
    r = evaluate_perplexity(
        model, stream, args.seq_len, args.stride, args.batch_size, args.chunk, progress=sys.stderr.isatty()
    )
    print(
        f"{args.model} on {stream.name}: loss {r.loss:.4f} nats/token, perplexity {r.ppl:.3f} "
        f"({r.tokens:,} tokens in {r.windows:,} windows of {r.seq_len}, stride {r.stride})"
    )
    info = {"model": args.model, "data": stream.name, **r.summary()}
    if args.out:
        _write_json(args.out, info)
    if args.per_position:
        _write_json(args.per_position, {**info, "mean_loss": r.position_loss, "count": r.position_tokens})


def cmd_length(args: argparse.Namespace) -> None:
    from .length import length_sweep, plot_length_sweep

    model, stream = _load(args)
    sweep = length_sweep(
        model, stream, args.lengths, args.batch_size, args.chunk, progress=sys.stderr.isatty()
    )
    print(f"{args.model} on {stream.name} (training context {sweep['training_context']}):")
    for r in sweep["results"]:
        beyond = r["loss_beyond_context"]
        extra = "" if beyond is None else f", past the context {beyond:.4f}"
        tokens = f"{r['tokens']:,} tokens"
        print(f"  length {r['length']:>7}: loss {r['loss']:.4f} (ppl {r['ppl']:.3f}, {tokens}{extra})")
    _write_json(args.out, {"model": args.model, "data": stream.name, **sweep})
    print(f"wrote {args.out}")
    if not args.no_plot:
        plot = args.plot or str(Path(args.out).with_suffix(".png"))
        plot_length_sweep(sweep, plot, title=Path(args.model).name)
        print(f"wrote {plot}")


def cmd_harness(args: argparse.Namespace) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise ImportError("ratlm eval harness needs lm-evaluation-harness: pip install 'ratlm[eval]'") from e
    from . import harness  # noqa: F401  (registers the "ratlm" model)

    argv, sys.argv = sys.argv, ["lm_eval", *args.lm_eval_args]  # lm_eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = argv


def add_eval_parser(sub) -> None:
    """Add `eval` and its subcommands to ratlm's subparsers."""
    p = sub.add_parser(
        "eval", help="perplexity, loss against length, lm-evaluation-harness, LongBench, RULER"
    )
    evals = p.add_subparsers(dest="eval_command", required=True)

    q = evals.add_parser("ppl", help="token-level perplexity over windows of the data")
    _common(q, batch_size=8)
    q.add_argument("--seq-len", type=positive, required=True, help="tokens per window")
    q.add_argument("--stride", type=positive, help="score only the last STRIDE tokens of each later window")
    q.add_argument("--chunk", type=positive, help="feed each window CHUNK tokens at a time (less memory)")
    q.add_argument(
        "--per-position", metavar="FILE", help="write the mean loss at each window position (JSON)"
    )
    q.add_argument("--out", metavar="FILE", help="write the result (JSON)")
    q.set_defaults(func=cmd_ppl)

    q = evals.add_parser("length", help="loss against evaluation length (the paper's Figure 6)")
    _common(q, batch_size=1)
    q.add_argument("--lengths", type=_lengths, required=True, help="comma-separated, e.g. 512,1024,2048,4096")
    q.add_argument(
        "--chunk", type=positive, default=2048, help="tokens fed at a time through the cache (2048)"
    )
    q.add_argument("--out", default="length_eval.json", help="result JSON (default length_eval.json)")
    q.add_argument("--plot", help="PNG plot (default: the --out path with .png)")
    q.add_argument("--no-plot", action="store_true", help="write no plot (matplotlib is then not needed)")
    q.set_defaults(func=cmd_length)

    # Everything after `harness` goes to lm_eval, `--help` included: with "+" as its only option prefix
    # this parser takes no options itself, so argparse leaves the arguments alone.
    q = evals.add_parser(
        "harness",
        help="lm-evaluation-harness's command line with the `ratlm` model registered, e.g. ratlm eval "
        "harness --model ratlm --model_args pretrained=DIR --tasks hellaswag",
        prefix_chars="+",
        add_help=False,
    )
    q.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    q.set_defaults(func=cmd_harness)

    from .long_cli import add_long_context_parsers

    add_long_context_parsers(evals)
