"""The durability suite on two in-memory models: :func:`run_durability` runs the sections its settings ask for and
writes the report (the sections are the sibling modules; ``docs/durability.md``)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lat_lightning.errors import ConfigError
from lat_lightning.eval.durability.clean import clean_success
from lat_lightning.eval.durability.depth import depth_curves
from lat_lightning.eval.durability.figures import write_outputs
from lat_lightning.eval.durability.finetune import finetune_attack_section
from lat_lightning.eval.durability.inputs import (
    DurabilityData,
    DurabilityOptions,
    HarmfulPrompts,
    benign_pairs,
    evaluation_prompts,
    harmless_prompts,
)
from lat_lightning.eval.durability.rescan import rescan_section, run_rescans
from lat_lightning.eval.durability.rewrites import rewrites_section
from lat_lightning.eval.durability.settings import MODELS, DurabilitySettings, resolve_judges
from lat_lightning.eval.durability.table import build_rows
from lat_lightning.eval.durability.trainability import trainability_section
from lat_lightning.eval.generation import encode_prompts
from lat_lightning.models.layers import check_layer_indices, num_layers

SUMMARY_FILE = "durability_summary.json"
FRAGILE_FILE = "fragile_layers.json"  # a training run's fragile layers, found beside its saved model


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _check_request(sections: set[str], options: DurabilityOptions, out_dir, finetune: Callable | None) -> None:
    """Raises ValueError for a run the suite cannot do: a distributed run without a directory to share, or a
    fine-tuning section without a fine-tuning function."""
    if options.shard is not None and options.shard[1] > 1 and out_dir is None:
        raise ValueError("a distributed durability run (shard=...) needs out_dir")
    if finetune is None and sections & {"finetune", "trainability"}:
        raise ValueError(
            "the finetune / trainability sections need finetune= (lat_lightning.training.finetune."
            "lora_finetune); pass it or drop those sections"
        )


def _new_summary(
    s: DurabilitySettings, options: DurabilityOptions, n_prompts: int, layers: list, judge_map: Mapping[str, Any]
) -> dict[str, Any]:
    """The summary's header: the models, prompts, layers, judges and settings."""
    return {
        "models": dict(options.model_labels or {"original": "original model", "hardened": "hardened model"}),
        "n_prompts": n_prompts,
        "layers": layers,
        "primary_judge": s.primary_judge,
        "judges": list(judge_map),
        "settings": {
            "durability": dataclasses.asdict(s.dur),
            "max_new_tokens": s.max_new_tokens,
            "positions": s.positions,
            "refresh": s.refresh,
            "alpha": s.perturbation.alpha,
            "sign": s.perturbation.sign,
            "pgd": {
                k: getattr(s.perturbation, k)
                for k in ("steps", "eps", "lr", "norm", "init", "toward_harmful", "away_from_safe")
            },
        },
    }


def _configured_fragile(
    model: nn.Module, data: DurabilityData, s: DurabilitySettings, n_layers: int
) -> tuple[list | None, str | None]:
    """The fragile layers given to the run (``data``, else the settings) and where they came from; ``(None,
    None)`` when the re-scans are to find them.

    Raises:
        ConfigError: layers that are not layers of the model.
    """
    explicit = (
        list(data.fragile_layers)
        if data.fragile_layers is not None
        else (list(s.dur.fragile_layers) if s.dur.fragile_layers is not None else None)
    )
    if explicit is None:
        return None, None
    try:
        if not explicit:
            raise IndexError("empty")
        layers = check_layer_indices(model, explicit, what="fragile layer")
    except IndexError:
        raise ConfigError(f"fragile layers {explicit} are not valid layers of a {n_layers}-layer model") from None
    return layers, data.fragile_source or (
        "argument" if data.fragile_layers is not None else "evaluation.durability.fragile_layers"
    )


def _rescan_layers(model: nn.Module, s: DurabilitySettings, n_layers: int) -> list:
    """The re-scans' layers: ``s.dur.layers`` checked against the model and sorted (``EMBED`` first), else every
    block.

    Raises:
        ConfigError: layers that are not layers of the model.
    """
    if s.dur.layers is None:
        return list(range(n_layers))
    try:
        return sorted(set(check_layer_indices(model, list(s.dur.layers), what="evaluation.durability.layers")))
    except IndexError as exc:
        raise ConfigError(str(exc)) from None


