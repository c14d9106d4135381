"""``sign_gradient``: ASAgrad, FGSM on the residual stream (Gu et al. 2025, Eq. 7).

With teacher forcing on the prompt followed by the harmful target ``y*``, take one gradient of
``L = CE(y* | x)`` (target tokens only) with respect to ``h[l]`` and use

    δ' = α · Eq1(s · sign(∇_{h[l]} L)),     s = −1 for ``sign='descend'`` (default), +1 for ``ascend``

``descend`` is the step that makes ``y*`` *more* likely (it lowers ``L``); the reference code used
``+sign``, which makes it less likely. Eq. 1 rescales the sign vector to the statistics of the activation
it is added to. Weights stay frozen: the gradient is taken with ``torch.autograd.grad`` on the
perturbation only.
"""

from __future__ import annotations

import torch

from lat_lightning.losses import causal_lm_loss
from lat_lightning.models.layers import check_layer_indices, hidden_size
from lat_lightning.attacks.forward import cache_lower, perturbed_logits, stack_sequences
from lat_lightning.attacks.base import Perturbation, PerturbationStrategy, position_mask


class SignGradient(PerturbationStrategy):
    """One forward-backward toward the harmful target, then ``α·sign`` normalised by Eq. 1."""

    name = "sign_gradient"
    uses_gradients = True
    from_earliest_layer = True  # False runs the full model (tests compare the two)

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.sign not in ("descend", "ascend"):
            raise ValueError(f"perturbation.sign must be descend or ascend, got '{cfg.sign}'")

    def gradients(self, model, batch, layers) -> tuple[dict[int, torch.Tensor], torch.Tensor, float]:
        """``{l: ∂L/∂h[l]}`` for the harmful-target CE, the position mask and the loss value."""
        inputs = stack_sequences(batch, ("harmful",))
        first = min(layers)
        cached = cache_lower(model, inputs, first) if self.from_earliest_layer else None
        bsz, seq_len = inputs.input_ids.shape
        mask = position_mask(self.cfg.positions, batch["prompt_lengths"], seq_len, self.cfg.first_k)
        d = hidden_size(model)
        zeros = {l: torch.zeros(bsz, seq_len, d, device=inputs.input_ids.device, requires_grad=True) for l in layers}
        probe = Perturbation(vectors=zeros, mask=mask, normalise=False)
        logits = perturbed_logits(model, inputs, probe, cached, first)
        loss = causal_lm_loss(logits, inputs.labels)
        grads = torch.autograd.grad(loss, [zeros[l] for l in layers])
        return dict(zip(layers, grads)), mask, float(loss.detach())

    def make(self, model, batch, layers, step=0) -> Perturbation:
        layers = check_layer_indices(model, layers)
        grads, mask, loss = self.gradients(model, batch, layers)
        s = -1.0 if self.cfg.sign == "descend" else 1.0
        vectors = {l: s * torch.sign(g) for l, g in grads.items()}
        return Perturbation(vectors=vectors, mask=mask, normalise=True, alpha=self.cfg.alpha,
                            stats={"attack_loss_before": loss})
