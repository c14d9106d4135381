"""FSDP details: which module class is a decoder layer, FSDP2 sharding, and gathering weights for export.

* FSDP1 (``trainer.strategy=fsdp``, GPUs): Lightning's ``FSDPStrategy`` wraps (and, with
  ``model.gradient_checkpointing``, activation-checkpoints) every instance of the decoder-layer classes
  :func:`decoder_layer_classes` resolves from the model config's ``architectures`` entry (the classes
  transformers lists in ``_no_split_modules``, e.g. ``LlamaDecoderLayer``, ``GPT2Block``).
* FSDP2 (``trainer.strategy=fsdp2``): :func:`shard_fsdp2` applies ``fully_shard`` to each decoder layer
  and then to the whole model, over a 1-D data-parallel mesh. Module classes stay the same (FSDP2 swaps
  in a subclass), so layer access, hooks and ``forward_from_layer``'s per-instance ``forward`` patch keep
  working: the pre-forward hooks that all-gather a layer's weights run in ``__call__``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Optional, cast

import torch
from torch import nn

from lat_lightning.errors import ConfigError
from lat_lightning.models.settings import ModelSettings

log = logging.getLogger(__name__)


def decoder_layer_classes(model: ModelSettings) -> set[type[nn.Module]]:
    """The decoder-layer classes of the model ``model.name_or_path`` names (read from its config only).

    Raises:
        ConfigError: when the config names no architecture transformers knows.
    """
    from transformers import AutoConfig

    from lat_lightning.models.loading import resolve_model_source

    source = resolve_model_source(model)
    try:
        config = AutoConfig.from_pretrained(source, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ConfigError(
            f"cannot read the config of '{source}' to find its decoder layers: {(str(exc).splitlines() or [''])[0]}"
        ) from None
    return classes_for_architectures(list(getattr(config, "architectures", None) or []))


def classes_for_architectures(architectures: list[str]) -> set[type[nn.Module]]:
    """Decoder-layer classes (``_no_split_modules``) of the given transformers model class names."""
    import transformers

    found: set[type[nn.Module]] = set()
    for arch in architectures:
        model_cls = getattr(transformers, arch, None)
        if model_cls is None:
            continue
        module = sys.modules.get(model_cls.__module__) or importlib.import_module(model_cls.__module__)
        for name in getattr(model_cls, "_no_split_modules", None) or []:
            layer_cls = getattr(module, name, None)
            if isinstance(layer_cls, type) and issubclass(layer_cls, nn.Module):
                found.add(layer_cls)
    if not found:
        raise ConfigError(
            f"cannot tell the decoder-layer class of architectures {architectures or '[]'}; "
            "use trainer.strategy=fsdp2 or ddp for this model"
        )
    return found


# ------------------------------------------------------------------------------------------ FSDP2
def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (or a submodule)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_fsdp2(model: nn.Module, mesh, mp_policy: Optional[Any] = None) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, LM head). Idempotent.

    Args:
        model: the causal LM (a ``PeftModel`` is fine: frozen and trainable weights may share a layer).
        mesh: a 1-D ``DeviceMesh`` over the data-parallel processes.
        mp_policy: an optional ``MixedPrecisionPolicy``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lat_lightning.models.layers import get_decoder_layers

    if isinstance(model, FSDPModule):
        return model
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in get_decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(module: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The unsharded weights of ``module.model`` (keys as in ``module.model.state_dict()``), on CPU, on rank 0
    (``{}`` elsewhere); ``None`` when nothing is sharded. Collective: every rank must call it.

    Args:
        module: the ``LatentAdversarialModule`` (the FSDP1 root wraps it, so the state is taken there).
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    trainer = getattr(module, "_trainer", None)
    root = getattr(trainer.strategy, "model", None) if trainer is not None else None
    root = root if root is not None else module
    if not any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in root.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict=True: every value is a plain tensor (no DTensor / ShardedTensor)
    state = cast(
        "dict[str, torch.Tensor]",
        get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
    )
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


__all__ = ["classes_for_architectures", "decoder_layer_classes", "full_state_dict", "is_fsdp2", "shard_fsdp2"]
