"""What every perturbation strategy shares: positions, Eq. 1 normalisation, keyed noise, the interface.

A strategy turns a batch into a :class:`Perturbation`: per attacked layer a tensor of vectors
``[batch, T, d]`` plus how to apply them (added as is, or first normalised to the statistics of the
activation they are added to, Eq. 1). The perturbation is applied with forward hooks on the decoder
layers (:func:`lat_lightning.models.hooks.residual_edit`), so the same object serves the training step,
the NLL probe and teacher-forced evaluation.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn

from lat_lightning.config import PerturbationConfig
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


def position_mask(policy: str, prompt_lengths: Tensor, seq_len: int, first_k: int = 1,
                  attention_mask: Optional[Tensor] = None) -> Tensor:
    """Boolean ``[batch, seq_len]`` mask of perturbed positions for right-padded sequences.

    Policies (``P`` = prompt length, positions 0-based):
      - ``response``: ``t >= P`` (the response tokens; LAPT training);
      - ``prompt``: ``t < P`` (targeted-LAT style);
      - ``all``: every position;
      - ``prompt_last_and_generated``: ``t >= P - 1`` (the paper's attack: the last prompt token and every
        generated token);
      - ``first_k``: ``P - 1 <= t < P - 1 + k``, the ``k`` positions whose outputs are the first ``k``
        response tokens.
    """
    t = torch.arange(seq_len, device=prompt_lengths.device)[None, :]
    p = prompt_lengths[:, None]
    if policy == "response":
        mask = t >= p
    elif policy == "prompt":
        mask = t < p
    elif policy == "all":
        mask = torch.ones(len(prompt_lengths), seq_len, dtype=torch.bool, device=p.device)
    elif policy == "prompt_last_and_generated":
        mask = t >= p - 1
    elif policy == "first_k":
        mask = (t >= p - 1) & (t < p - 1 + first_k)
    else:
        raise ValueError(f"unknown positions policy '{policy}'")
    if attention_mask is not None:
        mask = mask & attention_mask[:, :seq_len].bool()
    return mask


def cell_seed(*key: int) -> int:
    """A 63-bit seed derived from integers (seed, prompt, layer, position, ...), stable across runs."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_normal(d: int, *key: int, device=None, dtype=torch.float32) -> Tensor:
    """``N(0, I_d)`` draw determined only by ``key`` (not by batch layout or call order)."""
    gen = torch.Generator().manual_seed(cell_seed(*key))
    return torch.randn(d, generator=gen).to(device=device, dtype=dtype)


@dataclass
class Perturbation:
    """Per-layer vectors for one batch, and how to add them to the residual stream.

    Attributes:
        vectors: layer -> ``[batch, T, d]``. Sequences longer than ``T`` are not perturbed past ``T``.
        mask: ``[batch, T]`` perturbed positions, or layer -> such a mask (per-row attacked layers, e.g.
            ASABench instances each attacked at their own layer).
        normalise: apply Eq. 1 to each vector against the activation it is added to (ASA, LAPT,
            ASAgrad); otherwise the vectors are added as they are (PGD).
        alpha: magnitude multiplier applied after normalisation.
        stats: numbers for logging (norms, attack losses).
    """

    vectors: dict[int, Tensor]
    mask: "Tensor | dict[int, Tensor]"
    normalise: bool = True
    alpha: float = 1.0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def delta(self, layer: int, hidden: Tensor) -> Tensor:
        """The tensor actually added to ``hidden`` (``[batch, seq, d]``) at ``layer``."""
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
        """Mean L2 norm of the raw vectors over perturbed positions, per layer."""
        out = {}
        for layer, vec in self.vectors.items():
            m = self.layer_mask(layer).bool().to(vec.device)
            sel = vec[:, : m.shape[1]][m[:, : vec.shape[1]]]
            out[f"layer{layer}"] = float(sel.norm(dim=-1).mean()) if sel.numel() else 0.0
        return out


class PerturbationStrategy:
    """Interface: build a :class:`Perturbation` for a batch at given layers.

    Subclasses set ``name`` and implement :meth:`make`. ``batch`` follows the data contract of
    :mod:`lat_lightning.data.collate`: ``harmful_*`` / ``safe_*`` ``input_ids``, ``attention_mask``,
    ``labels``, and ``prompt_lengths``.
    """

    name: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = False

    def __init__(self, cfg: PerturbationConfig):
        self.cfg = cfg

    def make(self, model: nn.Module, batch: dict[str, Tensor], layers: list[int], step: int = 0) -> Perturbation:
        raise NotImplementedError

    def empty(self, batch: dict[str, Tensor]) -> Perturbation:
        return Perturbation(vectors={}, mask=torch.zeros(1, 1, dtype=torch.bool), normalise=False)
