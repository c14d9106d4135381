"""What every attack shares: Eq. 1 normalisation, keyed noise, the training-time perturbation, the interface.

An :class:`Attack` has two faces, both in its own file:

* :meth:`Attack.make` turns a teacher-forced batch into a :class:`Perturbation`: per attacked layer a tensor of
  vectors ``[batch, T, d]`` plus how to apply them (added as is, or first normalised to the statistics of the
  activation they are added to, Eq. 1). It is applied with forward hooks on the decoder layers
  (:func:`lat_lightning.models.hooks.residual_edit`), so the same object serves the training step, the NLL
  probe and teacher-forced evaluation.
* :meth:`Attack.plan` turns rows ``(prompt, layer)`` of a scan into an
  :class:`~lat_lightning.attacks.plan.AttackPlan` that the batched generation engine applies while it
  decodes (:class:`~lat_lightning.attacks.plan.RowPerturber`).

Attacks are registered by name in :data:`lat_lightning.attacks.ATTACKS`; the same name is used by training
(``perturbation.attack``), the scan (``evaluation.attacks``), the validation loop and the durability suite.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from lat_lightning.attacks.settings import AttackSettings
from lat_lightning.models.hooks import residual_edit

NORMALISE_EPS = 1e-6  # as in the reference code


def normalise_to(delta: Tensor, hidden: Tensor, eps: float = NORMALISE_EPS) -> Tensor:
    """Eq. 1: ``δ' = μ(h) + (δ − μ(δ)) / (σ(δ) + eps) · σ(h)``, statistics over the hidden dimension.

    Args:
        delta: raw perturbation ``[..., d]``.
        hidden: the activation it will be added to, ``[..., d]`` (broadcastable).
        eps: guards against a constant ``delta``.

    Returns:
        ``δ'`` with (up to ``eps``) the mean and standard deviation of ``hidden`` along the last dim.
    """
    delta = delta.float()
    h = hidden.float()
    standard = (delta - delta.mean(-1, keepdim=True)) / (delta.std(-1, keepdim=True) + eps)
    return (h.mean(-1, keepdim=True) + standard * h.std(-1, keepdim=True)).to(hidden.dtype)


def cell_seed(*key: int) -> int:
    """A 63-bit seed derived from integers (seed, prompt, layer, position, ...), stable across runs."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_normal(d: int, *key: int, device=None, dtype=torch.float32) -> Tensor:
    """``N(0, I_d)`` draw determined only by ``key`` (not by batch layout or call order)."""
    gen = torch.Generator().manual_seed(cell_seed(*key))
    return torch.randn(d, generator=gen).to(device=device, dtype=dtype)


@dataclass
class ContrastPrompts:
    """Harmful and harmless prompts (token ids, chat template applied) of a contrastive attack."""

    harmful: list[list[int]]
    harmless: list[list[int]]

    def fingerprint(self) -> str:
        """A short hash of both sets (stored in a scan's settings: a resumed scan must use the same prompts)."""
        text = repr((self.harmful, self.harmless)).encode()
        return hashlib.blake2b(text, digest_size=6).hexdigest()


