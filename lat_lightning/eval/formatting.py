"""Number formatting shared by the evaluation reports: the durability report, the defence comparison and the run
report (``report.md``).

One place decides how a missing value, a rate, a spread and a change read, so the three tables agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

NOT_AVAILABLE = "n/a"  # a value that was not measured, or is not a number


def fmt_number(x: Any, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; ``n/a`` for ``None`` and NaN; anything that is not a number (a note) as is."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NOT_AVAILABLE
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def fmt_mean_std(x: Any, std: Any = None, digits: int = 2) -> str:
    """``x ± std``; the spread is left out when it is missing or NaN, a string ``x`` (a note) is kept as is."""
    if isinstance(x, str):
        return x
    spread = f" ± {std:.{digits}f}" if isinstance(std, (int, float)) and std == std else ""
    return fmt_number(x, digits) + spread


def fmt_signed(x: Any, digits: int = 2) -> str:
    """A change with its sign (``+0.12``, ``-0.30``); ``n/a`` for ``None``; NaN or a note as ``str``."""
    if isinstance(x, (int, float)) and x == x:
        return f"{x:+.{digits}f}"
    return NOT_AVAILABLE if x is None else str(x)


def _digits(kind: str) -> int:
    """Rates read to two decimals, losses to three."""
    return 2 if kind == "rate" else 3


def fmt_value(x: Any, std: Any = None, kind: str = "rate", detail: str | None = None, budget: int | None = None) -> str:
    """One model's cell of a table row of kind ``rate``, ``loss``, ``layer`` or ``steps``.

    Args:
        x: the value (``None``: not measured; for ``steps``: not broken within ``budget``).
        std: its spread (``± std``), or ``None``.
        kind: ``rate`` (two decimals), ``loss`` (three), ``layer`` (an index) or ``steps`` (steps-to-break).
        detail: shown in brackets after the value.
        budget: the step budget of a ``steps`` cell (``> budget`` when ``x`` is ``None``).
    """
    if kind == "steps":  # steps-to-break; None = not broken within the budget
        out = (f"> {budget}" if budget is not None else NOT_AVAILABLE) if x is None else str(int(x))
        return f"{out} ({detail})" if detail else out
    if x is None:
        return NOT_AVAILABLE
    if kind == "layer":  # the input embeddings' id (-2) shows as "embed"
        from lat_lightning.models.layers import layer_name

        return layer_name(int(x))
    out = fmt_mean_std(x, std, _digits(kind))
    return f"{out} ({detail})" if detail else out


def fmt_change(row: Mapping[str, Any]) -> str:
    """The change cell of a two-model row (``original``, ``hardened``, ``change``, ``kind``, ``budget``)."""
    if row["kind"] == "layer":
        o, h = row["original"], row["hardened"]
        if o is None or h is None:
            return NOT_AVAILABLE
        return "moved" if int(o) != int(h) else "same"
    c = row["change"]
    if row["kind"] == "steps":
        o, h, b = row["original"], row["hardened"], row["budget"]
        if c is not None:
            return f"{int(c):+d}"
        if o is not None and h is None:  # the hardened model outlasted the budget: more than b - o steps more
            return f"> {b - int(o):+d}"
        if o is None and h is not None:
            return f"< {int(h) - b:+d}"
        return "n/a (neither broke)"
    if c is None:
        return NOT_AVAILABLE
    return fmt_signed(c, _digits(row["kind"]))


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (std 0 for one value; ``(None, None)`` for none)."""
    vals = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return None, None
    return float(vals.mean()), (float(vals.std(ddof=1)) if vals.size > 1 else 0.0)


__all__ = ["NOT_AVAILABLE", "fmt_change", "fmt_mean_std", "fmt_number", "fmt_signed", "fmt_value", "mean_std"]
