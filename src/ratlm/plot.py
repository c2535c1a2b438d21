"""`ratlm plot RUN`: the curves of a training log (loss, learning rate, grad norm, tokens/s, MFU) in a PNG."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_log

PANELS = (
    ("loss", "loss (nats/token)"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("memory_gib", "peak memory (GiB)"),
)


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN/train_log.jsonl (or a log file) to `out` (default: train_curves.png beside the log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("ratlm plot needs matplotlib: pip install matplotlib") from e
    records = read_log(run)
    if not records:
        raise ValueError(f"the training log of {run} is empty")
    run = Path(run)
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "train_curves.png"
    panels = [(k, label) for k, label in PANELS if any(r.get(k) is not None for r in records)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels, strict=True):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points, strict=True), lw=1, label="train" if key == "loss" else None)
        if key == "loss":
            val = [(r["step"], r["val_loss_estimate"]) for r in records if "val_loss_estimate" in r]
            if val:
                ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation (estimate)")
            ax.legend()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
