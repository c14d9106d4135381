"""``asagrad``: ASAgrad, FGSM on the residual stream (Gu et al. 2025, Eq. 7).

With teacher forcing on the prompt followed by the harmful target ``y*``, take one gradient of
``L = CE(y* | x)`` (target tokens only) with respect to ``h[l]`` and use

    δ' = α · Eq1(s · sign(∇_{h[l]} L)),     s = −1 for ``sign='descend'`` (default), +1 for ``ascend``

``descend`` is the step that makes ``y*`` *more* likely (it lowers ``L``); the reference code used
``+sign``, which makes it less likely. Eq. 1 rescales the sign vector to the statistics of the activation
it is added to. Weights stay frozen: the gradient is taken with ``torch.autograd.grad`` on the
perturbation only. Cost: one forward-backward per batch (from the earliest attacked layer on), whatever
the number of layers.

Generation (:meth:`ASAGrad.plan`): one ``[T, d]`` direction per (prompt, layer), from ONE forward-backward
over all the layers and prompts of a call (:func:`sign_gradient_directions`), cached per (prompt, layer) and
applied as a ``direction`` plan (Eq. 1 against the activation at each position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import Attack, Perturbation
from lat_lightning.attacks.forward import cache_lower, perturbed_logits, prompt_target_batch, stack_sequences
from lat_lightning.attacks.plan import CLEAN, AttackPlan
from lat_lightning.attacks.positions import position_mask
from lat_lightning.losses import causal_lm_loss
from lat_lightning.models.eval_mode import eval_mode
from lat_lightning.models.layers import check_layer_indices, hidden_size, input_device

SIGNS = ("descend", "ascend")


def target_gradients(
    model: nn.Module,
    batch: dict[str, Tensor],
    layers: list[int],
    positions: str = "all",
    first_k: int = 1,
    from_earliest_layer: bool = True,
) -> tuple[dict[int, Tensor], Tensor, float]:
    """``{l: ∂L/∂h[l]}`` of the harmful-target CE at every listed layer from ONE forward-backward.

    A zero tensor requiring grad is added to the residual stream at EVERY listed layer at once, and one
    backward gives all of their gradients. That equals one backward per layer because adding a zero changes
    no activation: the forward pass, hence every Jacobian the backward pass multiplies, is exactly the clean
    one, and ``∂(h + δ)/∂h = I``, so the gradient reaching ``δ_l`` is the total derivative ``∂L/∂h[l]``
    through all later blocks. (Tested in ``tests/attacks/test_asagrad.py``.)

    Args:
        model: causal LM (its weights get no gradient).
        batch: a training-contract batch with ``harmful_*`` sequences and ``prompt_lengths``.
        layers: layers to take gradients at.
        positions / first_k: the positions policy of the returned mask.
        from_earliest_layer: run the blocks below the earliest layer once, without grad.

    Returns:
        The gradients ``[batch, T, d]`` per layer, the ``[batch, T]`` position mask and the loss value.
    """
    inputs = stack_sequences(batch, ("harmful",))
    first = min(layers)
    cached = cache_lower(model, inputs, first) if from_earliest_layer else None
    bsz, seq_len = inputs.input_ids.shape
    mask = position_mask(positions, batch["prompt_lengths"], seq_len, first_k)
    d = hidden_size(model)
    zeros = {l: torch.zeros(bsz, seq_len, d, device=inputs.input_ids.device, requires_grad=True) for l in layers}
    probe = Perturbation(vectors=zeros, mask=mask, normalise=False)
    logits = perturbed_logits(model, inputs, probe, cached, first)
    loss = causal_lm_loss(logits, inputs.labels)
    grads = torch.autograd.grad(loss, [zeros[l] for l in layers])
    return dict(zip(layers, grads)), mask, float(loss.detach())


def sign_gradient_directions(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    sign: str = "descend",
    pad_id: int = 0,
    from_earliest_layer: bool = True,
) -> list[dict[int, Tensor]]:
    """ASAgrad directions ``s · sign(∂L/∂h[l])`` per prompt and layer, from ONE forward-backward.

    ``L`` is the mean CE of the target tokens (prompt labels masked), teacher-forced on prompt + target.
    Batching prompts is exact up to a positive scale per prompt (the loss is a mean over all target tokens),
    which the sign ignores.

    Args:
        model: causal LM (weights are not touched; gradients go to the deltas only).
        prompt_ids: prompt token ids per prompt (chat template applied).
        target_ids: harmful target ids per prompt (no EOS needed).
        layers: layers to take gradients at.
        sign: ``descend`` (``−sign(g)``, lowers ``L``: default) or ``ascend`` (``+sign(g)``, the reference).
        pad_id: padding id.
        from_earliest_layer: run the blocks below the earliest layer once, without grad.

    Returns:
        One ``{layer: [T_i - 1, d]}`` per prompt, ``T_i = len(prompt) + len(target)``; position ``p`` is the
        direction at absolute position ``p``. The last position is dropped: its output predicts nothing,
        so its gradient is identically zero.

    Raises:
        ValueError: for an unknown ``sign``.
    """
    if sign not in SIGNS:
        raise ValueError(f"sign must be 'descend' or 'ascend', got '{sign}'")
    layers = sorted(set(check_layer_indices(model, list(layers))))
    if not layers or not prompt_ids:
        return [{} for _ in prompt_ids]
    device = input_device(model)
    batch = prompt_target_batch(prompt_ids, target_ids, None, pad_id, device)
    with eval_mode(model):
        grads, _mask, _loss = target_gradients(model, batch, layers, "all", 1, from_earliest_layer)
    s = -1.0 if sign == "descend" else 1.0
    out = []
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        length = len(p) + len(t)
        out.append({l: (s * torch.sign(grads[l][i, : max(length - 1, 1)].float())).detach() for l in layers})
    return out


class ASAGrad(Attack):
    """One forward-backward toward the harmful target, then ``α·sign`` normalised by Eq. 1."""

    name = "asagrad"
    uses_gradients = True
    needs_target = True
    from_earliest_layer = True  # False runs the full model (tests compare the two)

    def __init__(self, settings):
        super().__init__(settings)
        if settings.sign not in SIGNS:
            raise ValueError(f"perturbation.sign must be descend or ascend, got '{settings.sign}'")
        self._directions: dict[tuple[int, int], Tensor] = {}  # (prompt, layer) -> [T, d], generation face

    def describe(self) -> dict:
        return {**super().describe(), "sign": self.settings.sign}

    def make(self, model, batch, layers, step=0) -> Perturbation:
        s = self.settings
        layers = check_layer_indices(model, layers)
        grads, mask, loss = target_gradients(model, batch, layers, s.positions, s.first_k, self.from_earliest_layer)
        sgn = -1.0 if s.sign == "descend" else 1.0
        vectors = {l: sgn * torch.sign(g) for l, g in grads.items()}
        return Perturbation(
            vectors=vectors, mask=mask, normalise=True, alpha=s.alpha, stats={"attack_loss_before": loss}
        )

    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        """Directions of all rows of a prompt come from one forward-backward over all their layers (and all
        the prompts of the call at once); they are cached per (prompt, layer) for the prompts of this call."""
        keep = {int(i) for i in row_prompts}
        self._directions = {k: v for k, v in self._directions.items() if k[0] in keep}
        need: dict[int, set[int]] = {}
        for i, l in zip(row_prompts, row_layers):
            if l != CLEAN and (int(i), int(l)) not in self._directions:
                need.setdefault(int(i), set()).add(int(l))
        if need:
            prompts = sorted(need)
            layers = sorted(set().union(*need.values()))
            dirs = sign_gradient_directions(
                model,
                [prompt_ids[i] for i in prompts],
                [target_ids[i] for i in prompts],
                layers,
                sign=self.settings.sign,
                pad_id=pad_id,
                from_earliest_layer=self.from_earliest_layer,
            )
            for i, per_layer in zip(prompts, dirs):
                for l in need[i]:
                    self._directions[(i, l)] = per_layer[l]
        vectors = [self._directions[(int(i), int(l))] if l != CLEAN else None for i, l in zip(row_prompts, row_layers)]
        s = self.settings
        return AttackPlan(
            kind="direction",
            positions=s.positions,
            first_k=s.first_k,
            alpha=s.alpha,
            seed=seed,
            vectors=vectors,
            name=self.name,
        )
