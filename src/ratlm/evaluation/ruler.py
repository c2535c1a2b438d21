"""RULER's needle-in-a-haystack family, made offline and deterministically, and scored as RULER scores it.

The eight tasks and their templates are RULER's (NVIDIA/RULER, `scripts/synthetic.yaml` and its niah
generator): needles read "One of the special magic {numbers} for {key} is: {value}.", keys and values are
words ("adjective-noun"), 7-digit numbers or UUIDs, and the prompt asks for the values of one or more keys,
ending with RULER's answer prefix ("... mentioned in the provided text are"), which a base model continues.

| task | haystack | key, value | needles |
| --- | --- | --- | --- |
| niah_single_1 | noise | word, number | 1 |
| niah_single_2 | essay | word, number | 1 |
| niah_single_3 | essay | word, UUID | 1 |
| niah_multikey_1 | essay | word, number | 4 keys, 1 asked |
| niah_multikey_2 | needles | word, number | 1 among distractor needles |
| niah_multikey_3 | needles | UUID, UUID | 1 among distractor needles |
| niah_multivalue | essay | word, number | 1 key with 4 values |
| niah_multiquery | essay | word, number | 4 keys, all 4 asked |

"noise" repeats RULER's five sentences ("The grass is green. ..."), one line each, with the needles between
lines; "essay" is running text from the embedded Shakespeare corpus (RULER uses Paul Graham's essays), its
words from a random start, cut into sentences, with the needles put at depths drawn from RULER's 40 evenly
spaced depths; "needles" is a list of distractor needles with other keys. Evaluation samples take their essay
from the works held out from training (Macbeth, Twelfth Night, King John), training samples from the others.

Every sample is drawn from its own generator, seeded by (split, seed, task, length, index), so samples are
the same whatever else is made with them, and the "train" and "test" splits never share one. Each sample's
haystack is sized with the model's tokenizer: the prompt takes at least 80% of the target length in tokens
and leaves the answer's `max_new_tokens` within it (RULER counts the answer's tokens in the length).
An answer scores the share of the expected values it contains, case-insensitively (RULER's string_match_all);
a task's score is 100 x the mean over its samples, rounded to two decimals.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .answers import LengthError, auto_batch_size, greedy_answers

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
    "{type_needle_v} for {query} mentioned in the provided text?"
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"  # the answer prefix
)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # percent of the essay's sentences, RULER's 40 depths
MAX_NEW_TOKENS = 128  # RULER's tokens_to_generate for the needle tasks
MIN_FILL = 0.8  # a prompt takes at least this share of its target length ...
TARGET_FILL = 0.95  # ... and the haystack is sized to bring it within 5% of its room where the units allow
SPLITS = ("test", "train")


@dataclass(frozen=True)
class NeedleTask:
    haystack: str  # "noise", "essay" or "needle"
    key_type: str  # "words", "numbers" or "uuids"
    value_type: str
    num_keys: int  # needles with distinct keys
    num_values: int  # values per key, each its own needle
    num_queries: int  # keys asked for


TASKS: dict[str, NeedleTask] = {
    "niah_single_1": NeedleTask("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": NeedleTask("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": NeedleTask("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": NeedleTask("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": NeedleTask("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": NeedleTask("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": NeedleTask("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": NeedleTask("essay", "words", "numbers", 4, 1, 4),
}


class RulerError(ValueError):
    """Bad settings for the RULER tasks."""


def parse_tasks(text: str) -> list[str]:
    """A comma-separated list of task names ("all": every task), each known, no repeats."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise RulerError(f"unknown RULER task {unknown[0]!r}; the known tasks are: {', '.join(TASKS)}")
    if not names or len(set(names)) < len(names):
        raise RulerError(f"--tasks must name each task once, got {text!r}")
    return names


@lru_cache(maxsize=1)
def _needle_words() -> tuple[str, ...]:
    """Every "adjective-noun" key word, from the word lists shipped with ratlm."""
    text = (resources.files("ratlm") / "data" / "needle_words.txt").read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[] "), [])
        else:
            current.extend(line.split())
    return tuple(f"{a}-{n}" for a in sections["adjectives"] for n in sections["nouns"])


