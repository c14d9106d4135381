"""Smoke version of the default pipeline (organism -> scan -> fit -> rescan -> report) on a tiny organism."""

import json
import os
from collections import defaultdict

import pytest

from lat_lightning.cli import main

pytestmark = pytest.mark.integration  # end-to-end: whole recipes / processes

SMOKE = [
    "model.name_or_path=organism:smoke",
    "evaluation.num_prompts=4",
    "evaluation.seeds=[0,1]",
    "evaluation.max_new_tokens=8",
    "evaluation.bootstrap_samples=20",
    "trainer.max_steps=2",
    "data.batch_size=4",
    "perturbation.steps=2",
    "callbacks.weight_interpolation.lambdas=[0.0,0.5]",
    "evaluation.durability.num_prompts=2",
    "evaluation.durability.random_seeds=[0]",
    "evaluation.durability.max_k=2",
    "evaluation.durability.finetune_steps=1",
    "evaluation.durability.finetune_seeds=[0]",
    "evaluation.durability.benign_steps=1",
    "evaluation.durability.rewrites=[leetspeak]",
]


def _masr_init_from_jsonl(path, attack, judge):
    """MASR (mean over seeds) and INIT recomputed from the streamed cells."""
    cells = defaultdict(lambda: defaultdict(list))
    clean = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        verdict = rec["verdicts"][judge]
        value = None if verdict["failed"] else float(verdict["success"])
        if rec["attack"] == "clean":
            clean.append(value)
        elif rec["attack"] == attack:
            cells[rec["seed"]][rec["prompt_idx"]].append(value)
    per_seed = []
    for prompts in cells.values():
        broken = [
            max(v for v in vals if v is not None) for vals in prompts.values() if any(v is not None for v in vals)
        ]
        per_seed.append(sum(broken) / len(broken))
    init = [v for v in clean if v is not None]
    return sum(per_seed) / len(per_seed), sum(init) / len(init)


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_default_pipeline_smoke(isolated_cache, capsys):
    root = isolated_cache / "runs"
    assert main([f"logging.root_dir={root}", *SMOKE]) == 0
    run = root / "default" / "version_0"
    for stage in ("organism", "scan", "fit", "rescan", "durability", "report"):
        assert (run / "stages" / f"{stage}.done.json").exists(), stage
    for rel in (
        "organism.json",
        "scan.jsonl",
        "scan_summary.json",
        "scan_report.md",
        "fragile_layers.json",
        "final/config.json",
        "interpolated/config.json",
        "interpolation.json",
        "rescan/scan.jsonl",
        "rescan/scan_summary.json",
        "report.md",
        "report.json",
        "report_lasr_asa_random.png",
        "report_lambda.png",
        "checkpoints/last.ckpt",
        "durability_summary.json",
        "durability_report.md",
    ):
        assert (run / rel).exists(), rel
    report = json.loads((run / "report.json").read_text())
    for judge, table in report["judges"].items():
        for when in ("before", "after"):
            for attack, row in table[when].items():
                for key in ("init", "masr", "pasr"):
                    assert row[key] is None or 0.0 <= row[key] <= 1.0, (judge, when, attack, key, row[key])
    for when, jsonl in (("before", run / "scan.jsonl"), ("after", run / "rescan" / "scan.jsonl")):
        for judge in ("target_match", "keyword"):
            masr, init = _masr_init_from_jsonl(jsonl, "asa_random", judge)
            row = report["judges"][judge][when]["asa_random"]
            assert row["masr"] == pytest.approx(masr), (when, judge)
            assert row["init"] == pytest.approx(init), (when, judge)
    for value in report["utility"].values():
        assert 0.0 <= value <= 1.0
    assert report["lambda"] in (0.0, 0.5)
    assert "## Durability" in (run / "report.md").read_text()
    # A re-run resumes: every stage is skipped, nothing is recomputed.
    assert main([f"logging.root_dir={root}", "--resume", "last", *SMOKE]) == 0
    assert capsys.readouterr().out.count("already done") == 6
    assert not (root / "default" / "version_1").exists()
    assert os.environ["LAT_LIGHTNING_CACHE"].startswith(str(isolated_cache))
