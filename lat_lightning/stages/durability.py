"""Stage ``durability``: load the original and the hardened model and run
:func:`lat_lightning.eval.durability.run_durability` into the run directory.

original = ``evaluation.model_path`` or ``model.name_or_path``; hardened = ``evaluation.compare_path``, or the
model a ``fit`` stage earlier in the same recipe produced (``interpolated/`` when weight interpolation ran, else
``final/``). A LoRA adapter directory is merged into its base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from torch import nn

from lat_lightning.errors import ConfigError
from lat_lightning.models.settings import ModelSettings
from lat_lightning.stages.common import load_stage_model, process_shard

log = logging.getLogger(__name__)


def model_config(cfg, name_or_path: str) -> ModelSettings:
    """``model`` with ``name_or_path`` replaced, LoRA and gradient checkpointing off."""
    from lat_lightning.stages.settings import model_settings

    configured = model_settings(cfg)
    # model.gguf_file names a file of model.name_or_path only
    gguf = configured.gguf_file if str(name_or_path) == str(configured.name_or_path) else None
    return dataclasses.replace(
        configured,
        name_or_path=str(name_or_path),
        gguf_file=gguf,
        lora=dataclasses.replace(configured.lora, enabled=False),
        gradient_checkpointing=False,
    )


def load_any_model(cfg, spec: str, base_fallback: str | None = None, label: str | None = None) -> tuple[nn.Module, str]:
    """A model from a saved directory, hub id or ``tiny:`` name, placed on ``trainer.accelerator``.

    A LoRA adapter directory (one with ``adapter_config.json``) is loaded onto its base (the recorded base
    when that directory exists, else ``base_fallback``) and merged.

    Args:
        cfg: the run config (``model`` settings, ``trainer.accelerator``).
        spec: what to load.
        base_fallback: the base of an adapter whose recorded base directory does not exist.
        label: the name of a plain model in the description (default ``spec``).

    Returns:
        ``(model in eval mode, description for the report)``.

    Raises:
        ConfigError: an adapter directory without a usable base model.
    """
    from lat_lightning.models.loading import load_model

    path = Path(os.path.expanduser(str(spec)))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from peft import PeftModel

        recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = recorded if recorded and Path(recorded).is_dir() else (base_fallback or recorded)
        if not base:
            raise ConfigError(f"{path} is a LoRA adapter without a usable base model; set evaluation.model_path")

        def merged() -> nn.Module:
            model = load_model(model_config(cfg, base), train=False, with_lora=False)
            return PeftModel.from_pretrained(model, str(path)).merge_and_unload()

        return load_stage_model(cfg, loader=merged), f"`{path}` (LoRA adapter merged into `{base}`)"
    return load_stage_model(cfg, model_config(cfg, str(spec))), f"`{label or spec}`"


def find_fragile_layers(*model_specs: str) -> tuple[list[int] | None, str | None]:
    """``layers`` of the first ``fragile_layers.json`` found in a model directory or its parent (the run
    directory of the training run that wrote the model).

    Returns:
        ``(layers, path of the file)``, or ``(None, None)`` when there is none.
    """
    from lat_lightning.eval.durability import FRAGILE_FILE

    for spec in model_specs:
        if not spec:
            continue
        path = Path(os.path.expanduser(str(spec)))
        if not path.is_dir():
            continue
        for where in (path, path.parent):
            f = where / FRAGILE_FILE
            if f.is_file():
                try:
                    layers = json.loads(f.read_text()).get("layers")
                except (OSError, json.JSONDecodeError) as exc:
                    log.warning("cannot read %s: %s", f, exc)
                    continue
                if layers:
                    return [int(l) for l in layers], str(f)
    return None, None


def reusable_scans(run_dir: Path, specs: dict[str, str], prompt_keys: list[int]) -> dict[str, tuple[Path, list[int]]]:
    """The scans this run already has of the two models: the ``scan`` stage's (``run_dir``) when it scanned the
    original model, the ``rescan`` stage's (``run_dir/rescan``) when it scanned the hardened one (the stage
    markers record which model). LoRA adapter directories are never matched (the re-scan merges them, the
    stages do not: a different float rounding).

    Returns:
        ``{"original" | "hardened": (scan directory, prompt keys)}`` for :func:`run_durability`'s ``reuse_scans``.
    """
    out = {}
    for name, stage, where in (("original", "scan", run_dir), ("hardened", "rescan", run_dir / "rescan")):
        marker = run_dir / "stages" / f"{stage}.done.json"
        spec = specs[name]
        if not marker.is_file() or (Path(os.path.expanduser(spec)) / "adapter_config.json").is_file():
            continue
        try:
            scanned = json.loads(marker.read_text()).get("model")
        except (OSError, json.JSONDecodeError):
            continue
        if scanned is not None and str(scanned) == str(spec):
            out[name] = (where, list(prompt_keys))
    return out


def run(cfg, run_dir: Path) -> dict:
    """Compare the original and the hardened model (``durability_report.md``, ``durability_summary.json``, ...).

    Returns:
        The report and summary paths, the fragile layers, timings and every row's two values.

    Raises:
        ConfigError: no hardened model, bad durability settings.
    """
    from lat_lightning.data.loaders import load_benign_examples
    from lat_lightning.eval.durability import (
        MODELS,
        REPORT_FILE,
        SUMMARY_FILE,
        DurabilityData,
        DurabilityOptions,
        run_durability,
    )
    from lat_lightning.eval.formatting import fmt_change, fmt_value
    from lat_lightning.models.loading import load_tokenizer, resolve_model_source
    from lat_lightning.resources import resource_path
    from lat_lightning.stages.durability_settings import durability_settings
    from lat_lightning.stages.organism import recipe_name
    from lat_lightning.stages.rescan import trained_model_path
    from lat_lightning.stages.scan import load_contrast_prompts, load_finetune_pairs, load_scan_prompts
    from lat_lightning.training.finetune import lora_finetune

    run_dir = Path(run_dir)
    ev = cfg.evaluation
    original_spec = str(ev.model_path or cfg.model.name_or_path)
    if ev.compare_path:
        hardened_spec = str(ev.compare_path)
    elif (run_dir / "interpolated").is_dir() or (run_dir / "final").is_dir():
        hardened_spec = str(trained_model_path(run_dir))
    else:
        raise ConfigError(
            "the durability stage needs a hardened model: set evaluation.compare_path (a directory "
            "saved with save_pretrained, or a LoRA adapter directory), or run a fit stage first"
        )
    settings = durability_settings(cfg)  # fail fast on bad settings, before loading anything
    shard = process_shard(cfg)  # several processes: the re-scans are shared out, rank 0 does the rest
    original, o_desc = load_any_model(cfg, original_spec, label=recipe_name(original_spec, int(cfg.organism.seed)))
    hardened, h_desc = load_any_model(
        cfg, hardened_spec, base_fallback=resolve_model_source(model_config(cfg, original_spec))
    )
    tokenizer = load_tokenizer(model_config(cfg, original_spec))
    dur = settings.dur
    prompts, targets, keys = load_scan_prompts(
        cfg,
        attacks=[
            a
            for section, names in (("adaptive", dur.adaptive_attacks), ("depth", dur.depth_attacks))
            if section in dur.sections
            for a in names
        ],
        require_target="finetune" in dur.sections,
    )  # the fine-tuning attack's loss is measured on the targets
    pairs = None
    if (dur.finetune_data or cfg.data.harmful) and "finetune" in dur.sections:  # its training pairs
        pairs = load_finetune_pairs(cfg)
    benign = []
    source = cfg.data.benign or cfg.data.eval_benign
    if source:
        benign = [
            (e.prompt, e.response)
            for e in load_benign_examples(
                resource_path(source), cfg.data.benign_split, dict(cfg.data.benign_columns or {}), cfg.data.max_examples
            )
        ]
    # The trainability curve scores multiple-choice / exact-match utility rows; `contains` rows (the organism's
    # benign tasks) are not scored there, as before the organism's utility kind was resolved to `contains`.
    rows, kind = None, str(ev.utility_kind)
    if ev.utility_data and kind in ("multiple_choice", "exact_match"):
        from lat_lightning.eval.utility import load_utility_rows

        rows = load_utility_rows(resource_path(ev.utility_data), kind)
    fragile, fsource = (
        (list(dur.fragile_layers), "evaluation.durability.fragile_layers")
        if dur.fragile_layers is not None
        else find_fragile_layers(hardened_spec, original_spec)
    )
    harmful_side, harmless = load_contrast_prompts(cfg, prompts)
    data = DurabilityData(
        prompts,
        targets,
        prompt_keys=keys,
        benign=benign,
        finetune_pairs=pairs,
        utility_rows=rows,
        utility_kind=kind if rows is not None else "multiple_choice",
        harmless_prompts=harmless,
        contrast_prompts=harmful_side,
        fragile_layers=fragile,
        fragile_source=fsource,
    )
    options = DurabilityOptions(
        model_labels={"original": o_desc, "hardened": h_desc},
        resume=True,
        progress=True,
        shard=shard,
        reuse_scans=reusable_scans(run_dir, {"original": original_spec, "hardened": hardened_spec}, keys),
    )
    summary = run_durability(
        original, hardened, tokenizer, data, settings, run_dir, finetune=lora_finetune, options=options
    )
    if shard is not None and shard[0] != 0:
        return {"rank": shard[0], "timings": summary["timings"]}
    for r in summary["rows"]:
        print(
            f"[durability] {r['label']}: {fmt_value(r['original'], None, r['kind'], budget=r.get('budget'))} -> "
            f"{fmt_value(r['hardened'], None, r['kind'], budget=r.get('budget'))} ({fmt_change(r)})",
            flush=True,
        )
    print(f"[durability] report: {run_dir / REPORT_FILE}", flush=True)
    return {
        "report": str(run_dir / REPORT_FILE),
        "summary": str(run_dir / SUMMARY_FILE),
        "fragile_layers": summary["fragile_layers"],
        "timings": summary["timings"],
        "rows": {r["id"]: {m: r[m] for m in MODELS} for r in summary["rows"]},
    }


def saved(run_dir: Path) -> str | None:
    """What an interrupted durability suite keeps for ``--resume``: the cells of its two re-scans (the other
    sections run again)."""
    from lat_lightning.stages.scan import cells_saved

    counts = {name: cells_saved(Path(run_dir) / name / "scan.jsonl") for name in ("original", "hardened")}
    if not any(counts.values()):
        return None
    return (
        f"{counts['original']} + {counts['hardened']} finished re-scan cells in original/ and hardened/ (kept; "
        "the other sections run again)"
    )


__all__ = ["find_fragile_layers", "load_any_model", "model_config", "reusable_scans", "run", "saved"]
