"""Which weights LoRA adapts: chosen per architecture when a recipe leaves ``model.lora.target_modules`` unset.

Module names differ between families (``q_proj`` in Llama, ``query_key_value`` in Falcon/BLOOM/GPT-NeoX,
``c_attn`` in GPT-2, ``Wqkv`` in MPT, ``fc1`` in Phi ...), so a fixed list fits only some of them: on
others it matches nothing or, worse, part of each block. The default is therefore the way peft's
``all-linear`` works, read off the model itself: **every linear layer inside the decoder blocks** (the LM head
and embeddings stay frozen), plus the **fused expert weights** of mixture-of-experts blocks (transformers 5
stores a block's experts as 3-D parameters such as ``mlp.experts.gate_up_proj``, which peft adapts through
``target_parameters``). The router is left out (Mixtral's, and Llama-4's, a linear layer with a forward of its own).

Targets a recipe lists are used as given; the block linear layers (and expert weights) they leave out are
named in a warning. Fused experts need care: peft adapts a fused ``gate_up_proj`` only when both halves are
asked for (``gate_proj`` with ``up_proj``, Mixtral's ``w1`` with ``w3``), so a list naming one of them gets the
other added, with a warning; and peft's parameter adapters take no dropout, so ``model.lora.dropout`` is set to 0
(with a warning) whenever expert weights are adapted.

:func:`lat_lightning.models.loading.apply_lora` wraps the model with these and records what was chosen (a
:class:`LoraTargets`, read back with :func:`lora_targets_of`; a training run writes it to ``lora_targets.json``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

from lat_lightning.models.layers import get_decoder_layers, unwrap_model

log = logging.getLogger(__name__)

ATTRIBUTE = "lat_lora_targets"  # where apply_lora leaves the LoraTargets on the wrapped model


@dataclass
class LoraTargets:
    """What LoRA adapts in one model.

    Attributes:
        auto: the targets were chosen from the architecture (``model.lora.target_modules`` unset).
        requested: the recipe's ``target_modules`` (``None`` when unset).
        target_modules: what peft was given as ``target_modules`` (block-relative module names when automatic).
        target_parameters: fused expert parameters given to peft as ``target_parameters``.
        block_weights: every linear layer and fused expert weight of a decoder block (block-relative names).
        adapted: block-relative names of the linear layers and expert weights that got adapters, in block order.
        left_out: block linear layers and expert weights of the adapted layers that got none.
        added: names added to a recipe's list because peft fuses them with a listed one.
        dropout: the LoRA dropout in effect (0 when expert weights are adapted).
        layers: decoder layers carrying adapters.
        num_adapted: number of adapted modules and parameters over all layers.
    """

    auto: bool
    requested: Optional[list[str]]
    target_modules: list[str]
    target_parameters: list[str]
    block_weights: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    dropout: float = 0.0
    layers: list[int] = field(default_factory=list)
    num_adapted: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the log."""
        how = "chosen per architecture (every linear layer of the decoder blocks)" if self.auto else "from the recipe"
        return (
            f"LoRA targets {how}: {', '.join(self.adapted) or 'none'} in {len(self.layers)} layers "
            f"({self.num_adapted} adapted)" + (f"; left out: {', '.join(self.left_out)}" if self.left_out else "")
        )


# ------------------------------------------------------------------------------------------------ the blocks
def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return (nn.Linear, Conv1D)


def _plain_linear(module: nn.Module, linear_types: tuple[type, ...]) -> bool:
    """A linear layer LoRA can wrap: one of ``linear_types``, but not a mixture-of-experts router built on one
    (a class named ``...Router``): Llama-4's ``Llama4Router`` is an ``nn.Linear`` whose forward returns
    ``(scores, logits)``, and peft's LoRA layer, which expects a tensor from the layer it wraps, fails on the tuple.
    Other subclasses with a forward of their own (Falcon's ``FalconLinear``) return a tensor and stay adaptable."""
    return isinstance(module, linear_types) and not type(module).__name__.endswith("Router")


