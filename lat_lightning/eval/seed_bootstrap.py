"""Intervals of a mean over perturbation seeds: a two-stage bootstrap (seeds, then prompts) of a scan's success array.

A scan's headline numbers for a seeded attack (ASA random) are means over its noise seeds: ``MASR = mean_k
MASR_k``, ``PASR = mean_k PASR_k`` (each seed's own peak), ``INIT = mean_k INIT_k``. Their interval must describe
that same mean, not one seed's rate. Two things make it noisy, the noise seed and the finite sample of prompts, so
each bootstrap draw resamples both:

    for b in 1..B:   draw S seed indices with replacement,
                     draw N prompt indices with replacement (the SAME prompts for every drawn seed: a prompt's
                     seeds and layers stay together, they are correlated),
                     r_b = mean over the drawn seeds of the statistic on the drawn prompts

and the interval is the ``alpha / 2`` and ``1 - alpha / 2`` percentiles of ``r_b``. This is the scheme of the defence
comparison's cells (:func:`lat_lightning.eval.compare_stats.cell_interval`), drawn in the same order: for MASR, a
mean of per-prompt outcomes, the two give the same interval for the same bootstrap seed
(``tests/eval/test_seed_bootstrap.py`` holds them together). With one seed (ASAgrad, PGD) the seed stage is a no-op
and this is the plain prompt bootstrap (:func:`lat_lightning.eval.metrics.bootstrap_ci`, the same draws). With 3
seeds the seed stage is coarse (a bootstrap of 3 values understates their spread by a factor sqrt(2/3)).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

MAX_CHUNK_VALUES = 2_000_000  # floats of one vectorised chunk of draws ([draws, N, L, S]), ~16 MB


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the non-NaN entries along ``axis``; NaN (no warning) where every entry is NaN."""
    judged = np.isfinite(x).sum(axis=axis)
    total = np.where(np.isfinite(x), x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(judged > 0, total / np.maximum(judged, 1), np.nan)


def per_seed_init(clean: np.ndarray) -> np.ndarray:
    """``clean[..., N, S]`` (1 / 0 / NaN) -> INIT of every seed ``[..., S]`` (mean over judged prompts)."""
    return _nanmean(clean, axis=-2)


def per_seed_masr(s: np.ndarray) -> np.ndarray:
    """``s[..., N, L, S]`` -> MASR of every seed ``[..., S]``: the mean over prompts judged at some layer of
    "broken at any judged layer" (:func:`lat_lightning.eval.metrics.masr` per seed)."""
    judged = np.isfinite(s)
    broken = np.where(judged, s, 0.0).max(axis=-2)  # [..., N, S]
    broken = np.where(judged.any(axis=-2), broken, np.nan)
    return _nanmean(broken, axis=-2)


def per_seed_pasr(s: np.ndarray) -> np.ndarray:
    """``s[..., N, L, S]`` -> PASR of every seed ``[..., S]``: the max over layers of the LASR (NaN-aware; NaN where
    no layer has a judged prompt), as :func:`lat_lightning.eval.metrics.pasr` per seed."""
    lasr = _nanmean(s, axis=-3)  # [..., L, S]
    with warnings.catch_warnings():  # an all-NaN seed (no judged cell) is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(lasr, axis=-2)


def seed_mean_interval(
    per_seed: Callable[[np.ndarray], np.ndarray],
    arr: np.ndarray,
    samples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """The two-stage bootstrap interval (module docstring) of ``mean over seeds of per_seed(arr)``.

    Args:
        per_seed: statistic of every seed, ``[..., N, *rest, S] -> [..., S]`` (:func:`per_seed_masr`,
            :func:`per_seed_pasr`, :func:`per_seed_init`); it must accept a leading batch axis of draws.
        arr: prompts on axis 0, seeds on the last axis (``[N, L, S]`` or ``[N, S]``), 1 / 0 / NaN.
        samples: bootstrap draws (>= 1).
        seed: the bootstrap's own seed (fixed: the report repeats).
        alpha: 1 - confidence level.

    Returns:
        ``(low, high)``, or ``None`` without any judged outcome (or without prompts).

    Raises:
        ValueError: ``samples < 1``, ``alpha`` not in (0, 1) or ``arr`` with fewer than 2 axes.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"arr must have prompts on axis 0 and seeds on the last axis, got shape {arr.shape}")
    n, n_seeds = arr.shape[0], arr.shape[-1]
    if n == 0 or n_seeds == 0:
        return None
    rng = np.random.default_rng(seed)
    # compare_stats._indices' order: every draw's seeds, then every draw's prompts
    seed_idx = rng.integers(0, n_seeds, size=(samples, n_seeds))
    prompt_idx = rng.integers(0, n, size=(samples, n))
    chunk = max(1, MAX_CHUNK_VALUES // max(1, arr.size))
    draws = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        values = per_seed(arr[prompt_idx[start:stop]])  # [draws, S]
        draws[start:stop] = _nanmean(np.take_along_axis(values, seed_idx[start:stop], axis=1), axis=1)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    low, high = np.percentile(draws, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


__all__ = ["per_seed_init", "per_seed_masr", "per_seed_pasr", "seed_mean_interval"]
