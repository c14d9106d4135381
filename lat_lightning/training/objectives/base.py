"""What every defence objective shares: the interface the training module calls, the frozen starting model, and
the forward passes and masks the objectives are written in.

An objective replaces the *safety* terms of the defence step (``toward_safe`` / ``away_from_harmful`` under the
training attack): :meth:`Objective.losses` returns its weighted terms for one batch; the module adds the shared
``utility`` CE on benign data and any callback terms, sums them and runs the update (so accumulation, clipping,
logging, checkpoints and the LR schedule are the module's, as for every other defence).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import Tensor, nn

from lat_lightning.losses import IGNORE_INDEX
from lat_lightning.models.layers import _get_path, get_decoder_layers, unwrap_model
from lat_lightning.training.interpolation import is_peft_model

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

# Attribute paths, tried in order, from the bare causal LM to the norm applied before the unembedding.
FINAL_NORM_PATHS = (
    "model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.final_layernorm",
    "model.language_model.norm",
    "transformer.norm_f",
    "model.decoder.final_layer_norm",
)
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


class FrozenReference:
    """The starting model h⁰: with LoRA the same model with its adapters switched off (no copy); with full
    fine-tuning a frozen deep copy made at :meth:`attach` (the module's ``setup``, before any update or checkpoint
    restore). The copy lives in a plain list, so no strategy wraps it and no checkpoint holds it."""

    def __init__(self) -> None:
        self._copy: list[nn.Module] = []
        self._adapters = False

    def attach(self, model: nn.Module) -> None:
        self._adapters = is_peft_model(model)
        if not self._adapters and not self._copy:
            frozen = copy.deepcopy(model)
            frozen.requires_grad_(False)
            frozen.eval()
            self._copy.append(frozen)
            log.info("defence objective: frozen copy of the starting model (full fine-tuning)")

    def release(self) -> None:
        self._copy.clear()

    @torch.no_grad()
    def __call__(self, model: nn.Module, **inputs: Any) -> Any:
        """The starting model's outputs for ``inputs`` (no graph)."""
        if self._adapters:
            with cast("PeftModel", model).disable_adapter():
                return model(**inputs)
        if not self._copy:
            raise RuntimeError("the frozen reference is not attached: the module's setup() attaches it")
        frozen = self._copy[0]
        device = inputs["input_ids"].device
        if next(frozen.parameters()).device != device:
            frozen.to(device)
        return frozen(**inputs)


def seq_inputs(batch: dict, prefix: str) -> dict[str, Tensor]:
    """Model inputs of the ``<prefix>_*`` sequences of a batch."""
    return {
        "input_ids": batch[f"{prefix}_input_ids"],
        "attention_mask": batch[f"{prefix}_attention_mask"],
        "use_cache": False,
    }


def token_mask(batch: dict, prefix: str, response_only: bool = False) -> Tensor:
    """``[batch, T]`` bool: the real tokens of ``<prefix>`` (prompt and response), or its response tokens only."""
    if response_only:
        return batch[f"{prefix}_labels"] != IGNORE_INDEX
    return batch[f"{prefix}_attention_mask"].bool()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` ``[batch, T]`` over ``mask``'s positions (0 when none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the unembedding (for the logit lens).

    Raises:
        ValueError: an architecture whose final norm is at none of :data:`FINAL_NORM_PATHS`.
    """
    base = unwrap_model(model)
    for path in FINAL_NORM_PATHS:
        norm = _get_path(base, path)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(f"cannot find the final norm of {type(base).__name__} (tried {', '.join(FINAL_NORM_PATHS)})")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder block's attention module, in order.

    Raises:
        ValueError: a block without an attention submodule named as in :data:`ATTENTION_NAMES`.
    """
    out = []
    for block in get_decoder_layers(model):
        found = next(
            (getattr(block, n) for n in ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
        )
        if found is None:
            raise ValueError(f"cannot find the attention module of {type(block).__name__}")
        out.append(found)
    return out


def output_tensor(output: Any) -> Tensor:
    """The hidden-state tensor of a submodule's output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, tuple) else output


def replace_output(output: Any, tensor: Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class Objective:
    """A defence's training objective (one file per defence in this package; :data:`OBJECTIVES` names them).

    Subclasses set :attr:`name`, :attr:`needs_harmful` (the batch must hold the harmful completions),
    :attr:`needs_reference` (the frozen starting model) and implement :meth:`losses`.
    """

    name = ""
    needs_harmful = True
    needs_reference = False

    def __init__(self, settings: Any, toward_safe: float = 1.0):
        self.settings = settings
        self.toward_safe = float(toward_safe)  # loss.toward_safe: the weight of an objective's alignment CE
        self.reference = FrozenReference()
        self.stats: dict[str, float] = {}  # numbers of the last batch, logged as defence/<key>

    def setup(self, model: nn.Module) -> None:
        """Before the first step (and before a checkpoint is restored): take what the starting model gives."""
        if self.needs_reference:
            self.reference.attach(model)

    def teardown(self) -> None:
        self.reference.release()

    def losses(self, model: nn.Module, batch: dict, step: int, max_steps: int) -> dict[str, Tensor]:
        """The weighted terms for one batch (their sum is minimised)."""
        raise NotImplementedError


def hidden_states(model: nn.Module, inputs: dict, reference: Optional[FrozenReference] = None) -> tuple[Tensor, ...]:
    """``hidden_states`` of the model (``reference``: of the frozen starting model, no graph); index 0 = the
    embeddings, ``l + 1`` = block ``l``'s output."""
    if reference is not None:
        return reference(model, output_hidden_states=True, **inputs).hidden_states
    return model(output_hidden_states=True, **inputs).hidden_states
