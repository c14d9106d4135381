"""Booster (Huang et al. 2024, arXiv:2409.01586): penalise how fast one harmful fine-tuning step would work.

With ``f`` the alignment CE (harmful prompt → refusal, the ``safe`` sequences) and ``h`` the harmful CE (harmful
prompt → harmful completion)::

    L(w) = w_s · f(w) + λ · [h(w) − h(w̃)],    w̃ = w − α · ∇h(w) / ‖∇h(w)‖     (the direction held constant)
    ∇L   = w_s · ∇f(w) + λ · [∇h(w) − ∇h(w̃)]

``h(w) − h(w̃)`` is how much one normalised harmful step of size α lowers the harmful loss; minimising it flattens
the harmful loss around the aligned weights, so a later harmful fine-tune makes slow progress. ``w̃`` is evaluated
with :func:`torch.func.functional_call` on ``w − c`` (``c`` constant), so autograd gives ``∇h(w̃)`` for the second
term without touching the weights. ``‖·‖`` is over every trainable parameter; ``w_s`` is ``loss.toward_safe``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lat_lightning.checks import setting, validate
from lat_lightning.losses import causal_lm_loss
from lat_lightning.training.objectives.base import Objective, seq_inputs


@dataclass(frozen=True)
class BoosterSettings:
    """``loss.booster``: the look-ahead harmful-step penalty (docs/defences.md#booster)."""

    lam: float = setting(5.0, check=">= 0")  # λ: weight of the penalty (the paper's value)
    step_size: float = setting(0.1, check="> 0")  # α: norm of the simulated harmful step (the paper's value)

    def __post_init__(self) -> None:
        validate(self)


def harmful_loss(model: nn.Module, batch: dict, params: dict[str, Tensor] | None = None) -> Tensor:
    """h: CE of the harmful completion (at ``params`` in place of the trainable weights when given)."""
    inputs = seq_inputs(batch, "harmful")
    out = model(**inputs) if params is None else functional_call(model, params, args=(), kwargs=inputs, strict=False)
    return causal_lm_loss(out.logits, batch["harmful_labels"])


def look_ahead(model: nn.Module, batch: dict, step_size: float) -> tuple[Tensor, Tensor]:
    """``(h(w), h(w̃))``, both differentiable in ``w`` (the step direction is constant)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    h = harmful_loss(model, batch)
    raw = torch.autograd.grad(h, [p for _, p in named], retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, raw)]
    norm = torch.stack([(g.float() ** 2).sum() for g in grads]).sum().sqrt().clamp(min=1e-12)
    shifted = {n: p - (step_size / norm * g).to(p.dtype) for (n, p), g in zip(named, grads)}
    return h, harmful_loss(model, batch, shifted)


class Booster(Objective):
    name = "booster"

    def losses(self, model: nn.Module, batch: dict, step: int, max_steps: int) -> dict[str, Tensor]:
        s: BoosterSettings = self.settings
        align = causal_lm_loss(model(**seq_inputs(batch, "safe")).logits, batch["safe_labels"])
        h, h_ahead = look_ahead(model, batch, s.step_size)
        drop = h - h_ahead
        self.stats = {"harmful_ce": float(h.detach()), "look_ahead_drop": float(drop.detach())}
        return {"toward_safe": self.toward_safe * align, "booster": s.lam * drop}
