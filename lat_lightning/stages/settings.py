"""The run config -> the library's typed settings, in one place.

Library packages own frozen settings dataclasses (``attacks.settings.AttackSettings``, ``models.settings``,
``data.settings``, ``training.settings``, ...). Stages build them here, once per need, from the run config (an
OmegaConf ``DictConfig`` or a :class:`~lat_lightning.config.RunConfig`) and pass them down; nothing below the stages
reads the raw config. Every builder is a pure function of the config, so two callers given the same config get
equal settings (``tests/stages/test_same_settings.py``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from lat_lightning.attacks.settings import AttackSettings
from lat_lightning.data.datamodule import DataModuleSettings
from lat_lightning.data.settings import DataSettings
from lat_lightning.models.settings import ModelSettings
from lat_lightning.training.settings import LossSettings, TrainerSettings

T = TypeVar("T")


def _plain(node: Any) -> Any:
    """A config node as plain Python values (dicts, lists, scalars)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: _plain(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def to_settings(cls: type[T], node: Any) -> T:
    """A frozen settings dataclass ``cls`` from a config section with the same keys (nested settings too).

    Keys the section has but ``cls`` lacks are an error (a schema and its settings class out of step), as is a
    settings field the section lacks.
    """
    if isinstance(node, cls):
        return node
    values = _plain(node)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = sorted(set(values) - names)
    if extra:
        raise TypeError(f"{cls.__name__} has no field(s) {extra}: the config schema and the settings class differ")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = values[f.name]
        hint = hints[f.name]
        nested = isinstance(hint, type) and dataclasses.is_dataclass(hint)  # a hint is a class, never an instance
        kwargs[f.name] = to_settings(hint, value) if nested and value is not None else value
    return cls(**kwargs)


def attack_settings(cfg) -> AttackSettings:
    """``perturbation``: what every attack reads (training, the scan, durability)."""
    return to_settings(AttackSettings, cfg.perturbation)


def model_settings(cfg, model_node: Any = None) -> ModelSettings:
    """``model`` (or another section of the same shape, e.g. a stage's copy with a different path)."""
    return to_settings(ModelSettings, cfg.model if model_node is None else model_node)


def data_settings(cfg) -> DataSettings:
    """``data``: sources, column maps, filters, length policy, batching."""
    return to_settings(DataSettings, cfg.data)


def loss_settings(cfg) -> LossSettings:
    """``loss``: the defence step's loss weights."""
    return to_settings(LossSettings, cfg.loss)


def trainer_settings(cfg) -> TrainerSettings:
    """``trainer``: Lightning trainer and optimiser settings."""
    return to_settings(TrainerSettings, cfg.trainer)


def datamodule_settings(cfg) -> DataModuleSettings:
    """What the training data module reads: ``data``, ``seed``, the model's prompt formatting, and whether the
    validation loop runs without held-out prompts (it still scores over-refusal and utility)."""
    return DataModuleSettings(data=data_settings(cfg), seed=int(cfg.seed),
                              use_chat_template=bool(cfg.model.use_chat_template),
                              system_prompt=cfg.model.system_prompt,
                              validate_without_prompts=bool(cfg.data.eval_benign or cfg.evaluation.utility_data))


__all__ = ["attack_settings", "data_settings", "datamodule_settings", "loss_settings", "model_settings",
           "to_settings", "trainer_settings"]
