"""The intervals of the means over seeds (``lat_lightning.eval.seed_bootstrap``): the same quantity as the point
estimate beside them, in the scan summary, the scan report and the real-organism benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.real_organism import attack_figures
from lat_lightning.eval import seed_bootstrap
from lat_lightning.eval.compare_stats import any_layer_outcomes, cell_interval
from lat_lightning.eval.metrics import bootstrap_ci, masr, pasr, summarise_seeds
from lat_lightning.eval.scan.summary import _headline
from lat_lightning.eval.seed_bootstrap import per_seed_masr, per_seed_pasr, seed_mean_interval


def _keyword_like() -> np.ndarray:
    """8 prompts x 2 layers x 3 seeds: seeds 0 and 1 break every prompt, seed 2 all but one (MASR 1, 1, 0.875:
    mean 0.958, the shape of the real organism's `keyword` row beside seed 0's interval [1.0, 1.0])."""
    s = np.ones((8, 2, 3))
    s[7, :, 2] = 0.0
    return s


def _random(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = (rng.random((12, 4, 3)) < 0.3).astype(float)
    s[rng.random(s.shape) < 0.1] = np.nan  # judge failures
    s[5] = np.nan  # a prompt never judged
    return s


def test_per_seed_statistics_are_the_metrics_of_each_seed():
    s = _random()
    assert per_seed_masr(s) == pytest.approx([masr(s[:, :, k]) for k in range(3)])
    assert per_seed_pasr(s) == pytest.approx([pasr(s[:, :, k])[0] for k in range(3)])


def test_masr_interval_is_the_comparisons_two_stage_bootstrap():
    """For MASR (a mean of per-prompt outcomes) the scan's interval and the defence comparison's cell interval are
    the same bootstrap: same draws, same interval."""
    s = _random(1)
    ours = seed_mean_interval(per_seed_masr, s, samples=300, seed=4)
    theirs = cell_interval(any_layer_outcomes(s, [0, 1, 2]), samples=300, seed=4)
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_the_seed_mean_interval_contains_the_seed_mean_where_seed_0s_does_not():
    s = _keyword_like()
    out = summarise_seeds(s, np.zeros(8), layer_ids=[-2, 6], samples=400, seed=0, seed_ids=[0, 1, 2])
    assert out["masr_mean"] == pytest.approx(23 / 24)
    assert out["per_seed"][0]["masr_ci"] == [1.0, 1.0]  # seed 0's own rate: not the mean's interval
    low, high = out["masr_mean_ci"]
    assert low < out["masr_mean"] <= high == 1.0
    low, high = out["pasr_mean_ci"]
    assert low < out["pasr_mean"] <= high
    assert out["init_mean_ci"] == [0.0, 0.0]


def test_one_seed_is_the_plain_prompt_bootstrap():
    """With one seed the seed stage is a no-op: the same draws, the same interval as ``bootstrap_ci`` over prompts
    (and as that seed's own ``per_seed[0]`` intervals in ``summarise_seeds``)."""
    s = _random(2)[:, :, :1]
    for stat, per_seed in ((masr, per_seed_masr), (lambda a: pasr(a)[0], per_seed_pasr)):
        ours = seed_mean_interval(per_seed, s, samples=200, seed=7)
        assert ours == pytest.approx(bootstrap_ci(stat, s[:, :, 0], samples=200, seed=7), abs=1e-12)
    clean = np.array([1.0, 0.0, np.nan, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    out = summarise_seeds(s, clean, samples=200, seed=7)
    for key in ("init", "pasr", "masr"):
        assert out[f"{key}_mean_ci"] == pytest.approx(out["per_seed"][0][f"{key}_ci"], abs=1e-12)


def test_intervals_contain_the_mean_and_repeat():
    for k in range(4):
        s = _random(10 + k)
        out = summarise_seeds(s, (s[:, 0, 0] == 1).astype(float), samples=300, seed=k)
        for key in ("init", "masr"):  # means of per-prompt outcomes (PASR, a max, may sit below: docs/metrics.md)
            low, high = out[f"{key}_mean_ci"]
            assert low <= out[f"{key}_mean"] <= high
        assert out == summarise_seeds(s, (s[:, 0, 0] == 1).astype(float), samples=300, seed=k)


def test_chunked_draws_equal_one_chunk(monkeypatch):
    s = _random(3)
    whole = seed_mean_interval(per_seed_pasr, s, samples=100, seed=1)
    monkeypatch.setattr(seed_bootstrap, "MAX_CHUNK_VALUES", s.size * 7)  # chunks of 7 draws (the last one short)
    assert seed_mean_interval(per_seed_pasr, s, samples=100, seed=1) == whole


def test_no_intervals_without_samples_or_judged_outcomes():
    s = _random(2)
    out = summarise_seeds(s, np.zeros(12), samples=0)
    assert out["init_mean_ci"] is None and out["pasr_mean_ci"] is None and out["masr_mean_ci"] is None
    assert seed_mean_interval(per_seed_masr, np.full((3, 2, 2), np.nan), samples=20) is None
    assert seed_mean_interval(per_seed_masr, np.zeros((0, 2, 2)), samples=20) is None
    with pytest.raises(ValueError, match="samples"):
        seed_mean_interval(per_seed_masr, s, samples=0)


def test_scan_headline_and_benchmark_show_the_interval_of_the_mean():
    """The scan summary's headline (what scan_report.md prints) and the RESULT line of benchmarks.real_organism put
    beside the seed-mean MASR / PASR the interval of that mean (before: seed 0's, [1.0, 1.0] beside 0.958)."""
    judge = summarise_seeds(_keyword_like(), np.zeros(8), layer_ids=[-2, 6], samples=400, seed=0)
    head = _headline(judge)
    assert head["masr_ci"] == judge["masr_mean_ci"] and head["pasr_ci"] == judge["pasr_mean_ci"]
    assert head["masr_ci"][0] < head["masr_mean"] <= head["masr_ci"][1]
    fig = attack_figures({"attacks": {"asa_random": {"headline": head, "judges": {"keyword": judge}}}})
    row = fig["asa_random"]["keyword"]
    assert row["masr_ci"][0] < row["masr"] <= row["masr_ci"][1]
    assert row["pasr_ci"][0] < row["pasr"] <= row["pasr_ci"][1]
