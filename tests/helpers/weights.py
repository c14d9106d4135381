"""Deterministic weight edits for tests: a trained-looking LoRA adapter, or a full model moved off its start."""

from __future__ import annotations

import torch
from torch import nn


def set_lora_b(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Fill every ``lora_B`` matrix with seeded noise (a fresh adapter's B is zero, so it changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def perturb_weights(model: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Add seeded noise to every parameter (a stand-in for full fine-tuning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


__all__ = ["perturb_weights", "set_lora_b"]
