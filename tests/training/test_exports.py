"""What the fit stage exports loads back with the standard loaders and gives the trained model's logits.

``final/`` (adapter or full model) and ``final_merged/`` (LoRA runs) are checked here; ``interpolated/`` is
checked against the in-memory interpolated model in ``tests/callbacks/test_weight_interpolation.py``
(bitwise for full fine-tuning, to float tolerance for LoRA).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lat_lightning.cli import load_config
from lat_lightning.models.loading import load_model
from lat_lightning.stages import fit_setup as train
from tests.helpers.batches import safety_batch

SHORT = ["trainer.max_steps=1", "perturbation.steps=1", "logging.tensorboard=false"]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return safety_batch(tiny_tokenizer, n=2)["safe_input_ids"]


def test_lora_adapter_and_merged_model_load_with_the_trained_logits(tmp_path, ids):
    from peft import PeftModel

    from lat_lightning.training.interpolation import merged_state_dict

    cfg = load_config("lat_tiny", SHORT + ["model.lora.r=4"])
    module = train.fit(cfg, tmp_path)
    trained = _logits(module.model, ids)
    assert any(p.abs().max() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)

    adapter = PeftModel.from_pretrained(load_model(cfg.model, train=False, with_lora=False), str(tmp_path / "final"))
    assert torch.equal(_logits(adapter, ids), trained)

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final_merged"))
    reference = load_model(cfg.model, train=False, with_lora=False)
    reference.load_state_dict(merged_state_dict(module.model))
    assert torch.equal(_logits(merged, ids), _logits(reference, ids))  # exactly W + BA
    torch.testing.assert_close(_logits(merged, ids), trained, atol=1e-5, rtol=1e-4)  # x(W + BA) vs xW + xBA
    assert not (tmp_path / "final_merged" / "adapter_config.json").exists()


def test_full_fine_tuning_exports_a_plain_model_with_identical_logits(tmp_path, ids):
    cfg = load_config("lat_tiny", SHORT + ["model.lora.enabled=false", "callbacks.kl_teacher.enabled=false"])
    module = train.fit(cfg, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(_logits(loaded, ids), _logits(module.model, ids))
    original = load_model(cfg.model, train=False)
    assert not torch.equal(_logits(original, ids), _logits(loaded, ids)), "the export is the trained model"
    assert not (tmp_path / "final_merged").exists()
