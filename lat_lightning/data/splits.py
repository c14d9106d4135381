"""Deterministic, category-stratified, prompt-disjoint train / evaluation splits of prompt sets.

:func:`stratified_split` first drops duplicate prompts (same text after :func:`normalise_prompt`: Unicode NFKC,
case-folded, whitespace collapsed; the first occurrence is kept), so no prompt can land on both sides. Then, inside
each category, it orders the rows by a keyed hash of their normalised text and sends the first
``round(n * eval_fraction)`` to evaluation. The order does not depend on the input order or on the Python process
(``hashlib``, not ``hash()``), so the same rows and seed always give the same split, and adding rows to one
category never moves a row of another. Each category with at least two rows keeps at least one row on each side;
a category with one row goes to training. Both outputs keep the source order.

Used for the shipped prompt sets (``pkg://lat_lightning/resources/real_benign.jsonl``, ``real_borderline.jsonl``)
and for StrongREJECT (:mod:`lat_lightning.data.real_sets`).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from lat_lightning.errors import DataError

log = logging.getLogger(__name__)


def normalise_prompt(text: str) -> str:
    """The key two prompts are duplicates under: NFKC, case-folded, every whitespace run one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _text(row: Mapping[str, Any], text_key: str, i: int) -> str:
    value = row.get(text_key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"row {i} has no text in column '{text_key}' (columns: {', '.join(map(str, row))})")
    return value


def deduplicate(rows: Sequence[Mapping[str, Any]], text_key: str = "prompt") -> list[Mapping[str, Any]]:
    """``rows`` without repeated prompts (by :func:`normalise_prompt`), first occurrence kept, order kept.

    Raises:
        DataError: a row without text in ``text_key``.
    """
    seen: set[str] = set()
    out = []
    for i, row in enumerate(rows):
        norm = normalise_prompt(_text(row, text_key, i))
        if norm not in seen:
            seen.add(norm)
            out.append(row)
    return out


def _rank(norm: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{norm}".encode()).hexdigest()


def _eval_count(n: int, eval_fraction: float) -> int:
    if n < 2:
        return 0
    return min(max(round(n * eval_fraction), 1), n - 1)


def stratified_split(
    rows: Sequence[Mapping[str, Any]],
    key: str = "category",
    eval_fraction: float = 0.5,
    seed: int = 0,
    text_key: str = "prompt",
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Split ``rows`` into ``(train, evaluation)``: deduplicated, prompt-disjoint, stratified by ``row[key]``.

    Args:
        rows: row mappings (e.g. from :func:`lat_lightning.data.readers.load_records`).
        key: the column whose value is the stratum (a category); every row needs a non-empty one.
        eval_fraction: the share of each category sent to evaluation, in (0, 1).
        seed: selects a different (equally deterministic) split.
        text_key: the column holding the prompt text (what duplicates are judged on).

    Returns:
        ``(train, evaluation)``, each in source order.

    Raises:
        ValueError: ``eval_fraction`` outside (0, 1).
        DataError: a row without text or without a category.
    """
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    kept = deduplicate(rows, text_key)
    if len(kept) < len(rows):
        log.info("stratified_split: dropped %d duplicate prompt(s) of %d", len(rows) - len(kept), len(rows))
    strata: dict[str, list[int]] = {}
    for i, row in enumerate(kept):
        category = row.get(key)
        if category is None or not str(category).strip():
            raise DataError(f"row {i} has no '{key}' to stratify on (columns: {', '.join(map(str, row))})")
        strata.setdefault(str(category), []).append(i)
    to_eval: set[int] = set()
    for members in strata.values():
        ranked = sorted(members, key=lambda i: _rank(normalise_prompt(kept[i][text_key]), seed))
        to_eval.update(ranked[: _eval_count(len(members), eval_fraction)])
    train = [row for i, row in enumerate(kept) if i not in to_eval]
    evaluation = [row for i, row in enumerate(kept) if i in to_eval]
    return train, evaluation


__all__ = ["deduplicate", "normalise_prompt", "stratified_split"]
