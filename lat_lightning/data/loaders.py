"""Load safety and benign data from local files or ``datasets`` and normalise it into the schema.

Sources (``load_records``, :mod:`lat_lightning.data.readers`):
  - a local ``.jsonl`` (one object per line), ``.json`` (a list of objects, or ``{"data": [...]}``),
    ``.csv`` / ``.tsv`` (header row), ``.parquet`` or ``.txt`` (one prompt per line: a ``prompt`` column)
    file; the ``split`` argument does not apply to single files. An existing file of another type is an error
    that names its type;
  - a local directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split``
    picks the split of a ``DatasetDict``) or a directory of data files ``datasets.load_dataset`` reads;
  - anything else is a ``datasets`` name (``datasets.load_dataset(source, split=split)``).

Columns are mapped onto our fields either explicitly (``columns={"prompt": "goal", ...}``, the
``data.harmful_columns`` / ``data.benign_columns`` config maps) or by auto-detection from common names
(AdvBench ``goal``/``target``, HarmBench ``Behavior``, StrongREJECT ``forbidden_prompt``, ASABench
``prompt``/``steered_response``/``original_response``/``layer_idx``, Alpaca ``instruction``/``input``/``output``,
GSM8K ``question``/``answer``, ...; names match regardless of case).

Prompt-only safety data (HarmBench, StrongREJECT, a ``.txt`` list) has no harmful target ``y*``. Attacks that
need none (ASA random, LAPT's Gaussian noise) use it as it is; for ASAgrad and PGD a constant target can be set
(``default_target``, AdvBench style "Sure, here is"); callers that need a target and have none get a one-line
error saying both ways out. Rows can be filtered by column values first (``row_filter``, ``data.filter``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

from lat_lightning.data.readers import load_records
from lat_lightning.data.schema import BENIGN_FIELDS, SAFETY_FIELDS, BenignExample, SafetyExample
from lat_lightning.data.settings import DataSettings
from lat_lightning.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SAFE_RESPONSE: str = DataSettings.default_safe_response

# Auto-detected column names per field, most specific first. The first name present wins.
# ASABench: ``steered_response`` is the response under the attack (the harmful target) and
# ``original_response`` the model's own clean answer (a refusal); LLM-LAT style preference data uses
# ``rejected`` for the harmful completion and ``chosen`` for the refusal.
SAFETY_CANDIDATES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "goal", "behavior", "forbidden_prompt", "instruction", "question", "query"),
    "harmful_response": ("harmful_response", "target", "steered_response", "rejected", "harmful"),
    "safe_response": ("safe_response", "original_response", "refusal", "chosen", "safe"),
    "layer": ("layer", "layer_idx"),
}
BENIGN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "instruction", "question", "query", "input"),
    "response": ("response", "output", "answer", "completion", "target"),
}
# Alpaca-style data keeps optional context in ``input`` next to ``instruction``; it belongs to the prompt.
_ALPACA_PROMPT, _ALPACA_CONTEXT = "instruction", "input"


def resolve_columns(
    records: Sequence[Mapping[str, Any]],
    columns: Mapping[str, str] | None,
    candidates: Mapping[str, Sequence[str]],
    required: Sequence[str],
    source: str,
    config_key: str,
    hints: Mapping[str, str] | None = None,
) -> dict[str, str | None]:
    """Map each of our fields to a column of ``records``.

    Args:
        records: the rows (their keys, in first-seen order, are the available columns).
        columns: explicit ``field -> column`` map; fields not in it are auto-detected from ``candidates``.
        candidates: ``field -> column names`` tried in order when a field is not mapped explicitly.
        required: fields that must resolve to a column.
        source: the data source, for messages.
        config_key: the config map users fix the columns with (``data.harmful_columns``), for messages.
        hints: ``field -> text`` added to the message when that field is missing (another way out).

    Returns:
        ``field -> column`` for every field in ``candidates`` (``None`` when an optional field is absent).

    Raises:
        DataError: an unknown field is mapped, or a required or explicitly mapped column is missing.
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(candidates))
    if unknown:
        raise DataError(
            f"unknown field(s) {', '.join(repr(u) for u in unknown)} in {config_key}; "
            f"valid fields: {', '.join(candidates)}"
        )
    available = _available_columns(records)
    resolved: dict[str, str | None] = {}
    missing: list[tuple[str, str]] = []  # (field, how it is described in the message)
    for field_name, names in candidates.items():
        if field_name in columns:
            column = str(columns[field_name])
            resolved[field_name] = column
            if column not in available:  # an explicit map must point at a real column
                missing.append((field_name, f"'{field_name}' (mapped to '{column}')"))
            continue
        lower = {a.lower(): a for a in reversed(available)}  # the first column wins among case variants
        resolved[field_name] = next((lower[n] for n in names if n in lower), None)
        if resolved[field_name] is None and field_name in required:
            missing.append((field_name, f"'{field_name}'"))
    if missing:
        fix = " ".join(f"{config_key}.{f}=<column>" for f, _ in missing)
        known = hints or {}
        extra = "".join(f" {known[f]}" for f, _ in missing if f in known)
        raise DataError(
            f"missing column(s) {', '.join(d for _, d in missing)} in {source}; "
            f"found: {', '.join(available)}; map them with {fix}{extra}"
        )
    auto = {f: c for f, c in resolved.items() if c is not None and f not in columns and c != f}
    if auto:
        log.info("%s: auto-mapped columns %s", source, ", ".join(f"{f}<-{c}" for f, c in auto.items()))
    return resolved


