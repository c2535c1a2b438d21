"""Turn the JSON results of mqar.py, lm.py and length.py into markdown tables and PNG plots.

The tables replace what stands between the marker comments of docs/results.md
(`<!-- BEGIN mqar -->` ... `<!-- END mqar -->`, and likewise `mqar-long`, `lm`, `length`, `cost`); an
experiment without results keeps a "not yet run" line there. Plots go to docs/img/ (skipped, with a note,
without matplotlib).

    python experiments/summarize.py --mqar results/mqar --mqar-long results/mqar-6k --lm results/lm \
        --length results/length
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = "*Not yet run.* No results in `{}`."
# The paper's validation perplexities at 1.3B parameters (a different corpus, tokenizer and scale: shown
# for the direction of the differences only).
PAPER_PPL = {"attn": 7.61, "rat": 7.67, "attn-swa": 7.61, "rat-swa": 7.57}
MQAR_ORDER = ("attn", "rat-l16", "rat-l64", "rnn", "rat-swa")
LM_ORDER = ("attn", "rat", "rnn", "attn-swa", "rat-swa")


def load(directory: Path | None) -> list[dict]:
    if directory is None or not Path(directory).is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]


def ordered(names, order) -> list[str]:
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), n))


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def figure_markdown(fig, img: Path, name: str, alt: str) -> str:
    """Save `fig` as img/<name> and close it; returns the markdown that shows it under the section."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(img / name, dpi=120)
    plt.close(fig)
    return f"\n\n![{alt}](img/{name})"


def mqar_section(results: list[dict], img: Path, plots: bool) -> str:
    ok = [r for r in results if r["status"] == "ok"]
    failed = {
        (r["params"]["arch"], r["params"]["seq_len"], r["params"]["num_pairs"]): r["status"]
        for r in results
        if r["status"] != "ok"
    }
    # best learning rate per (arch, T, K), as Zoology reports; seeds averaged at that learning rate
    by_lr: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        p = r["params"]
        by_lr[(p["arch"], p["seq_len"], p["num_pairs"])][p["lr"]].append(r["accuracy"])
    best = {key: max(lrs.values(), key=statistics.mean) for key, lrs in by_lr.items()}
    archs = ordered([r["params"]["arch"] for r in results], MQAR_ORDER)
    tasks = sorted({(r["params"]["seq_len"], r["params"]["num_pairs"]) for r in results})
    rows = []
    for T, K in tasks:
        cells = []
        for arch in archs:
            if (arch, T, K) in best:
                cells.append(mean_std(best[(arch, T, K)], 3))
            else:
                cells.append(failed.get((arch, T, K), "–"))
        rows.append([str(T), str(K), *cells])
    text = table(["seq len", "KV pairs", *archs], rows)
    p = results[0]["params"]
    text += (
        f"\n\nQuery accuracy on {p['test_examples']} test sequences (vocabulary {p['vocab']}: a guess among"
        f" the values scores {2 / p['vocab']:.1g}, a guess among the K values in the sequence 1/K); the best"
        " learning rate per cell when several were run, mean ± std over seeds."
    )
    if plots and best:
        import matplotlib.pyplot as plt

        pairs = sorted({K for _, K in tasks})
        fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.2), squeeze=False)
        for ax, K in zip(axes[0], pairs, strict=True):
            for arch in archs:
                pts = sorted(
                    (T, statistics.mean(best[(a, T, k)])) for a, T, k in best if a == arch and k == K
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=arch)
            ax.set(xscale="log", xlabel="sequence length", ylabel="accuracy", title=f"{K} key-value pairs")
            seq_lens = sorted({T for T, k in tasks if k == K})
            ax.set_xticks(seq_lens, [str(T) for T in seq_lens])
            ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
        axes[0][-1].legend(fontsize=8)
        text += figure_markdown(fig, img, "mqar.png", "MQAR accuracy")
    return text


def mqar_long_section(results: list[dict], img: Path, plots: bool) -> str:
    """A second MQAR grid under another schedule (one learning rate): accuracy and the steps each run took."""
    archs = ordered([r["params"]["arch"] for r in results], MQAR_ORDER)
    by_seed = sorted(results, key=lambda r: -r["params"]["seed"])  # the lowest seed wins
    found = {(r["params"]["arch"], r["params"]["seq_len"], r["params"]["num_pairs"]): r for r in by_seed}
    rows = []
    for T, K in sorted({(T, K) for _, T, K in found}):
        cells = []
        for arch in archs:
            r = found.get((arch, T, K))
            if r is None:
                cells.append("–")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{r['accuracy']:.3f} ({r['steps_run']} steps)")
        rows.append([str(T), str(K), *cells])
    p = results[0]["params"]
    warmup = round(p.get("warmup", 0.1) * p["steps"])
    lrs = ", ".join(f"{lr:g}" for lr in sorted({r["params"]["lr"] for r in results}))
    seeds = len({r["params"]["seed"] for r in results})
    return table(["seq len", "KV pairs", *archs], rows) + (
        f"\n\nQuery accuracy on {p['test_examples']} test sequences, {seeds} seed(s) (the lowest shown),"
        f" learning rate {lrs}, a schedule of {p['steps']} steps with {warmup} warm-up steps; a run stops"
        f" early once its probe accuracy reaches {p['stop_at']} (the steps column)."
    )


