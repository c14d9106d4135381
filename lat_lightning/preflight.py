"""One validation pass over a run config and every listed stage's settings, before anything is built or written.

The pipeline calls :func:`check_config` (everything decidable from the config, the files it names and the stages
already done in a resumed run), then :func:`check_model` (everything that needs the model's ``config.json``:
layer indices, LoRA target modules), and only then builds the model organism, creates the run directory and
runs the stages. Neither builds or loads a model: the organism and ``tiny:`` models are described from their
recipes, other models by ``AutoConfig`` (a model whose config cannot be read offline is checked when it loads).
Every failure is one :class:`~lat_lightning.errors.ConfigError` (or ``DataError`` / ``ModelLoadError``) line that
names the key or file and the valid range, so a bad setting never leaves a run directory, a cache entry or a
partial result behind, and a degenerate value never runs into a silently wrong answer.

The valid ranges are :data:`lat_lightning.config.BOUNDS`; the checks of the stages live in the ``_check_*``
functions below, one per concern; the checks of model names, data files and a model's layers and modules in
:mod:`lat_lightning.preflight_sources`. ``docs/errors.md`` lists what each refuses.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from lat_lightning.checks import choice_error, range_error
from lat_lightning.config import BOUNDS
from lat_lightning.errors import ConfigError
from lat_lightning.preflight_compare import check_compare_attacks, check_compare_defences
from lat_lightning.preflight_sources import (
    check_data_sources,
    check_generation_budget,
    check_layers,
    check_model_specs,
    check_target_modules,
    config_only_model,
    config_value,
    stage_names,
)
from lat_lightning.stages.settings import attack_settings, model_settings, trainer_settings
from lat_lightning.training.distributed import check_distributed_config
from lat_lightning.training.objectives import check_objective_attack

# Stages that read the evaluation section's attacks, judges and generation settings.
SCANNING = ("scan", "rescan", "evaluate", "durability", "compare")
_EMPTY_HINTS = {
    "stages": "e.g. stages=[fit]",
    "evaluation.seeds": "e.g. evaluation.seeds=[0]",
    "evaluation.attacks": "e.g. evaluation.attacks=[asa_random]",
    "evaluation.judges": "e.g. evaluation.judges=[keyword]",
    "evaluation.layers": "null scans every layer",
    "evaluation.durability.random_seeds": "5 or more give a meaningful spread",
    "evaluation.durability.finetune_seeds": "3 or more give a spread of the fine-tuning-attack curve",
}


# ------------------------------------------------------------------------------------------------ ranges
def _fmt(value: Any) -> str:
    return "[" + ", ".join(_fmt(v) for v in value) + "]" if isinstance(value, list) else str(value)


def check_choices(cfg, sections: Sequence[str] | None = None) -> None:
    """Every key with a fixed set of values (written beside its field; :data:`~lat_lightning.config.CHOICES` reads
    them off the schema, registries included) holds one of them; only the keys under ``sections`` when given.

    Raises:
        ConfigError: naming the key, its choices and the closest one.
    """
    from lat_lightning.config import CHOICES

    for key, allowed in CHOICES.items():
        if sections is not None and key.split(".")[0] not in sections:
            continue
        error = choice_error(key, OmegaConf.select(cfg, key), allowed)
        if error:
            raise ConfigError(error)


def check_bounds(cfg) -> None:
    """Every key within the range written beside its field (:data:`lat_lightning.config.BOUNDS` reads them off the
    schema), every float finite.

    Raises:
        ConfigError: naming the key, its value and the valid range.
    """
    for key, rule in BOUNDS.items():
        error = range_error(key, config_value(cfg, key), rule, _EMPTY_HINTS.get(key))
        if error:
            raise ConfigError(error)
    _check_finite(OmegaConf.to_container(cfg, resolve=True))
    betas = config_value(cfg, "trainer.betas")
    if betas is not None and len(betas) != 2:
        raise ConfigError(f"trainer.betas must hold two values (Adam's beta1, beta2), got {_fmt(betas)}")


def _check_finite(node: Any, prefix: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for v in node:
            _check_finite(v, prefix)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix[:-1]} must be a finite number, got {node}")


# ------------------------------------------------------------------------------------------------ stages
def _check_stage_order(cfg, done: set[str], run_dir: Optional[Path]) -> None:
    """What a stage needs from an earlier one: in ``stages`` before it, or done in the resumed run."""
    stages = stage_names(cfg)

    def earlier(stage: str, needed: str) -> bool:
        return needed in stages[: stages.index(stage)] or needed in done

    for stage in ("interpolate", "rescan"):
        if stage in stages and not earlier(stage, "fit"):
            raise ConfigError(
                f"stage '{stage}' needs the model a fit trains: put fit before it in stages "
                f"(e.g. stages=[fit, {stage}]) or --resume a run whose fit is done"
            )
    if (
        "report" in stages
        and not earlier("report", "scan")
        and not (run_dir is not None and (Path(run_dir) / "scan_summary.json").is_file())
    ):
        raise ConfigError(
            "stage 'report' reports a scan: put scan before it in stages (e.g. stages=[scan, report]) "
            "or --resume a run whose scan is done"
        )
    if "durability" in stages and not cfg.evaluation.compare_path and not earlier("durability", "fit"):
        raise ConfigError(
            "stage 'durability' needs a hardened model: set evaluation.compare_path (a directory saved "
            "with save_pretrained, or a LoRA adapter directory) or put fit before it in stages"
        )


def _check_data_settings(cfg) -> None:
    stages, d, ev = stage_names(cfg), cfg.data, cfg.evaluation
    if "compare" in stages and not d.harmful:
        raise ConfigError(
            "data.harmful is not set (the compare stage trains every defence on it and fine-tunes on "
            "its harmful responses); point it at a safety data file"
        )
    if "fit" in stages and not (d.harmful or d.asabench):
        raise ConfigError(
            "data.harmful is not set (the fit stage trains on it); point it at a .jsonl/.json/.csv "
            "file, a saved dataset directory or a datasets name (or data.asabench at an ASABench export)"
        )
    for stage in ("scan", "rescan", "durability", "compare"):
        if stage in stages and not (d.eval_harmful or d.harmful):
            raise ConfigError(
                f"stage '{stage}' needs harmful prompts: set data.eval_harmful or data.harmful "
                "(e.g. pkg://lat_lightning/resources/tiny_harmful.jsonl)"
            )
    if "evaluate" in stages and not (
        d.eval_harmful or d.eval_benign or ev.utility_data or ev.utility_kind == "organism"
    ):
        raise ConfigError(
            "stage 'evaluate' needs held-out data: set data.eval_harmful, data.eval_benign or evaluation.utility_data"
        )
    wi = cfg.callbacks.weight_interpolation
    interpolating = "interpolate" in stages or (bool({"fit", "compare"} & set(stages)) and wi.enabled)
    if interpolating and not ev.utility_data and wi.utility != "organism":
        raise ConfigError(
            f"weight interpolation scores utility: set evaluation.utility_data (a file of "
            f"{wi.utility} rows){' or disable callbacks.weight_interpolation' if wi.enabled else ''}"
        )


def _check_training(cfg) -> None:
    """Settings only the fit stage reads."""
    from lat_lightning.attacks import build_attack
    from lat_lightning.models.loading import quantization_config

    if "fit" not in stage_names(cfg):
        return
    check_distributed_config(trainer_settings(cfg), cfg.perturbation.early_stop_loss)
    quantization_config(model_settings(cfg))  # both flags, or no bitsandbytes
    q = cfg.model.quantization
    if (q.load_in_4bit or q.load_in_8bit) and not cfg.model.lora.enabled:
        bits = "4" if q.load_in_4bit else "8"
        raise ConfigError(
            f"model.quantization.load_in_{bits}bit=true without LoRA trains nothing sensible (quantised "
            f"weights are frozen; only embeddings, norms and the head would change): set "
            f"model.lora.enabled=true, or load_in_{bits}bit=false for full fine-tuning"
        )
    try:
        attack = build_attack(str(cfg.perturbation.attack), attack_settings(cfg))
        check_objective_attack(str(cfg.loss.objective), attack.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if attack.needs_harmless and not cfg.data.benign:
        raise ConfigError(
            f"perturbation.attack={attack.name} contrasts each batch's harmful prompts with harmless "
            "ones: set data.benign (harmless prompt/response pairs)"
        )
    fl = cfg.callbacks.fragile_layers
    if attack.name != "none" and not cfg.perturbation.layers and not fl.enabled and not cfg.data.asabench:
        raise ConfigError("perturbation.layers is empty; list layers or enable callbacks.fragile_layers")
    if fl.enabled and fl.method == "explicit" and not fl.layers:
        raise ConfigError(
            "callbacks.fragile_layers.method=explicit needs callbacks.fragile_layers.layers "
            "(e.g. [1]), or another method (nll_probe, grad_norm, scan)"
        )
    loss = cfg.loss
    if not (loss.toward_safe or loss.away_from_harmful or loss.utility):
        raise ConfigError(
            "loss.toward_safe, loss.away_from_harmful and loss.utility are all 0: nothing to train; "
            "set one > 0 (e.g. loss.toward_safe=1.0)"
        )
    if loss.utility and not cfg.data.benign:
        raise ConfigError(
            f"loss.utility={loss.utility} weighs a CE on benign data, but data.benign is not set; set "
            "data.benign or loss.utility=0"
        )


def _check_attacks(cfg) -> None:
    """The scan's / validation's attacks as they will be built (generation-time positions policy included)."""
    from lat_lightning.attacks import build_attack
    from lat_lightning.attacks.positions import GENERATION_POLICIES
    from lat_lightning.stages.settings import scan_positions

    stages = stage_names(cfg)
    if not (set(stages) & set(SCANNING) or "fit" in stages):
        return
    positions, first_k, refresh = scan_positions(cfg)
    if positions not in GENERATION_POLICIES:
        raise ConfigError(
            f"evaluation.positions '{positions}' is a training policy; the scan generates, so choose "
            f"one of {', '.join(GENERATION_POLICIES)}"
        )
    for name in cfg.evaluation.attacks:
        try:
            build_attack(str(name), attack_settings(cfg), positions=positions, first_k=first_k, refresh=refresh)
        except ValueError as exc:
            raise ConfigError(f"evaluation.attacks '{name}': {exc}") from None


def _check_judges(cfg) -> None:
    from lat_lightning.eval.judges import COHERENT_SUFFIX, JUDGES, ONTOPIC_SUFFIX, split_judge_name

    ev = cfg.evaluation
    judges = [str(j) for j in ev.judges]
    roots = [split_judge_name(j)[0] for j in judges]  # a listed judge may be qualified (`refusal+coherent+ontopic`)

    def needs_the_check(name: str, key: str) -> None:
        if COHERENT_SUFFIX in split_judge_name(name)[1] and not ev.coherence.enabled:
            raise ConfigError(
                f"{key} '{name}' reads the coherence check, which is off: set "
                f"evaluation.coherence.enabled=true or drop '{COHERENT_SUFFIX}' from the name"
            )

    for j, root in zip(judges, roots):
        if root not in JUDGES:
            close = difflib.get_close_matches(root, list(JUDGES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown judge '{j}' in evaluation.judges{hint}; choose from {', '.join(JUDGES)} (each may end in "
                f"'{COHERENT_SUFFIX}' and/or '{ONTOPIC_SUFFIX}')"
            )
        needs_the_check(j, "evaluation.judges")
    # a `<judge>+coherent` twin of a listed judge may lead when the coherence check adds the twins; a listed judge
    # qualified by `+ontopic` (text only) may lead too, `refusal+coherent+ontopic` when the check runs
    primary = str(ev.primary_judge)
    twins = [f"{j}{COHERENT_SUFFIX}" for j in judges] if ev.coherence.enabled and ev.coherence.judges else []
    root, suffixes = split_judge_name(primary)
    if primary in judges + twins:
        return _check_judge_options(ev, roots)
    if ONTOPIC_SUFFIX in suffixes and root in judges:
        needs_the_check(primary, "evaluation.primary_judge")
        return _check_judge_options(ev, roots)
    raise ConfigError(
        f"evaluation.primary_judge '{primary}' is not in evaluation.judges {_fmt(judges)}; add it there or choose "
        f"one of them (or '<judge>{ONTOPIC_SUFFIX}' of one)"
    )


def _check_judge_options(ev, roots: list[str]) -> None:
    """The classifier judge's directory (``roots``: the listed judges' registered names) and the target-key regex."""
    if "classifier" in roots:
        path = ev.classifier_path
        if not path or not Path(os.path.expanduser(str(path))).is_dir():
            raise ConfigError(
                f"the classifier judge needs evaluation.classifier_path: a local directory saved with "
                f"save_pretrained (got {path!r})"
            )
    if ev.target_key_pattern:
        try:
            re.compile(str(ev.target_key_pattern))
        except re.error as exc:
            raise ConfigError(
                f"evaluation.target_key_pattern {ev.target_key_pattern!r} is not a valid regex: {exc}"
            ) from None


def _check_durability(cfg) -> None:
    stages = stage_names(cfg)
    if "durability" not in stages and not ("compare" in stages and cfg.compare.finetune):
        return
    from lat_lightning.stages.durability_settings import durability_settings

    durability_settings(cfg)


def _check_compare(cfg) -> None:
    """The defences of the comparison, their overrides, and each defence's training settings as the fit will see
    them (``lat_lightning.stages.defences.defence_config``)."""
    if "compare" not in stage_names(cfg):
        return
    names = [str(n) for n in cfg.compare.defences]
    check_compare_defences(cfg, names)
    check_compare_attacks(cfg)
    _check_compare_training(cfg, names)


def _check_compare_training(cfg, names: list[str]) -> None:
    """Each compared defence's training settings, as the fit will see them."""
    from lat_lightning.stages.defences import defence_config

    for name in names:
        dcfg = defence_config(cfg, name)
        try:
            check_bounds(dcfg)
            check_choices(dcfg, sections=("perturbation", "loss", "trainer"))
            _check_training(dcfg)
        except ConfigError as exc:
            raise ConfigError(f"compare.defences '{name}': {exc}") from None


