"""Checks written beside the settings they check: one mechanism for every key of the run config.

A settings field declares its valid values in its own definition::

    steps: int = setting(16, check=">= 1")                     # pgd: optimisation steps
    norm: str = setting("l2", choices=("l2", "linf"))          # pgd: l2 or linf ball
    batch_size: int = setting(256, check=">= 1", resume="rows per batch: same results")

``check`` is a comma-separated list of clauses: ``">= N"``, ``"> N"``, ``"< N"``, intervals ``"in [a, b)"`` /
``"in (a, b]"`` / ``"in [a, b]"``, ``"not empty"`` and ``"unique"`` (lists) and ``"each <clause>"`` (every entry of
a list). ``None`` is always valid (an unset optional key). ``choices`` is a fixed set of values, a callable
returning one, or a registry named ``"module:function"`` (imported when checked, so a settings class needs no
import of the registry that imports it: attack names, positions policies). ``resume`` says why the key may change
when a run resumes (keys without it may not).

The same metadata serves two readers: a frozen settings class calls :func:`validate` in ``__post_init__`` (a
library user constructing settings by hand gets a ``ValueError`` naming the field), and the preflight walks the
run config's schema with :func:`walk` to check every key of a recipe before a run directory exists (one line
naming the full key path, exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# Layer lists may also name the input embeddings and every block; those are checked against the model later.
LAYER_NAMES = ("embed", "all")
_COMPARE = {">=": lambda v, n: v >= n, ">": lambda v, n: v > n, "<": lambda v, n: v < n}
_INTERVAL = re.compile(r"in ([\[(])(-?[\d.]+), (-?[\d.]+)([\])])$")
_CLAUSE_SPLIT = re.compile(r", (?=[a-z<>])")  # not inside an interval "in [0, 1)"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    check: str | None = None,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | str | None = None,
    resume: str | None = None,
) -> Any:
    """A dataclass field that carries its own check (see the module docstring).

    Args:
        default / default_factory: as for :func:`dataclasses.field`.
        check: the valid range, in the clause language above.
        choices: the allowed values, or a callable giving them (looked up when checked).
        resume: why a resumed run may change this key.
    """
    metadata = {k: v for k, v in (("check", check), ("choices", choices), ("resume", resume)) if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _fmt(value: Any) -> str:
    return "[" + ", ".join(_fmt(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)


def satisfies(value: Any, clause: str) -> bool:
    """Whether a number meets one comparison or interval clause (``">= 1"``, ``"in [0, 1)"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    m = _INTERVAL.match(clause)
    if m:
        lo_closed, lo, hi, hi_closed = m.group(1) == "[", float(m.group(2)), float(m.group(3)), m.group(4) == "]"
        return (value >= lo if lo_closed else value > lo) and (value <= hi if hi_closed else value < hi)
    op, number = clause.split(" ", 1)
    return _COMPARE[op](value, float(number))


def range_error(key: str, value: Any, check: str, empty_hint: str | None = None) -> str | None:
    """The one-line message when ``value`` breaks ``check`` (``None`` when it holds or is unset)."""
    if value is None:
        return None
    for clause in _CLAUSE_SPLIT.split(check):
        if clause == "not empty":
            if isinstance(value, (list, tuple)) and not value:
                return f"{key} is empty; give at least one value" + (f" ({empty_hint})" if empty_hint else "")
        elif clause == "unique":
            value = list(value)
            seen = [v for i, v in enumerate(value) if v in value[:i]]
            if seen:
                return f"{key} lists {seen[0]} more than once: {_fmt(value)}"
        elif clause.startswith("each "):
            names = LAYER_NAMES if key.endswith("layers") else ()
            bad = [v for v in value if v not in names and not satisfies(v, clause[5:])]
            if bad:
                return f"every entry of {key} must be {clause[5:]}, got {_fmt(bad[0])} in {_fmt(value)}"
        elif not satisfies(value, clause):
            return f"{key} must be {clause}, got {_fmt(value)}"
    return None


def allowed_values(choices: Sequence[Any] | Callable[[], Sequence[Any]] | str) -> tuple[Any, ...]:
    """A field's choices (a registry's callable, or its ``"module:function"`` name, is called now)."""
    if isinstance(choices, str):
        import importlib

        module, _, function = choices.partition(":")
        choices = getattr(importlib.import_module(module), function)
    return tuple(choices() if callable(choices) else choices)


def choice_error(key: str, value: Any, choices: Sequence[Any] | Callable[[], Sequence[Any]] | str) -> str | None:
    """The one-line message when ``value`` is not among the choices, with the closest one (``None`` if valid)."""
    allowed = allowed_values(choices)
    if value is None or value in allowed:
        return None
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"invalid value '{value}' for '{key}'; choose one of {', '.join(map(str, allowed))}{hint}"


def field_error(key: str, value: Any, field: dataclasses.Field) -> str | None:
    """The first broken check of one field's metadata, as a one-line message naming ``key``."""
    meta = field.metadata
    if "choices" in meta:
        error = choice_error(key, value, meta["choices"])
        if error:
            return error
    return range_error(key, value, meta["check"]) if "check" in meta else None


def validate(settings: Any, prefix: str = "") -> None:
    """Check every field of a settings dataclass instance against its metadata (nested settings are validated by
    their own ``__post_init__``).

    Raises:
        ValueError: one line naming the first field that breaks its check.
    """
    for f in dataclasses.fields(settings):
        error = field_error(prefix + f.name, getattr(settings, f.name), f)
        if error:
            raise ValueError(error)


def settings_copy(cls: type[T], value: Any) -> T:
    """``value`` as a ``cls`` settings object: itself, the defaults for ``None``, or a copy of any object with the
    same fields (a config section's node; a list-like value becomes a list)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value

    def plain(v: Any) -> Any:
        return list(v) if hasattr(v, "__len__") and not isinstance(v, (str, bytes, dict)) else v

    return cls(**{f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """Every field of a (schema) dataclass as ``(key path, field)``, nested dataclass sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        yield key, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], key + ".")


__all__ = [
    "LAYER_NAMES",
    "allowed_values",
    "choice_error",
    "field_error",
    "range_error",
    "satisfies",
    "setting",
    "settings_copy",
    "validate",
    "walk",
]
