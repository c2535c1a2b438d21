import json
import math

import numpy as np
import pytest
import torch

from ratlm import LanguageModel, from_pretrained, preset
from ratlm.cli import main
from ratlm.loader import to_batch
from ratlm.train import IGNORE_INDEX, TrainConfig, lr_at, recipe, train, unigram_loss


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
    x, y = to_batch(np.stack([tokens[s : s + 6] for s in (0, 1)]).astype(np.int64), eos, "cpu")
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


def test_the_1_3b_presets_get_the_paper_optimiser_and_small_ones_keep_the_demo_defaults():
    paper, demo = recipe("rat-1.3b"), recipe("rat-small")
    assert (paper.lr, paper.min_lr, paper.warmup, paper.weight_decay) == (8e-4, 1e-6, 0.05, 0.1)
    assert (paper.beta1, paper.beta2, paper.grad_clip, paper.seq_len) == (0.9, 0.95, 1.0, 4096)
    assert demo == TrainConfig(preset="rat-small", out="runs/rat-small")


def test_flops_per_token_counts_matmuls_and_the_keys_each_mixer_attends_to():
    from ratlm.metrics import flops_per_token

    cfg = preset("rat-tiny")  # D 64, 2 layers, FFN 256, vocab 257, G 2 of d 32, L 8
    D, F, V = 64, 256, 257
    matmuls = 2 * (D * (3 * D + 2 * D) + D * D + 2 * D * F) + V * D
    for T in (8, 64):
        keys = sum(t // 8 + 1 for t in range(T)) / T  # earlier chunk summaries + the running state
        model = LanguageModel(cfg)
        assert flops_per_token(model, T) == pytest.approx(6 * matmuls + 2 * 12 * D * keys)
    attn = LanguageModel(preset("attn-small"))
    assert flops_per_token(attn, 256) - flops_per_token(attn, 128) == pytest.approx(4 * 12 * 256 * 64)


def test_training_on_tokenized_shards_from_the_cli(tmp_path, capsys):
    from ratlm.corpus import load_split

    train_docs, valid_docs = load_split()
    (tmp_path / "train.txt").write_text(train_docs[0][:100_000])
    (tmp_path / "valid.txt").write_text(valid_docs[0][:5_000])
    for split in ("train", "valid"):
        assert main(["tokenize", str(tmp_path / f"{split}.txt"), "--out", str(tmp_path / split)]) == 0
    data = ["--data", str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid")]
    args = "train --preset rat-tiny --max-steps 3 --batch-size 4 --micro-batch 2 --device cpu --seq-len 32"
    args = [*args.split(), "--final-eval-tokens", "1000", *data]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["val_loss"] < math.log(257) and "sample" not in metrics
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()  # the final checkpoint
    assert from_pretrained(tmp_path / "run").config == preset("rat-tiny")
    capsys.readouterr()
    (tmp_path / "train" / "tokenizer_config.json").unlink()
    assert main([*args, "--out", str(tmp_path / "run2")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    long = [*args, "--seq-len", "200000", "--tokenizer", "byte", "--out", str(tmp_path / "run3")]
    assert main(long) == 2
    assert "longer than the data" in capsys.readouterr().err


def test_unusable_validation_data_or_tokenizer_fails_before_training(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("some training text " * 200)
    (tmp_path / "short.txt").write_text("short")
    for split in ("train", "short"):
        assert main(["tokenize", str(tmp_path / f"{split}.txt"), "--out", str(tmp_path / split)]) == 0
    args = "train --preset rat-tiny --max-steps 3 --batch-size 2 --device cpu --seq-len 32 --eval-every 0"
    args = [*args.split(), "--data", str(tmp_path / "train"), "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert main([*args, "--valid-data", str(tmp_path / "short")]) == 2
    assert "longer than the data: " + str(tmp_path / "short") in capsys.readouterr().err
    assert not (tmp_path / "run" / "train_log.jsonl").exists()  # refused before the first step
    manifest = tmp_path / "short" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"vocab_size": 257', '"vocab_size": 300'))
    assert main([*args, "--valid-data", str(tmp_path / "short")]) == 2
    assert "short was tokenized with" in capsys.readouterr().err
