"""lora_finetune's frozen settings: bad values and unknown fields fail before any model is copied."""

from __future__ import annotations

import dataclasses

import pytest

from lat_lightning.training.finetune import LoraFinetuneSettings, lora_finetune


def test_steps_below_one_raise_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="^steps: fine-tune steps must be >= 1, got 0"):
        LoraFinetuneSettings(steps=0, lr=1e-3)


def test_the_settings_are_frozen_and_keep_target_modules_as_a_tuple():
    settings = LoraFinetuneSettings(steps=2, lr=1e-3, target_modules=["q_proj", "v_proj"])
    assert settings.target_modules == ("q_proj", "v_proj")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 3


def test_a_mapping_with_an_unknown_field_is_refused_before_training():
    """The durability suite passes a mapping of the fields (evaluation does not import training)."""
    with pytest.raises(ValueError, match="lora_finetune settings: .*'lora_rank'"):
        lora_finetune(object(), None, [("p", "r")], "unused", {"steps": 1, "lr": 1e-3, "lora_rank": 4})
