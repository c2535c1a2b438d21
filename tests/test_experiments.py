"""The experiment scripts (experiments/*.py) end to end at toy sizes, and the parts behind their numbers."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import harness  # noqa: E402
import length  # noqa: E402
import lm  # noqa: E402
import mqar  # noqa: E402
import prepare_corpus  # noqa: E402
import ruler  # noqa: E402
import summarize  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models gain nothing from a second thread, and lose much when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_LM = ["--device", "cpu", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "2",
           "--steps", "2", "--log-every", "1", "--eval-every", "1"]  # fmt: skip


def test_mqar_examples_pair_each_query_with_its_value():
    task = mqar.MQARTask(vocab_size=64, seq_len=48, num_pairs=5)
    batch = mqar.sample_batch(task, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    rows = zip(batch.inputs, batch.targets, batch.query_pos, batch.values, batch.distance, strict=True)
    for x, y, pos, vals, dist in rows:
        keys, values = x[0:10:2], x[1:10:2]
        assert len(set(keys.tolist())) == 5 and len(set(values.tolist())) == 5
        assert keys.max() < 32 <= values.min() and keys.min() >= 1
        assert sorted(pos.tolist()) == sorted((y != harness.IGNORE_INDEX).nonzero().flatten().tolist())
        assert (pos >= 10).all() and (pos % 2 == 0).all()
        assert torch.equal(vals, values)
        for i, p in enumerate(pos.tolist()):  # the query is the key itself, its label the key's value
            assert x[p] == keys[i] and y[p] == values[i] and dist[i] == p - 2 * i
        assert (x[10:][y[10:] == harness.IGNORE_INDEX] == 0).all()  # Zoology's figure setting: zero filler


def test_mqar_is_reproducible_from_the_seed():
    task = mqar.MQARTask(vocab_size=64, seq_len=32, num_pairs=4, random_fill=True)
    cpu = torch.device("cpu")
    a, b = (mqar.sample_batch(task, 4, torch.Generator().manual_seed(7), cpu) for _ in range(2))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    with pytest.raises(ValueError):
        mqar.MQARTask(vocab_size=64, seq_len=32, num_pairs=9)  # no room for 9 queries


def test_mqar_model_scores_the_queries_as_the_language_model_does():
    """The query-only logits and loss equal the LanguageModel's full logits and masked loss; positions other
    than the queries get no gradient; "scaled" and "untied" change only the output projection."""
    V, D = 64, 16
    task = mqar.MQARTask(vocab_size=V, seq_len=32, num_pairs=4)
    cfg = harness.ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, d_ffn=32, layers="rat,attn",
                              chunk_size=4, context=32)  # fmt: skip
    torch.manual_seed(0)
    model = mqar.MQARModel(cfg, "tied")
    batch = mqar.sample_batch(task, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    full = model.lm(batch.inputs)
    torch.testing.assert_close(model(batch.inputs), full)
    at_queries = full.gather(1, batch.query_pos[..., None].expand(-1, -1, V))
    torch.testing.assert_close(model.query_logits(batch.inputs, batch.query_pos), at_queries)
    loss = mqar.query_loss(model, batch.inputs, (batch.query_pos, batch.values))
    torch.testing.assert_close(loss, harness.masked_loss(full, batch.targets))
    logits = full.detach().requires_grad_()
    harness.masked_loss(logits, batch.targets).backward()
    assert torch.equal(logits.grad.abs().sum(-1) > 0, batch.targets != harness.IGNORE_INDEX)
    scaled = mqar.MQARModel(cfg, "scaled")
    scaled.load_state_dict(model.state_dict())
    torch.testing.assert_close(scaled(batch.inputs), full / (cfg.init_std * D**0.5))
    untied = mqar.MQARModel(cfg, "untied")
    assert sum(p.numel() for p in untied.parameters()) == model.lm.num_params() + V * D
    assert untied(batch.inputs).shape == full.shape


def test_lr_sweep_runs_its_cell_first_and_the_rest_at_its_best_rate(tmp_path):
    argv = ["--out", str(tmp_path), "--archs", "attn,rnn", "--seq-lens", "32,64", "--kv-pairs", "2,4",
            "--lrs", "1e-3,3e-3", "--lr-sweep-at", "64:4"]  # fmt: skip
    args = mqar.parse_args(argv)
    jobs = mqar.make_jobs(args)
    assert [j.name for j in jobs[:4]] == [f"{arch}_T64_K4_lr{lr}_s0" for arch in ("attn", "rnn")
                                          for lr in ("0.001", "0.003")]  # fmt: skip
    assert len(jobs) == 4 + 3 * 2 and {j.params["lr"] for j in jobs[4:]} == {"best"}
    assert jobs[4].name == "attn_T32_K2_lrbest_s0"

    def write(arch, lr, accuracy, steps, status="ok"):
        result = {"status": status, "accuracy": accuracy, "steps_run": steps}
        (tmp_path / f"{mqar.job_name(arch, 64, 4, lr, 0)}.json").write_text(json.dumps(result))

    write("attn", 1e-3, 0.995, 300)
    write("attn", 3e-3, 0.992, 200)  # both solved: the faster one wins
    write("rnn", 1e-3, 0.4, 500)
    write("rnn", 3e-3, 0.9, 500, status="timeout")  # unfinished runs do not count
    best = {j.params["arch"]: mqar.best_lr(j.params, tmp_path)[0] for j in jobs[4:]}
    assert best == {"attn": 3e-3, "rnn": 1e-3}
    with pytest.raises(SystemExit):
        mqar.parse_args([*argv[:-1], "128:4"])  # not a cell of the grid


def test_cells_replace_the_product_of_lengths_and_pairs(tmp_path):
    args = mqar.parse_args(["--out", str(tmp_path), "--archs", "attn", "--cells", "64:8,256:16,32:4"])
    assert mqar.grid_cells(args) == [(64, 8), (256, 16), (32, 4)] and args.lr_sweep_at == (64, 8)
    assert [j.name for j in mqar.make_jobs(args)][-2:] == ["attn_T256_K16_lrbest_s0", "attn_T32_K4_lrbest_s0"]
    assert "warmup" not in mqar.make_jobs(args)[0].params  # the default keeps earlier results' params
    warm = mqar.make_jobs(mqar.parse_args(["--out", str(tmp_path), "--archs", "attn", "--warmup", "0.25"]))
    assert warm[0].params["warmup"] == 0.25
    for bad in ("64:16", "64", "64:x", "0:0", "64:4,64:4"):  # T < 8 K, no K, not a number, K = 0, twice
        with pytest.raises(SystemExit):
            mqar.parse_args(["--out", str(tmp_path), "--cells", bad])
    with pytest.raises(SystemExit):  # the cells, or the product of two lists: not both
        mqar.parse_args(["--out", str(tmp_path), "--cells", "64:4", "--seq-lens", "64"])
    product = mqar.parse_args(["--out", str(tmp_path), "--seq-lens", "128"])
    assert mqar.grid_cells(product) == [(128, 16)]  # --kv-pairs defaults to 16 and 64, with T >= 8 x K


class Oracle(nn.Module):
    """Looks each token up among the key-value pairs at the start: the logits of a perfect recaller."""

    def __init__(self, task: mqar.MQARTask, wrong: bool = False):
        super().__init__()
        self.task, self.wrong = task, wrong

    def forward(self, x):
        K, V = self.task.num_pairs, self.task.vocab_size
        answer = torch.zeros_like(x)
        for i in range(K):
            j = (i + 1) % K if self.wrong else i  # "wrong": the value of the next pair instead
            answer = torch.where(x == x[:, 2 * i : 2 * i + 1], x[:, 2 * j + 1 : 2 * j + 2], answer)
        return nn.functional.one_hot(answer, V).float()


@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)])
def test_mqar_accuracy_counts_exactly_the_queries(wrong, expected):
    task = mqar.MQARTask(vocab_size=128, seq_len=64, num_pairs=4)
    result = mqar.evaluate(Oracle(task, wrong), task, 10, 4, 3, torch.device("cpu"))
    assert result["accuracy"] == expected and result["queries"] == 40
    assert sum(b["queries"] for b in result["accuracy_by_distance"].values()) == 40
    assert mqar.evaluate(Oracle(task, wrong), task, 10, 3, 3, torch.device("cpu")) == result  # same test set


@pytest.mark.parametrize("layers", ["attn", "swa", "rnn", "rat", "rat,swa"])
def test_parameter_count_matches_the_model(layers):
    cfg = harness.ModelConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=4, n_groups=2, d_ffn=40,
                              layers=layers, window=4)  # fmt: skip
    assert harness.count_params(cfg) == harness.LanguageModel(cfg).num_params()


def test_equal_parameters_across_lm_architectures():
    args = lm.parse_args(["--out", "unused"])
    counts = {arch: harness.count_params(lm.model_config(arch, args, 257)) for arch in lm.ARCHS}
    assert 20e6 < counts["attn"] < 50e6
    assert all(abs(n / counts["attn"] - 1) < 0.005 for n in counts.values()), counts


def test_flop_model_scales_as_each_mixer_should():
    cfg = harness.ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=2, d_ffn=256, layers="attn")
    attn = [harness.flops_per_token(cfg, T) for T in (256, 512)]
    rnn = [harness.flops_per_token(cfg.replace(layers="rnn"), T) for T in (256, 512)]
    rat = [harness.flops_per_token(cfg.replace(layers="rat", chunk_size=16), T) for T in (256, 512)]
    assert attn[1] - attn[0] == pytest.approx(3 * 2 * 4 * 128 * 64)  # 2 layers, 128 more keys each
    assert rnn[0] == rnn[1] and rat[1] - rat[0] == pytest.approx((attn[1] - attn[0]) * 2 / 16)
    queries_only = harness.flops_per_token(cfg, 256, logit_fraction=0.0)
    assert attn[0] - queries_only == pytest.approx(6 * 257 * 64)  # the logits, 6 FLOPs per parameter


def test_sweep_stops_before_the_deadline_and_records_timeouts(tmp_path, capsys):
    args = Namespace(out=str(tmp_path), plan=False, max_minutes=1.0)
    ran = []

    def run_one(job, limit):
        ran.append(job.name)
        if job.name == "slow":
            raise harness.Deadline("too slow")
        if job.name == "broken":
            raise FloatingPointError("training loss became nan")
        return {"value": 1}

    names = {"slow": 1.0, "broken": 1.0, "fast": 1.0, "huge": 3600.0}
    jobs = [harness.Job(name, {}, estimate) for name, estimate in names.items()]
    assert harness.run_sweep(jobs, run_one, args) == 1
    assert ran == ["slow", "broken", "fast"] and "INCOMPLETE" in capsys.readouterr().out
    assert json.loads((tmp_path / "slow.json").read_text())["status"] == "timeout"
    assert json.loads((tmp_path / "broken.json").read_text())["status"] == "error"
    assert json.loads((tmp_path / "fast.json").read_text())["value"] == 1
    assert not (tmp_path / "huge.json").exists()
    assert harness.run_sweep(jobs, run_one, args) == 1 and ran[3:] == []  # the three results are kept


def test_early_stopped_runs_are_compared_with_the_estimate_of_the_steps_they_ran():
    job = harness.Job("x", {"steps": 100}, estimate_s=25.0, step_s=0.2)
    assert harness.planned_seconds(job, {"steps_run": 40}) == pytest.approx(13.0)  # 25 - 60 x 0.2
    assert harness.planned_seconds(harness.Job("y", {}, 25.0), {"steps_run": 40}) == 25.0
    log = [{"step": 10, "seconds": 9.0}, {"step": 40, "seconds": 15.0}]  # 0.2 s per step after warm-up
    assert harness.measured_ratio(job, {"log": log, "wall_seconds": 30.0}) == pytest.approx(1.0)
    assert harness.measured_ratio(harness.Job("y", {}, 25.0), {"wall_seconds": 50.0}) == 2.0


def test_mqar_script_end_to_end_and_resumes(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--archs", "attn,rat-l16,rnn,rat-swa", "--seq-lens",
            "32", "--kv-pairs", "2,4", "--vocab", "64", "--d-model", "16", "--n-layers", "2", "--steps", "2",
            "--min-batch", "2", "--tokens-per-step", "64", "--test-examples", "4", "--window", "8",
            "--log-every", "1", "--lrs", "1e-3,3e-3"]  # fmt: skip
    assert mqar.main(argv) == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    archs = ("attn", "rat-l16", "rat-swa", "rnn")
    assert files == sorted([f"{a}_T32_K2_lr{lr}_s0.json" for a in archs for lr in ("0.001", "0.003")]
                           + [f"{a}_T32_K4_lrbest_s0.json" for a in archs])  # fmt: skip
    result = json.loads((tmp_path / "attn_T32_K2_lr0.001_s0.json").read_text())
    assert result["status"] == "ok" and 0.0 <= result["accuracy"] <= 1.0 and result["queries"] == 8
    assert len(result["log"]) == 2 and "probe_accuracy" in result["log"][0]
    assert result["estimate_seconds_for_steps_run"] <= result["estimate_seconds"]
    best = json.loads((tmp_path / "attn_T32_K4_lrbest_s0.json").read_text())
    assert best["lr_used"] in (1e-3, 3e-3) and set(best["lr_sweep_scores"]) == {"0.001", "0.003"}
    assert best["optim"]["lr"] == best["lr_used"] and best["queries"] == 16
    capsys.readouterr()
    mqar.main(argv)
    assert "12 already done, 0 to run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="results of other settings"):
        mqar.main([*argv, "--d-model", "32"])
    warm = tmp_path / "warm"
    mqar.main([*argv[2:], "--out", str(warm), "--archs", "attn", "--lrs", "1e-3", "--warmup", "0.5"])
    assert json.loads((warm / "attn_T32_K2_lr0.001_s0.json").read_text())["optim"]["warmup"] == 0.5

    # both grids in the doc: the swept one as the MQAR table, the single-rate one as the long-schedule table
    doc = tmp_path / "results.md"
    doc.write_text((EXPERIMENTS.parent / "docs" / "results.md").read_text())
    summarize.main(["--mqar", str(tmp_path), "--mqar-long", str(warm), "--doc", str(doc), "--no-plots"])
    text = doc.read_text()
    long_table = text.split("<!-- BEGIN mqar-long -->")[1].split("<!-- END mqar-long -->")[0]
    assert "| 32 | 2 | " in long_table and " steps) |" in long_table and "with 1 warm-up steps" in long_table
    assert "| 32 | 4 | " in text.split("<!-- BEGIN mqar -->")[1].split("<!-- END mqar -->")[0]


def test_a_run_out_of_time_saves_its_state_and_the_next_invocation_continues_it_exactly(tmp_path, capsys):
    argv = ["--device", "cpu", "--archs", "rat-l16", "--cells", "32:2", "--vocab", "64", "--d-model", "16",
            "--n-layers", "1", "--steps", "6", "--min-batch", "2", "--tokens-per-step", "64",
            "--test-examples", "4", "--log-every", "2", "--lrs", "1e-3", "--stop-at", "1.01"]  # fmt: skip
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert mqar.main([*argv, "--out", str(whole)]) == 0
    name = "rat-l16_T32_K2_lr0.001_s0"
    # no time at all: the run stops at its first log step (2 of 6) and saves its state
    mqar.main([*argv, "--out", str(pieces), "--max-minutes", "0"])
    assert "INCOMPLETE" in capsys.readouterr().out and not (pieces / f"{name}.json").exists()
    assert json.loads((pieces / f"{name}.partial.info").read_text())["step"] == 2
    mqar.main([*argv, "--out", str(pieces), "--plan"])
    assert "resumes at 33%" in capsys.readouterr().out
    summarize.load(pieces)  # a saved state is not mistaken for a result
    mqar.main([*argv, "--out", str(pieces)])
    assert "resuming at step 2" in capsys.readouterr().out
    done, ref = (json.loads((d / f"{name}.json").read_text()) for d in (pieces, whole))
    assert [r["loss"] for r in done["log"]] == [r["loss"] for r in ref["log"]]  # same batches, same updates
    assert done["accuracy"] == ref["accuracy"] and done["steps_run"] == 6
    assert 0 <= done["eval_seconds"] < done["wall_seconds"] and done["wall_seconds"] >= done["train_seconds"]
    assert not list(pieces.glob("*.partial.*"))  # removed once the result is written
    # a saved state of other settings under the same name is refused, not resumed: through its sidecar,
    # and without one (a crash between the two writes) by the params inside the state itself
    other = tmp_path / "other"
    mqar.main([*argv, "--out", str(other), "--max-minutes", "0"])
    with pytest.raises(SystemExit, match="saved training states of other settings"):
        mqar.main([*argv, "--out", str(other), "--steps", "8"])
    (other / f"{name}.partial.info").unlink()
    with pytest.raises(SystemExit, match="saved with params"):
        mqar.main([*argv, "--out", str(other), "--steps", "8"])
    with pytest.raises(SystemExit, match="saved with log interval 2, not 3"):
        mqar.main([*argv, "--out", str(other), "--log-every", "3"])


def fake_sources(root: Path) -> tuple[Path, Path]:
    """A 66-book King James jsonl and a folder of Gutenberg texts, a few lines each."""
    books = [*prepare_corpus.KJV_VALIDATION, *(f"Book {i}" for i in range(62))]
    lines = [json.dumps({"book": b, "chapter": 1, "verse": v, "text": f"Verse {v} of {b}."})
             for b in books for v in (1, 2)]  # fmt: skip
    (root / "kjv.jsonl").write_text("\n".join(lines) + "\n")
    texts = root / "gutenberg"
    texts.mkdir()
    (texts / "austen-persuasion.txt").write_text("[Persuasion]\r\n\r\nSir Walter Elliot.  \r\n")
    (texts / "melville-moby_dick.txt").write_bytes("Call me Ishmael. Bruneti\xe8re.\n".encode("latin-1"))
    (texts / "shakespeare-hamlet.txt").write_text("skipped: already in the Shakespeare source")
    (texts / "chesterton-ball.txt").write_text("The end.\n\nEnd of Project Gutenberg's The Ball\nlicence\n")
    return root / "kjv.jsonl", texts


def test_corpus_lm_length_and_summary_end_to_end(tmp_path):
    kjv, texts = fake_sources(tmp_path)
    data = tmp_path / "corpus"
    sources = ["--kjv", str(kjv), "--gutenberg", str(texts)]
    prepare_corpus.main(["--out", str(data), *sources, "--limit-chars", "3000"])
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 257 and [s["name"] for s in meta["sources"]] == [
        "shakespeare", "king_james_bible", "nltk_gutenberg"]  # fmt: skip
    assert meta["sources"][2]["documents"] == 3 and meta["sources"][1]["validation_documents"][0] == "Ruth"
    valid = (data / "valid.bin").read_bytes()
    assert "Persuasion".encode("utf-16-le") in valid  # a held-out work; uint16 little-endian tokens
    assert "Gutenberg" not in (data / "train.bin").read_bytes()[::2].decode("latin-1")  # footer cut

    lm_out, length_out = tmp_path / "lm", tmp_path / "length"
    lm.main(["--out", str(lm_out), "--data", str(data), "--seeds", "0", "--seq-len", "32", *TINY_LM])
    results = [json.loads(p.read_text()) for p in sorted(lm_out.glob("*.json"))]
    assert sorted(r["params"]["arch"] for r in results) == sorted(lm.ARCHS)
    for r in results:
        assert r["status"] == "ok" and 0 < r["val_bits_per_byte"] < 12 and r["val_perplexity"] > 1
    # out of time after its first log step, then continued: the same run as in one go
    pieces = tmp_path / "lm-pieces"
    one = [
        "--out",
        str(pieces),
        "--data",
        str(data),
        "--seeds",
        "0",
        "--seq-len",
        "32",
        *TINY_LM,
        "--archs",
        "rnn",
    ]
    lm.main([*one, "--max-minutes", "0"])
    assert (pieces / "rnn_s0.partial.pt").exists() and not (pieces / "rnn_s0.json").exists()
    lm.main(one)
    resumed, whole = (json.loads((d / "rnn_s0.json").read_text()) for d in (pieces, lm_out))
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in whole["log"]]
    length_args = [
        "--out",
        str(length_out),
        "--data",
        str(data),
        "--seq-len",
        "16",
        "--eval-multiples",
        "1,2",
    ]
    length.main([*length_args, *TINY_LM])
    result = json.loads((length_out / "rat-swa-nope_N16_s0.json").read_text())
    assert set(result["by_length"]) == {"16", "32"} and len(result["per_position_longest"]) == 32
    assert result["model_config"]["position"] == "nope" and result["model_config"]["window"] == 4

    doc = tmp_path / "results.md"
    doc.write_text((EXPERIMENTS.parent / "docs" / "results.md").read_text())
    summarize.main(["--lm", str(lm_out), "--length", str(length_out), "--doc", str(doc), "--no-plots"])
    text = doc.read_text()
    assert "| rat-swa | " in text and "ppl @ 32 (2N)" in text
    assert "*Not yet run.* No results in `--mqar`" in text  # the MQAR section keeps its placeholder


def test_parallel_script_runs_one_process_per_model(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable}
    script = str(EXPERIMENTS / "parallel.sh")
    tiny = ["--device", "cpu", "--cells", "32:2", "--vocab", "64", "--d-model", "16", "--n-layers", "1",
            "--steps", "1", "--min-batch", "2", "--tokens-per-step", "64", "--test-examples", "4",
            "--window", "8", "--lrs", "1e-3"]  # fmt: skip
    out = tmp_path / "mqar"
    done = subprocess.run(["bash", script, "mqar", f"{out}/", *tiny], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("every process finished its configurations")
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == sorted(f"{arch}_T32_K2_lr0.001_s0.json" for arch in mqar.ARCHS)
    assert sorted(p.stem for p in (tmp_path / "mqar-logs").glob("*.log")) == sorted(mqar.ARCHS)
    for bad in (["--archs", "attn"], ["--out=x"]):  # set per process by the script
        refused = subprocess.run(["bash", script, "mqar", str(out), *bad], capture_output=True, text=True)
        assert refused.returncode == 2 and bad[0].split("=")[0] in refused.stderr
    refused = subprocess.run(["bash", script, "nope", str(out)], capture_output=True, text=True)
    assert refused.returncode == 2 and "mqar, lm, length" in refused.stderr
    for bad in (["--lrs", "1e-3,3e-3"], ["--lrs", "1e-3", "--cells", ""]):  # --per-cell: one lr, given cells
        refused = subprocess.run(["bash", script, "mqar", str(out), "--per-cell", "--cells", "32:2", *bad],
                                 capture_output=True, text=True)  # fmt: skip
        assert refused.returncode == 2 and "single --lrs" in refused.stderr

    # --per-cell: one process per (architecture, cell), each given only its cell
    per_cell = [*tiny, "--per-cell", "--cells", "32:2,64:2"]
    out = tmp_path / "cells"
    command = ["bash", script, "mqar", str(out), *per_cell]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == sorted(f"{a}_T{t}_K2_lr0.001_s0.json" for a in mqar.ARCHS for t in (32, 64))
    logs = sorted(p.stem for p in (tmp_path / "cells-logs").glob("*.log"))
    assert logs == sorted(f"{a}-{t}-2" for a in mqar.ARCHS for t in (32, 64))


def test_ruler_fine_tuning_targets_only_the_answer_and_its_eos():
    args = ruler.parse_args(["--out", "unused", "--tiny"])
    batches = ruler.needle_batches(args, 512, 4, 0, torch.Generator().manual_seed(0))
    x, y = next(batches)
    assert x.shape == y.shape == (2, 512)
    for row, target in zip(x, y, strict=True):
        scored = (target != harness.IGNORE_INDEX).nonzero().flatten()
        first, last = scored[0].item(), scored[-1].item()
        assert (scored == torch.arange(first, last + 1)).all() and target[last] == 256  # the answer, then EOS
        answer = bytes(target[first:last].tolist()).decode()
        assert (
            answer.startswith(" ")
            and answer.endswith(".")
            and answer[1:-1] in bytes(row[:first].tolist()).decode()
        )
        assert torch.equal(
            row[first + 1 : last + 1], target[first:last]
        )  # teacher forcing: the answer is input
        prompt = bytes(row[: first + 1].tolist()).decode()
        assert prompt.endswith("mentioned in the provided text is") or prompt.endswith("provided text are")


@pytest.mark.slow
def test_ruler_experiment_end_to_end_tiny(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--tiny", "--device", "cpu", "--archs", "rat-l16,rat-swa"]
    assert ruler.main(argv) == 0
    printed = capsys.readouterr().out
    assert "DONE" in printed and "average score over tasks (trained at 512)" in printed
    result = json.loads((tmp_path / "rat-swa_N512_s0.json").read_text())
    assert result["status"] == "ok" and result["lengths"] == [512, 1024]
    assert set(result["scores"]) == {"niah_single_1", "niah_multikey_2"}
    shown = result["examples"]["niah_multikey_2@1024"]
    assert len(shown) == 1 and sorted(shown[0]) == ["answer", "outputs", "score"]
    assert len(result["pretrain"]["log"]) == 2 and len(result["finetune"]["log"]) == 2
    assert result["model_config"]["layers"] == "rat,swa" and result["training_context"] == 512
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rat-l16_N512_s0.json", "rat-swa_N512_s0.json"]
    ruler.main(argv)
    assert "2 already done, 0 to run" in capsys.readouterr().out
