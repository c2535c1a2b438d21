"""The embedded corpus is what offline training and most other tests rely on, so pin its shape."""

from collections import Counter

import pytest

from ratlm.corpus import VALIDATION_WORKS, Work, load_split, load_works


def test_works_and_kinds() -> None:
    works = load_works()
    assert len(works) == 42
    assert all(isinstance(w, Work) for w in works)
    assert Counter(w.kind for w in works) == {"play": 37, "poem": 5}
    ids = [w.id for w in works]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(w.title and w.text for w in works)


def test_text_is_normalised_and_recognisable() -> None:
    works = {w.id: w for w in load_works()}
    assert "To be, or not to be" in works["hamlet"].text
    assert "Shall I compare thee to a summer's day?" in works["sonnets"].text
    assert works["sonnets"].kind == "poem"
    for w in works.values():
        assert "\r" not in w.text
        assert all(line == line.rstrip() for line in w.text.split("\n"))
        assert "Project Gutenberg" not in w.text


def test_load_works_returns_fresh_list() -> None:
    works = load_works()
    works.clear()
    assert len(load_works()) == 42


def test_validation_split() -> None:
    works = {w.id: w for w in load_works()}
    assert len(VALIDATION_WORKS) == 3
    assert all(works[v].kind == "play" for v in VALIDATION_WORKS)

    train, valid = load_split()
    assert len(valid) == 3 and len(train) == 39
    valid_texts = {works[v].text for v in VALIDATION_WORKS}
    assert set(valid) == valid_texts
    assert not valid_texts & set(train)
    assert all(train) and all(valid)

    share = sum(map(len, valid)) / sum(len(w.text) for w in works.values())
    assert 0.05 <= share <= 0.08


def test_custom_and_unknown_split() -> None:
    train, valid = load_split(["hamlet"])
    assert len(valid) == 1 and "To be, or not to be" in valid[0]
    assert len(train) == 41
    with pytest.raises(ValueError, match="no_such_play"):
        load_split(["no_such_play"])
