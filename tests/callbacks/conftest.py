"""Helpers for the callback tests: a run config, a LoRA tiny Llama and a 1-2 step Trainer fit."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf


def make_cfg(**overrides):
    from lat_lightning.config import RunConfig

    cfg = OmegaConf.structured(RunConfig)
    base = {
        "trainer": {"max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0, "accelerator": "cpu", "gradient_clip_val": None},
        "logging": {"tensorboard": False},
    }
    return OmegaConf.merge(cfg, base, overrides)


def load_tiny(model_dir, lora: bool = False, train: bool = True):
    from lat_lightning.config import LoraConfig, ModelConfig
    from lat_lightning.models.loading import load_model

    mcfg = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    return load_model(mcfg, train=train)


def perturb_lora_b(model, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def fit_module(module, batches, callbacks, tmp_path, steps: int = 1, logger=False):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    loader = DataLoader(list(batches), batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.fixture()
def batch(tiny_tokenizer):
    from tests.helpers.batches import safety_batch

    return safety_batch(tiny_tokenizer, n=4, with_benign=True)


@pytest.fixture()
def kit():
    """The helper functions above (test modules cannot import a conftest reliably)."""
    from types import SimpleNamespace

    return SimpleNamespace(make_cfg=make_cfg, load_tiny=load_tiny, perturb_lora_b=perturb_lora_b, fit_module=fit_module)