@dataclass
class Perturbation:
    """Per-layer vectors for one batch, and how to add them to the residual stream.

    Attributes:
        vectors: layer -> ``[batch, T, d]``. Sequences longer than ``T`` are not perturbed past ``T``.
            With ``ablate``: layer -> unit directions ``[batch, d]`` (one per row) or ``[d]`` (all rows).
        mask: ``[batch, T]`` perturbed positions, or layer -> such a mask (per-row attacked layers, e.g.
            ASABench instances each attacked at their own layer).
        normalise: apply Eq. 1 to each vector against the activation it is added to (ASA, LAPT,
            ASAgrad); otherwise the vectors are added as they are (PGD).
        alpha: magnitude multiplier applied after normalisation.
        stats: numbers for logging (norms, attack losses).
        ablate: directional ablation instead of addition: ``h ← h − alpha · (h·r̂) r̂`` at the masked positions
            (refusal-direction ablation; ``normalise`` is ignored).
    """

    vectors: dict[int, Tensor]
    mask: "Tensor | dict[int, Tensor]"
    normalise: bool = True
    alpha: float = 1.0
    stats: dict[str, float] = field(default_factory=dict)
    ablate: bool = False
    # The attack's loss at its final δ, from logits a caller computes anyway with this perturbation applied
    # ({"harmful" | "safe": logits}); set when the attack left that measurement to the caller (see PGD).
    final_loss: Any = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def delta(self, layer: int, hidden: Tensor) -> Tensor:
        """The tensor actually added to ``hidden`` (``[batch, seq, d]``) at ``layer``."""
        if self.ablate:
            return self._ablation_delta(layer, hidden)
        T = hidden.shape[1]
        vec = self.vectors[layer]
        mask = self.layer_mask(layer)
        if vec.shape[1] < T:  # pad: positions past the vectors' length stay unperturbed
            vec = torch.nn.functional.pad(vec, (0, 0, 0, T - vec.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, T - mask.shape[1]))
        vec, mask = vec[:, :T].to(hidden.device), mask[:, :T].to(hidden.device)
        if vec.shape[0] != hidden.shape[0]:  # the same perturbation applied to a stacked batch
            reps = hidden.shape[0] // vec.shape[0]
            vec, mask = vec.repeat(reps, 1, 1), mask.repeat(reps, 1)
        if self.normalise:
            # Statistics are a property of the activation, not a path for gradients: LAPT treats the
            # noise as a constant input, and recomputation under checkpointing must give the same value.
            vec = self.alpha * normalise_to(vec, hidden.detach())
        else:
            vec = self.alpha * vec.to(hidden.dtype)
        return vec.to(hidden.dtype) * mask[..., None].to(hidden.dtype)

    def _ablation_delta(self, layer: int, hidden: Tensor) -> Tensor:
        bsz, T = hidden.shape[:2]
        r = self.vectors[layer].to(hidden.device, torch.float32)
        r = r.expand(bsz, -1) if r.dim() == 1 else r
        if r.shape[0] != bsz:  # the same perturbation applied to a stacked batch
            r = r.repeat(bsz // r.shape[0], 1)
        mask = self.layer_mask(layer).to(hidden.device)
        if mask.shape[1] < T:
            mask = torch.nn.functional.pad(mask, (0, T - mask.shape[1]))
        mask = mask[:, :T]
        if mask.shape[0] != bsz:
            mask = mask.repeat(bsz // mask.shape[0], 1)
        coef = torch.einsum("btd,bd->bt", hidden.float(), r)  # h·r̂ per position
        return (-self.alpha * coef[..., None] * r[:, None, :] * mask[..., None].float()).to(hidden.dtype)

    def layer_mask(self, layer: int) -> Tensor:
        return self.mask[layer] if isinstance(self.mask, dict) else self.mask

    def edit(self, layer: int, hidden: Tensor) -> Tensor:
        return hidden + self.delta(layer, hidden)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Context in which every forward of ``model`` carries this perturbation."""
        if not self.vectors:
            yield
            return
        with residual_edit(model, self.layers, self.edit):
            yield

    def norm_stats(self) -> dict[str, float]:
        """Mean L2 norm of the raw vectors over perturbed positions, per layer (none for an ablation: its
        vectors are unit directions)."""
        out: dict[str, float] = {}
        if self.ablate:
            return out
        for layer, vec in self.vectors.items():
            m = self.layer_mask(layer).bool().to(vec.device)
            sel = vec[:, : m.shape[1]][m[:, : vec.shape[1]]]
            out[f"layer{layer}"] = float(sel.norm(dim=-1).mean()) if sel.numel() else 0.0
        return out


class Attack:
    """Interface of one attack. Subclasses set :attr:`name` and implement :meth:`make` and :meth:`plan`.

    Args:
        settings: the attack's knobs (``perturbation`` section: positions, alpha, seed, PGD steps/eps/lr ...).
            The positions policy, ``first_k`` and ``refresh`` in it apply to both faces; the scan passes a copy
            with its own generation-time policy.

    Class attributes (an instance may override them: :class:`~lat_lightning.attacks.transfer.Transfer`
    takes its base attack's):
        name: the registry name.
        uses_gradients: the attack runs forward-backward passes (weights frozen, gradients to the
            perturbation only).
        needs_target: every prompt needs a harmful target ``y*`` (the scan refuses prompts without one).
        one_plan_for_all_seeds: the generation plan is keyed by the per-row seeds at apply time, so one
            :meth:`plan` call serves every seed of a chunk.
        needs_harmless: the attack contrasts harmful with harmless prompts (the refusal direction): its
            generation face needs :meth:`set_contrast_prompts` first, its training face batches with
            ``benign_*`` rows.
    """

    name: str = ""
    uses_gradients: bool = False
    needs_target: bool = False
    one_plan_for_all_seeds: bool = False
    needs_harmless: bool = False

    def __init__(self, settings: AttackSettings):
        self.settings = settings
        self.contrast: ContrastPrompts | None = None

    # -- data a contrastive attack reads ---------------------------------------------------------------
    def set_contrast_prompts(self, harmful_ids: Sequence[Sequence[int]], harmless_ids: Sequence[Sequence[int]]) -> None:
        """Give the attack its harmful and harmless prompts (token ids, chat template applied) for the
        generation face; attacks that need none ignore them."""
        self.contrast = ContrastPrompts([list(p) for p in harmful_ids], [list(p) for p in harmless_ids])

    # -- state a resumed training run needs --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold for the training face to continue exactly (e.g. a cached direction)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called when a training run resumes)."""

    # -- identity ------------------------------------------------------------------------------------------
    @property
    def seed_dependent(self) -> bool:
        """Whether different seeds give different perturbations (the scan runs one seed otherwise)."""
        return False

    def describe(self) -> dict[str, Any]:
        """What determines this attack's perturbation (stored with a scan and compared on resume)."""
        s = self.settings
        return {"attack": self.name, "positions": s.positions, "first_k": s.first_k, "alpha": s.alpha}

    # -- training face -------------------------------------------------------------------------------------
    def make(self, model: nn.Module, batch: dict[str, Tensor], layers: list[int], step: int = 0) -> Perturbation:
        """The perturbation of a teacher-forced training batch at ``layers``.

        ``batch`` follows the data contract of :mod:`lat_lightning.data.collate`: ``safe_*`` (and, when present,
        ``harmful_*``) ``input_ids`` / ``attention_mask`` / ``labels``, ``prompt_lengths``, ``index`` and
        ``layer``. ``step`` keys any randomness (a resumed run draws the same).
        """
        raise NotImplementedError

    def empty(self, batch: dict[str, Tensor] | None = None) -> Perturbation:
        """A perturbation that changes nothing."""
        return Perturbation(vectors={}, mask=torch.zeros(1, 1, dtype=torch.bool), normalise=False)

    # -- generation face -----------------------------------------------------------------------------------
    def plan(
        self,
        model: nn.Module,
        prompt_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]],
        row_prompts: Sequence[int],
        row_layers: Sequence[int],
        seed: int,
        safe_ids: Sequence[Sequence[int]] | None = None,
        pad_id: int = 0,
    ):
        """The generation plan (an :class:`~lat_lightning.attacks.plan.AttackPlan`) for rows
        ``(row_prompts[r], row_layers[r])`` (layer ``-1`` = clean row).

        Args:
            model: the model under attack (gradient attacks take their gradients on it).
            prompt_ids / target_ids: token ids per prompt index (chat template applied; targets without EOS).
            row_prompts / row_layers: each row's prompt index and attacked layer.
            seed: the perturbation seed of these rows.
            safe_ids: refusal ids per prompt (attacks that push away from the refusal).
            pad_id: padding id.
        """
        raise NotImplementedError