def _check_devices(cfg) -> None:
    import torch

    acc = str(cfg.trainer.accelerator)
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={acc} but no CUDA device is visible; use trainer.accelerator=cpu "
            "(or auto: a GPU when there is one)"
        )
    if acc == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but Apple's MPS backend is not available; use cpu or auto")


# ------------------------------------------------------------------------------------------------ entry points
def check_config(cfg: DictConfig, done: Iterable[str] = (), run_dir: Optional[Path] = None) -> None:
    """The checks that need no model: ranges, stage order, the settings of every listed stage, model names and
    data files.

    Args:
        cfg: the run config as given (organism names unresolved).
        done: stages already done in the run being resumed (they satisfy later stages' needs).
        run_dir: the run being resumed, if any.

    Raises:
        ConfigError: a value out of range, a stage without what it needs, an invalid stage setting.
        DataError: a data file that is missing, unreadable, empty or lacks a needed column.
        ModelLoadError: a model path that does not exist, a bad ``tiny:`` name, quantisation without bitsandbytes.
    """
    check_bounds(cfg)
    _check_devices(cfg)
    _check_stage_order(cfg, set(done), run_dir)
    _check_data_settings(cfg)
    _check_judges(cfg)
    _check_attacks(cfg)
    _check_training(cfg)
    _check_durability(cfg)
    _check_compare(cfg)
    check_model_specs(cfg)
    check_data_sources(cfg)