def _available_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in records:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _text_cell(row: Mapping[str, Any], column: str, field_name: str, i: int, source: str) -> str:
    """A non-empty string cell, or a DataError naming the row."""
    value = row.get(column)
    if isinstance(value, str) and value.strip():
        return value
    if value is None:
        what = "missing"
    elif isinstance(value, str):
        what = "empty"
    else:
        what = f"a {type(value).__name__}, not text"
    raise DataError(
        f"row {i} (0-based) of {source}: column '{column}' ({field_name}) is {what}; "
        "every cell must be a non-empty string"
    )


def _layer_cell(row: Mapping[str, Any], column: str, i: int, source: str) -> int | None:
    """An optional non-negative integer cell (CSV gives strings, pandas-backed data may give floats)."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    layer: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        layer = value
    elif isinstance(value, float) and value.is_integer():
        layer = int(value)
    elif isinstance(value, str):
        try:
            layer = int(value.strip())
        except ValueError:
            layer = None
    if layer is None or layer < 0:
        raise DataError(
            f"row {i} (0-based) of {source}: column '{column}' (layer) is {value!r}; "
            "expected a non-negative integer layer index or an empty cell"
        )
    return layer


_Row = TypeVar("_Row")


def _limit(records: list[_Row], max_examples: int | None, source: str) -> list[_Row]:
    if max_examples is None:
        return records
    if max_examples < 1:
        raise DataError(f"max_examples must be >= 1 (got {max_examples}) for {source}")
    return records[:max_examples]


def filter_records(
    records: Sequence[Mapping[str, Any]], row_filter: Mapping[str, Any] | None, source: str
) -> list[tuple[int, dict]]:
    """The rows whose columns match ``row_filter``, with their row numbers in the source.

    Args:
        records: the rows.
        row_filter: ``column -> value`` (keep rows whose cell equals it) or ``column -> [values]`` (keep rows whose
            cell is one of them); every column must match. Cells and values compare as text, so ``1`` matches
            the CSV cell ``"1"``. ``None`` or ``{}`` keeps everything.
        source: the data source, for messages.

    Returns:
        ``(row number, row)`` pairs, in source order.

    Raises:
        DataError: a filtered column does not exist, or no row matches.
    """
    pairs = list(enumerate(dict(r) for r in records))
    if not row_filter:
        return pairs
    available = _available_columns(records)
    unknown = [c for c in row_filter if c not in available]
    if unknown:
        raise DataError(
            f"data.filter names column(s) {', '.join(repr(c) for c in unknown)} that {source} lacks; "
            f"found: {', '.join(available)}"
        )
    wanted = {
        column: {_as_text(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
        for column, value in row_filter.items()
    }
    kept = [(i, row) for i, row in pairs if all(_as_text(row.get(c)) in values for c, values in wanted.items())]
    if not kept:
        shown = "; ".join(f"{c} in {sorted(v)}" for c, v in wanted.items())
        raise DataError(f"data.filter ({shown}) keeps no row of the {len(pairs)} in {source}")
    return kept


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# --------------------------------------------------------------------------------------------- examples
def load_safety_examples(
    source: str,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    default_safe_response: str = DEFAULT_SAFE_RESPONSE,
    max_examples: int | None = None,
    default_target: str | None = None,
    require_target: bool = True,
    row_filter: Mapping[str, Any] | None = None,
) -> list[SafetyExample]:
    """Load (prompt, safe_response, harmful_response[, layer]) examples.

    Args:
        source: see :func:`load_records`.
        split: dataset split.
        columns: ``field -> column`` map for ``prompt``, ``safe_response``, ``harmful_response``, ``layer``
            (``data.harmful_columns``); unmapped fields are auto-detected (AdvBench, ASABench, ...).
        default_safe_response: the refusal used when the data has no safe-response column.
        max_examples: keep only the first N rows (after filtering).
        default_target: the harmful target of every example when the data has no target column
            (``data.default_target``, e.g. "Sure, here is").
        require_target: a target is needed (ASAgrad, PGD, the ``away`` loss): prompt-only data without
            ``default_target`` is an error. Otherwise such examples carry ``harmful_response=None``.
        row_filter: keep only matching rows (:func:`filter_records`, ``data.filter``).

    Returns:
        The examples; ``index`` is the row number in the source (stable under filtering and ``max_examples``).

    Raises:
        DataError: the source cannot be read, is empty, lacks ``prompt`` (or a needed target), the filter keeps
            nothing, or a cell is invalid.
    """
    records = load_records(source, split)
    if not records:
        raise DataError(f"no examples in {source} (split '{split}')")
    rows = _limit(filter_records(records, row_filter, source), max_examples, source)
    needs_column = require_target and default_target is None
    required = ("prompt", "harmful_response") if needs_column else ("prompt",)
    cols = resolve_columns(
        records,
        columns,
        SAFETY_CANDIDATES,
        required,
        source,
        "data.harmful_columns",
        hints={
            "harmful_response": "(this run needs a harmful target: ASAgrad, PGD or "
            "loss.away_from_harmful), or set data.default_target, e.g. 'Sure, here is'"
        },
    )
    if cols["harmful_response"] is None and default_target is not None:
        log.info(
            "%s has no harmful target column; using data.default_target (%r) for all %d examples",
            source,
            default_target,
            len(rows),
        )
    if cols["safe_response"] is None:
        log.info(
            "%s has no safe_response column; using data.default_safe_response (%r) for all %d examples",
            source,
            default_safe_response,
            len(rows),
        )
    examples = []
    for i, row in rows:
        safe = (
            _text_cell(row, cols["safe_response"], "safe_response", i, source)
            if cols["safe_response"] is not None
            else default_safe_response
        )
        harmful = (
            _text_cell(row, cols["harmful_response"], "harmful_response", i, source)
            if cols["harmful_response"] is not None
            else default_target
        )
        layer = _layer_cell(row, cols["layer"], i, source) if cols["layer"] is not None else None
        # prompt (and below, response) is a required column: resolve_columns raised if it is missing
        examples.append(
            SafetyExample(
                prompt=_text_cell(row, cast(str, cols["prompt"]), "prompt", i, source),
                safe_response=safe,
                harmful_response=harmful,
                layer=layer,
                index=i,
            )
        )
    return examples


def load_benign_examples(
    source: str, split: str = "train", columns: Mapping[str, str] | None = None, max_examples: int | None = None
) -> list[BenignExample]:
    """Load benign (prompt, response) pairs.

    Alpaca-style data (``instruction`` / ``input`` / ``output``) is recognised: a non-empty ``input`` is
    appended to the instruction after a blank line when the prompt column was auto-detected.

    Args:
        source: see :func:`load_records`.
        split: dataset split.
        columns: ``field -> column`` map for ``prompt`` and ``response`` (``data.benign_columns``).
        max_examples: keep only the first N rows.

    Returns:
        The examples in source order.

    Raises:
        DataError: the source cannot be read, is empty, lacks a column, or has an invalid cell.
    """
    records = _limit(load_records(source, split), max_examples, source)
    if not records:
        raise DataError(f"no examples in {source} (split '{split}')")
    cols = resolve_columns(records, columns, BENIGN_CANDIDATES, BENIGN_FIELDS, source, "data.benign_columns")
    add_context = (
        cols["prompt"] == _ALPACA_PROMPT and "prompt" not in dict(columns or {}) and cols["response"] != _ALPACA_CONTEXT
    )
    examples = []
    for i, row in enumerate(records):
        prompt = _text_cell(row, cast(str, cols["prompt"]), "prompt", i, source)
        context = row.get(_ALPACA_CONTEXT) if add_context else None
        if isinstance(context, str) and context.strip():
            prompt = f"{prompt}\n\n{context}"
        examples.append(
            BenignExample(prompt=prompt, response=_text_cell(row, cast(str, cols["response"]), "response", i, source))
        )
    return examples


__all__ = [
    "BENIGN_CANDIDATES",
    "DEFAULT_SAFE_RESPONSE",
    "SAFETY_CANDIDATES",
    "SAFETY_FIELDS",
    "filter_records",
    "load_benign_examples",
    "load_records",
    "load_safety_examples",
    "resolve_columns",
]
