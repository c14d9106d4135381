"""Stage ``interpolate``: λ search between the configured model and ``run_dir/final`` (LoRA adapter or full
model), saved as a plain model with its curve."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from lat_lightning.stages.interpolate import run as interpolate_stage
from tests.helpers.weights import perturb_weights, set_lora_b


def _load(model_dir, lora=False):
    from lat_lightning.config import LoraConfig, ModelConfig
    from lat_lightning.models.loading import load_model

    cfg = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    return load_model(cfg, train=False)


def _mc_rows(path):
    rows = [
        {
            "question": f"What is {a} plus {b}?",
            "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
            "answerKey": "A",
        }
        for a, b in [(1, 2), (3, 4)]
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("lora", [True, False])
def test_interpolate_stage(tiny_llama_dir, tiny_tokenizer, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    from lat_lightning.config import RunConfig

    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "model": {"name_or_path": str(tiny_llama_dir), "lora": {"enabled": lora, "r": 4, "alpha": 8}},
            "evaluation": {"utility_data": str(_mc_rows(tmp_path / "mc.jsonl")), "batch_size": 4},
            "callbacks": {"weight_interpolation": {"lambdas": [1.0], "tolerance": 1.0}},
            "logging": {"tensorboard": True},
        },
    )
    model = _load(tiny_llama_dir, lora=lora)
    (set_lora_b if lora else perturb_weights)(model)
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "final")
    result = interpolate_stage(cfg, run_dir)
    assert result["chosen_lambda"] == 1.0  # tolerance 1.0 accepts every λ
    saved = json.loads((run_dir / "interpolation.json").read_text())
    assert [p["lambda"] for p in saved["curve"]] == [0.0, 1.0]
    assert all(0.0 <= p["score"] <= 1.0 or math.isnan(p["score"]) for p in saved["curve"])
    loaded = AutoModelForCausalLM.from_pretrained(str(run_dir / "interpolated")).eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )
    assert list((run_dir / "tensorboard" / "interpolate").glob("events.out.tfevents.*"))