def _found_fragile(scans: Mapping[str, Any], n_layers: int) -> tuple[list, str]:
    """The fragile layers when none were given: the peak layers of both ASA random re-scans (the middle layer
    without re-scans)."""
    if not scans:
        return [n_layers // 2], "middle layer (no re-scan, none configured)"
    peaks = {name: scans[name].headline("asa_random")["pasr_of_mean_lasr_layer"] for name in MODELS}
    layers = sorted({int(p) for p in peaks.values() if p is not None}) or [n_layers // 2]
    return (
        layers,
        f"peak layers of the ASA random re-scans (original, hardened: {peaks['original']}, {peaks['hardened']})",
    )


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    result = fn()
    timings[name] = round(time.time() - t0, 2)
    return result


@dataclass(frozen=True)
class _SuiteRun:
    """What the sections after the re-scans share: the models and data, the settings and judges, the fragile
    layers, the re-scans, the run directory (``write``: a directory the caller asked for, not a temporary one) and
    the fine-tuning function."""

    models: Mapping[str, nn.Module]
    tokenizer: Any
    data: DurabilityData
    harmful: HarmfulPrompts
    settings: DurabilitySettings
    judge_map: Mapping[str, Any]
    fragile: list
    scans: Mapping[str, Any]
    out: Path
    write: bool
    finetune: Callable | None


def _later_sections(run: _SuiteRun, summary: dict[str, Any], timings: dict[str, float]) -> None:
    """Depth, rewrites, fine-tuning attack and trainability into ``summary`` (their run times into ``timings``)."""
    models, tok, data, harmful, s = run.models, run.tokenizer, run.data, run.harmful, run.settings
    judge_map, fragile, sections = run.judge_map, run.fragile, set(s.dur.sections)
    prompts, targets, keys = harmful.prompts, harmful.targets, harmful.keys
    finetune = run.finetune  # set when a fine-tuning section runs (run_durability checks)
    if "depth" in sections:  # 4. refusal depth: first k positions and prefill
        assert data.harmless_prompts is not None  # run_durability fills it in
        contrast = (
            encode_prompts(tok, list(data.contrast_prompts or prompts), s.use_chat_template, s.system_prompt),
            encode_prompts(tok, data.harmless_prompts, s.use_chat_template, s.system_prompt),
        )
        summary["depth"] = _timed(
            timings,
            "depth",
            lambda: {
                name: depth_curves(models[name], tok, harmful, fragile, judge_map, s, contrast) for name in MODELS
            },
        )
    if "rewrites" in sections and s.dur.rewrites:  # 5. prompt rewrites
        t0 = time.time()
        summary["rewrites"] = rewrites_section(models, tok, prompts, targets, keys, judge_map, s)
        if "depth" not in sections and not run.scans:
            summary["clean"] = {
                name: clean_success(models[name], tok, prompts, targets, keys, judge_map, s) for name in MODELS
            }
        timings["rewrites"] = round(time.time() - t0, 2)
    if "finetune" in sections:  # 3. fine-tuning attack and trainability
        assert finetune is not None
        summary["finetune_attack"] = _timed(
            timings,
            "finetune_attack",
            lambda: finetune_attack_section(models, tok, data, s, judge_map, run.out if run.write else None, finetune),
        )
    if "trainability" in sections:
        bpairs = benign_pairs(data.benign)
        if bpairs or s.dur.trainability_task == "novel":  # the novel task is generated: no data needed
            assert finetune is not None
            summary["trainability"] = _timed(
                timings, "trainability", lambda: trainability_section(models, tok, bpairs, s, run.out, finetune, data)
            )
        else:
            summary["trainability"] = {"skipped": "no benign (prompt, response) pairs given"}


def run_durability(
    original_model: nn.Module,
    hardened_model: nn.Module,
    tokenizer,
    data: DurabilityData,
    settings: DurabilitySettings,
    out_dir: str | Path | None = None,
    *,
    finetune: Callable | None = None,
    judges=None,
    options: DurabilityOptions | None = None,
) -> dict[str, Any]:
    """Run the durability suite on two in-memory models and write the report.

    Args:
        original_model / hardened_model: the models to compare (same tokenizer, same number of layers; put
            in eval mode; never modified: the fine-tunes train copies).
        tokenizer: their tokenizer.
        data: the harmful prompts and targets, benign pairs, fine-tuning pairs, utility rows, contrast prompts
            and given fragile layers (:class:`~lat_lightning.eval.durability.inputs.DurabilityData`).
        settings: the sections and their knobs, judging, decoding and formatting
            (:class:`~lat_lightning.eval.durability.settings.DurabilitySettings`).
        out_dir: run directory for everything (``None``: a temporary directory, deleted afterwards; only the
            returned summary remains).
        finetune: the LoRA fine-tuning function of the ``finetune`` and ``trainability`` sections
            (:func:`lat_lightning.training.finetune.lora_finetune`; evaluation does not import training, so the
            caller passes it in). Required when one of those sections is on.
        judges: judge names or ``name -> judge`` (default: ``settings.judges``).
        options: model labels, resume, progress bars, sharding and scans to reuse
            (:class:`~lat_lightning.eval.durability.inputs.DurabilityOptions`).

    Returns:
        The summary (also written to ``durability_summary.json``): ``rows`` (the report table), one entry
        per section, settings, timings.

    Raises:
        ValueError: no prompts, models of different depths, a section that needs an argument it lacks.
        ConfigError: bad fragile layers, bad judges.
    """
    t_start = time.time()
    options = options or DurabilityOptions()
    s = settings
    _check_request(set(s.dur.sections), options, out_dir, finetune)
    data = dataclasses.replace(data, harmless_prompts=harmless_prompts(data, s.perturbation.direction_prompts))
    prompts, targets, keys = evaluation_prompts(data, s.dur, "run_durability needs at least one harmful prompt")
    n_layers = num_layers(original_model)
    if num_layers(hardened_model) != n_layers:
        raise ValueError(
            f"the models have {n_layers} and {num_layers(hardened_model)} layers; the durability suite "
            "compares two versions of the same architecture"
        )
    layers = _rescan_layers(original_model, s, n_layers)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="durability-")
        out, write = Path(tmp.name), False
    else:
        out, write = Path(out_dir), True
    out.mkdir(parents=True, exist_ok=True)
    models = {"original": original_model, "hardened": hardened_model}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    s, judge_map = resolve_judges(s, judges)
    timings: dict[str, float] = {}
    summary = _new_summary(s, options, len(prompts), layers, judge_map)
    summary["world_size"] = options.shard[1] if options.shard is not None else 1  # processes sharing the re-scans
    try:
        harmful = HarmfulPrompts.encode(tokenizer, prompts, targets, keys, s)
        explicit, fsource = _configured_fragile(original_model, data, s, n_layers)
        missing = [l for l in (explicit or []) if l not in layers]
        if missing:  # the fragile layers' rows read the re-scans there: re-scan them too
            layers = sorted(set(layers) | set(missing))  # EMBED (-2) sorts first
            summary["layers"] = layers
        sections = set(s.dur.sections)
        scans = {}
        if sections & {"rescan", "adaptive"} or (explicit is None and "depth" in sections):  # 1 + 2. re-scans
            scans = _timed(
                timings,
                "scans",
                lambda: run_rescans(
                    models, tokenizer, harmful, data, layers, judge_map, s, out if write else None, options
                ),
            )
        if options.shard is not None and options.shard[0] != 0:  # this rank's share is done; rank 0 does the rest
            return {"rank": int(options.shard[0]), "rows": [], "timings": timings}
        if explicit is None:
            explicit, fsource = _found_fragile(scans, n_layers)
        fragile = sorted(set(explicit))
        summary["fragile_layers"] = {"layers": fragile, "source": fsource}
        if scans:
            summary["rescan"] = rescan_section(scans, fragile, out if write else None)
        _later_sections(
            _SuiteRun(models, tokenizer, data, harmful, s, judge_map, fragile, scans, out, write, finetune),
            summary,
            timings,
        )
        summary["rows"] = build_rows(summary)
        timings["total"] = round(time.time() - t_start, 2)
        summary["timings"] = timings
        summary["figures"] = write_outputs(summary, out) if write else {}
        if write:
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default))
    finally:
        for k, m in models.items():
            m.train(modes[k])
        if tmp is not None:
            tmp.cleanup()
    return json.loads(json.dumps(summary, default=_json_default))


__all__ = ["FRAGILE_FILE", "SUMMARY_FILE", "run_durability"]
