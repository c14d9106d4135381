"""Find the decoder layers of a causal LM, through PEFT, DDP and FSDP wrappers.

Hidden size and layer count always come from the model config; nothing here is hard-coded to one
architecture's width (the reference code hard-coded 4096).

Attackable layers are the decoder blocks ``0 .. n-1`` (a perturbation at ``l`` is added to the block's
output ``h[l]``) and the input embeddings, :data:`EMBED` (written ``embed`` in configs): a perturbation there
is added to the output of the token-embedding module, i.e. to ``inputs_embeds``, before block 0 (and before
any model-side rescaling such as Gemma's ``sqrt(d)`` or GPT-2's position embeddings) — the embedding-space
attack of Schwinn et al. (2024). ``EMBED`` sorts below every block, so ``min(layers)`` is still the earliest
attacked point; ``-1`` stays the "no layer / clean row" marker used by generation and the data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

EMBED = -2  # the input embeddings as an attackable layer (below block 0; -1 means "no layer")
EMBED_NAME = "embed"  # how configs, reports and logs name it
ALL_BLOCKS = "all"  # in a layer list: every decoder block (expanded once the model is known)

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

# Families tested on tiny random models (lat_lightning.models.tiny_factory builds one of each).
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt_neox",
    "falcon",
    "bloom",
    "mpt",
    "qwen3",
    "gemma3",
    "olmo2",
    "phi",
    "mixtral",
    "llama4",
)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids belong: the device of its input embeddings (the first device of a model split
    over devices with ``model.device_map``; the CPU when they are offloaded, accelerate's hooks move them)."""
    hf: Any = model  # duck-typed: a transformers model has get_input_embeddings (any other module: the except)
    try:
        device = hf.get_input_embeddings().weight.device
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
            model = cast(nn.Module, model._fsdp_wrapped_module)
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = cast(nn.Module, model.module)
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = cast(nn.Module, model.get_base_model())
        else:
            break
    return model


def _get_path(root: nn.Module, path: str):
    obj: Any = root
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
    config: Any = unwrap_model(model).config  # a transformers config (or a stand-in's, see lat_lightning.preflight)
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


def vocab_size(model: nn.Module) -> int | None:
    """Vocabulary size, from the config (``vocab_size``; ``None`` when the config does not say)."""
    value = getattr(_text_config(model), "vocab_size", None)
    return int(value) if value else None


def check_layer_indices(model: nn.Module, layers, what: str = "layer") -> list[int]:
    """Validate 0-based layer indices against the model; :data:`EMBED` (or ``"embed"``) is the input embeddings
    and ``"all"`` expands to every block (in place; a layer listed twice stays twice).

    Raises:
        IndexError: naming the bad index and the valid range.
    """
    n = num_layers(model)
    out = []
    for layer in layers:
        if layer == EMBED_NAME or (isinstance(layer, int) and not isinstance(layer, bool) and layer == EMBED):
            out.append(EMBED)
            continue
        if layer == ALL_BLOCKS:
            out.extend(range(n))
            continue
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise IndexError(
                f"{what} index {layer!r} out of range: this model has layers 0..{n - 1} "
                f"(and '{EMBED_NAME}' for the input embeddings)"
            )
        out.append(int(layer))
    return out


def parse_layers(values: Iterable[Any], what: str = "layers") -> list[int | str]:
    """Layer lists as written in a config -> layer ids: block indices, ``embed`` -> :data:`EMBED`, and ``all``
    (every block) kept as ``"all"`` until :func:`check_layer_indices` expands it against a model.

    The model-independent half of the check (:func:`check_layer_indices` then checks the range against a model).
    A negative integer is refused: ``-1`` / ``-2`` are internal markers, not Python-style "from the end" indices.

    Raises:
        ValueError: one line naming ``what`` and the bad entry.
    """
    out: list[int | str] = []
    for v in values:
        if isinstance(v, str) and v.strip().lower() == EMBED_NAME:
            out.append(EMBED)
        elif isinstance(v, str) and v.strip().lower() == ALL_BLOCKS:
            out.append(ALL_BLOCKS)
        elif isinstance(v, str) and v.strip().isdigit():
            out.append(int(v))
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out.append(int(v))
        else:
            raise ValueError(
                f"{what}: {v!r} is not a layer; use block indices 0, 1, ..., '{EMBED_NAME}' for "
                f"the input embeddings or '{ALL_BLOCKS}' for every block"
            )
    return out


def layer_name(layer: int) -> str:
    """How a layer id is shown to people: ``embed`` for :data:`EMBED`, else the block index."""
    return EMBED_NAME if int(layer) == EMBED else str(int(layer))


def get_input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module whose output is ``inputs_embeds`` (through PEFT, DDP and FSDP wrappers).

    Raises:
        ValueError: if the model exposes none.
    """
    base: Any = unwrap_model(model)  # duck-typed: a transformers model has get_input_embeddings
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if emb is None:
        raise ValueError(f"{type(base).__name__} has no input embeddings to attack")
    return emb
