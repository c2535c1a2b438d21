"""`ratlm eval longbench | ruler`: long-context tasks, added to `ratlm eval` by `add_long_context_parsers`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _count(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _lengths(value: str) -> list[int]:
    try:
        lengths = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e
    if not lengths or min(lengths) < 1 or len(set(lengths)) < len(lengths):
        raise argparse.ArgumentTypeError(f"expected distinct positive lengths, got {value!r}")
    return sorted(lengths)


def _model_and_tokenizer(args: argparse.Namespace):
    from .inputs import load_model, model_tokenizer

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = model_tokenizer(args.model, args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.model} holds no tokenizer: pass --tokenizer")
    return model, tokenizer


def _write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def cmd_longbench(args: argparse.Namespace) -> None:
    from .longbench import parse_tasks, predict_longbench
    from .longbench_score import METRICS, RESULT_FILE, format_table, rouge_l, score_folder

    if args.score is not None:
        given = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out))
                 if value is not None]  # fmt: skip
        if given:
            raise ValueError(f"--score DIR scores a prediction folder; it takes no {', '.join(given)}")
        scores = score_folder(args.score)
        print(format_table(scores))
        print(f"wrote {Path(args.score) / RESULT_FILE}")
        return
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out))
               if value is None]  # fmt: skip
    if missing:
        raise ValueError(f"predicting needs {', '.join(missing)} (or --score DIR to score predictions)")
    tasks = parse_tasks(args.tasks)
    if any(METRICS[t] is rouge_l for t in tasks):
        rouge_l("a", "a")  # the summarisation tasks are scored with the rouge package: fail before generating
    model, tokenizer = _model_and_tokenizer(args)
    predict_longbench(
        model,
        tokenizer,
        args.data,
        args.out,
        tasks,
        max_length=args.max_length,
        batch_size=args.batch_size,
        limit=args.limit,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
    )
    scores = score_folder(args.out)
    print(format_table(scores))
    print(f"wrote {Path(args.out) / RESULT_FILE}")


def cmd_ruler(args: argparse.Namespace) -> None:
    from .inputs import model_tokenizer
    from .jsonl import write_jsonl
    from .ruler import evaluate_ruler, format_table, make_samples, parse_tasks, plot_ruler

    tasks = parse_tasks(args.tasks)
    if args.make_samples is not None:
        if args.model is None and args.tokenizer is None:
            raise ValueError("--make-samples sizes the samples with a tokenizer: give --model or --tokenizer")
        tokenizer = model_tokenizer(args.model or ".", args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{args.model} holds no tokenizer: pass --tokenizer")
        made = make_samples(tokenizer, tasks, args.lengths, args.samples, args.split, args.seed,
                            args.max_new_tokens)  # fmt: skip
        write_jsonl(args.make_samples, [{**s.as_dict(), "answer": s.answer} for s in made])
        print(f"wrote {len(made)} {args.split} samples to {args.make_samples}")
        return
    if args.split != "test":
        raise ValueError("--split train only makes training samples (with --make-samples FILE)")
    missing = [flag for flag, value in (("--model", args.model), ("--out", args.out)) if value is None]
    if missing:
        raise ValueError(f"evaluating needs {', '.join(missing)} (or --make-samples FILE to write samples)")
    model, tokenizer = _model_and_tokenizer(args)
    saved: list[dict] = []
    result = evaluate_ruler(
        model,
        tokenizer,
        tasks,
        args.lengths,
        args.samples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        on_sample=None if args.save_samples is None else lambda sample, *_: saved.append(sample.as_dict()),
    )
    _write_json(args.out, {"model": args.model, **result})
    print(f"{args.model}: RULER needle tasks, {args.samples} samples each (training context "
          f"{result['training_context']})")  # fmt: skip
    print(format_table(result))
    print(f"wrote {args.out}")
    if args.save_samples is not None:
        print(f"wrote {write_jsonl(args.save_samples, saved)}")
    if not args.no_plot:
        plot = args.plot or str(Path(args.out).with_suffix(".png"))
        print(f"wrote {plot_ruler(result, plot, title=Path(args.model).name)}")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory")
    p.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    p.add_argument(
        "--batch-size", type=_count, help="sequences per generate call (default: planned from memory)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: as saved)")


def add_long_context_parsers(evals) -> None:
    """Add `longbench` and `ruler` to the subparsers of `ratlm eval`."""
    from .longbench_score import TASK_NAMES
    from .ruler import MAX_NEW_TOKENS, SPLITS, TASKS

    q = evals.add_parser("longbench", help="LongBench v1 (English and code tasks): predict and score")
    _model_options(q)
    q.add_argument("--data", help="folder of LongBench's <dataset>.jsonl files")
    q.add_argument(
        "--tasks", default="all", help=f"comma-separated, or all (default): {', '.join(TASK_NAMES)}"
    )
    q.add_argument("--out", help="prediction folder: <dataset>.jsonl files and result.json")
    q.add_argument(
        "--score", metavar="DIR", help="only score the prediction files in DIR (writes DIR/result.json)"
    )
    q.add_argument(
        "--max-length",
        type=_count,
        help="prompt budget in tokens; longer prompts are cut in the middle (default: the training context "
        "less the task's new tokens)",
    )
    q.add_argument("--limit", type=_count, help="only the first N samples of each task")
    q.add_argument(
        "--overwrite", action="store_true", help="predict tasks whose prediction file exists again"
    )
    q.set_defaults(func=cmd_longbench)

    q = evals.add_parser("ruler", help="RULER's needle-in-a-haystack tasks at several lengths")
    _model_options(q)
    q.add_argument("--tasks", default="all", help=f"comma-separated, or all (default): {', '.join(TASKS)}")
    q.add_argument(
        "--lengths", type=_lengths, required=True, help="target lengths in tokens, e.g. 1024,2048,4096"
    )
    q.add_argument("--samples", type=_count, default=100, help="samples per task and length (default 100)")
    q.add_argument("--seed", type=int, default=0, help="sample generation seed (default 0)")
    q.add_argument(
        "--max-new-tokens",
        type=_count,
        default=MAX_NEW_TOKENS,
        help=f"answer tokens, kept within each length (default {MAX_NEW_TOKENS}, RULER's)",
    )
    q.add_argument("--out", metavar="FILE", help="result JSON")
    q.add_argument("--save-samples", metavar="FILE", help="write every sample as JSON lines (task, length, "
                   "input, outputs)")  # fmt: skip
    q.add_argument("--plot", help="PNG plot (default: the --out path with .png)")
    q.add_argument("--no-plot", action="store_true", help="write no plot (matplotlib is then not needed)")
    q.add_argument("--make-samples", metavar="FILE", help="only write samples (with their answer) as JSON "
                   "lines, for --split; needs a tokenizer, no model")  # fmt: skip
    q.add_argument(
        "--split", choices=SPLITS, default="test", help="samples to make: test (evaluation) or train"
    )
    q.set_defaults(func=cmd_ruler)