def _layers_prefix(base: nn.Module) -> str:
    """Qualified name of the decoder-layer list inside the bare model (``model.layers``, ``transformer.h`` ...)."""
    layers = get_decoder_layers(base)
    for name, module in base.named_modules():
        if module is layers:
            return name
    raise ValueError(f"cannot name the decoder layers of {type(base).__name__}")


def block_weights(model: nn.Module) -> tuple[list[str], list[str]]:
    """The adaptable weights of the decoder blocks, as block-relative names in order of appearance.

    Returns:
        ``(linear, experts)``: linear layers (``nn.Linear`` and GPT-2's ``Conv1D``, e.g. ``self_attn.q_proj``),
        and fused expert parameters of 3 or more dimensions (e.g. ``mlp.experts.gate_up_proj``), over all blocks.
    """
    linear_types = _linear_types()
    linear: dict[str, None] = {}
    experts: dict[str, None] = {}
    for block in get_decoder_layers(unwrap_model(model)):
        for name, module in block.named_modules():
            if name and _plain_linear(module, linear_types):
                linear.setdefault(name, None)
        for name, param in block.named_parameters():
            owner = name.rpartition(".")[0]
            owner_module = block.get_submodule(owner) if owner else block
            if param.dim() >= 3 and not isinstance(owner_module, linear_types + (nn.modules.conv._ConvNd,)):
                experts.setdefault(name, None)
    return list(linear), list(experts)


_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def attention_projections(model: nn.Module) -> list[str]:
    """The linear layers of the decoder blocks' attention, as peft ``target_modules`` names.

    ``q_proj, k_proj, v_proj, o_proj`` in Llama-like families, ``c_attn`` and ``attn.c_proj`` in GPT-2 (its MLP has
    a ``c_proj`` too), ``query_key_value`` and ``dense`` in Falcon / BLOOM / GPT-NeoX, ``Wqkv`` and ``out_proj`` in
    MPT. A layer's bare name is used when no other block linear layer shares it, else its block-relative name
    (peft matches a target against the end of a module's name).

    Raises:
        ValueError: the blocks have no linear layer under a submodule whose name contains ``attn`` / ``attention``.
    """
    linear, _ = block_weights(model)
    attention = [n for n in linear if _ATTENTION.search(n.split(".")[0])]
    if not attention:
        raise ValueError(
            f"no attention projections found in the decoder blocks of {type(model).__name__} "
            f"(block linear layers: {', '.join(linear)}); name the LoRA targets explicitly"
        )
    last = [n.rsplit(".", 1)[-1] for n in linear]
    return [n.rsplit(".", 1)[-1] if last.count(n.rsplit(".", 1)[-1]) == 1 else n for n in attention]


def _peft_fused_groups(model: nn.Module) -> dict[str, set[str]]:
    """peft's fused expert groups for this model type (e.g. ``gate_up_proj: [gate_proj, up_proj]``), if any.

    These live in a private peft module; when it moves, the groups are unknown and peft's own one-line error
    about a half-requested group still reaches the user.
    """
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_FUSED_TARGETS
    except ImportError:  # pragma: no cover - depends on the peft version
        return {}
    model_type: Any = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)  # None: no group
    return dict(_MOE_FUSED_TARGETS.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {}))