def lm_section(results: list[dict], img: Path, plots: bool) -> str:
    ok = [r for r in results if r["status"] == "ok"]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        groups[r["params"]["arch"]].append(r)
    rows = []
    for arch in ordered([r["params"]["arch"] for r in results], LM_ORDER):
        runs = groups.get(arch, [])
        if not runs:
            status = ", ".join(sorted({r["status"] for r in results if r["params"]["arch"] == arch}))
            rows.append([arch, "–", "0", status, "–", "–", str(PAPER_PPL.get(arch, "–"))])
            continue
        rows.append([
            arch,
            f"{runs[0]['model_params'] / 1e6:.2f}",
            str(len(runs)),
            mean_std([r["val_loss"] for r in runs], 4),
            mean_std([r["val_perplexity"] for r in runs], 3),
            mean_std([r["val_bits_per_byte"] for r in runs], 4),
            str(PAPER_PPL.get(arch, "–")),
        ])  # fmt: skip
    header = ["model", "params (M)", "seeds", "val loss (nats/token)", "val ppl / token", "bits / byte",
              "paper ppl, 1.3B"]  # fmt: skip
    text = table(header, rows)
    if ok:
        r = ok[0]
        text += (
            f"\n\nValidation: held-out works, {r['val_windows']} windows of {r['params']['seq_len']} tokens;"
            f" {r['train_tokens'] / 1e6:.1f}M training tokens ({r['epochs']:.1f} epochs) per run."
        )
    if plots and ok:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arch, runs in groups.items():
            for i, r in enumerate(runs):
                pts = [(e["step"], e["val_loss_estimate"]) for e in r["log"] if "val_loss_estimate" in e]
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=f"C{LM_ORDER.index(arch) % 10}",
                            label=arch if i == 0 else None, alpha=0.8)  # fmt: skip
        ax.set(xlabel="step", ylabel="validation loss (estimate)", title="Language modelling")
        ax.legend(fontsize=8)
        text += figure_markdown(fig, img, "lm.png", "validation loss during training")
    return text


def length_section(results: list[dict], img: Path, plots: bool) -> str:
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return ""
    lengths = sorted({int(n) for r in ok for n in r["by_length"]})
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        groups[r["params"]["model"]].append(r)
    rows = []
    for name, runs in sorted(groups.items()):
        cells = [mean_std([r["by_length"][str(n)]["perplexity"] for r in runs], 3) for n in lengths]
        rows.append([name, str(len(runs)), *cells])
    N = ok[0]["train_length"]
    text = table(["model", "seeds", *[f"ppl @ {n} ({n / N:g}N)" for n in lengths]], rows)
    text += (
        f"\n\nTrained at N = {N} tokens; perplexity per token on the held-out works at each window length."
    )
    if plots:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (name, runs) in enumerate(sorted(groups.items())):
            curve = runs[0]["per_position_longest"]
            bucket = max(1, len(curve) // 64)
            xs = [b * bucket + bucket / 2 for b in range(len(curve) // bucket)]
            ys = [statistics.mean(curve[b * bucket : (b + 1) * bucket]) for b in range(len(curve) // bucket)]
            ax.plot(xs, ys, color=f"C{i}", label=name)
        ax.axvline(N, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="position in the window", ylabel="loss (nats/token)", title=f"Trained at N = {N}")
        ax.legend(fontsize=8)
        text += figure_markdown(fig, img, "length.png", "loss by position")
    return text


def cost_section(experiments: dict[str, list[dict]]) -> str:
    rows = []
    for name, results in experiments.items():
        if results:
            minutes = sum(r.get("wall_seconds", 0.0) for r in results) / 60
            planned = sum(r.get("estimate_seconds", 0.0) for r in results) / 60
            env = [r["env"] for r in results if r["status"] == "ok"]
            gpus = sorted({e.get("gpu", e["device"]) for e in env})
            rows.append([name, str(len(results)), f"{minutes:.1f}", f"{planned:.1f}", ", ".join(gpus)])
    if not rows:
        return ""
    header = ["experiment", "runs", "sum of run wall times (min)", "planned (min, one at a time)", "device"]
    note = (
        "\n\nRuns started by `experiments/parallel.sh` share the GPU (one process per architecture), "
        "so their wall times overlap: the sum is not the GPU time spent."
    )
    return table(header, rows) + note


def replace_section(doc: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.DOTALL)
    if not pattern.search(doc):
        raise SystemExit(f"docs/results.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mqar", type=Path, help="output directory of mqar.py")
    parser.add_argument("--mqar-long", type=Path, help="output directory of a second (long) MQAR grid")
    parser.add_argument("--lm", type=Path, help="output directory of lm.py")
    parser.add_argument("--length", type=Path, help="output directory of length.py")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    plots = not args.no_plots
    if plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            print("matplotlib is not installed: tables only (pip install matplotlib for the plots)")
            plots = False
    img = args.doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    names = ("mqar", "mqar-long", "lm", "length")
    results = {name: load(getattr(args, name.replace("-", "_"))) for name in names}
    builders = {
        "mqar": mqar_section,
        "mqar-long": mqar_long_section,
        "lm": lm_section,
        "length": length_section,
    }
    doc = args.doc.read_text()
    for name, build in builders.items():
        body = build(results[name], img, plots) if results[name] else ""
        given = getattr(args, name.replace("-", "_"))
        doc = replace_section(doc, name, body or NOT_RUN.format(given or f"--{name}"))
    doc = replace_section(doc, "cost", cost_section(results) or NOT_RUN.format("any results directory"))
    args.doc.write_text(doc)
    done = {name: len(r) for name, r in results.items()}
    print(f"updated {args.doc} ({', '.join(f'{k}: {v} results' for k, v in done.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