def model_config(cfg: DictConfig, spec: Optional[str] = None) -> Optional[Any]:
    """The transformers config of a model (default ``model.name_or_path``) without loading or building it, or
    ``None`` when it cannot be read without loading (a hub id not in the cache, a LoRA adapter directory).

    Raises:
        ModelLoadError: a local model path that does not exist, a bad ``tiny:`` name.
    """
    from lat_lightning.models.gguf import is_gguf_path
    from lat_lightning.models.loading import resolve_model_path
    from lat_lightning.models.pypi_files import is_pip_spec
    from lat_lightning.models.tiny import is_tiny_spec, tiny_model_config
    from lat_lightning.stages.organism import is_organism_name, organism_model_config

    spec = str(spec or cfg.model.name_or_path)
    if is_organism_name(spec):
        return organism_model_config(spec)
    if is_tiny_spec(spec):
        return tiny_model_config(spec)
    if is_pip_spec(spec) or is_gguf_path(spec) or cfg.model.gguf_file:
        return None  # read when a stage converts it (fetching or converting here would be loading)
    source = resolve_model_path(spec)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception:  # noqa: BLE001 - not cached / offline / an adapter: load_model reports it with context
        return None


def check_model(cfg: DictConfig) -> Optional[Any]:
    """The checks that read the models' ``config.json``: layer indices against the depth of the model each stage
    uses, LoRA target modules, the hardened model's depth against the original's. Nothing is built or loaded.

    Returns:
        The main model's config (:func:`model_config`; ``None`` when it cannot be read without loading).

    Raises:
        ConfigError: a layer index out of range, a LoRA target that matches no module.
        ModelLoadError: a missing model path.
    """
    from lat_lightning.models.layers import num_layers

    stages = set(stage_names(cfg))
    main = model_config(cfg)
    main_key = f"model.name_or_path={cfg.model.name_or_path}"
    if main is not None and stages & {"fit", "compare"}:
        check_layers(
            main,
            cfg,
            (
                "perturbation.layers",
                "callbacks.fragile_layers.layers",
                "callbacks.fragile_layers.candidate_layers",
                "model.lora.layers_to_transform",
            ),
            main_key,
        )
        if cfg.model.lora.enabled and cfg.model.lora.target_modules is not None:  # None: chosen per architecture
            check_target_modules(main, list(cfg.model.lora.target_modules), "model.lora.target_modules", main_key)
    if main is not None and stages & {"fit", "rescan", "compare"}:  # the validation loop and the rescans attack it
        check_layers(main, cfg, ("evaluation.layers",), main_key)
    original_spec = cfg.evaluation.model_path or cfg.model.name_or_path
    original = main if not cfg.evaluation.model_path else model_config(cfg, cfg.evaluation.model_path)
    original_key = f"evaluation.model_path={cfg.evaluation.model_path}" if cfg.evaluation.model_path else main_key
    if original is not None and stages & {"scan", "evaluate"}:
        check_layers(original, cfg, ("evaluation.layers",), original_key)
    if original is not None and stages & {*SCANNING, "fit"}:  # every scan generates (the fit's validation loop too)
        check_generation_budget(original, cfg, original_key)
    if "compare" in stages and cfg.compare.finetune and main is not None:
        check_target_modules(
            main,
            cfg.evaluation.durability.finetune_target_modules,
            "evaluation.durability.finetune_target_modules",
            main_key,
        )
    if "durability" in stages and original is not None:
        check_layers(
            original, cfg, ("evaluation.durability.fragile_layers", "evaluation.durability.layers"), original_key
        )
        if {"finetune", "trainability"} & set(cfg.evaluation.durability.sections):
            check_target_modules(
                original,
                cfg.evaluation.durability.finetune_target_modules,
                "evaluation.durability.finetune_target_modules",
                original_key,
            )
        if cfg.evaluation.compare_path:
            hardened = model_config(cfg, cfg.evaluation.compare_path)
            if hardened is not None and num_layers(config_only_model(hardened)) != num_layers(
                config_only_model(original)
            ):
                raise ConfigError(
                    f"evaluation.compare_path={cfg.evaluation.compare_path} has "
                    f"{num_layers(config_only_model(hardened))} layers, the original model "
                    f"({original_spec}) {num_layers(config_only_model(original))}; the durability "
                    "suite compares two versions of the same architecture"
                )
    return main


def preflight(cfg: DictConfig) -> None:
    """:func:`check_config`, then :func:`check_model` (for a new run; the pipeline runs both itself).

    Raises:
        ConfigError, DataError, ModelLoadError: see the two functions.
    """
    check_config(cfg)
    check_model(cfg)


__all__ = ["check_bounds", "check_config", "check_model", "model_config", "preflight"]