def _peft_expert_names(model: nn.Module) -> set[str]:
    """Pre-fusion names peft maps onto fused expert parameters for this model type (``w1``, ``gate_proj`` ...)."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # pragma: no cover
        return set()
    model_type: Any = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)  # None: no group
    mapping = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {})
    return {old for old, new in mapping.items() if not new.endswith(".weight")}  # the router maps to gate.weight


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the whole name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


# ------------------------------------------------------------------------------------------------ choosing
def choose_targets(model: nn.Module, requested: Optional[Sequence[str]]) -> LoraTargets:
    """What to give peft for ``model`` (before wrapping).

    Args:
        model: the bare causal LM.
        requested: ``model.lora.target_modules``; ``None`` chooses every block linear layer and expert weight.

    Returns:
        A :class:`LoraTargets` with ``target_modules`` / ``target_parameters`` / ``added`` filled in.
    """
    linear, experts = block_weights(model)
    if requested is None:
        return LoraTargets(
            auto=True, requested=None, target_modules=linear, target_parameters=experts, block_weights=linear + experts
        )
    names = [str(n) for n in requested]
    # Names of fused expert parameters go to peft as target_parameters (target_modules only matches modules).
    params = [n for n in names if any(_matches(e, n) for e in experts)]
    modules = [n for n in names if n not in params]
    added = []
    for _fused, group in _peft_fused_groups(model).items():
        present = [g for g in group if g in modules]
        if present and len(present) < len(group):
            missing = [g for g in group if g not in modules]
            added += missing
            modules += missing
            log.warning(
                "LoRA targets: %s and %s are fused into one expert weight in this model; adapting it needs "
                "both, so %s was added to model.lora.target_modules",
                " and ".join(present),
                " and ".join(missing),
                ", ".join(missing),
            )
    return LoraTargets(
        auto=False,
        requested=names,
        target_modules=modules,
        target_parameters=params,
        block_weights=linear + experts,
        added=added,
    )


def adapts_expert_parameters(model: nn.Module, targets: LoraTargets) -> bool:
    """Whether peft will adapt fused expert parameters (directly, or through its pre-fusion names)."""
    return bool(targets.target_parameters) or bool(_peft_expert_names(model) & set(targets.target_modules))


def coverage(wrapped: nn.Module, targets: LoraTargets) -> LoraTargets:
    """Fill in what was adapted and what was left out, from the names peft reports after wrapping.

    Args:
        wrapped: the peft model.
        targets: what :func:`choose_targets` chose for the bare model (its ``block_weights`` are read).
    """
    tuner = getattr(wrapped, "base_model", wrapped)
    adapted_full = list(getattr(tuner, "targeted_module_names", []) or []) + list(
        getattr(tuner, "targeted_parameter_names", []) or []
    )
    base = unwrap_model(wrapped)
    prefix = _layers_prefix(base) + "."
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    by_layer: dict[int, set[str]] = {}
    for full in adapted_full:
        m = pattern.match(full)
        if m:
            by_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
    adapted_kinds = set().union(*by_layer.values()) if by_layer else set()
    targets.adapted = [n for n in targets.block_weights if n in adapted_kinds]
    targets.left_out = [n for n in targets.block_weights if n not in adapted_kinds]
    targets.layers = sorted(by_layer)
    targets.num_adapted = len(adapted_full)
    return targets


def lora_targets_of(model: nn.Module) -> Optional[LoraTargets]:
    """The :class:`LoraTargets` :func:`~lat_lightning.models.loading.apply_lora` recorded on ``model`` (or ``None``)."""
    return getattr(model, ATTRIBUTE, None)


def warn_left_out(targets: LoraTargets, config_key: str = "model.lora.target_modules") -> None:
    """A recipe's explicit targets that leave block weights out get one warning naming them (and ``config_key``,
    the setting they came from)."""
    if targets.auto or not targets.left_out:
        return
    log.warning(
        "%s %s leave out these weights of the decoder blocks: %s (leave it unset to adapt every linear "
        "layer of the blocks)",
        config_key,
        targets.requested,
        ", ".join(targets.left_out),
    )


__all__ = [
    "ATTRIBUTE",
    "LoraTargets",
    "adapts_expert_parameters",
    "attention_projections",
    "block_weights",
    "choose_targets",
    "coverage",
    "lora_targets_of",
    "warn_left_out",
]
