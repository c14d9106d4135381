"""Generation-time attacks of the layer scan: ASA random, ASAgrad and PGD.

Each attack turns rows ``(prompt i, layer l)`` into an :class:`~lat_lightning.eval.generation.AttackPlan`
that :func:`~lat_lightning.eval.generation.generate_under_attack` applies during generation:

* :func:`asa_random` — Gaussian noise keyed by ``(seed, prompt, layer, position)``, normalised by Eq. 1.
  Nothing to precompute.
* :func:`asagrad` — the sign of the gradient of the harmful-target CE (teacher-forced on prompt + target,
  prompt tokens masked) with respect to the residual stream ``h[l]``, one ``[T, d]`` direction per
  (prompt, layer). ``sign='descend'`` (default) uses ``−sign(g)``: the step that makes the target MORE
  likely. The reference code added ``+sign(g)`` (``sign='ascend'``). The gradients of every scanned layer
  come out of ONE forward-backward (see :func:`sign_gradient_directions`).
* :func:`pgd` — the training issue's PGD strategy (:class:`lat_lightning.attacks.pgd.PGD`),
  optimised per prompt (a batch of prompts, each with its own δ) at each layer before generation; the
  result is added as is.

ASAgrad is deterministic; PGD is seeded through its random start (``perturbation.init='random'``), ASA
random through its keyed noise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lat_lightning.config import PerturbationConfig
from lat_lightning.data.templating import build_sequences
from lat_lightning.eval.generation import AttackPlan, eval_mode
from lat_lightning.models.layers import check_layer_indices

log = logging.getLogger(__name__)

ATTACKS = ("asa_random", "asagrad", "pgd")
DEFAULT_POSITIONS = "prompt_last_and_generated"


def _settings(cfg: PerturbationConfig | None) -> PerturbationConfig:
    return dataclasses.replace(cfg) if cfg is not None else PerturbationConfig()


def asa_random(seed: int = 0, alpha: float = 1.0, positions: str = DEFAULT_POSITIONS, first_k: int = 1,
               refresh: str = "step") -> AttackPlan:
    """ASA random: keyed Gaussian noise, Eq. 1-normalised, at ``positions`` (the paper's attack by default)."""
    return AttackPlan(kind="noise", positions=positions, first_k=first_k, refresh=refresh, alpha=alpha, seed=seed,
                      name="asa_random")


def _prompt_target_batch(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                         safe_ids: Sequence[Sequence[int]] | None, pad_id: int, device) -> dict[str, Tensor]:
    """A right-padded training-contract batch (``harmful_*``, ``safe_*``, ``prompt_lengths``)."""
    harmful = build_sequences(prompt_ids, target_ids, pad_id)
    batch = {f"harmful_{k}": v.to(device) for k, v in harmful.items() if k != "prompt_lengths"}
    safe = build_sequences(prompt_ids, safe_ids if safe_ids is not None else target_ids, pad_id)
    batch.update({f"safe_{k}": v.to(device) for k, v in safe.items() if k != "prompt_lengths"})
    batch["prompt_lengths"] = harmful["prompt_lengths"].to(device)
    batch["index"] = torch.arange(len(prompt_ids), device=device)
    batch["layer"] = torch.full((len(prompt_ids),), -1, dtype=torch.long, device=device)
    return batch


def sign_gradient_directions(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                             target_ids: Sequence[Sequence[int]], layers: Sequence[int], sign: str = "descend",
                             pad_id: int = 0, from_earliest_layer: bool = True) -> list[dict[int, Tensor]]:
    """ASAgrad directions ``s · sign(∂L/∂h[l])`` per prompt and layer, from ONE forward-backward.

    ``L`` is the mean CE of the target tokens (prompt labels masked), teacher-forced on prompt + target.
    A zero tensor requiring grad is added to the residual stream at EVERY listed layer at once
    (:meth:`lat_lightning.attacks.asagrad.SignGradient.gradients`), and one backward gives all
    of their gradients. That equals one backward per layer because adding a zero changes no activation:
    the forward pass, hence every Jacobian the backward pass multiplies, is exactly the clean one, and
    ``∂(h + δ)/∂h = I``, so the gradient reaching ``δ_l`` is the total derivative ``∂L/∂h[l]`` through
    all later blocks whether or not the later blocks also carry a (zero) ``δ``. The other deltas are
    leaves that only receive gradient; they never scale or redirect it. (Tested in
    ``tests/eval/test_attacks.py``.) Batching prompts is also exact up to a positive scale per prompt
    (the loss is a mean over all target tokens), which the sign ignores.

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
    """
    from lat_lightning.attacks.asagrad import SignGradient

    if sign not in ("descend", "ascend"):
        raise ValueError(f"sign must be 'descend' or 'ascend', got '{sign}'")
    layers = sorted(set(check_layer_indices(model, list(layers))))
    if not layers or not prompt_ids:
        return [{} for _ in prompt_ids]
    device = next(model.parameters()).device
    batch = _prompt_target_batch(prompt_ids, target_ids, None, pad_id, device)
    # Gradients at every position (the generation-time positions policy picks the ones used).
    strategy = SignGradient(PerturbationConfig(strategy="sign_gradient", positions="all", sign=sign))
    strategy.from_earliest_layer = from_earliest_layer
    with eval_mode(model):
        grads, _mask, _loss = strategy.gradients(model, batch, layers)
    s = -1.0 if sign == "descend" else 1.0
    out = []
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        length = len(p) + len(t)
        out.append({l: (s * torch.sign(grads[l][i, : max(length - 1, 1)].float())).detach() for l in layers})
    return out


def _distinct(seq: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(x) for x in seq))


