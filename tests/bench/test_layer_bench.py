"""`ratlm bench layer` end to end at toy sizes (CPU works): the script runs, records and summarises."""

import json

import pytest
import torch

from ratlm.bench.layer import LayerBench, flops, run
from ratlm.cli import main
from ratlm.config import ModelConfig


def test_smoke_run_writes_checks_timings_and_summary(tmp_path, capsys):
    bench = LayerBench(out=tmp_path)
    bench.smoke_mode("cuda" if torch.cuda.is_available() else "cpu")
    bench.candidates = ("triton", "torch")
    bench.modes = ("train", "prefill", "fill")
    assert run(bench) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_layer.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"env", "ceilings", "check", "time", "phase"} <= kinds
    triton_checks = [r for r in rows if r["kind"] == "check" and r.get("engine") == "triton"]
    assert triton_checks and all(r["status"] == "ok" for r in triton_checks), triton_checks
    timed = [r for r in rows if r["kind"] == "time"]
    assert all(r["status"] == "ok" for r in timed), [r for r in timed if r["status"] != "ok"]
    layers = {(r["mode"], r["layer"]) for r in timed}
    assert {
        (m, k) for m in ("train", "prefill", "fill") for k in ("attention", "rat", "rnn", "swa")
    } <= layers
    assert all(r["ms"] > 0 and r["tflop"] > 0 for r in timed)
    out = capsys.readouterr().out
    assert "train (ms" in out and "checks:" in out


def test_time_budget_skips_and_records(tmp_path):
    bench = LayerBench(out=tmp_path)
    bench.smoke_mode("cpu")
    bench.checks, bench.budget_s = False, 0.0
    assert run(bench) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_layer.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["kind"] == "time"]
    assert timed and all(r["status"] == "skipped" for r in timed)


def test_flop_counts():
    cfg = ModelConfig(d_model=2048, n_heads=16, n_groups=2, chunk_size=16, layers="rat", window=1024)
    B, T = 2, 131072
    # projections 28 TFLOP for forward + backward, chunk attention 30.8 TFLOP (PERF.md)
    proj = 3 * (2 * B * T * 2048 * (3 * 2048 + 2 * 2 * 128) + 2 * B * T * 2048 * 2048)
    assert flops("rat", B, T, cfg, train=True) == pytest.approx(proj + 30.8e12, rel=0.01)
    assert proj == pytest.approx(28e12, rel=0.05)
    attn = flops("attention", B, T, cfg, train=False) - flops("rnn", B, T, cfg, train=False)
    assert attn == pytest.approx(4 * B * 16 * T * 128 * (T + 1) / 2)
    window = flops("swa", 1, 4096, cfg, train=False) - flops("rnn", 1, 4096, cfg, train=False)
    keys = sum(min(t, 1024) + 1 for t in range(4096)) / 4096
    assert window == pytest.approx(4 * 16 * 4096 * 128 * keys)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--candidates", "cudnn,magic", "unknown ['magic']; allowed: cudnn, triton, flex, torch"),
        ("--modes", "fill,decode", "unknown ['decode']; allowed: train, prefill, fill"),
        ("--baselines", "mamba", "unknown ['mamba']; allowed: attention, swa, rnn"),
    ],
)
def test_cli_rejects_unknown_names(tmp_path, capsys, flag, value, message):
    assert main(["bench", "layer", "--out", str(tmp_path), flag, value]) == 2
    assert f"{flag}: {message}" in capsys.readouterr().err
