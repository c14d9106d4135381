"""Utility rows: loading a utility data file and bringing each row into the form :mod:`lat_lightning.eval.utility`
scores (multiple choice, exact match, contains), and the number extraction of exact-match scoring."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from lat_lightning.errors import ConfigError, DataError

UTILITY_KINDS = ("multiple_choice", "exact_match", "contains")
_DEFAULT_SPLIT = {"multiple_choice": "validation", "exact_match": "test", "contains": "test"}
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Thousands separators only between groups of three digits, so "1,234" is one number and "3,4" two.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


# ------------------------------------------------------------------------------------------- numbers
def _canonical(number: str) -> str | None:
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        value = Decimal(0)  # "-0", "0.00" and "0" are the same answer
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The answer number of a text, canonicalised (``"1,000.0"`` -> ``"1000"``).

    If the text contains the GSM8K answer marker ``####``, the first number after the last marker is
    used (a model trained on GSM8K often keeps generating after its answer); otherwise the last number in
    the text.

    Args:
        text: model output or gold answer.

    Returns:
        The canonical decimal string, or ``None`` when there is no number.
    """
    if not isinstance(text, str):
        return None
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return _canonical(found.group(0))
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------- rows
def _answer_index(key: Any, labels: Sequence[str], n_choices: int) -> int | None:
    """Resolve an answer key: a label of the row, a letter (A = 0), or a 0-based integer index."""
    if isinstance(key, bool) or key is None:
        return None
    if isinstance(key, int):
        index = key
    else:
        text = str(key).strip()
        if text in labels:  # e.g. ARC's numeric labels "1".."4" or CommonsenseQA's "A".."E"
            return list(labels).index(text)
        if len(text) == 1 and text.upper() in _LETTERS:
            index = _LETTERS.index(text.upper())
        elif text.lstrip("-").isdigit():
            index = int(text)
        else:
            return None
    return index if 0 <= index < n_choices else None