def asagrad(model: nn.Module, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
            row_prompts: Sequence[int], row_layers: Sequence[int], *, sign: str = "descend", alpha: float = 1.0,
            positions: str = DEFAULT_POSITIONS, first_k: int = 1, seed: int = 0, pad_id: int = 0,
            cache: dict[tuple[int, int], Tensor] | None = None) -> AttackPlan:
    """ASAgrad plan for rows ``(row_prompts[r], row_layers[r])``.

    Directions of all rows of a prompt come from one forward-backward over all their layers (and all the
    prompts of the call at once). ``cache`` (``(prompt, layer) -> [T, d]``) is read and filled.

    Args:
        prompt_ids / target_ids: per prompt index (rows refer to them by index).
        row_prompts: prompt index of each row; ``row_layers``: its layer (``-1`` = clean row, no vector).
        seed: recorded on the plan (ASAgrad itself is deterministic).
    """
    cache = {} if cache is None else cache
    need: dict[int, set[int]] = {}
    for i, l in zip(row_prompts, row_layers):
        if l >= 0 and (int(i), int(l)) not in cache:
            need.setdefault(int(i), set()).add(int(l))
    if need:
        prompts = sorted(need)
        layers = sorted(set().union(*need.values()))
        dirs = sign_gradient_directions(model, [prompt_ids[i] for i in prompts], [target_ids[i] for i in prompts],
                                        layers, sign=sign, pad_id=pad_id)
        for i, per_layer in zip(prompts, dirs):
            for l in need[i]:
                cache[(i, l)] = per_layer[l]
    vectors = [cache[(int(i), int(l))] if l >= 0 else None for i, l in zip(row_prompts, row_layers)]
    return AttackPlan(kind="direction", positions=positions, first_k=first_k, alpha=alpha, seed=seed,
                      vectors=vectors, name="asagrad")


def pgd(model: nn.Module, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
        row_prompts: Sequence[int], row_layers: Sequence[int], *, cfg: PerturbationConfig | None = None,
        safe_ids: Sequence[Sequence[int]] | None = None, seed: int = 0, positions: str | None = None,
        pad_id: int = 0) -> AttackPlan:
    """PGD plan: the lead's PGD strategy optimised per prompt at each row's layer, then added as is.

    For every distinct layer among the rows, one :meth:`PGD.make` call optimises a separate δ for each
    prompt of those rows (a batch of prompts; the loss is a mean, Adam's per-element normalisation makes
    each prompt's update independent of the others up to its eps term). ``positions`` overrides
    ``cfg.positions`` (the attacked positions of the prompt + target sequence; the scan passes its own
    generation positions policy, so PGD attacks the last prompt token and the target tokens by default).
    At generation time the vectors are added at the positions PGD attacked, aligned by absolute
    position; positions past the optimised sequence are not perturbed.

    Args:
        cfg: PGD settings (``steps``, ``eps``, ``lr``, ``norm``, ``init``, ``toward`` / ``away`` ...).
        safe_ids: refusal ids per prompt (needed when ``cfg.away > 0``; default: the target).
        seed: seeds the random start (``cfg.init='random'``), keyed also by the layer.
    """
    from lat_lightning.attacks.pgd import PGD

    settings = _settings(cfg)
    settings.strategy = "pgd"
    settings.seed = int(seed)
    if positions is not None:
        settings.positions = positions
    strategy = PGD(settings)
    device = next(model.parameters()).device
    rows = list(zip((int(i) for i in row_prompts), (int(l) for l in row_layers)))
    vectors: list[Tensor | None] = [None] * len(rows)
    masks: list[Tensor | None] = [None] * len(rows)
    for layer in _distinct(l for _, l in rows):
        if layer < 0:
            continue
        prompts = _distinct(i for i, l in rows if l == layer)
        batch = _prompt_target_batch([prompt_ids[i] for i in prompts], [target_ids[i] for i in prompts],
                                     [safe_ids[i] for i in prompts] if safe_ids is not None else None, pad_id, device)
        with eval_mode(model):
            pert = strategy.make(model, batch, [layer], step=layer)
        vec, mask = pert.vectors[layer], pert.layer_mask(layer)
        for k, i in enumerate(prompts):
            length = len(prompt_ids[i]) + len(target_ids[i])
            v = (pert.alpha * vec[k, :length]).detach().float().cpu()
            m = mask[k, :length].bool().cpu()
            for r, (ri, rl) in enumerate(rows):
                if ri == i and rl == layer:
                    vectors[r], masks[r] = v, m
    return AttackPlan(kind="additive", alpha=1.0, seed=seed, vectors=vectors, vector_masks=masks, name="pgd")


