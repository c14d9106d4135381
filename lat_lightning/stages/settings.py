"""The run config -> the library's typed settings, in one place.

Library packages own frozen settings dataclasses (``attacks.settings.AttackSettings``, ``models.settings``,
``data.settings``, ``training.settings``, ``eval.scan.settings``, ``eval.coherence``...). Stages build them here
from the run config (an OmegaConf ``DictConfig`` or a :class:`~lat_lightning.config.RunConfig`) and pass them
down; nothing below the stages reads the raw config. Every scan (the ``scan`` stage, the validation loop, the
``evaluate`` stage, the fragile-layer selection, durability's re-scans, the comparison's battery) starts from
:func:`scan_settings`, and a caller that scans differently says so with ``dataclasses.replace`` beside a comment.
Every builder is a pure function of the config, so two callers given the same config get equal settings
(``tests/stages/test_same_settings.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, Optional, Sequence, TypeVar

from lat_lightning.attacks.positions import GENERATION_POLICIES
from lat_lightning.attacks.settings import AttackSettings
from lat_lightning.data.datamodule import DataModuleSettings
from lat_lightning.data.settings import DataSettings
from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.generation import GenerationSettings
from lat_lightning.eval.scan.settings import JudgeSettings, ScanSettings, generation_positions
from lat_lightning.models.settings import ModelSettings
from lat_lightning.training.settings import LossSettings, TrainerSettings

log = logging.getLogger(__name__)
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
    return DataModuleSettings(
        data=data_settings(cfg),
        seed=int(cfg.seed),
        use_chat_template=bool(cfg.model.use_chat_template),
        system_prompt=cfg.model.system_prompt,
        validate_without_prompts=bool(cfg.data.eval_benign or cfg.evaluation.utility_data),
        validation_prompts=cfg.evaluation.validation_prompts,  # an int >= 1 or None (the schema checks it)
    )


def coherence_settings(cfg) -> CoherenceSettings:
    """``evaluation.coherence`` as :class:`~lat_lightning.eval.coherence.CoherenceSettings` (defaults for a config
    without the section)."""
    ev = cfg.evaluation
    node = ev.get("coherence") if hasattr(ev, "get") else getattr(ev, "coherence", None)
    return CoherenceSettings() if node is None else to_settings(CoherenceSettings, node)


def generation_settings(cfg) -> GenerationSettings:
    """Decoding and batching (``evaluation``) and prompt formatting (``model``)."""
    ev = cfg.evaluation
    return GenerationSettings(
        max_new_tokens=ev.max_new_tokens,
        do_sample=ev.do_sample,
        temperature=ev.temperature,
        top_p=ev.top_p,
        best_of_n=ev.best_of_n,
        batch_size=ev.batch_size,
        share_prefix=bool(ev.share_prefix),
        use_chat_template=cfg.model.use_chat_template,
        system_prompt=cfg.model.system_prompt,
    )


def scan_judges(cfg) -> list[str]:
    """``evaluation.judges``, plus the primary judge when it qualifies a listed judge (``+coherent``, ``+ontopic``:
    ``refusal+coherent+ontopic`` with ``refusal`` listed).

    Raises:
        ConfigError: a primary judge that is neither listed nor such a qualified judge.
    """
    from lat_lightning.errors import ConfigError
    from lat_lightning.eval.judges import split_judge_name

    ev = cfg.evaluation
    judges = [str(j) for j in ev.judges]
    primary = str(ev.primary_judge)
    if primary not in judges:
        base, suffixes = split_judge_name(primary)
        if not suffixes or base not in judges:
            raise ConfigError(f"evaluation.primary_judge '{primary}' is not in evaluation.judges {judges}")
        judges.append(primary)
    return judges


def judge_settings(cfg) -> JudgeSettings:
    """The judges (:func:`scan_judges`), the headline judge and the judges' own keys (``evaluation``)."""
    ev = cfg.evaluation
    return JudgeSettings(
        judges=tuple(scan_judges(cfg)),
        primary_judge=ev.primary_judge,
        classifier_path=ev.classifier_path,
        target_key_pattern=ev.target_key_pattern,
    )


