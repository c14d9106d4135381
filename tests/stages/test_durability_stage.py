"""Stage ``durability``: the recipe writes its report, summary, plots and TensorBoard through the CLI and never
touches the model on disk; saved LoRA adapters load onto their base."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from lat_lightning.stages import durability as dstage


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.integration
def test_recipe_writes_report_summary_plots_and_leaves_the_model_untouched(tiny_llama_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lat_lightning.cli import main

    model_dir = tmp_path / "original_model"
    shutil.copytree(tiny_llama_dir, model_dir)
    hashes = _hash_tree(model_dir)
    rc = main(
        [
            "--recipe",
            "durability_tiny",
            f"logging.root_dir={tmp_path / 'runs'}",
            f"model.name_or_path={model_dir}",
            "trainer.max_steps=2",
            "evaluation.num_prompts=3",
            "evaluation.max_new_tokens=4",
            "evaluation.bootstrap_samples=10",
            "perturbation.steps=2",
            "evaluation.durability.max_k=2",
            "evaluation.durability.finetune_steps=2",
            "evaluation.durability.benign_steps=2",
            "evaluation.durability.trainability_seeds=[0]",
            "evaluation.durability.trainability_pairs=4",
            "evaluation.durability.rewrites=[leetspeak,char_spaced,rot13]",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert _hash_tree(model_dir) == hashes  # fit, fine-tuning attack and trainability never wrote the model
    run = tmp_path / "runs" / "durability_tiny" / "version_0"
    report = (run / "durability_report.md").read_text()
    summary = json.loads((run / "durability_summary.json").read_text())
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0] == "| attack | original | hardened | change |"
    assert report.count("| attack |") == 1  # ONE table
    assert len(table) - 1 == len(summary["rows"]) >= 20
    assert "gibberish" in report
    assert summary["fragile_layers"]["source"].endswith("fragile_layers.json")  # written by the fit stage
    assert summary["fragile_layers"]["layers"] == [1]
    assert "LoRA adapter" not in summary["models"]["hardened"] and "final" in summary["models"]["hardened"]
    for row in summary["rows"]:
        if row["kind"] == "rate" and row["change"] is not None:
            assert row["change"] == pytest.approx(row["hardened"] - row["original"])
    for png in ("durability_lasr", "durability_first_k", "durability_prefill", "durability_finetune"):
        assert (run / f"{png}.png").stat().st_size > 1000
    for sub in ("original", "hardened"):
        assert (run / sub / "scan_report.md").is_file() and (run / sub / "scan_summary.json").is_file()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {
        "durability/init/original",
        "durability/init/hardened",
        "durability/first_k_asa_random/hardened",
        "durability/prefill/original",
        "durability/trainability_task_loss/hardened",
        "durability/finetune_attack_success_mean/original",
        "durability/finetune_attack_harmful_loss_mean/hardened",
    } <= set(tags["scalars"])
    assert "| Fine-tuning attack: LoRA steps to break" in report
    assert summary["finetune_attack"]["seeds"] == [0, 1, 2] and summary["finetune_attack"]["eval_steps"] == [0, 2]
    assert "durability/durability_lasr" in tags["images"]
    # The saved fine-tune adapter of the hardened model loads back onto its base (LoRA-directory path).
    from lat_lightning.cli import load_config

    cfg = load_config("durability_tiny", [f"model.name_or_path={model_dir}"])
    adapter = run / "finetune_attack" / "original" / "seed_0" / "final"
    merged, desc = dstage.load_any_model(cfg, str(adapter), base_fallback=str(model_dir))
    assert "LoRA adapter merged" in desc
    base, _ = dstage.load_any_model(cfg, str(model_dir))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[w], base.state_dict()[w])
    assert _hash_tree(model_dir) == hashes


def test_fragile_layers_come_from_the_training_run_of_a_model(tmp_path):
    model_dir = tmp_path / "run" / "final"
    model_dir.mkdir(parents=True)
    assert dstage.find_fragile_layers(str(model_dir)) == (None, None)
    (tmp_path / "run" / "fragile_layers.json").write_text(json.dumps({"layers": [2, 3]}))
    layers, source = dstage.find_fragile_layers("tiny:llama", str(model_dir))
    assert layers == [2, 3] and source.endswith("fragile_layers.json")


def test_reusable_scans_match_the_models_the_stages_scanned(tmp_path):
    """The scan stage's output serves the original model and the rescan stage's the hardened one, only when the
    stage markers name exactly those models (and never a LoRA adapter directory, which the re-scan merges)."""
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    final = run / "final"
    final.mkdir()
    specs = {"original": "/models/base", "hardened": str(final)}
    assert dstage.reusable_scans(run, specs, [3, 4]) == {}
    (run / "stages" / "scan.done.json").write_text(json.dumps({"model": "/models/base"}))
    (run / "stages" / "rescan.done.json").write_text(json.dumps({"model": str(final)}))
    assert dstage.reusable_scans(run, specs, [3, 4]) == {
        "original": (run, [3, 4]),
        "hardened": (run / "rescan", [3, 4]),
    }
    assert dstage.reusable_scans(run, dict(specs, original="/models/other"), [3])["hardened"] == (run / "rescan", [3])
    (final / "adapter_config.json").write_text("{}")
    assert set(dstage.reusable_scans(run, specs, [3])) == {"original"}


def test_the_real_organism_recipe_rescans_the_scans_layers():
    """The recipe's durability re-scans follow evaluation.layers (an interpolation, so an override of the scan's
    layers moves them too); null restores every block."""
    from lat_lightning.cli import load_config
    from lat_lightning.stages.durability_settings import durability_settings

    cfg = load_config("real_organism", [])
    assert list(cfg.evaluation.durability.layers) == list(cfg.evaluation.layers) != []
    cfg = load_config("real_organism", ["evaluation.layers=[embed,10]"])
    assert durability_settings(cfg).dur.layers == ("embed", 10)
    assert durability_settings(load_config("real_organism", ["evaluation.durability.layers=null"])).dur.layers is None


def test_the_fine_tuning_attack_trains_on_the_organisms_harmful_completions(tmp_path, monkeypatch):
    """The real-organism recipe's fine-tuning attack reads ``organism://<preset>/harmful_completions``: the base
    model's own answers to the harmful training prompts, written on first use (not the bare targets), and a stale
    organism directory is refused rather than given completions of another build."""
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError
    from lat_lightning.stages.organism import ensure_generated_data, resolve_organism
    from lat_lightning.stages.scan import load_finetune_pairs

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    data = {"harmful": "harmful_train", "eval_harmful": "harmful_eval", "benign": "benign_train"}
    smoke = ["model.name_or_path=organism:smollm2_smoke", "evaluation.utility_data=organism://smollm2_smoke/agreement"]
    smoke += [f"data.{k}=organism://smollm2_smoke/{v}" for k, v in data.items()]
    smoke += ["data.eval_benign=organism://smollm2_smoke/benign_eval"]
    cfg = load_config(
        "real_organism", [*smoke, "evaluation.durability.finetune_data=organism://smollm2_smoke/harmful_completions"]
    )
    resolved = resolve_organism(cfg, rebuild=False)
    path = Path(str(resolved.evaluation.durability.finetune_data))
    assert path.name == "harmful_completions.jsonl" and not path.exists()  # resolving writes nothing
    pairs = load_finetune_pairs(resolved)
    info = json.loads((path.parent / "harmful_completions.json").read_text())
    train = {
        json.loads(x)["prompt"]: json.loads(x) for x in (path.parent / "harmful_train.jsonl").read_text().splitlines()
    }
    assert len(pairs) == info["kept"] >= 1 and all(p in train for p, _ in pairs)
    assert all(r and r != train[p]["harmful_response"] for p, r in pairs)  # completions, not "Sure, here is"
    # without the knob the attack keeps data.harmful's own targets
    bare = load_finetune_pairs(
        resolve_organism(load_config("real_organism", [*smoke, "evaluation.durability.finetune_data=null"]))
    )
    assert {r for _, r in bare} == {"Sure, here is"}
    # a directory that is not the current build of its preset gets no completions
    stale = path.parent.parent.parent / (path.parent.parent.name[:-12] + "0" * 12)
    shutil.copytree(path.parent.parent, stale)
    (stale / "data" / "harmful_completions.jsonl").unlink()
    with pytest.raises(ConfigError, match="not a current build"):
        ensure_generated_data(str(stale / "data" / "harmful_completions.jsonl"))
    ensure_generated_data(str(tmp_path / "elsewhere.jsonl"))  # any other path is left alone
    assert not (tmp_path / "elsewhere.jsonl").exists()
