"""RULER's needle tasks: RULER's templates and task shapes, seeded and reproducible samples sized to 80-100%
of their length with the model's tokenizer, RULER's string_match_all, `ratlm eval ruler` end to end, training
samples apart from the evaluation ones, and the one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ratlm.cli import main
from ratlm.corpus import load_split
from ratlm.evaluation import ruler
from ratlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NEEDLE = re.compile(r"One of the special magic (numbers|uuids|words) for (\S+) is: (\S+)\.")


@pytest.fixture(scope="module")
def samples():
    return ruler.make_samples(TOK, list(ruler.TASKS), [768, 1024], 3, max_new_tokens=48)


def test_prompts_follow_rulers_templates(samples):
    by_task = {s.task: s for s in samples if s.length == 1024}
    one = by_task["niah_single_1"].input
    assert one.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    key = NEEDLE.search(one).group(2)
    assert one.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text? The "
                        f"special magic number for {key} mentioned in the provided text is")  # fmt: skip
    assert ruler.NOISE + "\n" + ruler.NOISE in one
    many = by_task["niah_multiquery"].input
    assert many.startswith("Some special magic numbers are hidden") and many.endswith("provided text are")
    assert "What are all the special magic numbers for " in many and ", and " in many
    assert by_task["niah_single_3"].input.startswith("A special magic uuid is hidden")
    assert by_task["niah_multivalue"].input.startswith("Some special magic numbers are hidden")


@pytest.mark.parametrize(
    "task, needles, keys, asked, outputs",
    [
        ("niah_single_1", 1, 1, 1, 1),
        ("niah_single_2", 1, 1, 1, 1),
        ("niah_single_3", 1, 1, 1, 1),
        ("niah_multikey_1", 4, 4, 1, 1),
        ("niah_multivalue", 4, 1, 1, 4),
        ("niah_multiquery", 4, 4, 4, 4),
    ],
)
def test_needles_keys_and_expected_values(samples, task, needles, keys, asked, outputs):
    for sample in (s for s in samples if s.task == task):
        found = NEEDLE.findall(sample.input)
        assert len(found) == needles and len({k for _, k, _ in found}) == keys
        question = sample.input.rsplit("\n", 1)[1]
        assert sum(f" {k}" in question for k in {k for _, k, _ in found}) == asked
        key_of = {v: k for _, k, v in found}
        assert len(sample.outputs) == outputs and all(key_of[v] in question for v in sample.outputs)
        kind = ruler.TASKS[task].value_type
        for value in sample.outputs:
            assert re.fullmatch(r"\d{7}" if kind == "numbers" else r"[0-9a-f-]{36}", value)


def test_needle_haystacks_hide_the_answer_among_distractors(samples):
    for sample in (
        s for s in samples if s.task in ("niah_multikey_2", "niah_multikey_3") and s.length == 1024
    ):
        lines = sample.input.split("\n")[1:-1]  # the haystack: one needle per line
        assert len(lines) >= 4 and all(NEEDLE.fullmatch(line) for line in lines)
        query_line = sample.input.rsplit("\n", 1)[1]
        keys = [NEEDLE.fullmatch(line).group(2) for line in lines]
        answering = [line for line in lines if f" {NEEDLE.fullmatch(line).group(2)} " in query_line]
        assert len(answering) == 1 and sample.outputs[0] in answering[0] and len(set(keys)) == len(keys)
    uuid_keys = next(s for s in samples if s.task == "niah_multikey_3").input
    assert re.search(r"for [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12} is", uuid_keys)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_needles_are_spread_over_the_haystack(task):
    depths = []
    for s in ruler.make_samples(TOK, [task], [2048], 24, max_new_tokens=32):
        context = s.input.split("\n", 1)[1].rsplit("\n", 1)[0]
        found = next(m for m in NEEDLE.finditer(context) if s.outputs[0] in m.group(0))
        depths.append(found.start() / len(context))
    assert min(depths) < 0.25 and max(depths) > 0.75 and 0.25 < sum(depths) / len(depths) < 0.75


def test_the_essay_is_held_out_shakespeare(samples):
    essay = next(s for s in samples if s.task == "niah_single_2" and s.length == 1024).input
    held_out = " ".join(" ".join(load_split()[1]).split())
    body = NEEDLE.sub("", essay.split("\n")[1]).split()
    assert " ".join(body[:8]) in held_out and " ".join(body[-8:]) in held_out


def test_every_prompt_fills_80_to_100_percent_of_its_length_with_the_answer_in_it(samples):
    for s in samples:
        assert s.tokens == len(TOK.encode(s.input))
        assert 0.8 * s.length <= s.tokens <= s.length - 48
        assert all(value in s.input for value in s.outputs)


def test_sizes_with_a_subword_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ratlm.tokenizer import load_tokenizer

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(load_split()[1][0][:20000].split("\n") + [ruler.NOISE, ruler.TEMPLATE], trainer)
    bpe.save(str(tmp_path / "bpe.json"))
    tok = load_tokenizer(tmp_path / "bpe.json")
    made = ruler.make_samples(tok, list(ruler.TASKS), [1000, 2000], 2, max_new_tokens=32)
    for s in made:
        assert s.tokens == len(tok.encode(s.input)) and 0.8 * s.length <= s.tokens <= s.length - 32
        assert len(TOK.encode(s.input)) > 1.2 * s.tokens  # sized in BPE tokens, not bytes


def test_samples_are_seeded_and_the_training_split_is_apart():
    args = (TOK, ["niah_single_2", "niah_multikey_2"], [512], 4)
    first, again = ruler.make_samples(*args, max_new_tokens=32), ruler.make_samples(*args, max_new_tokens=32)
    assert [s.as_dict() for s in first] == [s.as_dict() for s in again]
    # a sample does not depend on how many others are made with it
    assert (
        ruler.make_samples(TOK, ["niah_multikey_2"], [512], 2, max_new_tokens=32)[1].input == first[5].input
    )
    other_seed = ruler.make_samples(*args, seed=1, max_new_tokens=32)
    train = ruler.make_samples(*args, split="train", max_new_tokens=32)
    for other in (other_seed, train):
        assert not {s.input for s in first} & {s.input for s in other}
        assert not {v for s in first for v in s.outputs} & {v for s in other for v in s.outputs}
    held_out = " ".join(" ".join(load_split()[1]).split())
    essay = NEEDLE.sub("", train[0].input.split("\n")[1]).split()
    assert " ".join(essay[5:15]) not in held_out  # training samples take their essay from the other works
    assert train[0].answer == f" {train[0].outputs[0]}."
    multi = ruler.NeedleSample("t", 1, "", ["1", "2", "3"], 1)
    assert multi.answer == " 1, 2, and 3."


def test_string_match_all_counts_the_share_of_values_found():
    assert ruler.string_match_all(
        "The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]
    ) == (pytest.approx(2 / 3))
    assert ruler.string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert ruler.string_match_all("", ["1"]) == 0.0
    assert ruler.postprocess("  7\x00 is\tit \n") == "7\n is\nit"


def test_scores_are_rulers_mean_times_100(monkeypatch, tiny_model):
    """With a model answering every other sample right, each task scores 50."""
    made = []

    def answers(model, prompts, max_new_tokens, eos_id, batch_size, progress, desc):
        batch = [s for s in made if len(TOK.encode(s.input)) in map(len, prompts)]
        assert len(batch) == len(prompts)
        return [TOK.encode(s.answer if i % 2 else "no idea") for i, s in enumerate(batch)]

    real = ruler.make_samples
    monkeypatch.setattr(ruler, "make_samples", lambda *a: made.extend(real(*a)) or made)
    monkeypatch.setattr(ruler, "greedy_answers", answers)
    seen = []
    result = ruler.evaluate_ruler(tiny_model, TOK, ["niah_multivalue"], [1024], 4, max_new_tokens=48,
                                  on_sample=lambda s, answer, score: seen.append(score))  # fmt: skip
    assert seen == [0.0, 1.0, 0.0, 1.0] and result["scores"] == {"niah_multivalue": {"1024": 50.0}}
    assert result["average"] == {"1024": 50.0} and result["training_context"] == 16


@pytest.mark.slow
def test_ruler_end_to_end(model_dir, tmp_path, capsys):
    out, saved = tmp_path / "ruler.json", tmp_path / "samples.jsonl"
    args = ["eval", "ruler", "--model", str(model_dir), "--tasks", "niah_single_1,niah_multikey_3"]
    args += ["--samples", "2", "--lengths", "768,512", "--max-new-tokens", "16", "--device", "cpu"]
    args += ["--out", str(out), "--save-samples", str(saved)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (
        "niah_multikey_3" in printed
        and "average" in printed
        and f"wrote {out.with_suffix('.png')}" in printed
    )
    result = json.loads(out.read_text())
    assert result["lengths"] == [512, 768] and set(result["scores"]) == {"niah_single_1", "niah_multikey_3"}
    for task in result["scores"]:
        assert all(0 <= result["scores"][task][n] <= 100 for n in ("512", "768"))
    assert result["model"] == str(model_dir) and result["samples"] == 2
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 8 and all(sorted(r) == ["input", "length", "outputs", "task"] for r in rows)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_make_training_samples(model_dir, tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    args = ["eval", "ruler", "--tokenizer", "byte", "--tasks", "niah_single_2", "--lengths", "512"]
    args += ["--samples", "3", "--max-new-tokens", "32", "--make-samples", str(path), "--split", "train"]
    assert main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["answer"] == f" {r['outputs'][0]}." for r in rows)
    assert "wrote 3 train samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--tasks", "niah_single_9"],
            "unknown RULER task 'niah_single_9'; the known tasks are: niah_single_1",
        ),
        (["--lengths", "100"], "length 100 is too short for 128 new tokens"),
        (["--lengths", "300", "--max-new-tokens", "16"], "length 300 cannot hold niah_multikey_1"),
        (["--lengths", "1000000000000"], "does not fit in the memory"),
        (["--lengths", "512", "--split", "train"], "--split train only makes training samples"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(model_dir, tmp_path, capsys, extra, message):
    args = ["eval", "ruler", "--model", str(model_dir), "--device", "cpu", "--out", str(tmp_path / "r.json")]
    args += ["--tasks", "niah_multikey_1", "--samples", "1", "--no-plot", "--lengths", "1024"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratlm eval: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def test_bad_lengths_are_refused_by_the_parser(model_dir, capsys):
    for bad in ("0,512", "a,b", "512,512"):
        with pytest.raises(SystemExit):
            main(["eval", "ruler", "--model", str(model_dir), "--lengths", bad, "--out", "x.json"])
        assert "--lengths" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ruler_and_longbench_on_cuda(model_dir, tmp_path, capsys):
    """The batched generation (ragged prefill, CUDA-graph decode, EOS stops) on a GPU, in bf16."""
    out = tmp_path / "ruler.json"
    args = ["eval", "ruler", "--model", str(model_dir), "--lengths", "768,1536", "--samples", "4"]
    args += ["--max-new-tokens", "16", "--device", "cuda", "--dtype", "bf16", "--out", str(out), "--no-plot"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["scores"]) == set(ruler.TASKS) and result["lengths"] == [768, 1536]
    data = tmp_path / "data"
    data.mkdir()
    sample = {"input": "Q?", "context": "c " * 500, "answers": ["a"], "all_classes": None, "length": 1}
    (data / "triviaqa.jsonl").write_text((json.dumps(sample) + "\n") * 5)
    args = ["eval", "longbench", "--model", str(model_dir), "--data", str(data), "--tasks", "triviaqa"]
    assert main([*args, "--out", str(tmp_path / "lb"), "--max-length", "600", "--device", "cuda"]) == 0
    assert len((tmp_path / "lb" / "triviaqa.jsonl").read_text().splitlines()) == 5
