"""Circuit breakers / representation rerouting (Zou et al. 2024, arXiv:2406.04313).

On harmful inputs, push the target layers' representations to be orthogonal to the frozen starting model's; on
retained inputs, keep them where they were::

    L(t)  = c_s(t) · L_rr + c_r(t) · L_ret
    L_rr  = mean over target layers l ∈ S and the harmful sequence's tokens (prompt and completion) of
            ReLU(cos(h_l(x_harm), h⁰_l(x_harm)))
    L_ret = mean over layers l ≤ max S and the retained sequences' tokens of
            ‖h_l(x_ret) − h⁰_l(x_ret)‖₂ / ‖h⁰_l(x_ret)‖₂
    c_s(t) = α · (1 − t / 2T),   c_r(t) = α · t / 2T      (t: optimiser step, T: trainer.max_steps)

``h_l`` is block ``l``'s output (the residual stream), ``h⁰`` the starting model's (LoRA: adapters off; full
fine-tuning: a frozen copy). The retained sequences are the benign rows (``data.benign``) and the harmful prompts
with their refusals (the ``safe`` sequences), as in the paper's retain set. There is no CE term of its own (the
module still adds ``loss.utility`` · benign CE, shared by every defence of a comparison). The paper's public code
writes the schedule as t/300 with T = 150 steps; here it is tied to the run's real step count. The paper's L_ret is
the absolute distance (``retain_distance: absolute``); the default divides by the frozen norm, so both terms are
O(1) whatever the model's residual scale (docs/defences.md#circuit-breakers says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lat_lightning.checks import setting, validate
from lat_lightning.models.layers import num_layers
from lat_lightning.training.objectives.base import Objective, hidden_states, masked_mean, seq_inputs, token_mask


@dataclass(frozen=True)
class CircuitBreakersSettings:
    """``loss.circuit_breakers``: representation rerouting (docs/defences.md#circuit-breakers)."""

    alpha: float = setting(10.0, check="> 0")  # α of the schedule (the paper's Llama-3-8B value)
    # target blocks S; [] = the blocks at one and two thirds of the depth (the paper's 10 and 20 of 32)
    layers: list[int] = setting(default_factory=list, check="unique, each >= 0")
    # relative: ‖h − h⁰‖ / ‖h⁰‖ per token (scale-free); absolute: the paper's ‖h − h⁰‖, whose size follows the
    # model's residual norms (thousands on the organism, where it swamps the bounded rerouting term)
    retain_distance: str = setting("relative", choices=("relative", "absolute"))

    def __post_init__(self) -> None:
        validate(self)


def target_layers(model: nn.Module, layers: list[int]) -> list[int]:
    """``layers``, or the blocks at one and two thirds of the depth when empty.

    Raises:
        ValueError: a block index outside the model.
    """
    n = num_layers(model)
    chosen = sorted(set(layers)) if layers else sorted({max(0, round(n * k / 3) - 1) for k in (1, 2)})
    if chosen[-1] >= n:
        raise ValueError(f"loss.circuit_breakers.layers {chosen} outside the model's {n} blocks")
    return chosen


def schedule(alpha: float, step: int, max_steps: int) -> tuple[float, float]:
    """``(c_s, c_r)`` at optimiser step ``step`` of ``max_steps``: c_s falls α → α/2, c_r rises 0 → α/2."""
    frac = min(1.0, step / max(1, max_steps)) / 2
    return alpha * (1 - frac), alpha * frac


def rerouting_loss(states: tuple[Tensor, ...], frozen: tuple[Tensor, ...], layers: list[int], mask: Tensor) -> Tensor:
    """L_rr: mean ReLU(cos) between trained and frozen block outputs over ``layers`` and ``mask``."""
    cos = [F.cosine_similarity(states[l + 1].float(), frozen[l + 1].float(), dim=-1) for l in layers]
    return masked_mean(torch.relu(torch.stack(cos)).mean(0), mask)


def retain_loss(
    states: tuple[Tensor, ...], frozen: tuple[Tensor, ...], top: int, mask: Tensor, relative: bool = True
) -> Tensor:
    """L_ret: mean L2 distance of block outputs 0..``top`` to the frozen ones over ``mask`` (``relative``: each
    token's distance divided by its frozen norm)."""
    dist = []
    for l in range(top + 1):
        d = (states[l + 1].float() - frozen[l + 1].float()).norm(dim=-1)
        dist.append(d / frozen[l + 1].float().norm(dim=-1).clamp(min=1e-6) if relative else d)
    return masked_mean(torch.stack(dist).mean(0), mask)


class CircuitBreakers(Objective):
    name = "circuit_breakers"
    needs_reference = True

    def losses(self, model: nn.Module, batch: dict, step: int, max_steps: int) -> dict[str, Tensor]:
        s: CircuitBreakersSettings = self.settings
        layers = target_layers(model, list(s.layers))
        c_s, c_r = schedule(s.alpha, step, max_steps)
        harm = seq_inputs(batch, "harmful")
        l_rr = rerouting_loss(
            hidden_states(model, harm), hidden_states(model, harm, self.reference), layers, token_mask(batch, "harmful")
        )
        retained = [p for p in ("benign", "safe") if f"{p}_input_ids" in batch]
        l_ret = torch.stack(
            [
                retain_loss(
                    hidden_states(model, seq_inputs(batch, p)),
                    hidden_states(model, seq_inputs(batch, p), self.reference),
                    layers[-1],
                    token_mask(batch, p),
                    relative=s.retain_distance == "relative",
                )
                for p in retained
            ]
        ).mean()
        self.stats = {"rerouting_cos": float(l_rr.detach()), "retain_l2": float(l_ret.detach()), "c_s": c_s, "c_r": c_r}
        return {"rerouting": c_s * l_rr, "retain": c_r * l_ret}
