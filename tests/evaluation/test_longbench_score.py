"""LongBench's metrics on hand-made predictions: values worked out by hand from LongBench's definitions, a
small independent reimplementation as a cross-check, whole folders, and the errors."""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from ratlm.cli import main
from ratlm.evaluation import longbench_score as lb


def test_qa_f1_normalises_case_punctuation_articles_and_spaces():
    # "the eiffel tower in paris" -> [eiffel, tower, in, paris] against [eiffel, tower]: P 1/2, R 1
    assert lb.qa_f1("The Eiffel Tower, in Paris!", "Eiffel tower") == pytest.approx(2 / 3)
    assert lb.normalize_answer("  An apple a day, THE banana  ") == "apple day banana"
    assert lb.normalize_answer("Anna's theatre") == "annas theatre"  # articles only as whole words
    assert lb.qa_f1("no overlap", "something else") == 0.0
    assert lb.qa_f1("", "answer") == 0.0 and lb.qa_f1("the", "a") == 0.0  # nothing left after normalising
    # repeated tokens count as a multiset: "a b b" vs "b b b" shares two b's: P 2/3, R 2/3
    assert lb.token_f1(["a", "b", "b"], ["b", "b", "b"]) == pytest.approx(2 / 3)


def test_classification_keeps_longbenchs_walk_over_the_list_it_removes_from():
    classes = ["Lo", "Loc", "Location", "Animal"]
    # named: Lo, Loc, Location. LongBench removes "Lo" (a proper substring of the reference), then steps
    # past "Loc", which moved into its slot: two classes stay, the reference among them
    assert lb.classification("Lo Loc Location", "Location", all_classes=classes) == 0.5
    assert lb.classification("it is an Animal", "Animal", all_classes=classes) == 1.0
    # "Lo", "Loc" and "Location" are named too (as substrings) and none is part of "Animal": 1 / 4
    assert lb.classification("Animal or Location?", "Animal", all_classes=classes) == 0.25
    assert lb.classification("no class named", "Animal", all_classes=classes) == 0.0  # no fuzzy fallback
    with pytest.raises(lb.PredictionError, match="all_classes"):
        lb.classification("Animal", "Animal", all_classes=None)


def test_retrieval_count_and_code_similarity():
    assert lb.passage_retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert lb.passage_retrieval("Paragraph 12, or maybe Paragraph 3", "Paragraph 12") == 0.5
    assert lb.passage_retrieval("I do not know", "Paragraph 12") == 0.0
    with pytest.raises(lb.PredictionError, match="Paragraph N"):
        lb.passage_retrieval("1", "12")
    assert lb.passage_count("There are 7 unique paragraphs, 7 in all out of 9", "7") == pytest.approx(2 / 3)
    # the first line without a backtick, "#" or "//" is compared: here it equals the reference
    assert lb.code_similarity("\n# comment\n    return x + 1\nnext()", "    return x + 1") == 1.0
    assert lb.code_similarity("```\n// only marked lines", "x = 1") == 0.0  # no line left: ""
    # difflib: "abcd" vs "abce" match on "abc": 2 x 3 / 8 = 75%
    assert lb.code_similarity("abcd", "abce") == 0.75
    # 2 x 2 / 7 = 57.14% -> 57 (fuzzywuzzy rounds to whole percent)
    assert lb.fuzz_ratio("abc", "axbyz") == round(100 * 4 / 8) and lb.fuzz_ratio("ab", "abxyz") == 57
    assert lb.fuzz_ratio("", "") == 100 and lb.fuzz_ratio("", "a") == 0


def test_rouge_l_is_the_rouge_packages_f_score():
    pytest.importorskip("rouge")
    # LCS of "the cat sat on a mat" and "the cat is on a mat" is 5 words of 6: P = R = F = 5/6
    assert lb.rouge_l("the cat sat on a mat", "the cat is on a mat") == pytest.approx(5 / 6, abs=1e-6)
    # the package counts distinct words (its "exclusive" n-gram sets): with "the" twice, 4 of 5
    assert lb.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(4 / 5, abs=1e-6)
    assert lb.rouge_l("", "the cat") == 0.0  # the package refuses an empty hypothesis: LongBench scores 0


def test_first_line_only_for_trec_triviaqa_and_samsum():
    assert lb.score_sample("triviaqa", "\n\nParis\nLondon is big", ["London"]) == 0.0
    assert lb.score_sample("hotpotqa", "\n\nParis\nLondon is big", ["London"]) > 0.0
    # best over the answers: "rome" matches the second one exactly
    assert lb.score_sample("triviaqa", "Rome", ["Paris", "rome"]) == 1.0
    assert lb.score_sample("triviaqa", "Rome", []) == 0.0


