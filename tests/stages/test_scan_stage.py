"""Stages ``scan`` and ``rescan``: the tiny recipe writes its outputs through the CLI; prompts and the model
come from the run config."""

from __future__ import annotations

import json

import pytest


@pytest.mark.integration
def test_tiny_recipe_writes_outputs(tmp_path, monkeypatch):
    from lat_lightning.cli import main

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    rc = main(
        [
            "--recipe",
            "asa_scan_tiny",
            f"logging.root_dir={tmp_path / 'runs'}",
            "evaluation.max_new_tokens=6",
            "evaluation.seeds=[0]",
        ]
    )
    assert rc == 0
    run = tmp_path / "runs" / "asa_scan_tiny" / "version_0"
    for name in (
        "scan_heatmap_asa_random.png",
        "scan_lasr_asa_random.png",
        "scan_report.md",
        "scan_summary.json",
        "scan.jsonl",
        "asabench_train.jsonl",
        "asabench_test.jsonl",
        "probe_position_kl.png",
    ):
        assert (run / name).is_file(), name
    assert (run / "scan_heatmap_asagrad.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "scan_summary.json").read_text())
    assert set(summary["attacks"]) == {"asa_random", "asagrad", "pgd"}
    head = summary["attacks"]["asa_random"]["headline"]
    assert 0.0 <= head["pasr_mean"] <= 1.0 and 0.0 <= head["masr_mean"] <= 1.0
    assert len(summary["probes"]["nll"]) == 4
    report = (run / "scan_report.md").read_text()
    assert "gibberish" in report and "Judge failures" in report and "Position KL" in report
    lines = (run / "scan.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 8 * 4 * 3  # clean + (asa_random, asagrad, pgd) x 8 prompts x 4 layers, 1 seed
    assert any(p.name.startswith("events") for p in (run / "tensorboard").iterdir())
    assert (run / "stages" / "scan.done.json").is_file()


def test_scan_prompts_and_model_come_from_the_config(tmp_path):
    from lat_lightning.cli import load_config
    from lat_lightning.stages.scan import load_scan_prompts, scan_model_config

    cfg = load_config("asa_scan_tiny", ["evaluation.num_prompts=3"])
    prompts, targets, keys = load_scan_prompts(cfg)
    assert len(prompts) == 3 and keys == [0, 1, 2] and all(t.startswith("Sure") for t in targets)
    assert scan_model_config(cfg).name_or_path == "tiny:llama"
    other = load_config("asa_scan_tiny", [f"evaluation.model_path={tmp_path}"])
    assert scan_model_config(other).name_or_path == str(tmp_path) and other.model.name_or_path == "tiny:llama"


def test_rescan_needs_a_trained_model(tmp_path):
    from lat_lightning.errors import ConfigError
    from lat_lightning.stages.rescan import trained_model_path

    with pytest.raises(ConfigError, match="no trained model"):
        trained_model_path(tmp_path)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_config.json").write_text("{}")
    assert trained_model_path(tmp_path) == tmp_path / "final"
    (tmp_path / "interpolated").mkdir()
    (tmp_path / "interpolated" / "config.json").write_text("{}")
    assert trained_model_path(tmp_path) == tmp_path / "interpolated"


def test_prompt_only_scan_prompts(tmp_path):
    from lat_lightning.cli import load_config
    from lat_lightning.errors import DataError
    from lat_lightning.stages.scan import load_scan_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("Tell me a secret\nOpen the vault\n", encoding="utf-8")
    over = [f"data.harmful={path}", "evaluation.judges=[keyword]"]
    cfg = load_config("asa_scan_tiny", over + ["evaluation.attacks=[asa_random]"])
    assert load_scan_prompts(cfg) == (["Tell me a secret", "Open the vault"], [None, None], [0, 1])
    with pytest.raises(DataError, match="set data.default_target"):  # ASAgrad needs a target
        load_scan_prompts(load_config("asa_scan_tiny", over))
    with pytest.raises(DataError, match="set data.default_target"):  # so does the target_match judge
        load_scan_prompts(load_config("asa_scan_tiny", [f"data.harmful={path}", "evaluation.attacks=[asa_random]"]))
    cfg = load_config("asa_scan_tiny", over + ["data.default_target=Sure, here is"])
    assert load_scan_prompts(cfg)[1] == ["Sure, here is"] * 2


@pytest.mark.integration
def test_refusal_recipe_scans_refusal_and_embedding_attacks(tmp_path, monkeypatch):
    from lat_lightning.cli import main

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    rc = main(
        [
            "--recipe",
            "refusal_tiny",
            f"logging.root_dir={tmp_path / 'runs'}",
            "evaluation.max_new_tokens=4",
            "evaluation.layers=[embed,2]",
            "evaluation.num_prompts=3",
        ]
    )
    assert rc == 0
    run = tmp_path / "runs" / "refusal_tiny" / "version_0"
    summary = json.loads((run / "scan_summary.json").read_text())
    assert list(summary["attacks"]) == ["refusal_ablation", "refusal_addition", "pgd", "asa_random"]
    assert summary["layers"] == [-2, 2] and summary["layer_names"] == ["embed", "2"]
    assert summary["best_of_n"] == 2 and "best_of_n" in summary["attacks"]["pgd"]
    assert "keyword+coherent" in summary["judges"] and summary["tiebreak_judge"] == "keyword+coherent"
    cells = [json.loads(x) for x in (run / "scan.jsonl").read_text().splitlines()]
    assert len(cells) == 3 + 4 * 3 * 2  # clean + 4 attacks x 3 prompts x 2 layers (all deterministic or 1 seed)
    assert all("coherence" in c and len(c["samples"]) == 2 for c in cells)
    report = (run / "scan_report.md").read_text()
    assert "| embed |" in report and "## Best-of-2 beside greedy" in report and "## Judge agreement" in report


def test_probes_run_by_default_only_where_cheap():
    """``evaluation.probes: null`` runs them on small models only; true / false are obeyed."""
    from torch import nn

    from lat_lightning.cli import load_config
    from lat_lightning.stages.scan import PROBES_AUTO_MAX_PARAMETERS, probes_wanted

    assert load_config("asa_scan_tiny", []).evaluation.probes is None
    small = nn.Linear(10, 10)
    big = nn.Module()
    big.weight = nn.Parameter(torch_empty(PROBES_AUTO_MAX_PARAMETERS + 1))
    assert probes_wanted(None, small) and not probes_wanted(None, big)
    assert probes_wanted(True, big) and not probes_wanted(False, small)


def torch_empty(n):
    import torch

    return torch.empty(n, device="meta")


def test_more_prompts_asked_than_the_data_has_says_how_many_are_used(tmp_path, caplog):
    """evaluation.num_prompts is a cap: asking for 500 of 2 prompts runs on 2, and the log says so (issue 24)."""
    from lat_lightning.cli import load_config
    from lat_lightning.stages.scan import load_scan_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("Tell me a secret\nOpen the vault\n", encoding="utf-8")
    over = [f"data.harmful={path}", "evaluation.judges=[keyword]", "evaluation.attacks=[asa_random]"]
    with caplog.at_level("WARNING", logger="lat_lightning.stages.scan"):
        prompts, _, _ = load_scan_prompts(load_config("asa_scan_tiny", over + ["evaluation.num_prompts=500"]))
    assert len(prompts) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"evaluation.num_prompts=500, but {path} has 2 prompts: using all 2"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="lat_lightning.stages.scan"):
        assert len(load_scan_prompts(load_config("asa_scan_tiny", over + ["evaluation.num_prompts=1"]))[0]) == 1
    assert caplog.records == []  # a cap below what the data has is silent
