import json

import pytest
import torch

import ratlm.train
import ratlm.trainckpt
from ratlm import from_pretrained, preset
from ratlm.cli import main
from ratlm.train import DivergedError, TrainConfig, train
from ratlm.trainckpt import latest_checkpoint


def cfg(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(
        preset="rat-tiny", out=str(tmp_path / name), max_steps=6, batch_size=4, seq_len=32, lr=3e-3,
        eval_every=0, final_eval_tokens=500, sample_tokens=0, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def steps(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Six uninterrupted steps: the loss curve every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    train(cfg(tmp, "ref"))
    return losses(tmp / "ref"), from_pretrained(tmp / "ref").state_dict()


@pytest.mark.parametrize("fmt", ["dcp", "full"])
def test_stop_then_resume_gives_the_same_losses_and_weights(tmp_path, reference, fmt):
    ref_losses, ref_state = reference
    out = train(cfg(tmp_path, "run", stop_at=3, ckpt_format=fmt))
    assert out["stopped_at"] == 3 and steps(tmp_path / "run") == ["step_00000003"]
    assert not (tmp_path / "run" / "model.safetensors").exists()  # a stopped run is not exported
    train(cfg(tmp_path, "run", ckpt_format=fmt))
    assert losses(tmp_path / "run") == ref_losses  # bit-identical on CPU
    state = from_pretrained(tmp_path / "run").state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train(cfg(tmp_path, "run", max_steps=4, ckpt_every=1, keep_checkpoints=2))
    run = tmp_path / "run"
    assert steps(run) == ["step_00000003", "step_00000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, reference, monkeypatch):
    real_save, calls = ratlm.trainckpt.dcp.save, []

    def crashing_save(state, checkpoint_id, **kw):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the save of step 4 dies half-way
            (ratlm.trainckpt.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(ratlm.trainckpt.dcp, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        train(cfg(tmp_path, "run", ckpt_every=2))
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_00000002"
    assert (ckpts / ".tmp-step_00000004").exists()
    monkeypatch.setattr(ratlm.trainckpt.dcp, "save", real_save)
    train(cfg(tmp_path, "run", ckpt_every=2))  # resumes from step 2
    assert losses(tmp_path / "run") == reference[0]
    assert not list(ckpts.glob(".tmp-*"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss, calls = ratlm.train.lm_loss, []

    def poisoned(model, x, y, reduction="mean"):
        calls.append(1)
        loss = real_loss(model, x, y, reduction)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ratlm.train, "lm_loss", poisoned)
    with pytest.raises(DivergedError, match=r"at step 3.*step_00000002"):
        train(cfg(tmp_path, "run", ckpt_every=2))
    assert steps(tmp_path / "run") == ["step_00000002"] and len(losses(tmp_path / "run")) == 2
    calls.clear()
    argv = "train --preset rat-tiny --max-steps 4 --batch-size 4 --seq-len 32 --eval-every 0 --device cpu"
    argv = [*argv.split(), "--out", str(tmp_path / "cli")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1 and "loss nan" in capsys.readouterr().err


def test_export_and_plot_a_run(tmp_path, capsys):
    train(cfg(tmp_path, "run", max_steps=2, ckpt_every=1))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    exported, final = from_pretrained(tmp_path / "model"), from_pretrained(tmp_path / "run")
    assert exported.config == final.config == preset("rat-tiny")
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in exported.state_dict().items())
    assert (tmp_path / "model" / "tokenizer_config.json").exists()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "no training checkpoint" in capsys.readouterr().err


def test_resume_refuses_another_model_or_a_fresh_start_over_checkpoints(tmp_path):
    train(cfg(tmp_path, "run", max_steps=2, stop_at=1))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg(tmp_path, "run", max_steps=2, resume="never"))
    with pytest.raises(ValueError, match="another model configuration"):
        train(cfg(tmp_path, "run", max_steps=2), preset("rat-tiny", n_layers=1))
    with pytest.raises(ValueError, match="seq_len"):
        train(cfg(tmp_path, "run", max_steps=2, seq_len=16))


def test_sigterm_finishes_the_step_and_leaves_a_checkpoint(tmp_path, reference, monkeypatch):
    import signal

    real_loss, calls = ratlm.train.lm_loss, []

    def preempted(model, x, y, reduction="mean"):
        calls.append(1)
        if len(calls) == 2:  # during step 2, as a scheduler's preemption notice would arrive
            signal.raise_signal(signal.SIGTERM)
        return real_loss(model, x, y, reduction)

    monkeypatch.setattr(ratlm.train, "lm_loss", preempted)
    assert train(cfg(tmp_path, "run"))["stopped_at"] == 2
    assert steps(tmp_path / "run") == ["step_00000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.setattr(ratlm.train, "lm_loss", real_loss)
    train(cfg(tmp_path, "run"))
    assert losses(tmp_path / "run") == reference[0]