@lru_cache(maxsize=2)
def _essay_words(split: str) -> tuple[str, ...]:
    """The words of the corpus works of a split, whitespace collapsed: held-out works for "test"."""
    from ..corpus import load_split

    train, valid = load_split()
    return tuple(" ".join(valid if split == "test" else train).split())


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(_needle_words())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _join(items: Sequence[str]) -> str:
    """RULER's list of keys or values: "a", or "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass
class _Draw:
    """Everything random about one sample, drawn before its haystack is sized (so resizing keeps it)."""

    task: NeedleTask
    needles: list[str]
    keys: list[str]
    query: str
    outputs: list[str]
    places: list[float]  # where each needle goes, as a share of the haystack
    start: int  # first essay word
    rng: random.Random  # draws the distractor needles, one after another
    distractors: list[str] = field(default_factory=list)


def _draw(task: NeedleTask, rng: random.Random, essay_size: int) -> _Draw:
    keys, values, needles = [], [], []
    while len(keys) < max(task.num_keys, task.num_queries):
        key = _random_value(task.key_type, rng)
        if key not in keys:
            keys.append(key)
            values.append([_random_value(task.value_type, rng) for _ in range(task.num_values)])
            needles += [NEEDLE.format(type_needle_v=task.value_type, key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(len(keys)), task.num_queries)
    if task.haystack == "essay":
        places = sorted(d / 100 for d in rng.sample(DEPTHS, len(needles)))
    else:
        places = sorted(rng.random() for _ in needles)
    return _Draw(
        task=task,
        needles=needles,
        keys=keys,
        query=_join([keys[i] for i in asked]),
        outputs=[v for i in asked for v in values[i]],
        places=places,
        start=rng.randrange(essay_size),
        rng=random.Random(rng.getrandbits(64)),
    )


def _distractors(draw: _Draw, n: int) -> list[str]:
    task = draw.task
    while len(draw.distractors) < n:
        key = _random_value(task.key_type, draw.rng)
        if key in draw.keys:
            continue  # a distractor must not answer the question
        value = _random_value(task.value_type, draw.rng)
        draw.distractors.append(NEEDLE.format(type_needle_v=task.value_type, key=key, value=value))
    return draw.distractors[:n]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


_NOISE_SENTENCES = _sentences(NOISE)


def _context(draw: _Draw, n: int, essay: Sequence[str]) -> str:
    """The haystack of n units (essay words, noise sentences or distractor needles) with the needles in it."""
    if draw.task.haystack == "essay":
        words = [essay[(draw.start + i) % len(essay)] for i in range(n)]
        sentences = _sentences(" ".join(words))
        cuts = [0] + [int(len(sentences) * p) for p in draw.places] + [len(sentences)]
        pieces = []
        for i, needle in enumerate(draw.needles):
            pieces += [" ".join(sentences[cuts[i] : cuts[i + 1]]), needle]
        pieces.append(" ".join(sentences[cuts[-2] :]))
        return " ".join(p for p in pieces if p)
    if draw.task.haystack == "noise":  # n sentences, RULER's line of five repeated (the last may be short)
        sentences = [_NOISE_SENTENCES[i % 5] for i in range(n)]
        lines = [" ".join(sentences[i : i + 5]) for i in range(0, n, 5)]
    else:
        lines = _distractors(draw, n)
    slots = len(lines) + 1  # before the first line, between two, after the last
    for place, needle in sorted(zip(draw.places, draw.needles, strict=True), reverse=True):
        lines.insert(int(place * slots), needle)
    return "\n".join(lines)


def _prompt(draw: _Draw, context: str) -> str:
    task, template, kind = draw.task, TEMPLATE, draw.task.value_type
    if task.num_queries * task.num_values == 1:  # RULER's singular wording for a single answer
        for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(plural, singular)
        kind = kind[:-1]
    return template.format(type_needle_v=kind, context=context, query=draw.query)


@dataclass
class NeedleSample:
    task: str
    length: int  # target length in tokens (prompt and answer)
    input: str  # the whole prompt, RULER's answer prefix included
    outputs: list[str]  # the expected values
    tokens: int  # prompt tokens

    @property
    def answer(self) -> str:
        """The completion a model is trained to give: " v1, v2, and v3." (EOS follows it in training)."""
        return " " + _join(self.outputs) + "."

    def as_dict(self) -> dict:
        return {"task": self.task, "length": self.length, "input": self.input, "outputs": self.outputs}


def _fit(count: Callable[[int], int], low: int, high: int, guess: int) -> int:
    """A unit count n with low <= count(n) <= high, searched from the guess: proportional steps at first
    (tokens grow about linearly with the units), then bisection between the largest n known to stay under
    low and the smallest known to pass high. When no n lands in between, the largest under high."""
    under, over = -1, None
    n, tries = max(0, guess), 0
    while True:
        tokens = count(n)
        if low <= tokens <= high:
            return n
        if tokens < low:
            under = n
        else:
            over = n
        if over is not None and over - under <= 1:
            return under
        tries += 1
        n = int(n * high / max(tokens, 1)) if over is None or tries <= 3 else (under + over) // 2
        n = max(n, under + 1)
        if over is not None:
            n = min(n, over - 1)


def make_samples(
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    split: str = "test",
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[NeedleSample]:
    """`samples` samples of every task at every length: each prompt has between 80% of the length and the
    length less max_new_tokens tokens."""
    if split not in SPLITS:
        raise RulerError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if samples < 1 or max_new_tokens < 1:
        raise RulerError(f"samples and max_new_tokens must be >= 1, got {samples} and {max_new_tokens}")
    essay = _essay_words(split)
    out = []
    for name in tasks:
        task = TASKS[name]
        for length in lengths:
            low, high = math.ceil(MIN_FILL * length), length - max_new_tokens
            if high < low:
                raise LengthError(
                    f"length {length} is too short for {max_new_tokens} new tokens: a prompt takes at least "
                    f"{MIN_FILL:.0%} of the length ({low} tokens) and leaves the answer room in it"
                )
            guess = None
            for index in range(samples):
                rng = random.Random(f"ruler:{split}:{seed}:{name}:{length}:{index}")
                draw = _draw(task, rng, len(essay))

                def count(n: int, draw: _Draw = draw) -> int:
                    return len(tokenizer.encode(_prompt(draw, _context(draw, n, essay))))

                bare = count(0)
                if bare > high:
                    raise LengthError(
                        f"length {length} cannot hold {name}: its prompt takes {bare} tokens without any "
                        f"haystack, and {max_new_tokens} are kept for the answer"
                    )
                if guess is None:  # units per token from the bare prompt and one larger haystack
                    probe = count(64)
                    guess = int(64 * (high - bare) / max(1, probe - bare))
                n = _fit(count, max(low, int(TARGET_FILL * high)), high, guess)
                text = _prompt(draw, _context(draw, n, essay))
                tokens = len(tokenizer.encode(text))
                if tokens < low:
                    raise LengthError(
                        f"could not size {name} at length {length}: {tokens} tokens fit, fewer than {low} "
                        f"(one more unit of haystack passes {high}); use a longer length or fewer new tokens"
                    )
                out.append(NeedleSample(name, length, text, draw.outputs, tokens))
                guess = n
    return out


def postprocess(prediction: str) -> str:
    """RULER's clean-up of an answer: control characters become newlines, outer whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, outputs: Sequence[str]) -> float:
    """The share of the expected values found in the answer, case-insensitively (RULER's metric)."""
    text = prediction.lower()
    return sum(o.lower() in text for o in outputs) / len(outputs)


