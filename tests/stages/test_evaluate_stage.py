"""Stage ``evaluate``: the evaluation metrics of the configured model, through the CLI."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.integration
def test_evaluate_stage_writes_every_metric(tmp_path, monkeypatch):
    from lat_lightning.cli import main

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    res = "pkg://lat_lightning/resources"
    assert (
        main(
            [
                "--recipe",
                "asa_scan_tiny",
                "stages=[evaluate]",
                f"logging.root_dir={tmp_path / 'runs'}",
                f"data.eval_harmful={res}/tiny_harmful.jsonl",
                f"data.eval_benign={res}/tiny_benign.jsonl",
                f"evaluation.utility_data={res}/tiny_mc.jsonl",
                "evaluation.utility_kind=multiple_choice",
                "evaluation.num_prompts=2",
                "evaluation.max_new_tokens=4",
                "evaluation.layers=[1,2]",
                "logging.sample_generations=1",
            ]
        )
        == 0
    )
    run = tmp_path / "runs" / "asa_scan_tiny" / "version_0"
    saved = json.loads((run / "evaluation.json").read_text())
    marker = json.loads((run / "stages" / "evaluate.done.json").read_text())
    assert set(saved["metrics"]) == {
        "attack_success",
        "init",
        "nll_probe",
        "over_refusal",
        "utility_accuracy",
        "attack_success_asa_random",
        "attack_success_asa_random_coherent",
    }
    assert marker["metrics"] == saved["metrics"]
    for name in ("attack_success", "init", "over_refusal", "utility_accuracy", "attack_success_asa_random_coherent"):
        assert 0.0 <= saved["metrics"][name] <= 1.0, name
    assert saved["metrics"]["attack_success_asa_random"] == saved["metrics"]["attack_success"]
    # a coherent success is a success: the coherence-aware rate can only be lower
    assert saved["metrics"]["attack_success_asa_random_coherent"] <= saved["metrics"]["attack_success"]
    assert math.isfinite(saved["metrics"]["nll_probe"])
    assert len(saved["samples"]) == 1 and saved["samples"][0]["layer"] in (1, 2)
    assert (run / "evaluation.md").read_text().startswith("# Evaluation")
