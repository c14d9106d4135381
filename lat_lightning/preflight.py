"""Checks run before a run directory is created or any weight is loaded.

Everything that can be decided from the config and the model's ``config.json`` alone (strategy settings,
perturbation values, layer indices, quantisation support, the distributed strategy) fails here with one
actionable line, so a bad setting never leaves a half-written run directory behind and never starts
training. The same checks run again in :func:`lat_lightning.training.fit.validate_setup` against the loaded model.

The pipeline runs :func:`check_config` first, then resolves the model organism (which may build it), then
:func:`check_model` on the resolved model path; :func:`preflight` runs both for a config that names no organism.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

from omegaconf import DictConfig

from lat_lightning.training.distributed import check_distributed_config


def model_config(cfg: DictConfig) -> Optional[Any]:
    """The model's transformers config (no weights), or ``None`` when it cannot be read without loading.

    Raises:
        ModelLoadError: for a local model path that does not exist.
    """
    from lat_lightning.models.loading import resolve_model_source

    source = resolve_model_source(cfg.model)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - not cached / offline: load_model reports it with context
        return None


def check_config(cfg: DictConfig) -> None:
    """The checks that need no model: the distributed strategy and quantisation support.

    Raises:
        ConfigError: invalid distributed settings.
        ModelLoadError: quantisation without bitsandbytes.
    """
    if "fit" not in cfg.stages:
        return
    from lat_lightning.models.loading import _quantization_config

    check_distributed_config(cfg)
    _quantization_config(cfg.model)


def check_model(cfg: DictConfig) -> None:
    """The checks that read the model's ``config.json`` (layer indices against the model's depth).

    Run on a config whose model names a path or hub id (the pipeline resolves the organism first).

    Raises:
        ConfigError: invalid strategy, perturbation or layer settings.
        ModelLoadError: a missing model path.
    """
    if "fit" not in cfg.stages:
        return
    from lat_lightning.training.fit import validate_setup

    config = model_config(cfg)
    if config is not None:
        validate_setup(cfg, SimpleNamespace(config=config))


def preflight(cfg: DictConfig) -> None:
    """Validate ``cfg`` for its stages before anything is written: :func:`check_config`, then
    :func:`check_model`.

    Raises:
        ConfigError: invalid strategy, perturbation or layer settings.
        ModelLoadError: a missing model path, or quantisation without bitsandbytes.
    """
    check_config(cfg)
    check_model(cfg)


__all__ = ["check_config", "check_model", "model_config", "preflight"]
