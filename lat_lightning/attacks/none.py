"""``none``: no perturbation (the plain SFT baseline)."""

from __future__ import annotations

from lat_lightning.attacks.base import Perturbation, PerturbationStrategy


class NoPerturbation(PerturbationStrategy):
    """Leaves the residual stream untouched; the defence step becomes supervised fine-tuning."""

    name = "none"

    def make(self, model, batch, layers, step=0) -> Perturbation:
        return self.empty(batch)
