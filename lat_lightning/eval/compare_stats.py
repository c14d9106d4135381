"""Intervals over training seeds and prompts for the defence comparison (stage ``compare``, ``docs/defences.md``).

Each defence is trained once per seed of ``compare.seeds``; each trained model gets one battery. A success-rate cell
is a mean over those batteries (and, inside a battery, over the attack's own noise seeds) of the share of the ``P``
held-out prompts broken. Two things make it noisy: the training seed (and the attack's noise / LoRA seed) and the
finite sample of prompts. The interval resamples both, a **two-stage bootstrap**:

    for b in 1..B:   draw n seeds of the model with replacement (its batteries' seed runs, pooled),
                     draw P prompt indices with replacement (the SAME indices for every model: prompts are paired),
                     r_b = mean over the drawn seeds of the mean over the drawn prompts of the 0/1 outcome

and the cell's interval is the 2.5 / 97.5 percentiles of ``r_b`` (:func:`cell_interval`). The difference of a
defence from the reference row (plain refusal SFT) is bootstrapped the same way with the prompt draw shared by both
models and the seed draws independent (:func:`difference_interval`); it is **beyond noise** when its 95 % interval
excludes 0. Where a battery has no per-prompt outcomes (the fine-tuning attack's success at the budget), only the
seeds are resampled for the cell's interval, and no difference is judged (too coarse to call). With 3 seeds the
seed stage is coarse (a bootstrap of 3 values understates their spread by a factor sqrt(2/3)); the prompt stage is
what keeps a one-prompt difference between two seed-stable models (0.03 vs 0.00) from reading as real.

Utility cells: mean over seeds with a Student-t 95 % interval (no per-row outcomes are kept).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
# Student-t 0.975 quantiles for 1..30 degrees of freedom (a statistical table; the normal 1.96 beyond).
T_975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def outcomes(values: Sequence[float | None]) -> list[float | None]:
    """1 / 0 / NaN verdicts as JSON-able floats, ``None`` for NaN (not judged)."""
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]


def any_layer_outcomes(success: np.ndarray, seed_indices: Sequence[int]) -> list[list[float | None]]:
    """``success[prompt, layer, seed]`` (1 / 0 / NaN) -> per run seed, per prompt: broken at any layer (1), at none
    (0), ``None`` where no layer was judged. The mean of a run's judged outcomes is its MASR."""
    out = []
    for k in seed_indices:
        m = success[:, :, k]
        judged = np.isfinite(m).any(axis=1)
        best = np.where(np.isfinite(m), m, -np.inf).max(axis=1)
        out.append(outcomes([float(b) if j else float("nan") for b, j in zip(best, judged)]))
    return out


def _runs_matrix(runs: Sequence[Sequence[float]]) -> np.ndarray:
    """Seed runs of per-prompt outcomes -> ``[runs, prompts]`` float array (runs of unequal length: ValueError)."""
    lengths = {len(r) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"per-prompt outcomes of different lengths across seeds: {sorted(lengths)}")
    return np.array([[np.nan if v is None else float(v) for v in r] for r in runs], dtype=float)


def _draws(runs: np.ndarray, seed_idx: np.ndarray, prompt_idx: np.ndarray | None) -> np.ndarray:
    """``B`` bootstrap means: rows ``seed_idx[b]`` (``[B, n]``), columns ``prompt_idx[b]`` (``[B, P]``) or all."""
    picked = runs[seed_idx]  # [B, n, P]
    if prompt_idx is not None:
        picked = np.take_along_axis(picked, prompt_idx[:, None, :], axis=2)
    with warnings.catch_warnings():  # an all-NaN draw (no judged outcome) is NaN, dropped by _percentiles
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.nanmean(picked, axis=2), axis=1)


def _indices(rng: np.random.Generator, samples: int, n_runs: int, n_prompts: int | None):
    seeds = rng.integers(0, n_runs, size=(samples, n_runs))
    prompts = rng.integers(0, n_prompts, size=(samples, n_prompts)) if n_prompts else None
    return seeds, prompts


