"""The embedded Shakespeare corpus: a small, offline, public-domain dataset for training and tests.

The texts are the modern-spelling Complete Works (37 plays and 5 poem collections) from the
``shakespeare`` 0.6 package by the Open Knowledge Foundation (Open Shakespeare, MIT-licensed package),
which took them from Project Gutenberg; the texts themselves are in the public domain.
``scripts/build_corpus.py`` rebuilds ``data/shakespeare.jsonl.xz`` from that package.

Validation holds out whole plays rather than a slice of the concatenated text, so that no scene,
character list or running dialogue is shared between training and validation.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

CORPUS_FILE = "shakespeare.jsonl.xz"

# One tragedy, one comedy and one history, about 6.7% of the characters. Macbeth (2.0%) and Twelfth
# Night (2.3%) are short and self-contained; King John (2.4%) is the one history outside the two
# tetralogies, so none of its characters or plot carries over from the plays kept for training.
VALIDATION_WORKS: tuple[str, ...] = ("macbeth", "twelfth_night", "john")


@dataclass(frozen=True)
class Work:
    """One play or poem collection; ``id`` is the source file's stem, e.g. ``"hamlet"``."""

    id: str
    title: str
    kind: str  # "play" or "poem"
    text: str


@lru_cache(maxsize=1)
def _read_works() -> tuple[Work, ...]:
    """Decompress once per process; the file is ~1.6 MB compressed and ~5 MB of text."""
    path = resources.files(__package__ or "ratlm") / "data" / CORPUS_FILE
    with path.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as lines:
        return tuple(Work(**json.loads(line)) for line in lines if line.strip())


def load_works() -> list[Work]:
    """All 42 works, sorted by id. Returns a new list each call; the works themselves are cached."""
    return list(_read_works())


def load_split(valid_works: Iterable[str] = VALIDATION_WORKS) -> tuple[list[str], list[str]]:
    """Return ``(train_docs, valid_docs)``: one text per work, so a tokenizer can end each with EOS.

    Every work not named in ``valid_works`` (poems included) goes to training, in id order.
    """
    held_out = set(valid_works)
    works = _read_works()
    unknown = held_out - {w.id for w in works}
    if unknown:
        raise ValueError(f"unknown work ids for validation: {sorted(unknown)}")
    train = [w.text for w in works if w.id not in held_out]
    valid = [w.text for w in works if w.id in held_out]
    return train, valid
