"""``gaussian_normalised``: ASA random noise and the LAPT training noise (Gu et al. 2025, Eq. 1).

For each perturbed token vector ``h`` (the output of block ``l``) draw ``δ ~ N(0, I_d)`` and add

    δ' = μ(h) + (δ − μ(δ)) / (σ(δ) + 1e-6) · σ(h),        h ← h + α · δ'

where μ, σ are the mean and standard deviation over the ``d`` features of that one vector. The
statistics come from the very activation being perturbed (the reference code took them from the block
input: an off-by-one layer). ``α`` = 1 is the paper's setting.
"""

from __future__ import annotations

import random

import torch

from lat_lightning.models.layers import check_layer_indices, hidden_size
from lat_lightning.attacks.base import Perturbation, PerturbationStrategy, cell_seed, position_mask


class GaussianNormalised(PerturbationStrategy):
    """Random Gaussian direction, normalised to the activation's statistics at apply time.

    ``refresh='step'`` draws new noise every training step (seeded by ``(seed, step)``, so a resumed run
    draws the same noise); ``refresh='fixed'`` keeps one draw for the whole run. The reference reseeded
    42 at every step, which made the noise a fixed function of sequence length; we don't.

    For noise *augmentation* (e.g. building the model organism) two knobs mix clean and noisy steps:
    ``probability`` perturbs only that fraction of steps, and ``layer_sampling='one'`` perturbs one layer
    of ``layers`` drawn per step. Both draws are keyed by ``(seed, step)`` too.
    """

    name = "gaussian_normalised"

    def make(self, model, batch, layers, step=0) -> Perturbation:
        cfg = self.cfg
        layers = check_layer_indices(model, layers)
        rng = random.Random(cell_seed(cfg.seed, step, 11))
        if cfg.probability < 1.0 and rng.random() >= cfg.probability:
            return self.empty(batch)
        if cfg.layer_sampling == "one" and layers:
            layers = [rng.choice(layers)]
        input_ids = batch["safe_input_ids"]
        bsz, seq_len = input_ids.shape
        if "harmful_input_ids" in batch:
            seq_len = max(seq_len, batch["harmful_input_ids"].shape[1])
        d = hidden_size(model)
        mask = position_mask(cfg.positions, batch["prompt_lengths"], seq_len, cfg.first_k)
        vectors, masks = {}, {}
        row_layers = batch.get("layer")
        per_row = row_layers is not None and bool((row_layers >= 0).any())
        attacked = sorted(set(row_layers[row_layers >= 0].tolist())) if per_row else layers
        if per_row:
            attacked = check_layer_indices(model, attacked)
        # Noise is keyed by (seed, step, example index, layer), not by the row's place in the batch: the
        # same example gets the same noise whatever the batch layout, process rank or accumulation split.
        index = batch.get("index")
        keys = index.tolist() if index is not None else list(range(bsz))
        noise_step = step if cfg.refresh == "step" else 0
        for layer in attacked:
            rows = [torch.randn(seq_len, d, generator=torch.Generator().manual_seed(
                cell_seed(cfg.seed, noise_step, int(k), layer))) for k in keys]
            vectors[layer] = torch.stack(rows).to(input_ids.device)
            masks[layer] = mask & (row_layers == layer)[:, None].to(mask.device) if per_row else mask
        return Perturbation(vectors=vectors, mask=masks, normalise=True, alpha=cfg.alpha)
