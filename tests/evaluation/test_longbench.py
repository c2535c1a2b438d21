"""`ratlm eval longbench` on hand-made LongBench files: LongBench's prompts and budgets, middle truncation,
batched predictions equal to one-by-one greedy generation, LongBench's file layout, resuming, and the
one-line errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ratlm.cli import main
from ratlm.evaluation import longbench as lb
from ratlm.evaluation.answers import LengthError, auto_batch_size
from ratlm.evaluation.longbench_score import TASK_NAMES
from ratlm.generation import generate
from ratlm.tokenizer import ByteTokenizer


def _sample(task, question, context, answers, length):
    return {"input": question, "context": context, "answers": answers, "all_classes": None, "length": length,
            "dataset": task, "language": "en", "_id": f"{task}-{length}"}  # fmt: skip


SAMPLES = {
    "triviaqa": [
        _sample(
            "triviaqa", "Question: Capital of France?\nAnswer:", "Question: 2+2?\nAnswer: 4", ["Paris"], 9
        ),
        _sample("triviaqa", "Question: Who wrote Hamlet?\nAnswer:", "x " * 200, ["Shakespeare"], 210),
        _sample("triviaqa", "Question: Largest ocean?\nAnswer:", "Q: a?\nA: b", ["Pacific"], 8),
    ],
    "passage_retrieval_en": [
        _sample(
            "passage_retrieval_en",
            "An abstract.",
            "Paragraph 1: one.\nParagraph 2: two.",
            ["Paragraph 2"],
            12,
        )
    ],
}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for task, samples in SAMPLES.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return folder


def test_every_task_has_longbenchs_template_budget_and_metric():
    assert list(lb.PROMPTS) == list(TASK_NAMES) == list(lb.MAX_NEW_TOKENS)
    assert lb.MAX_NEW_TOKENS["gov_report"] == 512 and lb.MAX_NEW_TOKENS["hotpotqa"] == 32
    assert lb.MAX_NEW_TOKENS["narrativeqa"] == 128 and lb.MAX_NEW_TOKENS["lcc"] == 64
    sample = {"context": "CTX", "input": "IN"}
    assert lb.build_prompt("trec", sample) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\nCTX\nIN"
    )
    assert (
        lb.build_prompt("repobench-p", sample)
        == "Please complete the code given below. \nCTXINNext line of code:\n"
    )
    assert lb.build_prompt("passage_count", sample).endswith("\n\nThe final answer is: ")
    assert "{" not in lb.build_prompt("narrativeqa", {"context": "{a}", "input": "}"}).replace("{a}", "")


def test_middle_truncation_keeps_the_first_and_last_half_of_the_budget():
    ids = list(range(10))
    assert lb.middle_truncate(ids, 4) == [0, 1, 8, 9]
    assert lb.middle_truncate(ids, 5) == [0, 1, 8, 9]  # LongBench's int(max_length / 2) on each side
    assert lb.middle_truncate(ids, 10) == ids and lb.middle_truncate(ids, 99) == ids
    with pytest.raises(ValueError, match="at least 2"):
        lb.middle_truncate(ids, 1)


def test_parse_tasks():
    assert lb.parse_tasks("all") == list(TASK_NAMES)
    assert lb.parse_tasks("lcc, trec") == ["lcc", "trec"]
    with pytest.raises(lb.LongBenchDataError, match="known tasks are: narrativeqa, qasper"):
        lb.parse_tasks("trec,nq")
    with pytest.raises(lb.LongBenchDataError, match="is Chinese"):
        lb.parse_tasks("lsht")
    with pytest.raises(lb.LongBenchDataError, match="each task once"):
        lb.parse_tasks("trec,trec")


@pytest.mark.slow
def test_predict_and_score_end_to_end(model_dir, tiny_model, data_dir, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["eval", "longbench", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out)]
    args += [
        "--tasks",
        "triviaqa,passage_retrieval_en",
        "--max-length",
        "64",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 prompts cut in the middle to 64 tokens" in printed  # the 200-word context
    assert "few-shot" in printed and "synthetic" in printed and "average of groups" in printed
    records = [json.loads(line) for line in (out / "triviaqa.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in records] == [["all_classes", "answers", "length", "pred"]] * 3
    assert [r["answers"] for r in records] == [s["answers"] for s in SAMPLES["triviaqa"]]
    assert [r["length"] for r in records] == [9, 210, 8]
    # batched with prompts of other lengths, each prediction is what greedy decoding of its own prompt gives
    tok = ByteTokenizer()
    for sample, record in zip(SAMPLES["triviaqa"], records, strict=True):
        prompt = lb.middle_truncate(tok.encode(lb.build_prompt("triviaqa", sample)), 64)
        [alone] = generate(tiny_model, [prompt], 32, temperature=0.0, stop_ids=(tok.eos_id,))
        assert record["pred"] == tok.decode(alone)
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"triviaqa", "passage_retrieval_en"}

    # a second run keeps the finished files (and scores them again); --overwrite predicts them anew
    (out / "result.json").unlink()
    assert main(args) == 0
    assert "triviaqa: kept the 3 predictions" in capsys.readouterr().out
    assert (out / "result.json").exists()
    assert main([*args, "--overwrite", "--tasks", "triviaqa", "--limit", "2"]) == 0
    assert len((out / "triviaqa.jsonl").read_text().splitlines()) == 2
    assert main([*args, "--tasks", "triviaqa"]) == 2  # 2 predictions against 3 samples: not mixed up
    assert "holds 2 predictions, the data 3" in capsys.readouterr().err


def test_default_budget_is_the_training_context_less_the_new_tokens():
    model = SimpleNamespace(config=SimpleNamespace(context=4096))
    assert lb.prompt_budget(model, "hotpotqa", None) == 4096 - 32
    assert lb.prompt_budget(model, "gov_report", None) == 4096 - 512
    assert lb.prompt_budget(model, "gov_report", 100) == 100


def test_a_prompt_that_no_memory_holds_is_refused(tiny_model):
    with pytest.raises(LengthError, match="does not fit in the memory"):
        auto_batch_size(tiny_model, 10**13, 32)
    assert 1 <= auto_batch_size(tiny_model, 100, 32) <= 32


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "narrativeqa"], "LongBench data files not found: "),
        (["--tasks", "nq"], "unknown LongBench task 'nq'; the known tasks are: narrativeqa, qasper"),
        (["--tasks", "vcsum"], "is Chinese"),
        (["--tasks", "triviaqa"], "leaves no room for a prompt before triviaqa's 32 new tokens"),
        (["--tasks", "triviaqa", "--max-length", "1"], "must be at least 2 tokens"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(model_dir, data_dir, tmp_path, capsys, extra, message):
    args = [
        "eval",
        "longbench",
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratlm eval: error:") and message in err and err.count("\n") == 1


def test_bad_data_files(model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "triviaqa.jsonl").write_text(json.dumps({"input": "q", "context": "c", "answers": ["a"]}) + "\n")
    args = ["eval", "longbench", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "--tasks", "triviaqa", "--max-length", "32", "--device", "cpu"]) == 2
    assert "triviaqa.jsonl:1: no all_classes, length" in capsys.readouterr().err
    assert main(["eval", "longbench", "--model", str(model_dir)]) == 2
    assert "predicting needs --data, --out (or --score DIR" in capsys.readouterr().err
