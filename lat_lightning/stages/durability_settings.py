"""The durability suite's settings from a run config: the one place the suite's inputs are read from
``evaluation``, ``evaluation.durability``, ``perturbation``, ``model``, ``data`` and ``seed``.

Evaluation never reads the run config: the ``durability`` and ``compare`` stages (and the preflight) call
:func:`durability_settings` and pass the frozen :class:`~lat_lightning.eval.durability.DurabilitySettings` down.
"""

from __future__ import annotations

import dataclasses

from lat_lightning.errors import ConfigError
from lat_lightning.eval.durability import DurabilityChecks, DurabilitySettings


def durability_settings(cfg) -> DurabilitySettings:
    """The durability suite's settings from a run config (a :class:`~lat_lightning.config.RunConfig` or its
    OmegaConf node): ``evaluation.durability`` and the run's scan settings
    (:func:`lat_lightning.stages.settings.scan_settings`, the same object the ``scan`` stage runs with).

    Raises:
        ConfigError: a bad value, named by its config key (an unknown section, rewrite or attack; a primary judge
            not among the judges; no seeds).
    """
    from omegaconf import OmegaConf

    from lat_lightning.stages.settings import scan_settings, to_settings

    if dataclasses.is_dataclass(cfg):  # a RunConfig object: read it through OmegaConf like the CLI's
        cfg = OmegaConf.structured(cfg)
    try:
        checks = to_settings(DurabilityChecks, cfg.evaluation.durability)  # the section's schema is DurabilityChecks
    except ValueError as exc:  # the message starts with the field's name
        raise ConfigError(f"evaluation.durability.{exc}") from None
    try:
        return DurabilitySettings(
            dur=checks, scan=scan_settings(cfg, probes=False), max_length=int(cfg.data.max_length)
        )
    except ValueError as exc:
        raise ConfigError(f"evaluation.{exc}") from None


__all__ = ["durability_settings"]