class ScanAttack:
    """An attack as the scan uses it: ``plan(...)`` for a chunk of rows.

    Args:
        name: one of :data:`ATTACKS`.
        cfg: perturbation settings (``alpha``, ``sign``, PGD's ``steps`` / ``eps`` / ``lr`` / ...).
        positions / first_k / refresh: the generation-time positions policy (paper: last prompt token and
            every generated token, a fresh draw each step).
    """

    def __init__(self, name: str, cfg: PerturbationConfig | None = None, positions: str = DEFAULT_POSITIONS,
                 first_k: int = 1, refresh: str = "step"):
        if name not in ATTACKS:
            raise ValueError(f"unknown attack '{name}'; choose from {', '.join(ATTACKS)}")
        self.name = name
        self.cfg = _settings(cfg)
        self.positions, self.first_k, self.refresh = positions, first_k, refresh
        self._grad_cache: dict[tuple[int, int], Tensor] = {}

    @property
    def seed_dependent(self) -> bool:
        """Whether different seeds give different perturbations (ASAgrad and zero-start PGD do not)."""
        if self.name == "asa_random":
            return True
        if self.name == "pgd":
            return self.cfg.init == "random"
        return False

    def settings(self) -> dict:
        """What determines the perturbation (stored with a scan, checked on resume)."""
        out = {"attack": self.name, "positions": self.positions, "first_k": self.first_k, "alpha": self.cfg.alpha}
        if self.name == "asa_random":
            out["refresh"] = self.refresh
        if self.name == "asagrad":
            out["sign"] = self.cfg.sign
        if self.name == "pgd":
            out.update({k: getattr(self.cfg, k) for k in ("steps", "eps", "eps_mode", "norm", "norm_scope",
                                                          "optimizer", "lr", "init", "toward", "away")})
        return out

    def plan(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
             row_prompts: Sequence[int], row_layers: Sequence[int], seed: int,
             safe_ids: Sequence[Sequence[int]] | None = None, pad_id: int = 0) -> AttackPlan:
        if self.name == "asa_random":
            return asa_random(seed=seed, alpha=self.cfg.alpha, positions=self.positions, first_k=self.first_k,
                              refresh=self.refresh)
        if self.name == "asagrad":
            keep = {int(i) for i in row_prompts}
            self._grad_cache = {k: v for k, v in self._grad_cache.items() if k[0] in keep}
            return asagrad(model, prompt_ids, target_ids, row_prompts, row_layers, sign=self.cfg.sign,
                           alpha=self.cfg.alpha, positions=self.positions, first_k=self.first_k, seed=seed,
                           pad_id=pad_id, cache=self._grad_cache)
        cfg = dataclasses.replace(self.cfg, first_k=self.first_k)
        return pgd(model, prompt_ids, target_ids, row_prompts, row_layers, cfg=cfg, safe_ids=safe_ids, seed=seed,
                   positions=self.positions, pad_id=pad_id)


def build_attack(name: str, cfg: PerturbationConfig | None = None, positions: str = DEFAULT_POSITIONS,
                 first_k: int = 1, refresh: str = "step") -> ScanAttack:
    """A :class:`ScanAttack` by name (``asa_random``, ``asagrad``, ``pgd``)."""
    return ScanAttack(name, cfg, positions, first_k, refresh)


__all__ = ["ATTACKS", "ScanAttack", "asa_random", "asagrad", "build_attack", "pgd", "sign_gradient_directions"]
