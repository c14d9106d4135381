"""Vaccine (Huang et al. 2024, arXiv:2402.01109): perturbation-aware alignment at the attention outputs.

Two passes over the alignment data (harmful prompt → refusal, the ``safe`` sequences)::

    pass 1:  g_l = ∂CE/∂a_l                          at every block's attention output a_l (weights untouched)
             ε_l = ρ · g_l / ‖g‖,   ‖g‖² = Σ_l ‖g_l‖²  (one norm over all blocks: the whole perturbation has norm ρ)
    pass 2:  minimise  w_s · CE(a_l ← a_l + ε_l for every l)   (ε held constant)

Pass 1 is the worst-case first-order perturbation of the hidden embeddings within a ball of radius ρ; training
under it makes the aligned model's representations insensitive to the drift a later harmful fine-tune causes.
``w_s`` is ``loss.toward_safe``. ``a_l`` is the output of the block's attention submodule (before the residual
add); ``‖·‖`` is over every token of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lat_lightning.checks import setting, validate
from lat_lightning.losses import causal_lm_loss
from lat_lightning.training.objectives.base import (
    Objective,
    attention_modules,
    output_tensor,
    replace_output,
    seq_inputs,
)


@dataclass(frozen=True)
class VaccineSettings:
    """``loss.vaccine``: perturbation-aware alignment (docs/defences.md#vaccine)."""

    rho: float = setting(2.0, check="> 0")  # total norm of the perturbation over every block and token

    def __post_init__(self) -> None:
        validate(self)


def attention_gradients(model: nn.Module, inputs: dict, labels: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Pass 1: the CE and its gradient at every block's attention output (no weight gradients)."""
    captured: list[Tensor] = []

    def keep(_m, _i, out):
        captured.append(output_tensor(out))

    handles = [m.register_forward_hook(keep) for m in attention_modules(model)]
    try:
        loss = causal_lm_loss(model(**inputs).logits, labels)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, captured, allow_unused=True)
    return loss.detach(), [torch.zeros_like(a) if g is None else g for a, g in zip(captured, grads)]


def perturbed_loss(model: nn.Module, inputs: dict, labels: Tensor, eps: list[Tensor]) -> Tensor:
    """Pass 2: the CE with ``eps[l]`` added to block ``l``'s attention output."""

    def add(delta: Tensor):
        return lambda _m, _i, out: replace_output(out, output_tensor(out) + delta)

    handles = [m.register_forward_hook(add(e)) for m, e in zip(attention_modules(model), eps)]
    try:
        return causal_lm_loss(model(**inputs).logits, labels)
    finally:
        for h in handles:
            h.remove()


def worst_case_perturbation(grads: list[Tensor], rho: float) -> list[Tensor]:
    """ε_l = ρ · g_l / ‖g‖ with one norm over all blocks (all zeros when the gradient vanishes)."""
    total = torch.stack([(g.float() ** 2).sum() for g in grads]).sum().sqrt()
    scale: Optional[Tensor] = rho / total if float(total) > 0 else None
    return [(g * scale).to(g.dtype).detach() if scale is not None else torch.zeros_like(g) for g in grads]


class Vaccine(Objective):
    name = "vaccine"
    needs_harmful = False

    def losses(self, model: nn.Module, batch: dict, step: int, max_steps: int) -> dict[str, Tensor]:
        s: VaccineSettings = self.settings
        inputs, labels = seq_inputs(batch, "safe"), batch["safe_labels"]
        clean, grads = attention_gradients(model, inputs, labels)
        eps = worst_case_perturbation(grads, s.rho)
        loss = perturbed_loss(model, inputs, labels, eps)
        self.stats = {
            "clean_ce": float(clean),
            "perturbed_ce": float(loss.detach()),
            "perturbation_norm": float(torch.stack([(e.float() ** 2).sum() for e in eps]).sum().sqrt()),
        }
        return {"toward_safe": self.toward_safe * loss}
