"""Loss against evaluation length, also beyond the training context (the paper's Figure 6).

Every length L cuts the same stream into non-overlapping windows of L tokens and reports the mean
loss over all of their targets, so the lengths see (nearly) the same tokens and differ only in the
context each token gets. `loss_beyond_context` averages the positions at or past the training
context, where a model that does not generalise in length degrades first.
"""

from __future__ import annotations

from pathlib import Path

from ..model import LanguageModel
from .inputs import EvalDataError, TokenStream
from .perplexity import evaluate_perplexity


def length_sweep(
    model: LanguageModel,
    stream: TokenStream,
    lengths: list[int],
    batch_size: int = 1,
    chunk: int | None = None,
    progress: bool = False,
) -> dict:
    """{"training_context", "results": [{"length", "loss", "ppl", "tokens", "windows",
    "loss_beyond_context"}, ...]} for each length, shortest first."""
    lengths = sorted(set(lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    if lengths[-1] + 1 > len(stream.tokens):
        raise EvalDataError(
            f"{stream.name} holds {len(stream.tokens)} tokens, too few for a window of {lengths[-1]}"
        )
    context = model.config.context
    results = []
    for length in lengths:
        r = evaluate_perplexity(model, stream, length, batch_size=batch_size, chunk=chunk, progress=progress)
        beyond = [
            (loss, n)
            for loss, n in zip(r.position_loss[context:], r.position_tokens[context:], strict=True)
            if n
        ]
        n_beyond = sum(n for _, n in beyond)
        results.append(
            {
                "length": length,
                "loss": r.loss,
                "ppl": r.ppl,
                "tokens": r.tokens,
                "windows": r.windows,
                "loss_beyond_context": sum(loss * n for loss, n in beyond) / n_beyond if n_beyond else None,
            }
        )
    return {"training_context": context, "results": results}


def plot_length_sweep(sweep: dict, path: str | Path, title: str = "") -> None:
    """Loss against evaluation length (log2 axis), a dashed line at the training context; PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "the plot needs matplotlib: pip install matplotlib (or pip install 'ratlm[eval]'), "
            "or pass --no-plot"
        ) from e
    lengths = [r["length"] for r in sweep["results"]]
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    ax.plot(lengths, [r["loss"] for r in sweep["results"]], marker="o", label="mean loss")
    beyond = [
        (r["length"], r["loss_beyond_context"])
        for r in sweep["results"]
        if r["loss_beyond_context"] is not None
    ]
    if beyond:
        ax.plot(*zip(*beyond, strict=True), marker="s", linestyle=":", label="positions past the context")
    ax.axvline(sweep["training_context"], color="grey", linestyle="--", label="training context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("loss (nats / token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path))
