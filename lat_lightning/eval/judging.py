"""Judging helpers shared by the durability suite and the defence comparison: the judges by name, the coherence
check, per-item verdicts as numbers and NaN-aware means.

Nothing here reads a run config: callers pass the judge names, the coherence settings and the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from lat_lightning.eval.coherence import CoherenceScorer, CoherenceSettings


def finite(x: Any) -> float | None:
    """``x`` as a float; ``None`` for ``None``, NaN and infinity (a JSON-able "not measured")."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def nanmean(a: Any) -> float | None:
    """The mean of the finite entries of ``a``; ``None`` when there are none (nothing was judged)."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def judge_rates(
    judge_map: Mapping[str, Any],
    prompts: list[str],
    responses: list[str],
    targets: list[str | None],
    coherence: list[dict] | None = None,
) -> dict[str, np.ndarray]:
    """``judge -> [1 / 0 / NaN per item]``; a judge that raises fails every item (counted, never dropped)."""
    from lat_lightning.eval.judges import judge_items

    verdicts = judge_items(dict(judge_map), prompts, responses, targets, coherence)
    return {name: np.array([v.as_float() for v in vs], dtype=np.float64) for name, vs in verdicts.items()}


def coherence_scorer(
    model: nn.Module, tokenizer, coherence: CoherenceSettings, batch_size: int
) -> CoherenceScorer | None:
    """The coherence check with ``model`` as the unattacked model (``None`` when ``coherence.enabled`` is off)."""
    if not coherence.enabled:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return CoherenceScorer(model, coherence, pad_id, batch_size)


def build_judge_map(
    judges: Sequence[str] | Mapping[str, Any],
    coherence: CoherenceSettings,
    classifier_path: str | None = None,
    target_key_pattern: str | None = None,
) -> dict[str, Any]:
    """``name -> judge``: ``judges`` (names, or a map passed through) plus their ``+coherent`` twins when the
    coherence check adds them (``coherence.enabled`` and ``coherence.judges``).

    Args:
        judges: judge names (:func:`lat_lightning.eval.judges.build_judges`) or ``name -> judge``.
        coherence: the coherence settings.
        classifier_path / target_key_pattern: the classifier and ``target_match`` judges' options.
    """
    from lat_lightning.eval.judges import build_judges, with_coherent_judges

    out = (
        dict(judges) if isinstance(judges, Mapping) else build_judges(list(judges), classifier_path, target_key_pattern)
    )
    return with_coherent_judges(out) if coherence.enabled and coherence.judges else out


def primary_judge_of(judge_map: Mapping[str, Any], preferred: str) -> str:
    """``preferred`` when the map has it, else the map's first judge."""
    return preferred if preferred in judge_map else next(iter(judge_map))


__all__ = ["build_judge_map", "coherence_scorer", "finite", "judge_rates", "nanmean", "primary_judge_of"]
