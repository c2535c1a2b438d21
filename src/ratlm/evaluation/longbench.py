"""LongBench v1 (English and code tasks) on ratlm: prompts, middle truncation, batched greedy predictions.

Reads LongBench's JSONL files as published (`<dataset>.jsonl`, one sample per line with `input`, `context`,
`answers`, `all_classes`, `length`, `dataset`), builds each prompt from LongBench's own template for the task,
cuts prompts longer than the budget in the middle (the first half and the last half of the budget, in
tokens, as LongBench's `pred.py` does), answers greedily with up to the task's own number of new tokens (EOS
ends an answer earlier), and writes `<out>/<dataset>.jsonl` in LongBench's layout (`pred`, `answers`,
`all_classes`, `length`), which `ratlm.evaluation.longbench_score` scores.

The templates and token budgets are LongBench v1's `config/dataset2prompt.json` and
`config/dataset2maxlen.json`, verbatim (the narrativeqa template's "asconcisely" included). Prompts are
encoded without BOS, as ratlm encodes every text; LongBench's chat wrappers do not apply to base models.
The default budget is the model's training context less the task's new tokens, so that prompt and answer
fit the context the model was trained on; `max_length` sets it instead (LongBench's `model2maxlen`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .answers import greedy_answers
from .jsonl import is_string_list, read_jsonl, write_jsonl
from .longbench_score import TASK_NAMES, unknown_task_message

# LongBench v1's config/dataset2prompt.json (the English and code tasks)
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
        "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer '
        "the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, "
        'write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:'
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:"
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:"
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the "
        "report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
        "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. "
        "\n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of "
        "questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some "
        "examples.\n\n{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in "
        "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
        "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe "
        "final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter "
        'the number of the paragraph that the abstract is from. The answer format must be like "Paragraph '
        '1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
# LongBench v1's config/dataset2maxlen.json: new tokens per answer
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}
FIELDS = ("input", "context", "answers", "all_classes", "length")  # what a data record must hold


class LongBenchDataError(ValueError):
    """LongBench data that cannot be read, or settings that do not fit it."""


def parse_tasks(text: str) -> list[str]:
    """A comma-separated list of task names ("all": every English and code task), each known, no repeats."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASK_NAMES)
    for name in names:
        if name not in PROMPTS:
            raise LongBenchDataError(unknown_task_message(name))
    if not names or len(set(names)) < len(names):
        raise LongBenchDataError(f"--tasks must name each task once, got {text!r}")
    return names


def data_file(data_dir: str | Path, task: str) -> Path:
    return Path(data_dir) / f"{task}.jsonl"


def read_samples(path: str | Path, limit: int | None = None) -> list[dict]:
    """The samples of a LongBench data file (the first `limit` ones), each checked for LongBench's fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LongBench data file {path} not found")
    samples = []
    for number, sample in read_jsonl(path, LongBenchDataError):
        if limit is not None and len(samples) == limit:
            break
        missing = [k for k in FIELDS if k not in sample]
        if missing:
            raise LongBenchDataError(
                f"{path}:{number}: no {', '.join(missing)} (LongBench's fields: {', '.join(FIELDS)})"
            )
        if not isinstance(sample["input"], str) or not isinstance(sample["context"], str):
            raise LongBenchDataError(f"{path}:{number}: 'input' and 'context' must be strings")
        if not is_string_list(sample["answers"]):
            raise LongBenchDataError(f"{path}:{number}: 'answers' must be a list of strings")
        samples.append(sample)
    if not samples:
        raise LongBenchDataError(f"{path} holds no samples")
    return samples


def build_prompt(task: str, sample: dict) -> str:
    """LongBench's prompt for one sample: the task's template filled with its context and input."""
    return PROMPTS[task].format(context=sample["context"], input=sample["input"])


def middle_truncate(ids: Sequence[int], budget: int) -> list[int]:
    """ids as they are if they fit in budget, else the first budget // 2 and the last budget // 2 of them."""
    if budget < 2:
        raise ValueError(f"a prompt budget must be at least 2 tokens, got {budget}")
    if len(ids) <= budget:
        return list(ids)
    half = budget // 2
    return list(ids[:half]) + list(ids[len(ids) - half :])


def prompt_budget(model, task: str, max_length: int | None) -> int:
    """Prompt tokens allowed for a task: max_length, else the training context less the task's new tokens."""
    if max_length is not None:
        budget = max_length
    else:
        budget = model.config.context - MAX_NEW_TOKENS[task]
        if budget < 2:
            raise LongBenchDataError(
                f"the model's training context ({model.config.context} tokens) leaves no room for a prompt "
                f"before {task}'s {MAX_NEW_TOKENS[task]} new tokens: give a prompt budget (--max-length)"
            )
    if budget < 2:
        raise LongBenchDataError(f"the prompt budget (--max-length) must be at least 2 tokens, got {budget}")
    return budget


@dataclass
class TaskPredictions:
    task: str
    records: list[dict]  # LongBench's layout: pred, answers, all_classes, length
    truncated: int  # prompts cut in the middle
    budget: int  # prompt tokens allowed


def predict_task(
    model,
    tokenizer,
    task: str,
    samples: Sequence[dict],
    max_length: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> TaskPredictions:
    """Greedy predictions for one task's samples, in their order."""
    budget = prompt_budget(model, task, max_length)
    encoded = tokenizer.encode_batch([build_prompt(task, s) for s in samples])
    prompts = [middle_truncate(ids, budget) for ids in encoded]
    outputs = greedy_answers(
        model, prompts, MAX_NEW_TOKENS[task], tokenizer.eos_id, batch_size, progress, desc=task
    )
    records = [
        {"pred": tokenizer.decode(out), **{k: s[k] for k in ("answers", "all_classes", "length")}}
        for s, out in zip(samples, outputs, strict=True)
    ]
    cut = sum(len(ids) > budget for ids in encoded)
    return TaskPredictions(task=task, records=records, truncated=cut, budget=budget)


def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def predict_longbench(
    model,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    tasks: Sequence[str],
    max_length: int | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log=print,
) -> list[str]:
    """Write `out_dir/<task>.jsonl` for every task; returns the tasks predicted now.

    Every data file is read (and checked) before any generation. A task whose prediction file already holds
    as many predictions as its data is kept (so an interrupted run continues), unless overwrite.
    """
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LongBenchDataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}"
        )
    missing = [str(data_file(data_dir, t)) for t in tasks if not data_file(data_dir, t).is_file()]
    if missing:
        raise FileNotFoundError(f"LongBench data files not found: {', '.join(missing)}")
    data = {task: read_samples(data_file(data_dir, task), limit) for task in tasks}
    budgets = {task: prompt_budget(model, task, max_length) for task in tasks}
    out_dir = Path(out_dir)
    done = []
    for task in tasks:
        path = out_dir / f"{task}.jsonl"
        if path.exists() and not overwrite:
            have = count_lines(path)
            if have != len(data[task]):
                raise LongBenchDataError(
                    f"{path} holds {have} predictions, the data {len(data[task])}: delete it, or pass "
                    "--overwrite to predict it again"
                )
            log(f"{task}: kept the {have} predictions in {path}")
            continue
        result = predict_task(model, tokenizer, task, data[task], max_length, batch_size, progress)
        write_jsonl(path, result.records)
        note = f"{result.truncated} prompts cut in the middle to {budgets[task]} tokens"
        total = budgets[task] + MAX_NEW_TOKENS[task]
        if total > model.config.context:
            note += f"; prompt and answer may reach {total} tokens, past the training context"
        log(f"{task}: {len(result.records)} predictions -> {path} ({note})")
        done.append(task)
    return done
