"""benchmarks.judge_agreement: the on-topic sweep chooses on the calibration part only, and the defaults are its
best point (docs/metrics.md#on-topic-check)."""

from __future__ import annotations

import pytest

from benchmarks.judge_agreement import FIXTURES, SWEEP, main, sweep_ontopic
from lat_lightning.eval.judge_agreement import load_labels
from lat_lightning.eval.ontopic import OnTopicSettings


def test_the_ontopic_defaults_are_the_best_point_of_the_calibration_sweep():
    table = sweep_ontopic(load_labels(FIXTURES / "calibration.jsonl"))
    assert len(table) == len(SWEEP["min_overlap"]) * len(SWEEP["min_coverage"]) * len(SWEEP["min_novel"])
    d = OnTopicSettings()
    default = next(r for r in table if (r["min_overlap"], r["min_coverage"], r["min_novel"]) == (
        d.min_overlap, d.min_coverage, d.min_novel))  # fmt: skip
    # min_overlap 0-2 tie at coverage 0.25 (a quarter of the prompt's words is already >= 1): the default keeps 1
    assert default["mean"] == pytest.approx(table[0]["mean"])
    assert (table[0]["min_coverage"], table[0]["min_novel"]) == (d.min_coverage, d.min_novel)
    assert table[0]["mean"] > table[-1]["mean"]  # the thresholds matter


def test_the_sweep_refuses_the_held_out_parts():
    for part in ("heldout", "organism"):
        with pytest.raises(SystemExit, match="calibration only"):
            main(["--part", part, "--sweep-ontopic"])
