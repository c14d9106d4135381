"""The stage model loader: eval mode, no LoRA attached, placed on ``trainer.accelerator``; and every stage is
``lat_lightning.stages.<name>:run``."""

from __future__ import annotations

import pytest
import torch

from lat_lightning.stages import common


@pytest.mark.parametrize(
    ("accelerator", "cuda", "expected"),
    [
        ("cpu", True, "cpu"),
        ("auto", True, "cuda"),
        ("gpu", True, "cuda"),
        ("cuda", True, "cuda"),
        ("auto", False, "cpu"),
        ("gpu", False, "cpu"),
    ],
)
def test_stage_device_follows_the_accelerator(accelerator, cuda, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert common._stage_device(accelerator).type == expected


def _cfg(model_dir, accelerator="cpu", lora=False):
    from omegaconf import OmegaConf

    from lat_lightning.config import RunConfig

    return OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "model": {"name_or_path": str(model_dir), "lora": {"enabled": lora, "r": 2, "alpha": 4}},
            "trainer": {"accelerator": accelerator},
        },
    )


def test_load_stage_model_places_the_model_in_eval_mode(tiny_llama_dir, monkeypatch):
    model = common.load_stage_model(_cfg(tiny_llama_dir, lora=True))
    assert not model.training and not hasattr(model, "peft_config")  # LoRA is never attached for a stage
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # Wherever the accelerator says: a stand-in device that exists on every machine.
    monkeypatch.setattr(common, "_stage_device", lambda accelerator: torch.device("meta"))
    moved = common.load_stage_model(_cfg(tiny_llama_dir, accelerator="auto"))
    assert {p.device.type for p in moved.parameters()} == {"meta"}
    built = common.load_stage_model(_cfg(tiny_llama_dir), loader=lambda: torch.nn.Linear(2, 2).train())
    assert not built.training and built.weight.device.type == "meta"


def test_every_stage_is_a_run_function_in_the_stages_package():
    import importlib

    from lat_lightning.config import STAGES
    from lat_lightning.pipeline import STAGE_FUNCTIONS, get_stage

    assert set(STAGE_FUNCTIONS) == set(STAGES)
    for name in STAGES:
        assert STAGE_FUNCTIONS[name] == f"lat_lightning.stages.{name}:run"
        assert get_stage(name) is importlib.import_module(f"lat_lightning.stages.{name}").run
