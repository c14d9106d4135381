"""The shipped real prompt sets and the deterministic, stratified, prompt-disjoint split."""

from __future__ import annotations

import collections
import random

import pytest

from lat_lightning.data.readers import load_records
from lat_lightning.data.splits import deduplicate, normalise_prompt, stratified_split
from lat_lightning.errors import DataError

BENIGN = "pkg://lat_lightning/resources/real_benign.jsonl"
BORDERLINE = "pkg://lat_lightning/resources/real_borderline.jsonl"


@pytest.mark.parametrize(("source", "at_least", "min_categories"), [(BENIGN, 200, 8), (BORDERLINE, 50, 6)])
def test_shipped_sets_are_large_varied_and_free_of_duplicates(source, at_least, min_categories):
    rows = load_records(source)
    assert len(rows) >= at_least
    assert all(set(r) == {"prompt", "category"} and r["prompt"].strip() and r["category"] for r in rows)
    counts = collections.Counter(r["category"] for r in rows)
    assert len(counts) >= min_categories and min(counts.values()) >= 4, counts
    assert len(deduplicate(rows)) == len(rows), "a prompt is repeated"


def test_benign_and_borderline_sets_share_no_prompt():
    benign = {normalise_prompt(r["prompt"]) for r in load_records(BENIGN)}
    borderline = {normalise_prompt(r["prompt"]) for r in load_records(BORDERLINE)}
    assert not benign & borderline


def _rows(counts: dict[str, int]) -> list[dict]:
    return [{"prompt": f"{cat} question number {i}", "category": cat} for cat, n in counts.items() for i in range(n)]


def test_split_is_stratified_disjoint_and_covers_every_row():
    rows = _rows({"a": 10, "b": 7, "c": 2, "d": 1})
    train, evaluation = stratified_split(rows, "category", eval_fraction=0.3, seed=0)
    per = collections.Counter(r["category"] for r in evaluation)
    # round(n * 0.3), at least one per side when a category has two rows; a single row stays in training
    assert per == {"a": 3, "b": 2, "c": 1}
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in evaluation)
    assert sorted(map(str, train + evaluation)) == sorted(map(str, rows))
    assert train == [r for r in rows if r in train] and evaluation == [r for r in rows if r in evaluation]


def test_split_is_deterministic_order_free_and_seeded():
    rows = load_records(BENIGN)
    first = stratified_split(rows, "category", 0.25, seed=3)
    assert stratified_split(rows, "category", 0.25, seed=3) == first
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    again = stratified_split(shuffled, "category", 0.25, seed=3)
    assert {r["prompt"] for r in again[1]} == {r["prompt"] for r in first[1]}
    other = stratified_split(rows, "category", 0.25, seed=4)
    assert {r["prompt"] for r in other[1]} != {r["prompt"] for r in first[1]}


def test_split_drops_duplicates_before_splitting():
    rows = _rows({"a": 6}) + [
        {"prompt": "  A QUESTION number 2 ", "category": "a"},
        {"prompt": "a\tquestion  number 2", "category": "b"},
    ]
    assert normalise_prompt(rows[-1]["prompt"]) == normalise_prompt(rows[2]["prompt"])
    train, evaluation = stratified_split(rows, "category", 0.5, seed=0)
    assert len(train) + len(evaluation) == 6
    texts = [normalise_prompt(r["prompt"]) for r in train + evaluation]
    assert len(set(texts)) == len(texts)


def test_split_bad_input():
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        stratified_split(_rows({"a": 4}), eval_fraction=1.0)
    with pytest.raises(DataError, match="row 1 has no 'category'"):
        stratified_split([{"prompt": "x", "category": "a"}, {"prompt": "y"}])
    with pytest.raises(DataError, match="row 0 has no text in column 'prompt'"):
        stratified_split([{"text": "x", "category": "a"}])
