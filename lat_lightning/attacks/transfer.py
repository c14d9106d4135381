"""Transfer: any attack whose generation vectors are computed on a *source* model and applied to another.

The durability suite uses it to ask whether an attack found on the original model still works on the
hardened one (``asagrad_transfer``, ``pgd_transfer``). Composition, not a new attack: the wrapped attack's
plan is computed on the source; keyed-noise plans (``asa_random``) are the same on any model, so transfer
only means something for attacks whose plan depends on the model.
"""

from __future__ import annotations

from torch import nn

from lat_lightning.attacks.base import Attack, Perturbation
from lat_lightning.attacks.plan import AttackPlan


class Transfer(Attack):
    """``base`` with its vectors computed on ``source``; registered nowhere, named ``<base>_transfer``.

    Args:
        base: the attack to transfer.
        source: the model its vectors are computed on.
    """

    def __init__(self, base: Attack, source: nn.Module):
        super().__init__(base.settings)
        self.base = base
        self.source = source
        self.name = f"{base.name}_transfer"  # an instance attribute: the scan records rows under it
        self.uses_gradients = base.uses_gradients
        self.needs_target = base.needs_target
        self.one_plan_for_all_seeds = base.one_plan_for_all_seeds
        self.needs_harmless = base.needs_harmless
        self.contrast = base.contrast

    def set_contrast_prompts(self, harmful_ids, harmless_ids) -> None:
        self.base.set_contrast_prompts(harmful_ids, harmless_ids)  # the direction is computed on the source
        self.contrast = self.base.contrast

    @property
    def seed_dependent(self) -> bool:
        return self.base.seed_dependent

    def describe(self) -> dict:
        return {**self.base.describe(), "attack": self.name, "source": "original model"}

    def make(self, model, batch, layers, step=0) -> Perturbation:
        return self.base.make(self.source, batch, layers, step)

    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        return self.base.plan(self.source, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids, pad_id)
