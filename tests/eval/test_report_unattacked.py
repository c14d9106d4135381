"""The report's unattacked section (lat_lightning/eval/report_unattacked.py): the real organism's three models."""

from __future__ import annotations

import json

from lat_lightning.eval.report_unattacked import unattacked_figures, unattacked_markdown


def _figures(init: float, refusal: float) -> dict:
    return {
        "init": {"harmful_eval": {"refusal": init}, "harmbench_eval": {"refusal": init / 2}},
        "refusal": {"benign_eval": {"refusal": refusal}, "borderline_eval": {"refusal": 0.5}},
        "agreement": 0.75,
    }


def test_three_models_in_one_table_under_the_base_judge(tmp_path):
    record = {"build": {"kind": "real"}, "original": _figures(0.98, 0.0), "aligned": _figures(0.04, 0.14)}
    (tmp_path / "organism.json").write_text(json.dumps(record))
    (tmp_path / "rescan").mkdir()
    (tmp_path / "rescan" / "organism.json").write_text(json.dumps({"hardened": _figures(0.02, 0.2)}))
    figures = unattacked_figures(tmp_path)
    assert list(figures) == ["original", "aligned", "hardened"]
    lines = unattacked_markdown(figures, "refusal+coherent")
    assert lines[0] == "## Unattacked answers (refusal judge)"
    assert "| aligned | 0.040 | 0.020 | 0.140 | 0.500 | 0.750 |" in lines
    assert "| hardened | 0.020 | 0.010 | 0.200 | 0.500 | 0.750 |" in lines


def test_no_section_outside_the_real_organism(tmp_path):
    assert unattacked_figures(tmp_path) is None
    (tmp_path / "organism.json").write_text(json.dumps({"build": {"kind": "toy"}, "benign_accuracy": 0.9}))
    assert unattacked_figures(tmp_path) is None and unattacked_markdown(None, "keyword") == []