def _percentiles(values: np.ndarray) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 100 * (1 - LEVEL) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def cell_interval(runs: Sequence[Sequence[float]], samples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """The two-stage bootstrap 95 % interval of a model's success rate (module docstring).

    Args:
        runs: per seed run, the per-prompt outcomes (1 / 0 / NaN); a run of one value per seed (no prompt stage)
            is a list of length 1 each.
        samples: bootstrap draws.
        seed: the bootstrap's own seed (fixed: the report repeats).

    Returns:
        ``(low, high)``, or ``None`` without any judged outcome.
    """
    arr = _runs_matrix(runs)
    rng = np.random.default_rng(seed)
    n_prompts = arr.shape[1] if arr.shape[1] > 1 else None
    s_idx, p_idx = _indices(rng, samples, arr.shape[0], n_prompts)
    return _percentiles(_draws(arr, s_idx, p_idx))


def difference_interval(
    runs: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Mean, 95 % interval and verdict of ``rate(runs) - rate(reference)``, prompts paired (module docstring).

    Returns:
        ``{"diff", "low", "high", "beyond_noise"}`` (``beyond_noise``: the interval excludes 0), or ``None`` without
        judged outcomes on either side.
    """
    a, r = _runs_matrix(runs), _runs_matrix(reference)
    if a.shape[1] != r.shape[1]:
        raise ValueError(f"{a.shape[1]} per-prompt outcomes against {r.shape[1]} for the reference: not paired")
    rng = np.random.default_rng(seed)
    n_prompts = a.shape[1] if a.shape[1] > 1 else None
    sa, p_idx = _indices(rng, samples, a.shape[0], n_prompts)
    sr = rng.integers(0, r.shape[0], size=(samples, r.shape[0]))
    with warnings.catch_warnings():  # an all-NaN draw (no judged outcome) is NaN, dropped by _percentiles
        warnings.simplefilter("ignore", RuntimeWarning)
        diff = float(np.nanmean(a) - np.nanmean(r))
    if not math.isfinite(diff):
        return None
    ci = _percentiles(_draws(a, sa, p_idx) - _draws(r, sr, p_idx))
    if ci is None:
        return None
    return {"diff": diff, "low": ci[0], "high": ci[1], "beyond_noise": bool(ci[0] > 0 or ci[1] < 0)}


def t_interval(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean ± Student-t 95 % half-width over seeds (``None`` with fewer than 2 finite values)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size < 2:
        return None
    df = v.size - 1
    q = T_975[df - 1] if df <= len(T_975) else 1.96
    half = float(q * v.std(ddof=1) / math.sqrt(v.size))
    return float(v.mean() - half), float(v.mean() + half)


def seed_runs(batteries: Sequence[Mapping[str, Any]], getter) -> list[list[float]] | None:
    """The seed runs of one cell pooled over a model's batteries: ``getter(battery)`` gives a battery's runs (per
    seed, per prompt) or ``None``; ``None`` when any battery lacks them."""
    runs: list[list[float]] = []
    for b in batteries:
        got = getter(b)
        if got is None:
            return None
        runs.extend(list(r) for r in got)
    return runs or None


# ------------------------------------------------------------------------------------------ cells over batteries
def batteries_of(result: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A model's batteries: one per training seed (a single battery is a list of one)."""
    return [result] if isinstance(result, Mapping) else list(result)


def rate_cell(batteries: Sequence[Mapping[str, Any]], value_of, runs_of, std_of, samples: int) -> tuple[dict, Any]:
    """A success-rate cell over a model's batteries, and the seed runs its intervals resample.

    Args:
        batteries: one per training seed.
        value_of / runs_of / std_of: a battery's rate, its per-seed per-prompt outcomes (or ``None``) and its own
            spread over its noise seeds (or ``None``).
        samples: bootstrap draws.

    Returns:
        ``({"value": mean over batteries, "std", ["ci": [low, high]]}, runs or None)``. ``std``: one battery's own
        spread over noise seeds, or the sample std over the batteries. ``ci``: the two-stage bootstrap interval
        (:func:`cell_interval`), present when there is something to resample (several seed runs or prompts).
    """
    values = [_finite(value_of(b)) for b in batteries]
    judged = [v for v in values if v is not None]
    value = float(np.mean(judged)) if judged else None
    if len(batteries) == 1:
        std = _finite(std_of(batteries[0]))
    else:
        std = float(np.std(judged, ddof=1)) if len(judged) > 1 else None
    cell: dict[str, Any] = {"value": value, "std": std}
    runs = seed_runs(batteries, runs_of)
    if runs is None and len(batteries) > 1:  # no per-prompt outcomes: the seeds alone
        runs = [[float("nan") if v is None else v] for v in values]
    if runs is not None and (len(runs) > 1 or len(runs[0]) > 1):
        ci = cell_interval(runs, samples)
        cell["ci"] = list(ci) if ci is not None else None
    else:
        runs = None
    return cell, runs


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def utility_cell(batteries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Utility over a model's batteries: the mean, and a Student-t 95 % interval over seeds (:func:`t_interval`)."""
    values = [_finite(b["utility"]) for b in batteries]
    judged = [v for v in values if v is not None]
    cell: dict[str, Any] = {"value": float(np.mean(judged)) if judged else None, "std": None}
    if len(batteries) > 1:
        ci = t_interval(judged)
        cell["ci"] = list(ci) if ci is not None else None
    return cell


def merged_finetune(batteries: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The fine-tuning curves of a model's batteries as one curve whose seeds are ``<training seed>:<LoRA seed>``
    (a single battery's curve is returned as is)."""
    from lat_lightning.eval.durability import median_steps_to_break

    curves = [(b.get("seed", i), b["finetune"]) for i, b in enumerate(batteries) if b.get("finetune")]
    if not curves:
        return None
    if len(curves) == 1:
        return dict(curves[0][1])
    kept = ("budget", "eval_steps", "break_rate", "primary_judge", "stop_at_break")
    merged = {k: v for k, v in curves[0][1].items() if k in kept}
    for key in ("success", "harmful_loss", "steps_to_break"):
        merged[key] = {f"{t}:{k}": v for t, ft in curves for k, v in ft[key].items()}
    merged["seeds"] = list(merged["success"])
    merged["steps_to_break_median"] = median_steps_to_break(list(merged["steps_to_break"].values()))
    for key in ("success", "harmful_loss"):
        arr = np.array(list(merged[key].values()), dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(arr, axis=0)
        if merged.get("stop_at_break"):  # a step some seed did not reach (it stopped at its break) gets no mean
            mean = np.where(np.isnan(arr).any(axis=0), np.nan, mean)
        merged[f"{key}_mean"] = [_finite(v) for v in mean]
    return merged


def difference_cells(
    runs: Mapping[str, Mapping[str, Any]], baseline: str, samples: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {column: difference_interval(model, baseline)}}`` for every model but ``baseline`` and every column
    whose per-prompt outcomes both models kept (``runs``: model -> column -> seed runs)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if baseline not in runs:
        return out
    for model, cols in runs.items():
        if model == baseline:
            continue
        for col, r in cols.items():
            ref = runs[baseline].get(col)
            # Only where the prompts are resampled: a seed-only bootstrap of 3 values (the fine-tuning attack's
            # success, which keeps no per-prompt outcomes) would call a one-prompt difference between two
            # seed-stable models real.
            if r is None or ref is None or len(r[0]) != len(ref[0]) or len(r[0]) < 2:
                continue
            d = difference_interval(r, ref, samples)
            if d is not None:
                out.setdefault(model, {})[col] = d
    return out


def row_cells(name, batteries, attack_columns, prefill_ks, finetune: bool, samples: int):
    """One row of the comparison's table (:func:`lat_lightning.eval.compare.build_table`): its cells over the model's
    batteries, and the seed runs of each rate column (for the differences from the baseline).

    Raises:
        ValueError: a battery lacks an attack column or the fine-tuning curve.
    """
    lambdas = [_finite(b.get("lambda")) for b in batteries]
    known = [v for v in lambdas if v is not None]
    cells: dict[str, dict[str, Any]] = {
        "utility": utility_cell(batteries),
        "lambda": {"value": float(np.mean(known)) if known else None, "std": None},
    }
    if len(batteries) > 1 and known:
        cells["lambda"]["per_seed"] = lambdas
    runs: dict[str, Any] = {}
    cells["init"], runs["init"] = rate_cell(
        batteries, lambda b: b["init"], lambda b: b.get("init_per_prompt"), lambda b: None, samples
    )
    for c in attack_columns:
        for b in batteries:
            if c not in b["attacks"]:
                raise ValueError(f"the battery of '{name}' has no result for attack column '{c}'")
        cells[c], runs[c] = rate_cell(
            batteries,
            lambda b, c=c: b["attacks"][c]["value"],
            lambda b, c=c: b["attacks"][c].get("per_prompt"),
            lambda b, c=c: b["attacks"][c].get("std"),
            samples,
        )
    for k in prefill_ks:
        col = f"prefill_{k}"
        cells[col], runs[col] = rate_cell(
            batteries,
            lambda b, k=k: b["prefill"][str(k)]["rate"],
            lambda b, k=k: [b["prefill"][str(k)]["per_prompt"]] if "per_prompt" in b["prefill"][str(k)] else None,
            lambda b: None,
            samples,
        )
    if finetune:
        ft = merged_finetune(batteries)
        if ft is None:
            raise ValueError(f"the battery of '{name}' has no fine-tuning curve")
        from lat_lightning.eval.durability import last_measured

        # each seed's success at the budget, or at its break when its fine-tune stopped there
        ends = [last_measured(v) for v in ft["success"].values() if v]
        last = [[float(x)] for x in ends if x is not None]
        cells["finetune_rate"], runs["finetune_rate"] = rate_cell(
            [{"runs": last}], lambda b: np.mean([r[0] for r in b["runs"]]), lambda b: b["runs"], lambda b: None, samples
        )
        if len(last) > 1:
            cells["finetune_rate"]["std"] = _finite(np.std([r[0] for r in last]))
        cells["finetune_steps"] = {
            "value": _finite(ft["steps_to_break_median"]),
            "std": None,
            "per_seed": dict(ft["steps_to_break"]),
            "budget": int(ft["budget"]),
        }
    return cells, runs


__all__ = [
    "LEVEL",
    "T_975",
    "any_layer_outcomes",
    "batteries_of",
    "difference_cells",
    "merged_finetune",
    "outcomes",
    "rate_cell",
    "row_cells",
    "utility_cell",
    "cell_interval",
    "difference_interval",
    "seed_runs",
    "t_interval",
]