def _choices_of(row: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Choice texts and labels from a list of strings, a ``{"label", "text"}`` dict or a list of dicts."""
    raw = row.get("choices")
    question = row.get("question")
    if raw is None and isinstance(question, Mapping):  # original CommonsenseQA: question.stem / question.choices
        raw = question.get("choices")
    if isinstance(raw, Mapping):
        texts = list(raw.get("text") or [])
        labels = [str(v) for v in (raw.get("label") or _LETTERS[: len(texts)])]
    elif isinstance(raw, Sequence) and not isinstance(raw, str) and raw and isinstance(raw[0], Mapping):
        texts = [c.get("text") for c in raw]
        labels = [str(c.get("label", _LETTERS[i])) for i, c in enumerate(raw)]
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        texts = list(raw)
        labels = list(row.get("labels") or _LETTERS[: len(texts)])
    else:
        raise DataError("no 'choices' list (or {'label': [...], 'text': [...]}) in the row")
    if len(texts) < 2 or len(labels) != len(texts):
        raise DataError(f"need >= 2 choices with one label each, got {len(texts)} choices / {len(labels)} labels")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError("every choice must be non-empty text")
    return texts, [str(v) for v in labels]


def normalise_utility_row(row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Bring one raw row into the form :func:`evaluate_utility` scores (idempotent).

    Args:
        row: ``multiple_choice``: ``question`` (or ``question_stem`` / ``question.stem``), ``choices`` and
            ``answerKey`` or ``answer`` (label, letter or 0-based index). ``exact_match``: ``question`` and
            ``answer`` (GSM8K style, the number after ``####``, or else the last number). ``contains``:
            ``prompt`` (or ``question``) and ``answer``, the text a correct output contains.
        kind: ``multiple_choice``, ``exact_match`` or ``contains``.

    Returns:
        ``multiple_choice``: ``{"question", "choices", "labels", "answer_index"}``;
        ``exact_match``: ``{"question", "answer", "gold"}``; ``contains``: ``{"prompt", "answer"}``.

    Raises:
        DataError: the row lacks a field or its answer cannot be resolved.
        ConfigError: unknown ``kind``.
    """
    if kind not in UTILITY_KINDS:
        raise ConfigError(f"utility kind '{kind}' is not supported here; choose from {', '.join(UTILITY_KINDS)}")
    if not isinstance(row, Mapping):
        raise DataError(f"a row must be a mapping, got a {type(row).__name__}")
    if kind == "contains":
        return _contains_row(row)
    question = _question_of(row)
    if kind == "exact_match":
        return _exact_match_row(row, question)
    return _multiple_choice_row(row, question)


def _answer_text(row: Mapping[str, Any]) -> Any:
    """The row's ``answer``, a number (not a bool) written as text."""
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    return answer


def _contains_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`normalise_utility_row` for ``contains``."""
    prompt = row.get("prompt", row.get("question"))
    answer = _answer_text(row)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("missing or empty 'prompt'")
    if not isinstance(answer, str) or not answer:
        raise DataError("missing or empty 'answer' (the text a correct output contains)")
    return {"prompt": prompt, "answer": answer}


def _question_of(row: Mapping[str, Any]) -> str:
    """The row's question: ``question``, ``question_stem`` or ``question.stem``."""
    question = row.get("question", row.get("question_stem"))
    if isinstance(question, Mapping):
        question = question.get("stem")
    if not isinstance(question, str) or not question.strip():
        raise DataError("missing or empty 'question'")
    return question


def _exact_match_row(row: Mapping[str, Any], question: str) -> dict[str, Any]:
    """:func:`normalise_utility_row` for ``exact_match``."""
    answer = _answer_text(row)
    gold = row.get("gold") if isinstance(row.get("gold"), str) else extract_number(answer or "")
    if not isinstance(answer, str) or gold is None:
        raise DataError(f"answer {answer!r} has no final number (expected GSM8K style '... #### 42')")
    return {"question": question, "answer": answer, "gold": gold}


def _multiple_choice_row(row: Mapping[str, Any], question: str) -> dict[str, Any]:
    """:func:`normalise_utility_row` for ``multiple_choice``."""
    texts, labels = _choices_of(row)
    if isinstance(row.get("answer_index"), int):
        key: Any = row["answer_index"]
    else:
        key = next((row[k] for k in ("answerKey", "answer") if row.get(k) not in (None, "")), None)
    index = _answer_index(key, labels, len(texts))
    if index is None:
        raise DataError(f"answer key {key!r} is not one of the labels {labels}, a letter or an index")
    return {"question": question, "choices": texts, "labels": labels, "answer_index": index}


def load_utility_rows(
    source: str, kind: str = "multiple_choice", split: str | None = None, max_rows: int | None = None
) -> list[dict[str, Any]]:
    """Load and normalise utility rows from a local JSONL / JSON / CSV file, a local dataset or a name.

    Reading is done by :func:`lat_lightning.data.readers.load_records`. CSV cells are strings, so a CSV
    ``choices`` column may hold a JSON list.

    Args:
        source: path or ``datasets`` name (offline: only cached datasets load).
        kind: ``multiple_choice``, ``exact_match`` or ``contains``.
        split: dataset split (default ``validation`` for multiple choice, ``test`` otherwise).
        max_rows: keep the first N rows.

    Returns:
        Normalised rows (see :func:`normalise_utility_row`).

    Raises:
        DataError: unreadable source, no rows, or a malformed row (the message names the row).
        ConfigError: unknown ``kind``.
    """
    import json

    from lat_lightning.data.readers import load_records

    if kind not in UTILITY_KINDS:
        raise ConfigError(f"utility kind '{kind}' is not supported here; choose from {', '.join(UTILITY_KINDS)}")
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be >= 1, got {max_rows}")
    split = split or _DEFAULT_SPLIT[kind]
    records = load_records(source, split)
    if max_rows is not None:
        records = records[:max_rows]
    if not records:
        raise DataError(f"no utility rows in {source} (split '{split}')")
    rows = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if isinstance(rec.get("choices"), str):  # CSV: a JSON-encoded list or dict
            try:
                rec["choices"] = json.loads(rec["choices"])
            except ValueError:
                raise DataError(f"row {i} of {source}: 'choices' is text that is not JSON") from None
        try:
            rows.append(normalise_utility_row(rec, kind))
        except DataError as exc:
            raise DataError(f"row {i} (0-based) of {source}: {exc}") from None
    return rows


# ------------------------------------------------------------------------------------------- scoring


__all__ = ["UTILITY_KINDS", "extract_number", "load_utility_rows", "normalise_utility_row"]
