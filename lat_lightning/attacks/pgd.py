"""``pgd``: k-step projected gradient descent on the residual stream (targeted LAT, Sheshadri et al. 2024).

A perturbation ``δ_l`` of shape ``[batch, T, d]`` per attacked layer (per example, per token), masked to the
attacked positions, minimises

    L_attack = toward · CE(y* | x, δ) + away · mean_t[−log(1 − p(y_t | x, δ))]

(tokens with ``log p < −5`` contribute zero to the second term). After every step each ``δ`` is
projected back onto the ball ``‖δ‖ ≤ eps`` (L2 per token by default; L2 per sequence or L∞ optional;
``eps`` absolute or relative to the clean activation's norm). Updates are AdamW (the LAT reference, lr
1e-3 for Llama-3) or signed steps (classic L∞ PGD). Only the perturbation gets gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lat_lightning.losses import causal_lm_loss, log_one_minus_p_loss
from lat_lightning.models.hooks import capture_residual
from lat_lightning.models.layers import check_layer_indices, hidden_size
from lat_lightning.attacks.forward import AttackInputs, cache_lower, perturbed_logits, stack_sequences
from lat_lightning.attacks.base import Perturbation, PerturbationStrategy, cell_seed, position_mask


class PGD(PerturbationStrategy):
    """k-step PGD with projection after every step."""

    name = "pgd"
    uses_gradients = True
    from_earliest_layer = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.steps < 1:
            raise ValueError(f"perturbation.steps must be >= 1, got {cfg.steps}")
        if cfg.eps <= 0:
            raise ValueError(f"perturbation.eps must be > 0, got {cfg.eps}")
        if cfg.toward == 0 and cfg.away == 0:
            raise ValueError("pgd needs perturbation.toward or perturbation.away > 0")
        # Called after every projection with {layer: δ}; tests use it to check the ball constraint.
        self.step_callback: Optional[Callable[[int, dict[int, Tensor]], None]] = None

    # -- pieces -----------------------------------------------------------------------------------------
    def attack_loss(self, logits: Tensor, inputs: AttackInputs) -> Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if "harmful" in inputs.parts:
            loss = loss + self.cfg.toward * causal_lm_loss(*inputs.part(logits, "harmful"))
        if "safe" in inputs.parts:
            loss = loss + self.cfg.away * log_one_minus_p_loss(*inputs.part(logits, "safe"))
        return loss

    def radius(self, model, inputs: AttackInputs, layers: list[int], bsz: int) -> dict[int, Tensor]:
        """Per-layer radius broadcastable to ``[batch, T, 1]`` (relative eps scales the clean norm)."""
        if self.cfg.eps_mode == "absolute":
            return {l: torch.tensor(float(self.cfg.eps), device=inputs.input_ids.device) for l in layers}
        clean = capture_residual(model, layers, input_ids=inputs.input_ids[:bsz],
                                 attention_mask=inputs.attention_mask[:bsz], use_cache=False)
        if self.cfg.norm_scope == "sequence":
            return {l: self.cfg.eps * clean[l].float().flatten(1).norm(dim=-1)[:, None, None] for l in layers}
        return {l: self.cfg.eps * clean[l].float().norm(dim=-1, keepdim=True) for l in layers}

    def project(self, delta: Tensor, mask: Tensor, radius: Tensor) -> Tensor:
        """Zero δ outside the attacked positions and project it onto the eps-ball."""
        delta = delta * mask[..., None]
        if self.cfg.norm == "linf":
            return torch.maximum(torch.minimum(delta, radius), -radius)
        if self.cfg.norm_scope == "sequence":
            norm = delta.flatten(1).norm(dim=-1)[:, None, None]
        else:
            norm = delta.norm(dim=-1, keepdim=True)
        return delta * torch.clamp(radius / (norm + 1e-12), max=1.0)

    def init(self, shape, mask: Tensor, radius: Tensor, step: int, device) -> Tensor:
        if self.cfg.init == "zero":
            return torch.zeros(shape, device=device)
        gen = torch.Generator().manual_seed(cell_seed(self.cfg.seed, step, 7))
        if self.cfg.norm == "linf":
            raw = (torch.rand(shape, generator=gen) * 2 - 1).to(device) * radius
            return self.project(raw, mask, radius)
        raw = torch.randn(shape, generator=gen).to(device)
        raw = raw / raw.norm(dim=-1, keepdim=True)
        scale = torch.rand(shape[:-1] + (1,), generator=gen).to(device)
        return self.project(raw * scale * radius, mask, radius)

    # -- the attack ----------------------------------------------------------------------------------------
    def make(self, model, batch, layers, step=0) -> Perturbation:
        cfg = self.cfg
        layers = check_layer_indices(model, layers)
        parts = tuple(p for p, w in (("harmful", cfg.toward), ("safe", cfg.away)) if w != 0)
        inputs = stack_sequences(batch, parts)
        first = min(layers)
        cached = cache_lower(model, inputs, first) if self.from_earliest_layer else None
        bsz = inputs.batch_size
        seq_len = inputs.input_ids.shape[1]
        device = inputs.input_ids.device
        mask = position_mask(cfg.positions, batch["prompt_lengths"], seq_len, cfg.first_k).to(device).float()
        d = hidden_size(model)
        radius = self.radius(model, inputs, layers, bsz)
        deltas = {l: self.init((bsz, seq_len, d), mask, radius[l], step, device).requires_grad_(True)
                  for l in layers}
        opt = torch.optim.AdamW(deltas.values(), lr=cfg.lr, weight_decay=0.0) if cfg.optimizer == "adamw" else None
        losses = []
        for i in range(cfg.steps):
            logits = perturbed_logits(model, inputs, Perturbation(deltas, mask, normalise=False), cached, first)
            loss = self.attack_loss(logits, inputs)
            losses.append(float(loss.detach()))
            if cfg.early_stop_loss is not None and losses[-1] <= cfg.early_stop_loss:
                break
            grads = torch.autograd.grad(loss, [deltas[l] for l in layers])
            with torch.no_grad():
                if opt is not None:
                    for l, g in zip(layers, grads):
                        deltas[l].grad = g
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    for l, g in zip(layers, grads):
                        deltas[l].sub_(cfg.lr * torch.sign(g))
                for l in layers:
                    deltas[l].copy_(self.project(deltas[l], mask, radius[l]))
            if self.step_callback is not None:
                self.step_callback(i, {l: t.detach() for l, t in deltas.items()})
        final = {l: t.detach() for l, t in deltas.items()}
        with torch.no_grad():
            after = self.attack_loss(perturbed_logits(model, inputs, Perturbation(final, mask, normalise=False),
                                                      cached, first, grad=False), inputs)
        stats = {"attack_loss_before": losses[0], "attack_loss_after": float(after), "attack_steps": len(losses)}
        return Perturbation(vectors=final, mask=mask.bool(), normalise=False, stats=stats)
