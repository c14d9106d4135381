"""``refusal_ablation``: directional ablation of the refusal direction at every layer (Arditi et al. 2024).

With ``r̂ = r[l] / ‖r[l]‖`` the unit difference-in-means direction read at layer ``l``
(:mod:`lat_lightning.attacks.refusal_direction`), remove it from the residual stream at EVERY layer — the input
embeddings and every block output — at the positions the policy selects:

    h ← h − (h·r̂) r̂

(equivalently: orthogonalise every weight that writes to the residual stream against ``r̂``). The attacked
layer ``l`` only says which layer's direction is used, so a layer scan sweeps the direction's source layer, as
the paper's validation does. ``alpha`` is not used: the ablation is exact. Arditi et al. ablate at every
position (``evaluation.positions: all``); with the scan's default policy the prompt tokens before the last
keep their component. Cost: the direction needs one forward pass over the contrast prompts per model (cached);
applying it costs a projection per layer and position.

Training (:meth:`RefusalAblation.make`, refusal-feature adversarial training, ReFAT, Yu et al. 2024): the
direction comes from each batch's harmful prompts against its ``benign_*`` rows on the current weights,
recomputed every ``direction_refresh`` micro-batches (kept in checkpoints), and is ablated from the defence
forward at every layer; the defence then learns to refuse without it. ``perturbation.layers`` names ONE source
layer.

Generation (:meth:`RefusalAblation.plan`): an ``ablation`` plan, one unit direction per row (its layer's).
"""

from __future__ import annotations

from lat_lightning.attacks.base import Perturbation
from lat_lightning.attacks.plan import AttackPlan
from lat_lightning.attacks.positions import position_mask
from lat_lightning.attacks.refusal_direction import CLEAN, RefusalDirectionAttack, every_layer, unit, unit_or_zero


class RefusalAblation(RefusalDirectionAttack):
    """Project the unit refusal direction of one layer out of every layer's output."""

    name = "refusal_ablation"

    def make(self, model, batch, layers, step=0) -> Perturbation:
        s = self.settings
        layers = self.single_source_layer(model, batch, layers, self.name)
        if len(layers) != 1:
            raise ValueError(
                f"refusal_ablation ablates ONE direction: perturbation.layers must name one source layer, got {layers}"
            )
        direction = unit(self.training_directions(model, batch, layers, step)[layers[0]])
        input_ids = batch["safe_input_ids"]
        seq_len = max([input_ids.shape[1]] + [batch[k].shape[1] for k in ("harmful_input_ids",) if k in batch])
        mask = position_mask(s.positions, batch["prompt_lengths"], seq_len, s.first_k)
        r = direction.to(input_ids.device)
        assert self._train_dirs is not None  # training_directions set it
        return Perturbation(
            vectors={l: r for l in every_layer(model)},
            mask=mask,
            ablate=True,
            alpha=1.0,
            stats={"direction_norm": float(self._train_dirs[layers[0]].norm())},
        )

    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        s = self.settings
        dirs = self.generation_directions(model, row_layers, pad_id)
        vectors = [unit_or_zero(dirs[int(l)], int(l)) if l != CLEAN else None for l in row_layers]
        return AttackPlan(
            kind="ablation",
            positions=s.positions,
            first_k=s.first_k,
            alpha=1.0,
            seed=seed,
            vectors=vectors,
            name=self.name,
        )
