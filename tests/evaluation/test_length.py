"""Loss against evaluation length: one perplexity run per length, the part past the training context
reported apart, and the plot written (or a clear error without matplotlib)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ratlm.evaluation.inputs import EvalDataError, TokenStream
from ratlm.evaluation.length import length_sweep, plot_length_sweep
from ratlm.evaluation.perplexity import evaluate_perplexity

STREAM = TokenStream(tokens=np.random.default_rng(0).integers(0, 257, 130), eos_id=256, name="random")


def test_each_length_is_a_perplexity_run(tiny_model):
    sweep = length_sweep(tiny_model, STREAM, [32, 8, 16], batch_size=2, chunk=8)
    assert sweep["training_context"] == 16
    assert [r["length"] for r in sweep["results"]] == [8, 16, 32]
    for r in sweep["results"]:
        direct = evaluate_perplexity(tiny_model, STREAM, r["length"])
        assert r["loss"] == pytest.approx(direct.loss, rel=1e-5) and r["tokens"] == direct.tokens
        assert (r["loss_beyond_context"] is None) == (r["length"] <= 16)
    past = sweep["results"][-1]
    direct = evaluate_perplexity(tiny_model, STREAM, 32)
    beyond = [
        (loss, n) for loss, n in zip(direct.position_loss[16:], direct.position_tokens[16:], strict=True) if n
    ]
    assert past["loss_beyond_context"] == pytest.approx(
        sum(x * n for x, n in beyond) / sum(n for _, n in beyond)
    )


def test_too_long_for_the_data(tiny_model):
    with pytest.raises(EvalDataError, match="too few"):
        length_sweep(tiny_model, STREAM, [64, 256])


def test_plot(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    sweep = length_sweep(tiny_model, STREAM, [8, 32])
    plot_length_sweep(sweep, tmp_path / "loss.png", title="tiny")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_length_sweep(sweep, tmp_path / "again.png")
