"""The lm-evaluation-harness backend: log-likelihoods equal the model's own, generation stops at the stop
strings, and a local YAML task runs through lm_eval.simple_evaluate and the command line, offline."""

from __future__ import annotations

import functools
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from ratlm.evaluation import harness  # noqa: E402
from ratlm.evaluation.harness import RatLM  # noqa: E402

try:
    from ratlm.generation import generate
except ImportError:  # ratlm before generate.py became generation.py
    from ratlm.generate import generate

EOS = 256
TASKS = {
    "tiny_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],
    },
    "tiny_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "bits_per_byte"}, {"metric": "word_perplexity"}],
    },
    "tiny_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}
ROWS = {
    "tiny_mc": [
        {"question": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0},
        {"question": "Cats say", "choices": [" woof", " meow", " moo"], "answer": 1},
    ],
    "tiny_ppl": [{"text": "To be, or not to be."}, {"text": "All the world's a stage."}],
    "tiny_gen": [{"question": "Q: 1+1?\nA:", "answer": " 2"}],
}


@pytest.fixture(scope="module")
def lm(model_dir):
    return RatLM(pretrained=str(model_dir), device="cpu", batch_size=3, max_length=64)


def log_prob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids[:, :-1])[0].log_softmax(-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(float(logprobs[p, t]) for p, t in zip(positions, continuation, strict=True))


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_is_the_models_log_probability(lm, tiny_model):
    pairs = [("To be", ", or not"), ("", "abc"), ("x" * 70, "yz"), ("Now is", " the winter")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (score, _) in zip(pairs, got, strict=True):
        ids = [EOS] if not context else list(context.encode())
        whole = (ids + list(continuation.encode()))[-65:]  # max_length 64 inputs, one target beyond
        cut = len(whole) - len(continuation.encode())
        assert score == pytest.approx(log_prob(tiny_model, whole[:cut], whole[cut:]), abs=1e-4)
    greedy = generate(tiny_model, [[1, 2, 3]], 4, temperature=0)[0]
    results = lm._loglikelihood_tokens([((None, None), [1, 2, 3], greedy), ((None, None), [1, 2, 3], [7, 7])])
    assert [is_greedy for _, is_greedy in results] == [True, greedy == [7, 7]]


def test_rolling_loglikelihood_scores_each_token_once(lm, tiny_model):
    short, long = "To be, or not to be.", "All the world's a stage, and all the men and women merely players."
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in (short, long)])
    assert got[0] == pytest.approx(log_prob(tiny_model, [EOS], list(short.encode())), abs=1e-4)
    windows = get_rolling_token_windows(list(long.encode()), EOS, max_seq_len=64, context_len=1)
    expected = sum(log_prob(tiny_model, c, x) for c, x in map(make_disjoint_window, windows))
    assert len(long.encode()) > 64 and got[1] == pytest.approx(expected, abs=1e-3)


def test_generation_stops_at_the_stop_string(lm, tiny_model, monkeypatch):
    prompt = "Now is the winter"
    sampled = generate(tiny_model, [list(prompt.encode())], 20, temperature=1.0, stop_ids=[EOS], seed=lm.seed)
    text = bytes(t for t in sampled[0] if t != EOS).decode("utf-8", errors="replace")
    stop = text[5:7]
    kwargs = {"until": [stop], "max_gen_toks": 20, "do_sample": True, "temperature": 1.0}
    (out,) = lm.generate_until([request("generate_until", prompt, kwargs)])
    assert out == text[: text.find(stop)]

    # Rounds of 2, 4, 8, ... tokens add up to one uninterrupted greedy run.
    monkeypatch.setattr(harness, "FIRST_ROUND", 2)
    greedy = generate(tiny_model, [list(prompt.encode())], 11, temperature=0, stop_ids=[EOS])[0]
    (out,) = lm.generate_until([request("generate_until", prompt, {"until": ["never"], "max_gen_toks": 11})])
    assert out == bytes(t for t in greedy if t != EOS).decode("utf-8", errors="replace")


def write_tasks(directory) -> None:
    for name, spec in TASKS.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[name]))
        source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
        config = {"task": name, **source, "test_split": "test", **spec}
        (directory / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML


@pytest.fixture
def quick_lm_eval(monkeypatch):
    """lm-eval without its two slow extras: indexing its thousands of built-in tasks, and an environment
    report that runs pip and nvidia-smi."""
    from lm_eval import evaluator, tasks

    monkeypatch.setattr(tasks, "TaskManager", functools.partial(tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr(evaluator, "add_env_info", lambda results: None)


def test_local_tasks_through_simple_evaluate(model_dir, tmp_path, tiny_model, quick_lm_eval):
    write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="ratlm",
        model_args=f"pretrained={model_dir},max_length=64",
        tasks=list(TASKS),
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)),
        device="cpu",
        batch_size=4,
    )
    results = out["results"]
    texts = [row["text"] for row in ROWS["tiny_ppl"]]
    loglik = sum(log_prob(tiny_model, [EOS], list(t.encode())) for t in texts)
    bits_per_byte = -loglik / (sum(len(t.encode()) for t in texts) * math.log(2))
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-4)
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1 and "exact_match,none" in results["tiny_gen"]


def test_lm_eval_command_line(model_dir, tmp_path, quick_lm_eval):
    from ratlm.cli import main

    write_tasks(tmp_path)
    args = ["--model", "ratlm", "--model_args", f"pretrained={model_dir}", "--tasks", "tiny_ppl"]
    args += ["--include_path", str(tmp_path), "--device", "cpu", "--output_path", str(tmp_path / "out")]
    assert main(["eval", "harness", *args]) == 0
    (written,) = tmp_path.joinpath("out").rglob("results_*.json")
    assert "bits_per_byte,none" in json.loads(written.read_text())["results"]["tiny_ppl"]
