"""LongBench's scores for the English and code tasks, computed as its `eval.py` computes them.

A prediction folder holds `<dataset>.jsonl` files, one record per sample with `pred` (the model's text),
`answers` (the reference answers) and `all_classes` (the class names of a classification task, else null);
`length` is carried along but not scored here. A dataset's score is the mean, over its samples, of the best
metric value over the reference answers, times 100, rounded to two decimals. The metrics follow LongBench's
definitions (its `metrics.py`), quirks included, so that the numbers are LongBench's:

- QA F1: token F1 after normalisation (lower case, ASCII punctuation removed, the articles a/an/the
  dropped, whitespace collapsed);
- ROUGE-L: the F score of the `rouge` package's "rouge-l" (what LongBench calls), 0 when it fails, e.g. on
  an empty prediction;
- classification: the classes named in the prediction, less those that are a proper substring of the
  reference (LongBench removes them from the list it is walking, so the class after each removed one is
  never looked at); 1 / (classes left) if the reference is among them, else 0;
- passage retrieval: the share of the numbers in the prediction that equal the reference's paragraph
  number; passage count: the share equal to the reference count;
- code similarity: fuzzywuzzy's `fuzz.ratio` of the prediction's first line that holds no "`", "#" or "//"
  and the reference, divided by 100. LongBench installs fuzzywuzzy without python-Levenshtein, which makes
  it difflib's `SequenceMatcher` ratio rounded to a whole percent (equal strings 100, an empty one 0):
  computed here with difflib directly, no package needed.

trec, triviaqa and samsum are scored on the prediction's first line (after leading newlines), as LongBench
does. Each record is scored with its own `all_classes` (LongBench takes them from a file's last record; in
the published data they are the same for every record of a dataset).
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .jsonl import is_string_list, read_jsonl

# LongBench v1's groups (its leaderboard's columns), English and code tasks, in LongBench's order
GROUPS: dict[str, tuple[str, ...]] = {
    "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en"),
    "multi-doc QA": ("hotpotqa", "2wikimqa", "musique"),
    "summarisation": ("gov_report", "qmsum", "multi_news"),
    "few-shot": ("trec", "triviaqa", "samsum"),
    "synthetic": ("passage_count", "passage_retrieval_en"),
    "code": ("lcc", "repobench-p"),
}
TASK_NAMES: tuple[str, ...] = tuple(t for tasks in GROUPS.values() for t in tasks)
CHINESE_TASKS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum")
RESULT_FILE = "result.json"


class PredictionError(ValueError):
    """A prediction folder or file that cannot be scored."""


def unknown_task_message(name: str) -> str:
    if name in CHINESE_TASKS:
        return (
            f"LongBench task {name!r} is Chinese, which ratlm does not score (LongBench segments it with "
            f"jieba); the known tasks are: {', '.join(TASK_NAMES)}"
        )
    return f"unknown LongBench task {name!r}; the known tasks are: {', '.join(TASK_NAMES)}"


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no ASCII punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, all_classes=None) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_l(prediction: str, reference: str, all_classes=None) -> float:
    try:
        from rouge import Rouge
    except ImportError as e:
        raise ImportError("LongBench's ROUGE-L needs the rouge package: pip install 'ratlm[eval]'") from e
    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # LongBench scores any failure (empty or unsplittable text, deep recursion) as 0
        return 0.0


def classification(prediction: str, reference: str, all_classes=None) -> float:
    if all_classes is None:
        raise PredictionError("a classification task needs all_classes (the class names) in every record")
    named = [name for name in all_classes if name in prediction]
    # walk the list while removing from it, as LongBench's for-loop does: after a removal the next element
    # moves into the current slot and the walk steps past it
    i = 0
    while i < len(named):
        if named[i] in reference and named[i] != reference:
            named.remove(named[i])
        i += 1
    return 1.0 / len(named) if reference in named else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def passage_retrieval(prediction: str, reference: str, all_classes=None) -> float:
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise PredictionError(f"a passage-retrieval answer must name 'Paragraph N', got {reference!r}")
    return _number_share(prediction, found[0])


def passage_count(prediction: str, reference: str, all_classes=None) -> float:
    return _number_share(prediction, str(reference))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` without python-Levenshtein: difflib's ratio in whole percent."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_similarity(prediction: str, reference: str, all_classes=None) -> float:
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if not any(mark in line for mark in ("`", "#", "//"))), "")
    return fuzz_ratio(first, reference) / 100


Metric = Callable[..., float]
METRICS: dict[str, Metric] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en"), qa_f1),
    **dict.fromkeys(("hotpotqa", "2wikimqa", "musique", "triviaqa"), qa_f1),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), rouge_l),
    "trec": classification,
    "passage_count": passage_count,
    "passage_retrieval_en": passage_retrieval,
    **dict.fromkeys(("lcc", "repobench-p"), code_similarity),
}


def score_sample(task: str, prediction: str, answers: Sequence[str], all_classes=None) -> float:
    """The best metric value over the reference answers (0 with none), before the x100."""
    if task in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[task]
    return max([0.0, *(metric(prediction, answer, all_classes=all_classes) for answer in answers)])


def score_task(task: str, records: Sequence[dict]) -> float:
    """A dataset's LongBench score: 100 x the mean sample score, rounded to two decimals."""
    if task not in METRICS:
        raise PredictionError(unknown_task_message(task))
    if not records:
        raise PredictionError(f"no predictions for {task}")
    total = sum(score_sample(task, r["pred"], r["answers"], r.get("all_classes")) for r in records)
    return round(100 * total / len(records), 2)


