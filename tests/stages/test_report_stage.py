"""Stage ``report``: works on any run with a scan; the organism's benign accuracy only for organism runs, with
the seed recorded in the run's ``organism.json``."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.integration  # end-to-end: a scan + report run through the CLI

FAST = [
    "evaluation.seeds=[0]",
    "evaluation.max_new_tokens=4",
    "evaluation.attacks=[asa_random]",
    "evaluation.bootstrap_samples=10",
    "evaluation.num_prompts=3",
]


@pytest.fixture(scope="module")
def scan_only_run(tmp_path_factory):
    """A scan + report run of the tiny scan recipe (no organism, no training)."""
    from lat_lightning.cli import main

    root = tmp_path_factory.mktemp("report_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAT_LIGHTNING_CACHE", str(root / "cache"))
        assert (
            main(["--recipe", "asa_scan_tiny", "stages=[scan,report]", f"logging.root_dir={root / 'runs'}", *FAST]) == 0
        )
    return root


def test_report_of_a_run_without_the_organism(scan_only_run):
    run = scan_only_run / "runs" / "asa_scan_tiny" / "version_0"
    assert (run / "stages" / "report.done.json").is_file() and not (run / "organism.json").exists()
    assert not (scan_only_run / "cache" / "organism").exists()  # nothing built for the organism
    report = json.loads((run / "report.json").read_text())
    assert report["utility"] is None and report["lambda"] is None
    row = report["judges"]["keyword"]["before"]["asa_random"]
    assert 0.0 <= row["masr"] <= 1.0 and report["judges"]["keyword"]["after"] == {}
    assert report["pasr_relative_cut"] == {"asa_random": None}
    md = (run / "report.md").read_text()
    assert "| asa_random |" in md and "Benign accuracy" not in md and "access code" not in md
    assert (run / "report_lasr_asa_random.png").stat().st_size > 1000


def test_organism_figures_come_from_organism_json(scan_only_run, tmp_path, monkeypatch):
    """With an ``organism.json`` the report measures benign accuracy after training and interpolation with the
    seed recorded there."""
    from lat_lightning.cli import load_config
    from lat_lightning.stages import report as report_stage

    run = tmp_path / "run"
    shutil.copytree(scan_only_run / "runs" / "asa_scan_tiny" / "version_0", run)
    (run / "organism.json").write_text(
        json.dumps({"path": "x", "data": "y", "build": {"seed": 7}, "benign_accuracy": 0.75})
    )
    seen = []

    def fake_accuracy(cfg, model_dir, seed):
        seen.append((model_dir.name, seed))
        return 0.5

    monkeypatch.setattr(report_stage, "_benign_accuracy", fake_accuracy)
    cfg = load_config("asa_scan_tiny", FAST)
    assert report_stage.run(cfg, run) == {"report": str(run / "report.md")}
    assert seen == [("final", 7), ("interpolated", 7)]
    report = json.loads((run / "report.json").read_text())
    assert report["utility"] == {"aligned": 0.75, "after_training": 0.5, "after_interpolation": 0.5}
    md = (run / "report.md").read_text()
    assert "## Benign accuracy" in md and "| 0.75 | 0.50 | 0.50 |" in md and "access code" in md


def test_report_needs_a_scan(tmp_path):
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError
    from lat_lightning.stages.report import run

    with pytest.raises(ConfigError, match="no scan_summary.json"):
        run(load_config("asa_scan_tiny"), tmp_path)
