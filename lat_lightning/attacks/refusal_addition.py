"""``refusal_addition``: activation addition of the refusal direction at one layer (Arditi et al. 2024).

With ``r[l]`` the (unnormalised) difference-in-means direction read at layer ``l``
(:mod:`lat_lightning.attacks.refusal_direction`), add at that layer, at the positions the policy selects,

    h[l] ← h[l] + s · r[l]

``s = perturbation.direction_scale``: ``s < 0`` (default ``-1``) subtracts the refusal direction and bypasses
refusal; ``s > 0`` induces refusal (e.g. on benign prompts). ``alpha`` is not used. Cost: the direction needs
one forward pass over the contrast prompts per model (cached); nothing per generation step.

Training (:meth:`RefusalAddition.make`): the direction comes from each batch's harmful prompts against its
``benign_*`` rows on the current weights, recomputed every ``direction_refresh`` micro-batches, and ``s·r[l]``
is added at every listed layer (each its own direction) during the defence forward.

Generation (:meth:`RefusalAddition.plan`): a ``vector`` plan, ``s·r[l]`` per row at the row's layer.
"""

from __future__ import annotations

from lat_lightning.attacks.base import Perturbation
from lat_lightning.attacks.plan import AttackPlan
from lat_lightning.attacks.positions import position_mask
from lat_lightning.attacks.refusal_direction import CLEAN, RefusalDirectionAttack


class RefusalAddition(RefusalDirectionAttack):
    """Add ``direction_scale`` times the refusal direction of the attacked layer to that layer's output."""

    name = "refusal_addition"

    def describe(self) -> dict:
        return {**super().describe(), "direction_scale": self.settings.direction_scale}

    def make(self, model, batch, layers, step=0) -> Perturbation:
        s = self.settings
        layers = self.single_source_layer(model, batch, layers, self.name)
        dirs = self.training_directions(model, batch, layers, step)
        input_ids = batch["safe_input_ids"]
        bsz = input_ids.shape[0]
        seq_len = max([input_ids.shape[1]] + [batch[k].shape[1] for k in ("harmful_input_ids",) if k in batch])
        mask = position_mask(s.positions, batch["prompt_lengths"], seq_len, s.first_k)
        vectors = {l: dirs[l].to(input_ids.device).expand(bsz, seq_len, -1) for l in layers}  # views, no copies
        return Perturbation(
            vectors=vectors,
            mask=mask,
            normalise=False,
            alpha=float(s.direction_scale),
            stats={f"direction_norm_layer{l}": float(dirs[l].norm()) for l in layers},
        )

    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        s = self.settings
        dirs = self.generation_directions(model, row_layers, pad_id)
        vectors = [dirs[int(l)] if l != CLEAN else None for l in row_layers]
        return AttackPlan(
            kind="vector",
            positions=s.positions,
            first_k=s.first_k,
            alpha=float(s.direction_scale),
            seed=seed,
            vectors=vectors,
            name=self.name,
        )
