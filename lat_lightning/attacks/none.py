"""``none``: no perturbation. As a training attack the defence step becomes supervised fine-tuning."""

from __future__ import annotations

from lat_lightning.attacks.base import Attack, Perturbation
from lat_lightning.attacks.plan import AttackPlan


class NoAttack(Attack):
    """Leaves the residual stream untouched, in training and in generation."""

    name = "none"

    def make(self, model, batch, layers, step=0) -> Perturbation:
        return self.empty(batch)

    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        return AttackPlan(kind="none", seed=seed, name=self.name)
