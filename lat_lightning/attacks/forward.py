"""The forward pass every gradient-based attack step runs.

The blocks below the earliest attacked layer do not depend on the perturbation, so their output is
computed once per batch (no grad) and each attack step runs only the blocks above it
(:func:`lat_lightning.models.forward_from_layer.forward_from_layer`). Gradients are taken with
``torch.autograd.grad`` with respect to the perturbation tensors only: no weight ``.grad`` is written and,
under DDP, no gradient all-reduce is triggered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import Perturbation
from lat_lightning.data.templating import IGNORE_INDEX, build_sequences
from lat_lightning.models.forward_from_layer import forward_from_layer
from lat_lightning.models.hooks import capture_residual
from lat_lightning.models.layers import EMBED


@dataclass
class AttackInputs:
    """One or two right-padded sequence groups stacked along the batch (harmful first, then safe)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    parts: tuple[str, ...]
    batch_size: int

    def part(self, logits: Tensor, name: str) -> tuple[Tensor, Tensor]:
        i = self.parts.index(name)
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return logits[sl], self.labels[sl]


def stack_sequences(batch: dict[str, Tensor], parts: tuple[str, ...], pad_id: int = 0) -> AttackInputs:
    """Stack ``harmful_*`` / ``safe_*`` groups of a training batch, padded to one width.

    Prompt positions coincide in both groups (same prompt, right padding), so one perturbation tensor
    ``[batch, T, d]`` serves both halves.
    """
    width = max(batch[f"{p}_input_ids"].shape[1] for p in parts)

    def widen(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([widen(batch[f"{p}_input_ids"], pad_id) for p in parts])
    att = torch.cat([widen(batch[f"{p}_attention_mask"], 0) for p in parts])
    labels = torch.cat([widen(batch[f"{p}_labels"], IGNORE_INDEX) for p in parts])
    return AttackInputs(ids, att, labels, tuple(parts), batch[f"{parts[0]}_input_ids"].shape[0])


def prompt_target_batch(
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    safe_ids: Sequence[Sequence[int]] | None,
    pad_id: int,
    device,
) -> dict[str, Tensor]:
    """A right-padded training-contract batch (``harmful_*``, ``safe_*``, ``prompt_lengths``, ``index``,
    ``layer``) from token ids: the generation face of a gradient attack optimises on it.

    Args:
        prompt_ids / target_ids: per prompt; ``safe_ids`` the refusal per prompt (default: the target).
        pad_id: padding id.
        device: where the tensors go.
    """
    harmful = build_sequences(prompt_ids, target_ids, pad_id)
    batch = {f"harmful_{k}": v.to(device) for k, v in harmful.items() if k != "prompt_lengths"}
    safe = build_sequences(prompt_ids, safe_ids if safe_ids is not None else target_ids, pad_id)
    batch.update({f"safe_{k}": v.to(device) for k, v in safe.items() if k != "prompt_lengths"})
    batch["prompt_lengths"] = harmful["prompt_lengths"].to(device)
    batch["index"] = torch.arange(len(prompt_ids), device=device)
    batch["layer"] = torch.full((len(prompt_ids),), -1, dtype=torch.long, device=device)
    return batch


def cache_lower(model: nn.Module, inputs: AttackInputs, first_layer: int) -> Tensor | None:
    """``h[first_layer]`` of the clean model for the stacked inputs (no grad); ``None`` at the input embeddings
    (nothing lies below them: every step runs the whole model, the perturbation hooked on the embedding)."""
    if first_layer == EMBED:
        return None
    return capture_residual(
        model, [first_layer], input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False
    )[first_layer]


def perturbed_logits(
    model: nn.Module,
    inputs: AttackInputs,
    perturbation: Perturbation,
    cached: Tensor | None,
    first_layer: int,
    grad: bool = True,
) -> Tensor:
    """Logits with ``perturbation`` applied; from ``cached`` (``h[first_layer]``) when given.

    ``grad=True`` forces autograd on even when the caller runs under ``no_grad`` (evaluation), since
    the attack needs gradients with respect to the perturbation.
    """
    with torch.set_grad_enabled(grad), perturbation.applied(model):
        if cached is None:
            return model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False).logits
        return forward_from_layer(model, cached, first_layer, inputs.input_ids, inputs.attention_mask)
