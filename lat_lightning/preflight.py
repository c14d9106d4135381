"""Checks run before a run directory is created or any weight is loaded.

Everything that can be decided from the config and the model's ``config.json`` alone (strategy settings,
perturbation values, layer indices, quantisation support, the distributed strategy) fails here with one
actionable line, so a bad setting never leaves a half-written run directory behind and never starts
training. The same checks run again in :func:`lat_lightning.training.fit.validate_setup` against the loaded model.
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
    from lat_lightning.models.loading import resolve_model_path

    if cfg.model.name_or_path == "organism":  # built by the organism stage; checked when fit loads it
        return None
    source = resolve_model_path(cfg.model.name_or_path)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - not cached / offline: load_model reports it with context
        return None


def preflight(cfg: DictConfig) -> None:
    """Validate ``cfg`` for its stages before anything is written.

    Raises:
        ConfigError: invalid strategy, perturbation or layer settings.
        ModelLoadError: a missing model path, or quantisation without bitsandbytes.
    """
    if "fit" not in cfg.stages:
        return
    from lat_lightning.models.loading import _quantization_config
    from lat_lightning.training.fit import validate_setup

    check_distributed_config(cfg)
    _quantization_config(cfg.model)
    config = model_config(cfg)
    if config is not None:
        validate_setup(cfg, SimpleNamespace(config=config))


__all__ = ["model_config", "preflight"]
