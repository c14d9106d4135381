"""The refusal direction (Arditi et al. 2024): difference in means of harmful and harmless prompt activations.

For layer ``l`` and the prompt position ``i`` (``perturbation.direction_token``, counted from the end of the
prompt: ``-1`` is the last prompt token, whose output is the first answer token)

    r[l] = mean_{x harmful} h[l](x)_i  −  mean_{x harmless} h[l](x)_i

on the model under attack (so on a hardened model it is that model's own direction: the attack is adaptive).
Shared by the two attacks that use it, :mod:`~lat_lightning.attacks.refusal_ablation` and
:mod:`~lat_lightning.attacks.refusal_addition` (one file each), in their generation face (from the contrast
prompts the caller gives, :meth:`~lat_lightning.attacks.base.Attack.set_contrast_prompts`) and their training
face (from the batch: its harmful prompts and its ``benign_*`` rows, refreshed every ``direction_refresh``
micro-batches, as in refusal-feature adversarial training, Yu et al. 2024).

Cost: one forward pass (no grad) over both prompt sets, whatever the number of layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import Attack
from lat_lightning.attacks.plan import CLEAN
from lat_lightning.data.templating import pad_sequences
from lat_lightning.models.eval_mode import eval_mode
from lat_lightning.models.hooks import capture_residual
from lat_lightning.models.layers import EMBED, check_layer_indices, layer_name, num_layers

log = logging.getLogger(__name__)

MIN_NORM = 1e-8  # a direction shorter than this has no orientation (identical prompt sets)


def _states_at(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, layers: Sequence[int]
) -> dict[int, Tensor]:
    """``{l: [B, d]}`` residual states of right-padded rows at one position per row (float32, no grad)."""
    captured = capture_residual(model, layers, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return {l: captured[l][rows, positions.to(input_ids.device)].float() for l in layers}


def token_positions(prompt_lengths: Tensor, token: int) -> Tensor:
    """The column of prompt position ``token`` (``-1`` = last prompt token) in right-padded rows; clamped to
    the prompt (a prompt shorter than ``|token|`` is read at its first token).

    Raises:
        ValueError: for ``token >= 0`` (positions are counted from the end of the prompt).
    """
    if token >= 0:
        raise ValueError(
            f"perturbation.direction_token counts from the end of the prompt (-1 = last prompt token), got {token}"
        )
    return (prompt_lengths.long() + token).clamp(min=0)


@torch.no_grad()
def prompt_states(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    token: int = -1,
    pad_id: int = 0,
    batch_size: int = 32,
) -> dict[int, Tensor]:
    """``{l: [N, d]}``: each prompt's residual state at position ``token`` (from the end of the prompt)."""
    device = next(model.parameters()).device
    out: dict[int, list[Tensor]] = {l: [] for l in layers}
    with eval_mode(model):
        for start in range(0, len(prompt_ids), max(1, batch_size)):
            chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
            ids = pad_sequences(chunk, pad_id, side="right").to(device)
            mask = pad_sequences([[1] * len(p) for p in chunk], 0, side="right").to(device)
            pos = token_positions(torch.tensor([len(p) for p in chunk]), token)
            for l, s in _states_at(model, ids, mask, pos, layers).items():
                out[l].append(s.cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def difference_in_means(harmful: dict[int, Tensor], harmless: dict[int, Tensor]) -> dict[int, Tensor]:
    """``r[l] = mean(harmful[l]) − mean(harmless[l])`` per layer (``[d]`` float32)."""
    return {l: harmful[l].float().mean(0) - harmless[l].float().mean(0) for l in harmful}


def refusal_directions(
    model: nn.Module,
    harmful_ids: Sequence[Sequence[int]],
    harmless_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    token: int = -1,
    pad_id: int = 0,
    batch_size: int = 32,
) -> dict[int, Tensor]:
    """The difference-in-means direction ``r[l]`` (not normalised) at every listed layer, on ``model``.

    Args:
        model: the model under attack.
        harmful_ids / harmless_ids: prompt token ids (chat template applied), at least one of each.
        layers: layers to read (block indices, or :data:`~lat_lightning.models.layers.EMBED`).
        token: prompt position, counted from the end (``-1``: the last prompt token).
        pad_id: padding id.
        batch_size: prompts per forward.

    Returns:
        ``{l: [d]}`` float32 on the CPU.

    Raises:
        ValueError: an empty prompt set.
    """
    if not harmful_ids or not harmless_ids:
        raise ValueError("the refusal direction needs at least one harmful and one harmless prompt")
    layers = sorted(set(check_layer_indices(model, list(layers))))
    return difference_in_means(
        prompt_states(model, harmful_ids, layers, token, pad_id, batch_size),
        prompt_states(model, harmless_ids, layers, token, pad_id, batch_size),
    )


@torch.no_grad()
def batch_directions(
    model: nn.Module, batch: dict[str, Tensor], layers: Sequence[int], token: int = -1
) -> dict[int, Tensor]:
    """``r[l]`` from a training batch: its harmful prompts (the ``safe_*`` rows up to ``prompt_lengths``) against
    its harmless prompts (the ``benign_*`` rows up to ``benign_prompt_lengths``), on the current weights.

    Raises:
        ValueError: the batch carries no benign rows (set ``data.benign``).
    """
    if "benign_input_ids" not in batch or "benign_prompt_lengths" not in batch:
        raise ValueError(
            "the refusal direction in training contrasts each batch's harmful prompts with benign "
            "ones: set data.benign (harmless prompt/response pairs)"
        )
    with eval_mode(model):
        harmful = _states_at(
            model,
            batch["safe_input_ids"],
            batch["safe_attention_mask"],
            token_positions(batch["prompt_lengths"], token),
            layers,
        )
        harmless = _states_at(
            model,
            batch["benign_input_ids"],
            batch["benign_attention_mask"],
            token_positions(batch["benign_prompt_lengths"], token),
            layers,
        )
    return difference_in_means(harmful, harmless)


def unit(vec: Tensor) -> Tensor:
    """``vec / ‖vec‖``.

    Raises:
        ValueError: a (near-)zero direction (the two prompt sets are indistinguishable at that layer).
    """
    norm = float(vec.float().norm())
    if norm < MIN_NORM:
        raise ValueError(
            "the refusal direction is zero at this layer (harmful and harmless prompts give the same "
            "mean activation); attack another layer"
        )
    return vec.float() / norm


_warned_zero: set[int] = set()


def unit_or_zero(vec: Tensor, layer: int) -> Tensor:
    """:func:`unit`, or a zero vector (the attack then changes nothing) with a warning logged once per layer.

    At the input embeddings the direction is exactly zero whenever every prompt ends with the same chat-template
    token: both means are that token's embedding.
    """
    try:
        return unit(vec)
    except ValueError:
        if layer not in _warned_zero:
            _warned_zero.add(layer)
            log.warning(
                "refusal direction at layer %s is zero (harmful and harmless prompts have the same mean "
                "there); the attack leaves that row unperturbed",
                layer_name(layer),
            )
        return torch.zeros_like(vec, dtype=torch.float32)


class RefusalDirectionAttack(Attack):
    """What both refusal-direction attacks share: the knobs, the per-model direction cache, the training-time
    refresh and its checkpoint state. Subclasses turn directions into a perturbation or a plan."""

    needs_harmless = True

    def __init__(self, settings):
        super().__init__(settings)
        token_positions(torch.tensor([1]), settings.direction_token)  # fail on a bad position at construction
        if settings.direction_prompts < 1:
            raise ValueError(f"perturbation.direction_prompts must be >= 1, got {settings.direction_prompts}")
        if settings.direction_refresh < 1:
            raise ValueError(f"perturbation.direction_refresh must be >= 1, got {settings.direction_refresh}")
        self._generation_dirs: dict[tuple[int, int], Tensor] = {}  # (id(model), layer) -> r[l]
        self._train_dirs: dict[int, Tensor] | None = None  # training face: layer -> r[l]
        self._train_step: int | None = None  # the micro-batch at which they were computed

    def describe(self) -> dict[str, Any]:
        s = self.settings
        out = {
            "attack": self.name,
            "positions": s.positions,
            "first_k": s.first_k,
            "direction_token": s.direction_token,
            "direction_prompts": s.direction_prompts,
        }
        if self.contrast is not None:
            out["contrast_prompts"] = self.contrast.fingerprint()
        return out

    def set_contrast_prompts(self, harmful_ids, harmless_ids) -> None:
        super().set_contrast_prompts(harmful_ids, harmless_ids)
        self._generation_dirs = {}

    # -- generation face: directions from the contrast prompts, per model ------------------------------------
    def generation_directions(self, model: nn.Module, layers: Sequence[int], pad_id: int = 0) -> dict[int, Tensor]:
        """``r[l]`` of ``model`` for each listed layer (computed once per model and layer).

        Raises:
            ValueError: no contrast prompts were set.
        """
        if self.contrast is None:
            raise ValueError(
                f"attack '{self.name}' needs harmful and harmless prompts for the refusal direction "
                "(data.eval_benign or data.benign: harmless prompts)"
            )
        key = id(model)
        need = sorted({int(l) for l in layers if l != CLEAN and (key, int(l)) not in self._generation_dirs})
        if need:
            n = int(self.settings.direction_prompts)
            dirs = refusal_directions(
                model,
                self.contrast.harmful[:n],
                self.contrast.harmless[:n],
                need,
                self.settings.direction_token,
                pad_id,
            )
            for l, r in dirs.items():
                self._generation_dirs[(key, l)] = r
        return {int(l): self._generation_dirs[(key, int(l))] for l in layers if l != CLEAN}

    # -- training face: directions from the batch, refreshed every N micro-batches ---------------------------
    def training_directions(
        self, model: nn.Module, batch: dict[str, Tensor], layers: Sequence[int], step: int
    ) -> dict[int, Tensor]:
        """``r[l]`` for the training step ``step``: recomputed from this batch at step 0 and then every
        ``direction_refresh`` micro-batches (kept in between, and in checkpoints)."""
        every = int(self.settings.direction_refresh)
        stale = (
            self._train_dirs is None
            or self._train_step is None
            or step >= self._train_step + every
            or step < self._train_step
            or any(l not in self._train_dirs for l in layers)
        )
        if stale:
            self._train_dirs = batch_directions(model, batch, sorted(set(layers)), self.settings.direction_token)
            self._train_step = int(step) - int(step) % every
        assert self._train_dirs is not None  # stale whenever unset, and set just above when stale
        return {l: self._train_dirs[l] for l in layers}

    def state_dict(self) -> dict[str, Any]:
        if self._train_dirs is None:
            return {}
        return {
            "directions": {int(l): r.detach().cpu() for l, r in self._train_dirs.items()},
            "computed_at": self._train_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("directions"):
            self._train_dirs = {int(l): r.float() for l, r in state["directions"].items()}
            self._train_step = int(state["computed_at"])

    @staticmethod
    def single_source_layer(model: nn.Module, batch: dict[str, Tensor], layers: Sequence[int], name: str) -> list[int]:
        """The attacked layers of a training batch (per-row layers are not supported)."""
        row_layers = batch.get("layer")
        if row_layers is not None and bool((row_layers != CLEAN).any()):
            raise ValueError(
                f"attack '{name}' does not support per-instance layers (data.asabench); list "
                "perturbation.layers instead"
            )
        return check_layer_indices(model, list(layers))


def every_layer(model: nn.Module) -> list[int]:
    """The input embeddings and every block output: where a directional ablation acts."""
    return [EMBED] + list(range(num_layers(model)))


__all__ = [
    "RefusalDirectionAttack",
    "batch_directions",
    "difference_in_means",
    "every_layer",
    "prompt_states",
    "refusal_directions",
    "token_positions",
    "unit",
    "unit_or_zero",
]
