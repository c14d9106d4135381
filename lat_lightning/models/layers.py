"""Find the decoder layers of a causal LM, through PEFT, DDP and FSDP wrappers.

Hidden size and layer count always come from the model config; nothing here is hard-coded to one
architecture's width (the reference code hard-coded 4096).
"""

from __future__ import annotations

import torch
from torch import nn

# Attribute paths, tried in order, from the bare causal-LM to its decoder-layer ModuleList.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Mixtral, Qwen2/3, Gemma 1-3 (text), OLMo2, Phi, Phi-3
    "transformer.h",  # GPT-2, Falcon, BLOOM
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "model.decoder.layers",  # OPT
    "transformer.layers",
)

# Families tested on tiny random models (lat_lightning.testing.tiny_models builds one of each).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox",
                           "falcon", "bloom", "mpt", "qwen3", "gemma3", "olmo2", "phi", "mixtral")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids belong: the device of its input embeddings (the first device of a model split
    over devices with ``model.device_map``; the CPU when they are offloaded, accelerate's hooks move them)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP1/PEFT wrappers and return the underlying ``*ForCausalLM`` module.

    FSDP2 (``fully_shard``) keeps the module class hierarchy intact, so it needs no unwrapping.
    """
    seen = 0
    while seen < 10:
        seen += 1
        if hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            break
    return model


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
        if hasattr(obj, "_fsdp_wrapped_module") and not isinstance(obj, nn.ModuleList):
            obj = obj._fsdp_wrapped_module
    return obj


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of decoder blocks.

    Args:
        model: a causal LM, possibly wrapped by PEFT, DDP or FSDP.

    Returns:
        The decoder layers, in order (index ``l`` is block ``l``; its output is ``h[l]``).

    Raises:
        ValueError: if no layer list matching ``config.num_hidden_layers`` is found.
    """
    base = unwrap_model(model)
    n_layers = num_layers(base)
    for path in LAYER_PATHS:
        layers = _get_path(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) == n_layers:
            return layers
    # Unknown architecture: the only ModuleList with one entry per configured layer is the decoder.
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"cannot locate the decoder layers of {type(base).__name__}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _text_config(model: nn.Module):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers, from the config (``num_hidden_layers`` or ``n_layer``)."""
    config = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError(f"config of {type(model).__name__} has no layer count")


def hidden_size(model: nn.Module) -> int:
    """Residual-stream width, from the config (``hidden_size`` or ``n_embd``)."""
    config = _text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError(f"config of {type(model).__name__} has no hidden size")


def check_layer_indices(model: nn.Module, layers, what: str = "layer") -> list[int]:
    """Validate 0-based layer indices against the model.

    Raises:
        IndexError: naming the bad index and the valid range.
    """
    n = num_layers(model)
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise IndexError(f"{what} index {layer!r} out of range: this model has layers 0..{n - 1}")
        out.append(int(layer))
    return out
