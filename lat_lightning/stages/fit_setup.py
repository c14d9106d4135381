"""The ``fit`` stage's assembly: the run config -> the training module, data, callbacks and trainer.

Everything here reads the run config and hands typed settings to :mod:`lat_lightning.training` (which never reads
it): :func:`fit` builds the pieces and calls :func:`lat_lightning.training.fit.train`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lat_lightning.attacks import build_attack
from lat_lightning.callbacks import FragileLayerSelector, KLTeacher, WeightInterpolation
from lat_lightning.data.datamodule import SafetyDataModule
from lat_lightning.errors import ConfigError
from lat_lightning.eval.scan import ScanSettings
from lat_lightning.models.layers import check_layer_indices, parse_layers
from lat_lightning.models.loading import load_model, load_tokenizer
from lat_lightning.stages.settings import (
    attack_settings,
    datamodule_settings,
    loss_settings,
    model_settings,
    trainer_settings,
)
from lat_lightning.training.distributed import build_strategy
from lat_lightning.training.fit import build_trainer, checkpoint_callback, train
from lat_lightning.training.interpolation import UtilityScoreSettings
from lat_lightning.training.module import LatentAdversarialModule, OptimSettings
from lat_lightning.training.objectives import check_objective_attack
from lat_lightning.training.resume import InterruptCheckpoint


def utility_score_settings(cfg, kind: Optional[str] = None) -> UtilityScoreSettings:
    """How the weight interpolation (callback, ``interpolate`` stage, comparison) scores utility: rows of
    ``evaluation.utility_data`` of kind ``kind`` (default ``callbacks.weight_interpolation.utility``)."""
    return UtilityScoreSettings(
        kind=str(kind or cfg.callbacks.weight_interpolation.utility),
        source=cfg.evaluation.utility_data,
        use_chat_template=bool(cfg.model.use_chat_template),
        system_prompt=cfg.model.system_prompt,
        batch_size=int(cfg.evaluation.batch_size),
    )


def kl_teacher_callback(cfg) -> KLTeacher:
    """The KL-to-a-frozen-teacher callback of ``callbacks.kl_teacher``."""
    k = cfg.callbacks.kl_teacher
    return KLTeacher(weight=float(k.weight), direction=str(k.direction), chunk_size=int(k.chunk_size))


def weight_interpolation_callback(
    cfg, run_dir: Optional[str | Path] = None, score_fn: Optional[Callable[[nn.Module], float]] = None
) -> WeightInterpolation:
    """The weight-interpolation callback of ``callbacks.weight_interpolation`` (utility:
    ``evaluation.utility_data``)."""
    w = cfg.callbacks.weight_interpolation
    return WeightInterpolation(
        lambdas=list(w.lambdas),
        tolerance=float(w.tolerance),
        utility=str(w.utility),
        run_dir=run_dir,
        score_fn=score_fn,
        utility_settings=utility_score_settings(cfg),
    )


def fragile_layer_callback(cfg, run_dir: Optional[str | Path], scan: Optional[ScanSettings]) -> FragileLayerSelector:
    """The fragile-layer selection of ``callbacks.fragile_layers``; ``scan`` is the run's scan settings
    (:func:`lat_lightning.stages.settings.scan_settings`), which the ``scan`` and ``nll_probe`` methods use.

    Raises:
        ValueError: without ``scan``.
    """
    if scan is None:
        raise ValueError(
            "the fragile-layer selection needs the run's scan settings "
            "(lat_lightning.stages.settings.scan_settings(cfg))"
        )
    f = cfg.callbacks.fragile_layers
    return FragileLayerSelector(
        method=str(f.method),
        layers=list(f.layers),
        top_k=int(f.top_k),
        num_prompts=int(f.num_prompts),
        candidate_layers=None if f.candidate_layers is None else list(f.candidate_layers),
        run_dir=run_dir,
        scan=scan,
    )


def build_training_callbacks(
    cfg, run_dir: Optional[str | Path] = None, scan: Optional[ScanSettings] = None
) -> list[Callback]:
    """The callbacks ``callbacks`` enables, in order: FragileLayerSelector, KLTeacher, WeightInterpolation
    (``scan``: the run's scan settings, which the layer selector needs).

    The order matters: the layer selector runs in ``setup`` before anything else reads ``attack_layers``, and the
    interpolation runs last at the end of fit.
    """
    c = cfg.callbacks
    out: list[Callback] = []
    if c.fragile_layers.enabled:
        out.append(fragile_layer_callback(cfg, run_dir, scan))
    if c.kl_teacher.enabled:
        out.append(kl_teacher_callback(cfg))
    if c.weight_interpolation.enabled:
        out.append(weight_interpolation_callback(cfg, run_dir))
    return out


def build_callbacks(cfg, run_dir: Path, scan: Optional[ScanSettings] = None) -> list[Callback]:
    """The callbacks the ``callbacks`` config section enables, plus checkpointing (``scan``: the run's scan
    settings, for the fragile-layer selection)."""
    return [
        checkpoint_callback(trainer_settings(cfg), run_dir),
        InterruptCheckpoint(run_dir),
    ] + build_training_callbacks(cfg, run_dir, scan)


def validate_setup(cfg, model) -> None:
    """Checks that need the loaded model (layer indices) or span config sections.

    Raises:
        ConfigError: with one actionable line.
    """
    if getattr(cfg.model, "device_map", None) is not None:
        raise ConfigError(
            "model.device_map places a model over devices for the scan, evaluate, durability and "
            "interpolate stages; training shards with trainer.strategy=fsdp2 (set model.device_map=null "
            "for the fit)"
        )
    try:
        attack = build_attack(cfg.perturbation.attack, attack_settings(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        check_layer_indices(
            model, parse_layers(cfg.perturbation.layers, "perturbation.layers"), what="perturbation.layers"
        )
        check_layer_indices(
            model,
            parse_layers(cfg.callbacks.fragile_layers.layers, "callbacks.fragile_layers.layers"),
            what="callbacks.fragile_layers.layers",
        )
    except (IndexError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    _validate_objective(cfg, model, attack.name)
    if attack.needs_harmless and not cfg.data.benign:
        raise ConfigError(
            f"perturbation.attack={attack.name} contrasts each batch's harmful prompts with harmless "
            "ones: set data.benign (e.g. organism://benign_train)"
        )
    if (
        attack.name != "none"
        and not cfg.perturbation.layers
        and not cfg.callbacks.fragile_layers.enabled
        and not cfg.data.asabench
    ):
        raise ConfigError("perturbation.layers is empty; list layers or enable callbacks.fragile_layers")
    if cfg.trainer.accumulate_grad_batches < 1:
        raise ConfigError("trainer.accumulate_grad_batches must be >= 1")


def _validate_objective(cfg, model, attack: str) -> None:
    """A defence objective (``loss.objective``) trains without a training attack, on layers the model has.

    Raises:
        ConfigError: with one actionable line.
    """
    objective = str(cfg.loss.objective)
    if objective == "adversarial":
        return
    try:
        check_objective_attack(objective, attack)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if objective == "circuit_breakers":
        from lat_lightning.training.objectives.circuit_breakers import target_layers

        try:
            target_layers(model, list(cfg.loss.circuit_breakers.layers))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def build_module(
    cfg, model, tokenizer=None, evaluator=None, module_class: type[LatentAdversarialModule] = LatentAdversarialModule
) -> LatentAdversarialModule:
    """The training module for a run config: its attack, layers, loss weights and optimiser settings (the
    module itself takes these typed objects and never reads the run config). ``module_class`` lets a test or
    an extension use a subclass."""
    layers = check_layer_indices(
        model, parse_layers(cfg.perturbation.layers, "perturbation.layers"), what="perturbation.layers"
    )
    return module_class(
        model,
        build_attack(cfg.perturbation.attack, attack_settings(cfg)),
        layers,
        loss_settings(cfg),
        OptimSettings.from_trainer(trainer_settings(cfg)),
        tokenizer=tokenizer,
        evaluator=evaluator,
        sample_generations=int(cfg.logging.sample_generations),
    )


def has_held_out_data(cfg) -> bool:
    """Whether the fit has a validation loop: any held-out data is configured (harmful or benign prompts, utility
    rows)."""
    return bool(cfg.data.eval_harmful or cfg.data.eval_benign or cfg.evaluation.utility_data)


def build_evaluator(cfg, validation: Optional[ScanSettings] = None):
    """The validation-loop evaluator when any held-out data is configured, else ``None``.

    Args:
        cfg: the run config (the held-out data and ``evaluation.layers``).
        validation: the validation scan's settings (:func:`lat_lightning.stages.settings.validation_settings`).

    Raises:
        ValueError: held-out data is configured but ``validation`` is missing.
    """
    if not has_held_out_data(cfg):
        return None
    if validation is None:
        raise ValueError(
            "the validation loop needs its scan settings: pass "
            "validation=lat_lightning.stages.settings.validation_settings(cfg)"
        )
    from lat_lightning.eval.evaluate import SafetyEvaluator
    from lat_lightning.stages.evaluate import load_evaluation_data

    layers = None if cfg.evaluation.layers is None else parse_layers(cfg.evaluation.layers, "evaluation.layers")
    return SafetyEvaluator(validation, load_evaluation_data(cfg), layers)


def fit(
    cfg,
    run_dir: Path,
    model=None,
    tokenizer=None,
    datamodule: Optional[SafetyDataModule] = None,
    resume: Optional[str] = None,
    extra_callbacks: Sequence[Callback] = (),
    *,
    scan: Optional[ScanSettings] = None,
    validation: Optional[ScanSettings] = None,
) -> LatentAdversarialModule:
    """Train as configured. Model, tokenizer and data are built from ``cfg`` unless given.

    ``scan`` / ``validation`` are the run's scan settings and the validation loop's
    (:mod:`lat_lightning.stages.settings`); the fragile-layer selection and the validation loop need them when
    they are enabled.

    Returns:
        The trained module (its ``model`` holds the trained weights).
    """
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model_cfg = model_settings(cfg)
    tokenizer = tokenizer or load_tokenizer(model_cfg)
    model = model if model is not None else load_model(model_cfg, train=True)
    model.train()
    validate_setup(cfg, model)
    module = build_module(cfg, model, tokenizer, evaluator=build_evaluator(cfg, validation))
    datamodule = datamodule or SafetyDataModule(
        datamodule_settings(cfg),
        tokenizer,
        require_target=module.attack.needs_target
        or bool(cfg.loss.away_from_harmful)
        or bool(module.objective is not None and module.objective.needs_harmful),
    )
    callbacks = build_callbacks(cfg, run_dir, scan) + list(extra_callbacks)
    trainer_cfg = trainer_settings(cfg)
    strategy = build_strategy(trainer_cfg, model_cfg, cfg.perturbation.early_stop_loss)
    trainer = build_trainer(trainer_cfg, strategy, run_dir, callbacks, tensorboard=bool(cfg.logging.tensorboard))
    return train(module, datamodule, trainer, run_dir, model_cfg, resume=resume)


__all__ = [
    "build_callbacks",
    "build_evaluator",
    "build_module",
    "build_training_callbacks",
    "fit",
    "fragile_layer_callback",
    "has_held_out_data",
    "kl_teacher_callback",
    "utility_score_settings",
    "validate_setup",
    "weight_interpolation_callback",
]