def scan_positions(cfg) -> tuple[str, int, str]:
    """The generation-time positions policy, first_k and refresh for a run config.

    ``evaluation.positions`` / ``evaluation.refresh`` / ``evaluation.first_k`` win when they are set.
    Otherwise ``perturbation.positions`` is used when it is a generation policy (``prompt_last_and_generated``,
    ``first_k``, ``all``); the training-only policies (``response``, ``prompt``, LAPT's default) fall back to
    the paper's attack, ``prompt_last_and_generated``
    (:func:`~lat_lightning.eval.scan.settings.generation_positions`).
    """
    ev, pc = cfg.evaluation, cfg.perturbation
    if ev.positions is None and pc.positions not in GENERATION_POLICIES:
        log.info(
            "scan: perturbation.positions=%s is a training policy; the scan attacks the last prompt "
            "token and every generated token (prompt_last_and_generated)",
            pc.positions,
        )
    return generation_positions(ev.positions, ev.first_k, ev.refresh, pc)


def scan_settings(
    cfg,
    *,
    attacks: Optional[Sequence[str]] = None,
    layers: Optional[Sequence] = None,
    seeds: Optional[Sequence[int]] = None,
    probes: Optional[bool] = None,
) -> ScanSettings:
    """The scan the run config describes (what the ``scan`` stage runs).

    Args:
        cfg: the run config.
        attacks: attack names instead of ``evaluation.attacks``.
        layers: layers instead of ``evaluation.layers`` (block indices / ``embed``).
        seeds: seeds instead of ``evaluation.seeds``.
        probes: run the NLL / position-KL probes (default: ``evaluation.probes``, ``null`` read as off: the scan
            stage decides ``null`` by the model's size, :func:`lat_lightning.stages.scan.probes_wanted`).

    Raises:
        ConfigError: an unknown attack, or a primary judge not among the judges.
    """
    from lat_lightning.attacks import check_attack_name
    from lat_lightning.errors import ConfigError
    from lat_lightning.models.layers import parse_layers

    ev = cfg.evaluation
    attacks = [str(a) for a in (ev.attacks if attacks is None else attacks)]
    for a in attacks:
        try:
            check_attack_name(a, "evaluation.attacks", scan=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    layers = ev.layers if layers is None else layers
    positions, first_k, refresh = scan_positions(cfg)
    return ScanSettings(
        attacks=tuple(attacks),
        layers=parse_layers(layers, "evaluation.layers") if layers is not None else None,
        seeds=tuple(ev.seeds if seeds is None else seeds),
        positions=positions,
        first_k=first_k,
        refresh=refresh,
        perturbation=attack_settings(cfg),
        generation=generation_settings(cfg),
        judging=judge_settings(cfg),
        coherence=coherence_settings(cfg),
        bootstrap_samples=ev.bootstrap_samples,
        probes=bool(ev.probes) if probes is None else bool(probes),
        asabench_test_fraction=ev.split_test_fraction,
        asabench_split_mode=ev.split_mode,
        split_seed=int(cfg.seed),
    )


def validation_settings(cfg) -> ScanSettings:
    """The scan of the validation loop and the ``evaluate`` stage: :func:`scan_settings` with
    ``evaluation.validation_attacks``, and what a per-batch metric needs: the first seed only, greedy answers only
    (``best_of_n=1``), no bootstrap, probes or ASABench export."""
    ev = cfg.evaluation
    base = scan_settings(cfg, attacks=list(getattr(ev, "validation_attacks", None) or ["asa_random"]), probes=False)
    return dataclasses.replace(
        base,
        seeds=base.seeds[:1],
        bootstrap_samples=0,
        asabench_test_fraction=None,
        generation=dataclasses.replace(base.generation, best_of_n=1),
    )


__all__ = [
    "attack_settings",
    "coherence_settings",
    "data_settings",
    "datamodule_settings",
    "generation_settings",
    "judge_settings",
    "loss_settings",
    "model_settings",
    "scan_judges",
    "scan_positions",
    "scan_settings",
    "to_settings",
    "trainer_settings",
    "validation_settings",
]
