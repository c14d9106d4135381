"""``asa_random``: ASA random noise and the LAPT training noise (Gu et al. 2025, Eq. 1).

For each perturbed token vector ``h`` (the output of block ``l``) draw ``δ ~ N(0, I_d)`` and add

    δ' = μ(h) + (δ − μ(δ)) / (σ(δ) + 1e-6) · σ(h),        h ← h + α · δ'

where μ, σ are the mean and standard deviation over the ``d`` features of that one vector. The
statistics come from the very activation being perturbed (the reference code took them from the block
input: an off-by-one layer). ``α`` = 1 is the paper's setting. Cost: no extra forward or backward pass.

Training (:meth:`ASARandom.make`): ``refresh='step'`` draws new noise every training step, keyed by
``(seed, step, example index, layer)`` so a resumed run, another batch layout or another rank draws the same;
``refresh='fixed'`` keeps one draw for the whole run. The reference reseeded 42 at every step, which made
the noise a fixed function of sequence length; we don't. For noise *augmentation* (e.g. building the model
organism) ``probability`` perturbs only that fraction of steps and ``layer_sampling='one'`` perturbs one
layer of ``layers`` drawn per step (both draws keyed by ``(seed, step)``).

Generation (:meth:`ASARandom.plan`): keyed noise per ``(seed, prompt, layer, position)`` (a ``noise`` plan),
so one plan serves every seed of a chunk and batched and per-row runs draw identical noise.
"""

from __future__ import annotations

import random

import torch

from lat_lightning.attacks.base import Attack, Perturbation, cell_seed
from lat_lightning.attacks.plan import CLEAN, AttackPlan
from lat_lightning.attacks.positions import position_mask
from lat_lightning.models.layers import check_layer_indices, hidden_size


class ASARandom(Attack):
    """Random Gaussian direction, normalised to the activation's statistics at apply time."""

    name = "asa_random"
    one_plan_for_all_seeds = True

    @property
    def seed_dependent(self) -> bool:
        return True

    def describe(self) -> dict:
        return {**super().describe(), "refresh": self.settings.refresh}

    def make(self, model, batch, layers, step=0) -> Perturbation:
        s = self.settings
        layers = check_layer_indices(model, layers)
        rng = random.Random(cell_seed(s.seed, step, 11))
        if s.probability < 1.0 and rng.random() >= s.probability:
            return self.empty(batch)
        if s.layer_sampling == "one" and layers:
            layers = [rng.choice(layers)]
        input_ids = batch["safe_input_ids"]
        bsz, seq_len = input_ids.shape
        if "harmful_input_ids" in batch:
            seq_len = max(seq_len, batch["harmful_input_ids"].shape[1])
        d = hidden_size(model)
        mask = position_mask(s.positions, batch["prompt_lengths"], seq_len, s.first_k)
        vectors, masks = {}, {}
        row_layers = batch.get("layer")
        per_row = row_layers is not None and bool((row_layers != CLEAN).any())
        attacked = sorted(set(row_layers[row_layers != CLEAN].tolist())) if per_row else layers
        if per_row:
            attacked = check_layer_indices(model, attacked)
        # Noise is keyed by (seed, step, example index, layer), not by the row's place in the batch: the
        # same example gets the same noise whatever the batch layout, process rank or accumulation split.
        index = batch.get("index")
        keys = index.tolist() if index is not None else list(range(bsz))
        noise_step = step if s.refresh == "step" else 0
        for layer in attacked:
            rows = [
                torch.randn(
                    seq_len, d, generator=torch.Generator().manual_seed(cell_seed(s.seed, noise_step, int(k), layer))
                )
                for k in keys
            ]
            vectors[layer] = torch.stack(rows).to(input_ids.device)
            masks[layer] = mask & (row_layers == layer)[:, None].to(mask.device) if per_row else mask
        return Perturbation(vectors=vectors, mask=masks, normalise=True, alpha=s.alpha)

    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        s = self.settings
        return AttackPlan(
            kind="noise",
            positions=s.positions,
            first_k=s.first_k,
            refresh=s.refresh,
            alpha=s.alpha,
            seed=seed,
            name=self.name,
        )
