"""``pgd``: k-step projected gradient descent on the residual stream (targeted LAT, Sheshadri et al. 2024).

A perturbation ``δ_l`` of shape ``[batch, T, d]`` per attacked layer (per example, per token), masked to the
attacked positions, minimises

    L_attack = toward_harmful · CE(y* | x, δ) + away_from_safe · mean_t[−log(1 − p(y_t | x, δ))]

(tokens with ``log p < −5`` contribute zero to the second term). After every step each ``δ`` is
projected back onto the ball ``‖δ‖ ≤ eps`` (L2 per token by default; L2 per sequence or L∞ optional;
``eps`` absolute or relative to the clean activation's norm). Updates are AdamW (the LAT reference, lr
1e-3 for Llama-3) or signed steps (classic L∞ PGD). Only the perturbation gets gradients. Cost: ``steps``
forward-backward passes per batch from the earliest attacked layer on (the blocks below run once).

Generation (:meth:`PGD.plan`): for every distinct layer among the rows, one optimisation of a separate δ per
prompt (a batch of prompts on prompt + target, at the scan's positions policy), then an ``additive`` plan
that adds δ as is at the positions PGD attacked (aligned by absolute position).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from lat_lightning.attacks.base import Attack, Perturbation, cell_seed
from lat_lightning.attacks.forward import (
    AttackInputs,
    cache_lower,
    perturbed_logits,
    prompt_target_batch,
    stack_sequences,
)
from lat_lightning.attacks.plan import CLEAN, AttackPlan
from lat_lightning.attacks.positions import position_mask
from lat_lightning.losses import causal_lm_loss, log_one_minus_p_loss
from lat_lightning.models.eval_mode import eval_mode
from lat_lightning.models.hooks import capture_residual
from lat_lightning.models.layers import check_layer_indices, hidden_size, input_device

DESCRIBED = (
    "steps",
    "eps",
    "eps_mode",
    "norm",
    "norm_scope",
    "optimizer",
    "lr",
    "init",
    "toward_harmful",
    "away_from_safe",
)


class PGD(Attack):
    """k-step PGD with projection after every step."""

    name = "pgd"
    uses_gradients = True
    needs_target = True
    from_earliest_layer = True

    def __init__(self, settings):
        super().__init__(settings)
        if settings.steps < 1:
            raise ValueError(f"perturbation.steps must be >= 1, got {settings.steps}")
        if settings.eps <= 0:
            raise ValueError(f"perturbation.eps must be > 0, got {settings.eps}")
        if settings.toward_harmful == 0 and settings.away_from_safe == 0:
            raise ValueError("pgd needs perturbation.toward_harmful or perturbation.away_from_safe > 0")
        # Called after every projection with {layer: δ}; tests use it to check the ball constraint.
        self.step_callback: Optional[Callable[[int, dict[int, Tensor]], None]] = None
        # Sequence groups ("harmful", "safe") whose logits the caller computes with the final δ applied anyway
        # (the training step's defence passes): attack_loss_after is then measured on those logits
        # (Perturbation.final_loss) instead of by one more forward here.
        self.final_logits_from: frozenset[str] = frozenset()

    @property
    def seed_dependent(self) -> bool:
        return self.settings.init == "random"  # a zero start is deterministic

    def describe(self) -> dict:
        return {**super().describe(), **{k: getattr(self.settings, k) for k in DESCRIBED}}

    # -- pieces -----------------------------------------------------------------------------------------
    def attack_loss(self, logits: Tensor, inputs: AttackInputs) -> Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if "harmful" in inputs.parts:
            loss = loss + self.settings.toward_harmful * causal_lm_loss(*inputs.part(logits, "harmful"))
        if "safe" in inputs.parts:
            loss = loss + self.settings.away_from_safe * log_one_minus_p_loss(*inputs.part(logits, "safe"))
        return loss

    def radius(self, model, inputs: AttackInputs, layers: list[int], bsz: int) -> dict[int, Tensor]:
        """Per-layer radius broadcastable to ``[batch, T, 1]`` (relative eps scales the clean norm)."""
        if self.settings.eps_mode == "absolute":
            return {l: torch.tensor(float(self.settings.eps), device=inputs.input_ids.device) for l in layers}
        clean = capture_residual(
            model, layers, input_ids=inputs.input_ids[:bsz], attention_mask=inputs.attention_mask[:bsz], use_cache=False
        )
        if self.settings.norm_scope == "sequence":
            return {l: self.settings.eps * clean[l].float().flatten(1).norm(dim=-1)[:, None, None] for l in layers}
        return {l: self.settings.eps * clean[l].float().norm(dim=-1, keepdim=True) for l in layers}

    def project(self, delta: Tensor, mask: Tensor, radius: Tensor) -> Tensor:
        """Zero δ outside the attacked positions and project it onto the eps-ball."""
        delta = delta * mask[..., None]
        if self.settings.norm == "linf":
            return torch.maximum(torch.minimum(delta, radius), -radius)
        if self.settings.norm_scope == "sequence":
            norm = delta.flatten(1).norm(dim=-1)[:, None, None]
        else:
            norm = delta.norm(dim=-1, keepdim=True)
        return delta * torch.clamp(radius / (norm + 1e-12), max=1.0)

    def init(self, shape, mask: Tensor, radius: Tensor, step: int, device) -> Tensor:
        if self.settings.init == "zero":
            return torch.zeros(shape, device=device)
        gen = torch.Generator().manual_seed(cell_seed(self.settings.seed, step, 7))
        if self.settings.norm == "linf":
            raw = (torch.rand(shape, generator=gen) * 2 - 1).to(device) * radius
            return self.project(raw, mask, radius)
        raw = torch.randn(shape, generator=gen).to(device)
        raw = raw / raw.norm(dim=-1, keepdim=True)
        scale = torch.rand(shape[:-1] + (1,), generator=gen).to(device)
        return self.project(raw * scale * radius, mask, radius)

    # -- the attack ----------------------------------------------------------------------------------------
    def make(self, model, batch, layers, step=0) -> Perturbation:
        cfg = self.settings
        layers = check_layer_indices(model, layers)
        parts = tuple(p for p, w in (("harmful", cfg.toward_harmful), ("safe", cfg.away_from_safe)) if w != 0)
        inputs = stack_sequences(batch, parts)
        first = min(layers)
        cached = cache_lower(model, inputs, first) if self.from_earliest_layer else None
        bsz = inputs.batch_size
        seq_len = inputs.input_ids.shape[1]
        device = inputs.input_ids.device
        mask = position_mask(cfg.positions, batch["prompt_lengths"], seq_len, cfg.first_k).to(device).float()
        d = hidden_size(model)
        radius = self.radius(model, inputs, layers, bsz)
        deltas = {l: self.init((bsz, seq_len, d), mask, radius[l], step, device).requires_grad_(True) for l in layers}
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
        stats = {"attack_loss_before": losses[0], "attack_steps": len(losses)}
        out = Perturbation(vectors=final, mask=mask.bool(), normalise=False, stats=stats)
        if set(parts) <= self.final_logits_from:
            out.final_loss = lambda logits: self.loss_of_groups(logits, batch)
        else:
            with torch.no_grad():
                stats["attack_loss_after"] = float(
                    self.attack_loss(
                        perturbed_logits(
                            model, inputs, Perturbation(final, mask, normalise=False), cached, first, grad=False
                        ),
                        inputs,
                    )
                )
        return out

    def loss_of_groups(self, logits: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """:meth:`attack_loss` from per-group logits (``harmful`` / ``safe`` sequences of ``batch``, each at its own
        width: right padding, so the labelled tokens are the same)."""
        s = self.settings
        loss = torch.zeros((), dtype=torch.float32)
        if s.toward_harmful:
            loss = loss + s.toward_harmful * causal_lm_loss(logits["harmful"], batch["harmful_labels"]).float().cpu()
        if s.away_from_safe:
            loss = loss + s.away_from_safe * log_one_minus_p_loss(logits["safe"], batch["safe_labels"]).float().cpu()
        return loss

    # -- generation face -------------------------------------------------------------------------------------
    def plan(self, model, prompt_ids, target_ids, row_prompts, row_layers, seed, safe_ids=None, pad_id=0) -> AttackPlan:
        """For every distinct layer among the rows, one :meth:`make` call optimises a separate δ for each
        prompt of those rows (a batch of prompts; the loss is a mean, Adam's per-element normalisation makes
        each prompt's update independent of the others up to its eps term), seeded by ``(seed, layer)``.
        Positions past the optimised prompt + target sequence are not perturbed at generation time.

        ``safe_ids`` (refusal ids per prompt) are needed when ``away_from_safe > 0`` (default: the target).
        """
        keyed = PGD(dataclasses.replace(self.settings, seed=int(seed)))
        keyed.step_callback = self.step_callback
        keyed.final_logits_from = frozenset(("harmful", "safe"))  # a plan needs no loss at the final δ: no extra pass
        device = input_device(model)
        rows = list(zip((int(i) for i in row_prompts), (int(l) for l in row_layers)))
        vectors: list[Tensor | None] = [None] * len(rows)
        masks: list[Tensor | None] = [None] * len(rows)
        for layer in dict.fromkeys(l for _, l in rows):
            if layer == CLEAN:
                continue
            prompts = list(dict.fromkeys(i for i, l in rows if l == layer))
            batch = prompt_target_batch(
                [prompt_ids[i] for i in prompts],
                [target_ids[i] for i in prompts],
                [safe_ids[i] for i in prompts] if safe_ids is not None else None,
                pad_id,
                device,
            )
            with eval_mode(model):
                pert = keyed.make(model, batch, [layer], step=layer)
            vec, mask = pert.vectors[layer], pert.layer_mask(layer)
            for k, i in enumerate(prompts):
                length = len(prompt_ids[i]) + len(target_ids[i])
                v = (pert.alpha * vec[k, :length]).detach().float().cpu()
                m = mask[k, :length].bool().cpu()
                for r, (ri, rl) in enumerate(rows):
                    if ri == i and rl == layer:
                        vectors[r], masks[r] = v, m
        return AttackPlan(kind="additive", alpha=1.0, seed=seed, vectors=vectors, vector_masks=masks, name=self.name)
