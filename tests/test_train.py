import json
import math

import numpy as np
import pytest
import torch

from ratlm import from_pretrained, preset
from ratlm.train import IGNORE_INDEX, TrainConfig, lr_at, make_batch, train, unigram_loss


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(max_steps=100, lr=1e-3, min_lr=1e-5, warmup=0.1)
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(1e-5)


def test_target_after_eos_is_ignored():
    eos = 9
    tokens = np.array([1, 2, eos, 3, 4, 5, eos, 6], dtype=np.uint16)
    x, y = make_batch(tokens, np.array([0, 1]), 5, eos, "cpu")
    assert x[0].tolist() == [1, 2, eos, 3, 4]
    assert y[0].tolist() == [2, eos, IGNORE_INDEX, 4, 5]
    assert y[1].tolist() == [eos, IGNORE_INDEX, 4, 5, eos]


def test_unigram_loss_of_uniform_data_is_log_vocab():
    data = np.arange(1000) % 10
    assert unigram_loss(data, data, 10) == pytest.approx(math.log(10), rel=1e-3)


def test_training_learns_and_writes_a_loadable_model(tmp_path, capsys):
    cfg = TrainConfig(
        preset="rat-tiny",
        out=str(tmp_path / "run"),
        max_steps=25,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        eval_every=0,
        final_eval_tokens=20_000,
        sample_tokens=20,
        device="cpu",
    )
    metrics = train(cfg, preset("rat-tiny"))
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 25
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # from ~log(257) = 5.55 it must drop fast
    assert metrics["val_loss"] < metrics["unigram_val_loss"] + 0.5
    assert "--- sample ---" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert saved["val_loss"] == pytest.approx(metrics["val_loss"])
    model = from_pretrained(tmp_path / "run")
    assert model.config == preset("rat-tiny")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    cfg = TrainConfig(preset="rat-tiny", out=str(tmp_path / "x"), max_steps=1, device="cpu")
    with pytest.raises(ValueError, match="vocab_size"):
        train(cfg, preset("rat-tiny", vocab_size=100))


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = TrainConfig(preset="rat-tiny", out=str(tmp_path / "x"), max_steps=1, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(cfg)
