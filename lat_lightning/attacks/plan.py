"""How an attack's vectors are laid onto rows during batched generation (and teacher-forced probes).

An attack's generation face (:meth:`lat_lightning.attacks.base.Attack.plan`) returns an :class:`AttackPlan`; the
generation engine (:func:`lat_lightning.eval.generation.generate_under_attack`) applies it with a
:class:`RowPerturber`, a position-aware edit hooked on every layer that some row attacks. Every row names its own
attacked layer (``-1`` = clean), so a whole layer sweep of a prompt runs as one batched generation.

Plan kinds (the vocabulary an attack's plan is written in):

* ``noise`` (ASA random): ``δ ~ N(0, I_d)`` keyed by ``(seed, prompt_key, layer, position)`` (``position = -1``
  for ``refresh='fixed'``: one vector per prompt), so batched and per-row runs draw identical noise whatever
  the batch layout; then Eq. 1 (:func:`~lat_lightning.attacks.base.normalise_to`) against that row's
  activation at that position, times ``alpha``.
* ``direction`` (ASAgrad): a precomputed ``[T_r, d]`` per row, indexed by absolute position (the vector of the
  aligned teacher-forced position, the last one beyond its length), normalised with Eq. 1, times ``alpha``.
* ``additive`` (PGD): a precomputed ``[T_r, d]`` per row with its own ``[T_r]`` mask, added as is (times
  ``alpha``) where the mask is set; positions past ``T_r`` are not perturbed. The positions policy does not
  apply (the mask already is one).
* ``vector`` (refusal-direction activation addition): one ``[d]`` vector per row, added as is (times ``alpha``)
  at the row's layer, at every position the policy selects.
* ``ablation`` (refusal-direction ablation): one unit ``[d]`` direction ``r̂`` per row, projected out of the
  residual stream at EVERY layer (the input embeddings and every block output), at every position the policy
  selects: ``h ← h − alpha · (h·r̂) r̂`` (``alpha = 1``: exact ablation). The row's layer only names where the
  direction came from (and where the ``applied`` counter counts); any row layer other than ``-1`` is attacked.

Positions follow :mod:`lat_lightning.attacks.positions`. The prefill call sees the whole left-padded prompt
(column ``c`` of row ``r`` holds absolute position ``c - (P_max - P_r)``, negative = padding); decode call
``t`` sees one token per row, at absolute position ``P_r - 1 + t``. The caller sets
:attr:`RowPerturber.positions` before every forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import keyed_normal, normalise_to
from lat_lightning.attacks.positions import POLICIES, first_position, policy_mask
from lat_lightning.models.hooks import residual_edit
from lat_lightning.models.layers import EMBED, num_layers

ATTACK_KINDS = ("none", "noise", "direction", "additive", "vector", "ablation")
PER_ROW_VECTOR_KINDS = ("vector", "ablation")  # one [d] vector per row, whatever the position
REFRESH = ("step", "fixed")
FIXED_POSITION_KEY = -1  # position key of the single vector per prompt under refresh='fixed'
CLEAN = -1
NEVER = 1 << 62  # "first perturbed position" of a row that is never perturbed


@dataclass
class AttackPlan:
    """How rows are perturbed during generation (or a teacher-forced forward).

    Attributes:
        kind: ``none``, ``noise`` (ASA random), ``direction`` (ASAgrad), ``additive`` (PGD), ``vector``
            (activation addition) or ``ablation`` (directional ablation at every layer).
        positions: positions policy (see the module docstring); ignored by ``additive``.
        first_k: ``k`` of the ``first_k`` policy (the last prompt token counts as the first).
        refresh: ``step`` (a new draw per position) or ``fixed`` (one draw per prompt); ``noise`` only.
        alpha: magnitude multiplier, applied after Eq. 1 (``noise`` / ``direction``) or to the raw vectors
            (``additive``).
        seed: default perturbation seed of every row (``row_seeds`` overrides it per row).
        vectors: ``direction`` / ``additive``: one ``[T_r, d]`` tensor per row (``None`` for clean rows),
            indexed by absolute position (0 = first prompt token); ``vector`` / ``ablation``: one ``[d]`` tensor
            per row.
        vector_masks: ``additive``: one ``[T_r]`` bool tensor per row (``None`` = every position < T_r).
        name: label for logs.
    """

    kind: str = "none"
    positions: str = "prompt_last_and_generated"
    first_k: int = 1
    refresh: str = "step"
    alpha: float = 1.0
    seed: int = 0
    vectors: Sequence[Tensor | None] | None = None
    vector_masks: Sequence[Tensor | None] | None = None
    name: str = ""

    def __post_init__(self):
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack kind '{self.kind}'; choose from {', '.join(ATTACK_KINDS)}")
        if self.positions not in POLICIES:
            raise ValueError(
                f"unknown positions policy '{self.positions}' for generation; choose from {', '.join(POLICIES)}"
            )
        if self.refresh not in REFRESH:
            raise ValueError(f"unknown refresh '{self.refresh}'; choose from {', '.join(REFRESH)}")
        if self.positions == "first_k" and self.first_k < 1:
            raise ValueError(f"first_k must be >= 1, got {self.first_k}")
        if self.kind in ("direction", "additive") + PER_ROW_VECTOR_KINDS and self.vectors is None:
            raise ValueError(f"attack kind '{self.kind}' needs per-row vectors")

    def select(self, rows: Sequence[int]) -> AttackPlan:
        """The same plan restricted to ``rows`` (per-row vectors re-indexed)."""

        def pick(seq):
            return None if seq is None else [seq[r] for r in rows]

        return AttackPlan(
            self.kind,
            self.positions,
            self.first_k,
            self.refresh,
            self.alpha,
            self.seed,
            pick(self.vectors),
            pick(self.vector_masks),
            self.name,
        )


class RowPerturber:
    """The stateful, position-aware edit behind :func:`generate_under_attack` and teacher-forced probes.

    Before each forward the caller sets :attr:`positions` (``[B, S]`` absolute positions of the columns
    the layers will see; ``-1`` for padding). The edit of layer ``l`` then perturbs, for every row whose
    ``row_layers`` is ``l``, the columns its policy selects. Counters record how often each row was
    perturbed (``applied``: positions, counted at the row's own layer) and how many hook calls perturbed
    something (``calls``).

    Args:
        plan: the attack.
        row_layers: ``[B]`` attacked layer per row, ``-1`` = clean.
        prompt_lengths: ``[B]`` prompt token counts.
        prompt_keys: ``[B]`` integer id of each row's prompt (keys the noise; NOT the batch index).
        row_seeds: ``[B]`` perturbation seed per row (default: ``plan.seed``).
    """

    def __init__(
        self,
        plan: AttackPlan,
        row_layers: Tensor,
        prompt_lengths: Tensor,
        prompt_keys: Tensor,
        row_seeds: Tensor | None = None,
    ):
        self.plan = plan
        self.row_layers = row_layers.long().cpu()
        self.prompt_lengths = prompt_lengths.long().cpu()
        self.prompt_keys = prompt_keys.long().cpu()
        n = len(self.row_layers)
        self.row_seeds = (
            torch.full((n,), int(plan.seed), dtype=torch.long) if row_seeds is None else row_seeds.long().cpu()
        )
        for name, t in (
            ("prompt_lengths", self.prompt_lengths),
            ("prompt_keys", self.prompt_keys),
            ("row_seeds", self.row_seeds),
        ):
            if len(t) != n:
                raise ValueError(f"{name} has {len(t)} entries for {n} rows")
        if plan.vectors is not None and len(plan.vectors) != n:
            raise ValueError(f"plan has vectors for {len(plan.vectors)} rows, the batch has {n}")
        if plan.kind == "none":
            self.row_layers = torch.full_like(self.row_layers, CLEAN)
        self.rows_at: dict[int, Tensor] = {
            int(l): (self.row_layers == l).nonzero().flatten() for l in self.row_layers.unique().tolist() if l != CLEAN
        }
        self.attacked_rows = (self.row_layers != CLEAN).nonzero().flatten()
        self._row_vectors: Tensor | None = None
        if plan.kind in PER_ROW_VECTOR_KINDS and self.attacked_rows.numel():
            assert plan.vectors is not None  # AttackPlan.__post_init__: these kinds have per-row vectors
            d = next((v.shape[-1] for v in plan.vectors if v is not None), None)
            if d is None:
                raise ValueError(f"a '{plan.kind}' plan needs a vector for every attacked row; it has none")
            self._row_vectors = torch.stack(
                [torch.zeros(d) if v is None else v.detach().float().cpu().reshape(d) for v in plan.vectors]
            )
        self._all_layers: list[int] | None = None
        self.positions: Tensor | None = None
        self.applied = torch.zeros(n, dtype=torch.long)
        self.calls = 0
        self._fixed: dict[tuple[int, int, int, int], Tensor] = {}

    @property
    def layers(self) -> list[int]:
        """The hooked layers: the rows' layers, or (``ablation``) every layer once :meth:`hooked` knows the model."""
        if self.plan.kind == "ablation" and self.attacked_rows.numel():
            return list(self._all_layers or [])
        return sorted(self.rows_at)

    def first_perturbed(self) -> Tensor:
        """``[B]`` the earliest absolute position the plan can perturb in each row (:data:`NEVER` for a row it
        never touches: a clean row, a row without vectors). Every position before it runs exactly as in a clean
        forward, so it may be computed once per prompt and shared by all the prompt's rows."""
        plan = self.plan
        out = torch.full((len(self.row_layers),), NEVER, dtype=torch.long)
        for r in range(len(out)):
            if int(self.row_layers[r]) == CLEAN:  # (EMBED, -2, is an attacked layer: the input embeddings)
                continue
            if plan.kind == "noise":
                out[r] = first_position(plan.positions, int(self.prompt_lengths[r]), plan.first_k)
                continue
            assert plan.vectors is not None  # AttackPlan.__post_init__: every attacking kind but noise has vectors
            vec = plan.vectors[r]
            if vec is None or vec.shape[0] == 0:
                continue
            if plan.kind in ("direction",) + PER_ROW_VECTOR_KINDS:  # at the positions the policy selects
                out[r] = first_position(plan.positions, int(self.prompt_lengths[r]), plan.first_k)
                continue
            # additive: the first position of its own mask (no policy), within the vectors' length
            mask = plan.vector_masks[r] if plan.vector_masks is not None else None
            mask = torch.ones(vec.shape[0], dtype=torch.bool) if mask is None else mask[: vec.shape[0]].bool().cpu()
            hit = mask.nonzero().flatten()
            if hit.numel():
                out[r] = int(hit[0])
        return out

    def _raw(self, layer: int, r: int, p: int, d: int) -> Tensor | None:
        """The un-normalised vector for row ``r`` at absolute position ``p`` (``None``: leave it alone)."""
        plan = self.plan
        if plan.kind == "noise":
            key_pos = FIXED_POSITION_KEY if plan.refresh == "fixed" else p
            key = (int(self.row_seeds[r]), int(self.prompt_keys[r]), layer, key_pos)
            if plan.refresh == "fixed":
                if key not in self._fixed:
                    self._fixed[key] = keyed_normal(d, *key)
                return self._fixed[key]
            return keyed_normal(d, *key)
        assert plan.vectors is not None  # AttackPlan.__post_init__: every attacking kind but noise has vectors
        vec = plan.vectors[r]
        if vec is None or vec.shape[0] == 0:
            return None
        if plan.kind == "direction":
            return vec[min(p, vec.shape[0] - 1)]
        # additive
        if p >= vec.shape[0]:
            return None
        mask = plan.vector_masks[r] if plan.vector_masks is not None else None
        if mask is not None and not bool(mask[p]):
            return None
        return vec[p]

    def edit(self, layer: int, hidden: Tensor) -> Tensor:
        rows = self.attacked_rows if self.plan.kind == "ablation" else self.rows_at.get(layer)
        if rows is None or rows.numel() == 0:
            return hidden
        if self.positions is None:
            raise RuntimeError("RowPerturber.positions must be set before each forward")
        pos = self.positions[rows]  # [n, S]
        if pos.shape[1] != hidden.shape[1]:
            raise RuntimeError(f"positions cover {pos.shape[1]} columns but layer {layer} saw {hidden.shape[1]}")
        if self.plan.kind == "additive":
            sel = pos >= 0
        else:
            sel = policy_mask(self.plan.positions, pos, self.prompt_lengths[rows][:, None], self.plan.first_k)
        ri, ci = sel.nonzero(as_tuple=True)
        if ri.numel() == 0:
            return hidden
        if self.plan.kind in PER_ROW_VECTOR_KINDS:
            return self._edit_per_row_vector(layer, hidden, rows[ri], ci)
        d = hidden.shape[-1]
        row_idx, col_idx, raws = [], [], []
        for a, c in zip(ri.tolist(), ci.tolist()):
            r = int(rows[a])
            raw = self._raw(layer, r, int(pos[a, c]), d)
            if raw is None:
                continue
            row_idx.append(r)
            col_idx.append(c)
            raws.append(raw)
        if not raws:
            return hidden
        r_t = torch.tensor(row_idx, device=hidden.device)
        c_t = torch.tensor(col_idx, device=hidden.device)
        raw = torch.stack([v.to(hidden.device, torch.float32) for v in raws])
        target = hidden[r_t, c_t]
        if self.plan.kind == "additive":
            delta = (self.plan.alpha * raw).to(hidden.dtype)
        else:
            delta = (self.plan.alpha * normalise_to(raw, target.detach().float())).to(hidden.dtype)
        out = hidden.clone()
        out[r_t, c_t] = target + delta
        self.applied.index_add_(0, torch.tensor(row_idx), torch.ones(len(row_idx), dtype=torch.long))
        self.calls += 1
        return out

    def _edit_per_row_vector(self, layer: int, hidden: Tensor, r_idx: Tensor, c_idx: Tensor) -> Tensor:
        """``vector``: add the row's vector; ``ablation``: project the row's unit direction out (vectorised)."""
        r_dev, c_dev = r_idx.to(hidden.device), c_idx.to(hidden.device)
        assert self._row_vectors is not None  # __init__ stacked them: the plan's kind is a per-row vector kind
        vec = self._row_vectors[r_idx].to(hidden.device)  # [m, d] float32
        target = hidden[r_dev, c_dev]
        if self.plan.kind == "vector":
            delta = self.plan.alpha * vec
        else:
            delta = -self.plan.alpha * (target.float() * vec).sum(-1, keepdim=True) * vec
        out = hidden.clone()
        out[r_dev, c_dev] = target + delta.to(hidden.dtype)
        own = self.row_layers[r_idx] == layer  # count each position once, at the row's own layer
        if bool(own.any()):
            self.applied.index_add_(0, r_idx[own], torch.ones(int(own.sum()), dtype=torch.long))
        self.calls += 1
        return out

    @contextmanager
    def hooked(self, model: nn.Module) -> Iterator[RowPerturber]:
        if self.plan.kind == "ablation" and self.attacked_rows.numel():
            self._all_layers = [EMBED] + list(range(num_layers(model)))
        if not self.layers:
            yield self
            return
        with residual_edit(model, self.layers, self.edit):
            yield self


__all__ = ["ATTACK_KINDS", "CLEAN", "NEVER", "AttackPlan", "RowPerturber"]