def evaluate_ruler(
    model,
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int | None = None,
    progress: bool = False,
    on_sample: Callable[[NeedleSample, str, float], None] | None = None,
) -> dict:
    """Generate and answer the test samples; the scores of every task at every length, and their average.

    on_sample(sample, answer, score) sees every answered sample (to save or inspect them).
    """
    if tokenizer is None:
        raise RulerError("RULER needs the model's tokenizer: save one with the model or pass --tokenizer")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RulerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}"
        )
    if max(lengths) > max_new_tokens:  # refuse a length no memory holds before making its haystack
        auto_batch_size(model, max(lengths) - max_new_tokens, max_new_tokens)
    made = make_samples(tokenizer, tasks, lengths, samples, "test", seed, max_new_tokens)
    scores: dict[str, dict[str, list[float]]] = {t: {str(n): [] for n in lengths} for t in tasks}
    tokens: dict[str, list[int]] = {str(n): [] for n in lengths}
    for length in lengths:
        batch = [s for s in made if s.length == length]
        prompts = [tokenizer.encode(s.input) for s in batch]
        outputs = greedy_answers(
            model, prompts, max_new_tokens, tokenizer.eos_id, batch_size, progress, f"ruler {length}"
        )
        for sample, out in zip(batch, outputs, strict=True):
            answer = tokenizer.decode(out)
            score = string_match_all(postprocess(answer), sample.outputs)
            scores[sample.task][str(length)].append(score)
            tokens[str(length)].append(sample.tokens)
            if on_sample is not None:
                on_sample(sample, answer, score)
    table = {t: {n: round(100 * sum(v) / len(v), 2) for n, v in by.items()} for t, by in scores.items()}
    average = {str(n): round(sum(table[t][str(n)] for t in tasks) / len(tasks), 2) for n in lengths}
    return {
        "training_context": model.config.context,
        "tasks": list(tasks),
        "lengths": list(lengths),
        "samples": samples,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "scores": table,
        "average": average,
        "prompt_tokens": {n: [min(v), round(sum(v) / len(v), 1), max(v)] for n, v in tokens.items()},
    }


def format_table(result: dict) -> str:
    """Tasks as rows, lengths as columns, scores (0-100) in the cells, the average last."""
    lengths = [str(n) for n in result["lengths"]]
    width = max(len(t) for t in [*result["tasks"], "average"])
    lines = [f"{'task':<{width}}" + "".join(f"{n:>9}" for n in lengths)]
    for task in result["tasks"]:
        lines.append(f"{task:<{width}}" + "".join(f"{result['scores'][task][n]:9.2f}" for n in lengths))
    lines.append(f"{'average':<{width}}" + "".join(f"{result['average'][n]:9.2f}" for n in lengths))
    return "\n".join(lines)


def plot_ruler(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Score against length (log scale), one line per task and the average in bold, the training context
    marked. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the plot needs matplotlib: pip install 'ratlm[eval]', or pass --no-plot") from e
    lengths = result["lengths"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in result["tasks"]:
        ax.plot(lengths, [result["scores"][task][str(n)] for n in lengths], marker="o", lw=1, alpha=0.7,
                label=task)  # fmt: skip
    ax.plot(lengths, [result["average"][str(n)] for n in lengths], color="black", lw=2.5, marker="s",
            label="average")  # fmt: skip
    ax.axvline(result["training_context"], color="gray", ls="--", lw=1, label="training context")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set(xlabel="length (tokens)", ylabel="score (%)", ylim=(-2, 102), title=title or "RULER needle tasks")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
