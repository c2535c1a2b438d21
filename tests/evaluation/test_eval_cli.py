"""`ratlm eval ppl` and `ratlm eval length` from the command line: printed numbers, JSON files, a plot,
and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from ratlm.cli import main
from ratlm.evaluation.inputs import load_tokens
from ratlm.evaluation.perplexity import evaluate_perplexity
from ratlm.tokenizer import ByteTokenizer


def test_ppl(model_dir, jsonl_file, tiny_model, tmp_path, capsys):
    args = ["eval", "ppl", "--model", str(model_dir), "--data", str(jsonl_file), "--seq-len", "32"]
    args += ["--stride", "8", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    assert main([*args, "--per-position", str(tmp_path / "pos.json")]) == 0
    expected = evaluate_perplexity(tiny_model, load_tokens([jsonl_file], ByteTokenizer()), 32, 8)
    assert f"perplexity {expected.ppl:.3f}" in capsys.readouterr().out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["loss"] == pytest.approx(expected.loss) and summary["stride"] == 8
    positions = json.loads((tmp_path / "pos.json").read_text())
    assert positions["mean_loss"] == pytest.approx(expected.position_loss)
    assert positions["count"] == expected.position_tokens and len(positions["count"]) == 32


def test_length(model_dir, jsonl_file, tmp_path, capsys):
    args = ["eval", "length", "--model", str(model_dir), "--data", str(jsonl_file), "--device", "cpu"]
    args += ["--lengths", "8,16,64", "--chunk", "16", "--out", str(tmp_path / "len.json"), "--no-plot"]
    assert main(args) == 0  # test_length.py draws the plot
    sweep = json.loads((tmp_path / "len.json").read_text())
    assert [r["length"] for r in sweep["results"]] == [8, 16, 64] and sweep["training_context"] == 16
    assert not (tmp_path / "len.png").exists()
    assert "length      64" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seq-len", "100000"], "a window of seq_len 100000"),
        (["--seq-len", "8", "--dtype", "int8"], "dtype must be one of"),
        (["--seq-len", "8", "--tokenizer", "missing.model"], "not found"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(model_dir, jsonl_file, extra, message, capsys):
    args = ["eval", "ppl", "--model", str(model_dir), "--data", str(jsonl_file), "--device", "cpu"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratlm eval: error:") and message in err
