"""Two gloo processes under torchrun must follow the one-process loss curve for the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ratlm.bench.train import main as bench_main
from ratlm.train import TrainConfig, train

ARGS = dict(
    preset="rat-tiny", max_steps=6, batch_size=8, seq_len=32, lr=3e-3, eval_every=3, eval_batches=1,
    final_eval_tokens=1000, sample_tokens=0, device="cpu",
)  # fmt: skip


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def torchrun(out, **kw) -> None:
    args = {**ARGS, **kw, "out": str(out)}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ratlm",
        "train",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no data parallelism, micro-batch 4 x 2 accumulation steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    metrics = train(TrainConfig(**ARGS, out=str(out), micro_batch=4, parallel="none"))
    return losses(out), metrics["val_loss"]


def test_fsdp_on_two_ranks_matches_one_process_and_its_checkpoint_resumes_on_one(tmp_path, reference):
    ref, ref_val = reference
    torchrun(tmp_path / "fsdp", parallel="fsdp", micro_batch=4, ckpt_every=3)
    got = losses(tmp_path / "fsdp")
    assert got == pytest.approx(ref, rel=1e-5)
    saved = json.loads((tmp_path / "fsdp" / "train_metrics.json").read_text())
    assert saved["world_size"] == 2 and saved["parallel"] == "fsdp"
    assert saved["val_loss"] == pytest.approx(ref_val, rel=1e-5)
    # the sharded checkpoint of step 3, written by two ranks, resumes in one plain process
    run = tmp_path / "one"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "fsdp" / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000003"
    )
    train(TrainConfig(**ARGS, out=str(run), micro_batch=8, parallel="none"))
    assert losses(run) == pytest.approx(ref[3:], rel=1e-5)


def test_ddp_with_accumulation_and_full_checkpoints_matches_one_process(tmp_path, reference):
    torchrun(tmp_path / "ddp", parallel="ddp", micro_batch=2, ckpt_every=6, ckpt_format="full")
    assert losses(tmp_path / "ddp") == pytest.approx(reference[0], rel=1e-5)
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000006" / "state.pt").is_file()


def test_fsdp_in_one_process_is_exactly_the_plain_loop(tmp_path, reference):
    train(TrainConfig(**ARGS, out=str(tmp_path / "f"), micro_batch=4, parallel="fsdp"))
    assert losses(tmp_path / "f") == reference[0]


def test_train_benchmark_runs_its_cases_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--tiny", "--device", "cpu", "--cases", "rat-4k,attn-4k", "--steps", "1", "--warmup", "1"]
    assert bench_main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_train.jsonl").read_text().splitlines()]
    assert [r["case"] for r in rows] == ["rat-4k", "attn-4k"] and all(r["status"] == "ok" for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 for r in rows)
    assert "RAT / attention" in capsys.readouterr().out


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """parallelize(compile=True) compiles each block's forward (Inductor on the CPU: about 30 s)."""
    import copy

    import torch

    from ratlm import LanguageModel, preset
    from ratlm.distributed import Runtime, parallelize

    torch.manual_seed(0)
    model = LanguageModel(preset("rat-tiny", layers="rat,swa", window=6, chunk_size=4, vocab_size=40))
    eager = copy.deepcopy(model)
    compiled = parallelize(model, "none", Runtime(0, 1, torch.device("cpu"), False), bf16=False, compile=True)
    ids = torch.randint(0, 40, (2, 16))
    losses = []
    for m in (compiled, eager):
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