def read_predictions(path: Path) -> list[dict]:
    """The records of one prediction file, each checked for `pred` (text) and `answers` (list of text)."""
    records = []
    for number, record in read_jsonl(path, PredictionError):
        if not isinstance(record.get("pred"), str):
            raise PredictionError(f"{path}:{number}: no 'pred' text")
        if not is_string_list(record.get("answers")):
            raise PredictionError(f"{path}:{number}: 'answers' must be a list of strings")
        if record.get("all_classes") is not None and not is_string_list(record["all_classes"]):
            raise PredictionError(f"{path}:{number}: 'all_classes' must be null or a list of strings")
        records.append(record)
    if not records:
        raise PredictionError(f"{path} holds no predictions")
    return records


def score_folder(folder: str | Path, write: bool = True) -> dict[str, float]:
    """Score every `<dataset>.jsonl` in a prediction folder; writes `folder/result.json` ({dataset: score},
    in LongBench's task order) unless write=False."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"prediction folder {folder} not found")
    files = {path.stem: path for path in folder.glob("*.jsonl")}
    if not files:
        raise PredictionError(f"{folder} holds no <dataset>.jsonl prediction files")
    unknown = sorted(set(files) - set(METRICS))
    if unknown:
        raise PredictionError(f"{files[unknown[0]]}: {unknown_task_message(unknown[0])}")
    scores = {task: score_task(task, read_predictions(files[task])) for task in TASK_NAMES if task in files}
    if write:
        path = folder / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(scores, indent=4) + "\n", encoding="utf-8")
        tmp.replace(path)
    return scores


def group_averages(scores: dict[str, float]) -> dict[str, float]:
    """The mean score of each group with at least one scored task, and "average": the mean of the group
    means (LongBench's leaderboard average)."""
    groups = {}
    for group, tasks in GROUPS.items():
        present = [scores[t] for t in tasks if t in scores]
        if present:
            groups[group] = sum(present) / len(present)
    if groups:
        groups["average"] = sum(groups.values()) / len(groups)
    return groups


def format_table(scores: dict[str, float]) -> str:
    """A plain-text table: every scored task under its group, each group's mean and the overall average."""
    groups = group_averages(scores)
    width = max(len(t) for t in [*TASK_NAMES, *GROUPS])
    lines = [f"{'task':<{width}}  score"]
    for group, tasks in GROUPS.items():
        present = [t for t in tasks if t in scores]
        if not present:
            continue
        lines += [f"  {t:<{width - 2}}  {scores[t]:6.2f}" for t in present]
        lines.append(f"{group:<{width}}  {groups[group]:6.2f}")
    if groups:
        lines.append(f"{'average of groups':<{width}}  {groups['average']:6.2f}")
    return "\n".join(lines)
