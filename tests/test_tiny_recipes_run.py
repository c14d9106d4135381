"""The tiny training recipes run end to end on CPU and write what they promise."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lat_lightning.cli import main

pytestmark = pytest.mark.integration  # end-to-end: whole recipes / processes


def _scalars(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("recipe", ["lapt_tiny", "lat_tiny", "asagrad_at_tiny", "refat_tiny", "embed_lat_tiny"])
def test_tiny_recipe_trains_and_exports(recipe, tmp_path, capsys):
    assert (
        main(["--recipe", recipe, f"logging.root_dir={tmp_path}", "trainer.max_steps=2", "evaluation.num_prompts=2"])
        == 0
    )
    run_dir = tmp_path / recipe / "version_0"
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["state_dict"], "checkpoint holds the trainable weights"
    if recipe == "lat_tiny":  # LoRA: adapters only, on every linear layer of the blocks (targets left unset)
        assert all("lora_" in k for k in ckpt["state_dict"])
        assert (run_dir / "final" / "adapter_config.json").exists()
        targets = json.loads((run_dir / "lora_targets.json").read_text())
        assert targets["auto"] and "mlp.gate_proj" in targets["adapted"] and targets["left_out"] == []
    else:
        assert (run_dir / "final" / "config.json").exists()
    tags = _scalars(run_dir)
    assert {"train/loss", "train/loss_toward_safe", "train/lr"} <= tags
    if recipe == "lat_tiny":
        assert {"train/loss_kl", "train/loss_away_from_harmful", "attack/attack_loss_after"} <= tags
    if recipe == "refat_tiny":  # the refusal direction is logged and kept in the checkpoint for an exact resume
        assert "attack/direction_norm" in tags
        assert ckpt["lat_lightning"]["attack_state"]["directions"][2].shape == (64,)
    if recipe == "embed_lat_tiny":  # PGD on the input embeddings (layer id -2) and at block 2
        assert {"attack/norm_layer-2", "attack/norm_layer2", "attack/attack_loss_after"} <= tags
    if recipe == "lapt_tiny":
        assert (run_dir / "interpolated" / "config.json").exists()
        assert (run_dir / "fragile_layers.json").exists()
        assert {"val/attack_success", "val/init", "val/nll_probe", "val/over_refusal", "val/utility_accuracy"} <= tags


@pytest.mark.parametrize(
    "recipe, terms",
    [
        ("circuit_breakers_tiny", {"rerouting", "retain"}),
        ("repnoise_tiny", {"toward_safe", "noise_mmd", "harmful_ascent", "utility"}),
        ("vaccine_tiny", {"toward_safe"}),
        ("booster_tiny", {"toward_safe", "booster", "utility"}),
    ],
)
def test_tiny_defence_objective_recipe_trains(recipe, terms, tmp_path, capsys):
    overrides = [f"logging.root_dir={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    assert main(["--recipe", recipe, *overrides]) == 0
    run_dir = tmp_path / recipe / "version_0"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["state_dict"]
    if recipe in ("circuit_breakers_tiny", "vaccine_tiny"):  # LoRA: adapters only (h0 = the adapters switched off)
        assert all("lora_" in k for k in ckpt["state_dict"])
    tags = _scalars(run_dir)
    assert {f"train/loss_{t}" for t in terms} <= tags, tags
    assert not any(t.startswith("attack/") for t in tags)  # no training attack
    assert any(t.startswith("defence/") for t in tags) and "val/attack_success" in tags


def test_lapt_trains_on_an_asabench_export_of_its_own_scan(tmp_path, capsys):
    from lat_lightning.data.loaders import load_safety_examples

    assert main(["--recipe", "lapt_asabench_tiny", f"logging.root_dir={tmp_path}"]) == 0
    run_dir = tmp_path / "lapt_asabench_tiny" / "version_0"
    examples = load_safety_examples(str(run_dir / "asabench_train.jsonl"))
    assert examples and all(ex.layer is not None for ex in examples)
    assert (run_dir / "stages" / "fit.done.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