# --- an independent, literal reading of LongBench's definitions, as a cross-check -------------------------


def _reference_f1(prediction: str, truth: str) -> float:
    def norm(s):
        s = s.lower()
        s = "".join(c for c in s if c not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return s.split()

    p, t = norm(prediction), norm(truth)
    common = sum(min(p.count(w), t.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def _reference_classification(prediction: str, truth: str, classes: list[str]) -> float:
    matches = [c for c in classes if c in prediction]
    for m in matches:  # Python's own walk over a list that shrinks under it, as in LongBench
        if m in truth and m != truth:
            matches.remove(m)
    return 1.0 / len(matches) if truth in matches else 0.0


def test_metrics_agree_with_an_independent_reading_on_random_predictions():
    rng = random.Random(0)
    words = ["the", "a", "An", "cat", "Cat,", "dog", "dogs", "sat", "mat!", "on", "'quoted'", "x-ray"]
    classes = ["A", "AB", "ABC", "B", "BC", "C", "CA"]
    for _ in range(500):
        pred = " ".join(rng.choices(words, k=rng.randint(0, 8)))
        truth = " ".join(rng.choices(words, k=rng.randint(1, 5)))
        assert lb.qa_f1(pred, truth) == pytest.approx(_reference_f1(pred, truth))
        named = "".join(rng.choices("ABC ", k=rng.randint(0, 8)))
        label = rng.choice(classes)
        expected = _reference_classification(named, label, classes)
        assert lb.classification(named, label, all_classes=classes) == expected


# --- folders --------------------------------------------------------------------------------------------


def _write(folder, task, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(pred, answers, classes=None):
    return {"pred": pred, "answers": answers, "all_classes": classes, "length": 100}


def test_score_folder_writes_result_json_and_the_table_has_group_averages(tmp_path, capsys):
    out = tmp_path / "pred"
    # triviaqa: 1 (first line "Paris") and 0.5 ("answer is rome" against "rome": P 1/3, R 1) -> 75.00
    _write(
        out, "triviaqa", [_record("Paris\nLondon", ["Paris"]), _record("\n\nthe answer is rome", ["Rome"])]
    )
    # trec: 1 and 1/2 -> 75.00
    classes = ["Animal", "Location", "Entity"]
    _write(
        out, "trec", [_record("Animal", ["Animal"], classes), _record("Entity Location", ["Entity"], classes)]
    )
    # passage_retrieval_en: 1, 0, 1/3 -> 44.44
    retrieval = [("Paragraph 3", "Paragraph 3"), ("none", "Paragraph 1"), ("1 2 3", "Paragraph 2")]
    _write(out, "passage_retrieval_en", [_record(pred, [truth]) for pred, truth in retrieval])
    assert main(["eval", "longbench", "--score", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result == {"trec": 75.0, "triviaqa": 75.0, "passage_retrieval_en": 44.44}
    assert list(result) == ["trec", "triviaqa", "passage_retrieval_en"]  # LongBench's task order
    table = capsys.readouterr().out
    assert "few-shot" in table and "75.00" in table and "synthetic" in table and "44.44" in table
    assert "average of groups" in table and f"{(75.0 + 44.44) / 2:6.2f}" in table
    assert lb.group_averages(result) == pytest.approx({"few-shot": 75.0, "synthetic": 44.44,
                                                       "average": (75.0 + 44.44) / 2})  # fmt: skip


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("triviaqa", ['{"answers": ["a"], "all_classes": null}'], "no 'pred' text"),
        ("triviaqa", ['{"pred": "a", "all_classes": null}'], "'answers' must be a list of strings"),
        ("triviaqa", ["{not json"], "not valid JSON"),
        ("triviaqa", [""], "holds no predictions"),
        ("trec", ['{"pred": "a", "answers": ["a"], "all_classes": null}'], "needs all_classes"),
        (
            "nq",
            ['{"pred": "a", "answers": ["a"]}'],
            "unknown LongBench task 'nq'; the known tasks are: narrativeqa",
        ),
        ("dureader", ['{"pred": "a", "answers": ["a"]}'], "is Chinese"),
    ],
)
def test_bad_prediction_files_give_one_line_errors(tmp_path, capsys, name, lines, message):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["eval", "longbench", "--score", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratlm eval: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "result.json").exists()


def test_score_errors_for_missing_or_empty_folders(tmp_path, capsys):
    assert main(["eval", "longbench", "--score", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "longbench", "--score", str(tmp_path)]) == 2
    assert "no <dataset>.jsonl prediction files" in capsys.readouterr().err
    assert main(["eval", "longbench", "--score", str(tmp_path), "--model", "m"]) == 2
    assert "takes no --model" in capsys.readouterr().err
