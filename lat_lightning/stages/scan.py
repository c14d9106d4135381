"""Stage ``scan``: where does the model's safety break? Run :func:`lat_lightning.eval.scan.run_scan` into the
run directory (``scan.jsonl``, ``scan_summary.json``, ``scan_report.md``, figures, ASABench files)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import cast

from lat_lightning.models.settings import ModelSettings
from lat_lightning.stages.common import load_stage_model, process_shard

log = logging.getLogger(__name__)


def load_scan_prompts(cfg, attacks=None, require_target: bool = False) -> tuple[list[str], list[str | None], list[int]]:
    """Harmful prompts, targets and stable ids from ``data.eval_harmful`` (or ``data.harmful``).

    ``pkg://`` paths resolve to files shipped in the package (:func:`lat_lightning.resources.resource_path`);
    ``data.filter`` selects rows, then the first ``evaluation.num_prompts`` are kept. Prompt-only data gives
    ``None`` targets (or ``data.default_target``); it is an error when an attack that needs a target
    (ASAgrad, PGD) or the ``target_match`` judge will run.

    Args:
        cfg: the run config.
        attacks: the attack names that will run (default ``evaluation.attacks``).
        require_target: a target is needed whatever the attacks (e.g. the durability fine-tuning attack).

    Raises:
        ConfigError: when neither data source is set.
        DataError: the data cannot be loaded, or a needed target is missing.
    """
    from lat_lightning.attacks import attack_class
    from lat_lightning.data.loaders import load_safety_examples
    from lat_lightning.errors import ConfigError
    from lat_lightning.eval.judges import split_judge_name
    from lat_lightning.resources import resource_path

    source = cfg.data.eval_harmful or cfg.data.harmful
    if not source:
        raise ConfigError(
            "the scan needs harmful prompts: set data.eval_harmful or data.harmful "
            "(e.g. pkg://lat_lightning/resources/tiny_harmful.jsonl)"
        )
    attacks = list(cfg.evaluation.attacks if attacks is None else attacks)
    needs_target = (
        require_target
        or any(attack_class(a).needs_target for a in attacks)
        or "target_match" in {split_judge_name(str(j))[0] for j in cfg.evaluation.judges}
    )
    examples = load_safety_examples(
        resource_path(source),
        split=cfg.data.harmful_split,
        columns=dict(cfg.data.harmful_columns or {}),
        default_safe_response=cfg.data.default_safe_response,
        max_examples=cfg.data.max_examples,
        default_target=cfg.data.default_target,
        require_target=needs_target,
        row_filter=dict(cfg.data.filter or {}),
    )
    if cfg.evaluation.num_prompts is not None:
        wanted = int(cfg.evaluation.num_prompts)
        if wanted > len(examples):  # a cap, not a count: say how many the run really has
            log.warning(
                "evaluation.num_prompts=%d, but %s has %d prompts%s: using all %d",
                wanted,
                source,
                len(examples),
                " after data.filter" if cfg.data.filter else "",
                len(examples),
            )
        examples = examples[:wanted]
    return ([e.prompt for e in examples], [e.harmful_response for e in examples], [int(e.index) for e in examples])


def load_finetune_pairs(cfg) -> list[tuple[str, str]]:
    """``(prompt, harmful response)`` pairs the fine-tuning attack trains on (durability and compare stages):
    ``evaluation.durability.finetune_data`` when set (every row needs its own response: ``data.default_target`` does
    not fill it; a real organism's ``harmful_completions`` are generated here on first use), else ``data.harmful``
    (its training split, every row with a target or ``data.default_target``). Either is read with ``data.harmful``'s
    split, columns and ``data.filter``.

    Raises:
        DataError: the data cannot be loaded, or a row has no target.
    """
    from lat_lightning.data.loaders import load_safety_examples
    from lat_lightning.resources import resource_path
    from lat_lightning.stages.organism import ensure_generated_data

    own = cfg.evaluation.durability.finetune_data
    if own:
        ensure_generated_data(resource_path(str(own)))
    # load_safety_examples requires a target by default: every example has one
    return [
        (e.prompt, cast(str, e.harmful_response))
        for e in load_safety_examples(
            resource_path(str(own or cfg.data.harmful)),
            cfg.data.harmful_split,
            dict(cfg.data.harmful_columns or {}),
            cfg.data.default_safe_response,
            cfg.data.max_examples,
            default_target=None if own else cfg.data.default_target,
            row_filter=dict(cfg.data.filter or {}),
        )
    ]


def load_contrast_prompts(cfg, scan_prompts: list[str]) -> tuple[list[str], list[str]]:
    """The refusal direction's prompt sets: harmful (``data.harmful``, else the scan's own prompts) and harmless
    (``data.benign``, else ``data.eval_benign``; none: ``[]``), at most ``perturbation.direction_prompts`` each.

    Training-split prompts are preferred so that the direction is not estimated on the prompts it is scored on.
    """
    from lat_lightning.data.loaders import load_benign_examples, load_safety_examples
    from lat_lightning.resources import resource_path

    n = int(cfg.perturbation.direction_prompts)
    harmful = list(scan_prompts)
    if cfg.data.harmful:
        harmful = [
            e.prompt
            for e in load_safety_examples(
                resource_path(cfg.data.harmful),
                split=cfg.data.harmful_split,
                columns=dict(cfg.data.harmful_columns or {}),
                default_safe_response=cfg.data.default_safe_response,
                max_examples=n,
                default_target=cfg.data.default_target,
                require_target=False,
                row_filter=dict(cfg.data.filter or {}),
            )
        ]  # only the prompts are used
    source = cfg.data.benign or cfg.data.eval_benign
    harmless = (
        []
        if not source
        else [
            e.prompt
            for e in load_benign_examples(
                resource_path(source), cfg.data.benign_split, dict(cfg.data.benign_columns or {}), n
            )
        ]
    )
    return harmful[:n], harmless[:n]


def scan_model_config(cfg) -> ModelSettings:
    """The model the scan loads: ``model`` with ``name_or_path`` replaced by ``evaluation.model_path`` when set."""
    from lat_lightning.stages.settings import model_settings

    mcfg = model_settings(cfg)
    if cfg.evaluation.model_path:
        mcfg = dataclasses.replace(mcfg, name_or_path=str(cfg.evaluation.model_path), gguf_file=None)
    return mcfg


PROBES_AUTO_MAX_PARAMETERS = 50_000_000  # evaluation.probes: null runs the probes up to this model size


def probes_wanted(setting: bool | None, model) -> bool:
    """``evaluation.probes``: ``True`` / ``False`` as set; ``None`` (default) runs them only where they are cheap,
    i.e. on models of at most :data:`PROBES_AUTO_MAX_PARAMETERS` parameters (the tiny models, the organism:
    seconds). Above that they cost about as much as the scan's ASA-random generation again (a teacher-forced
    pass over every prompt x layer x seed), so they are opt-in (docs/scan.md)."""
    if setting is not None:
        return bool(setting)
    return sum(p.numel() for p in model.parameters()) <= PROBES_AUTO_MAX_PARAMETERS


def scan_model(
    cfg,
    model,
    tokenizer,
    out_dir: Path,
    *,
    attacks=None,
    layers=None,
    probes: bool | None = None,
    shard=None,
    progress: bool = True,
):
    """The scan of ``evaluation`` on an in-memory model into ``out_dir`` (what the ``scan`` stage runs after loading).

    Args:
        cfg: the run config (prompts, attacks, layers, seeds, judges, decoding, coherence, perturbation knobs).
        model / tokenizer: the model to scan (eval mode) and its tokenizer.
        out_dir: the scan's directory (``scan.jsonl`` resumes from it).
        attacks: attack names instead of ``evaluation.attacks``.
        layers: layers instead of ``evaluation.layers`` (block indices / ``embed``).
        probes: run the NLL / position-KL probes (default: ``evaluation.probes``, see :func:`probes_wanted`).
        shard: ``(rank, world_size)`` of a multi-process scan.
        progress: progress bars.

    Returns:
        The :class:`~lat_lightning.eval.scan.ScanResult`.

    Raises:
        ConfigError: an unknown attack, or a primary judge not among the judges.
    """
    from lat_lightning.eval.scan import ScanOptions, ScanPrompts, run_scan
    from lat_lightning.stages.settings import scan_settings

    settings = scan_settings(
        cfg,
        attacks=attacks,
        layers=layers,
        probes=probes_wanted(cfg.evaluation.probes, model) if probes is None else bool(probes),
    )
    prompts, targets, keys = load_scan_prompts(cfg, settings.attack_names())
    harmful_side, harmless = load_contrast_prompts(cfg, prompts)
    data = ScanPrompts(prompts, targets, prompt_keys=keys, harmless_prompts=harmless, contrast_prompts=harmful_side)
    return run_scan(model, tokenizer, data, settings, out_dir, ScanOptions(resume=True, progress=progress, shard=shard))


def run(cfg, run_dir: Path) -> dict:
    """Load the model and prompts, run the scan into ``run_dir``.

    Returns:
        A small dict for the stage marker: headline numbers per attack and the output files.

    Raises:
        ConfigError: an unknown attack, or a primary judge not among the judges.
    """
    from lat_lightning.eval.scan import REPORT_FILE, SUMMARY_FILE, fmt
    from lat_lightning.models.layers import layer_name
    from lat_lightning.models.loading import load_tokenizer

    mcfg = scan_model_config(cfg)
    shard = process_shard(cfg)  # several processes (torchrun, srun): each scans its share of the prompts
    model = load_stage_model(cfg, mcfg)
    tokenizer = load_tokenizer(mcfg)
    result = scan_model(cfg, model, tokenizer, run_dir, shard=shard)
    info = {
        "attacks": {
            a: {k: result.headline(a)[k] for k in ("init", "pasr_mean", "masr_mean", "pasr_of_mean_lasr_layer")}
            for a in result.attacks
        },
        "primary_judge": result.primary_judge,
        "cells_run": result.cells_run,
        "cells_resumed": result.cells_resumed,
        "model": str(mcfg.name_or_path),
        "report": str(Path(run_dir) / REPORT_FILE),
        "summary": str(Path(run_dir) / SUMMARY_FILE),
    }
    if shard is not None and shard[0] != 0:  # rank 0 reports
        return info
    for a in result.attacks:
        h = result.headline(a)
        tied = h.get("peak_tied_layers") or []
        ties = f", tied at {len(tied)} layers" if len(tied) > 1 else ""
        print(
            f"[scan] {a}: INIT {fmt(h['init'])}  PASR {fmt(h['pasr_mean'])} (layer "
            f"{layer_name(h['pasr_of_mean_lasr_layer']) if h['pasr_of_mean_lasr_layer'] is not None else 'n/a'}"
            f"{ties})  MASR {fmt(h['masr_mean'])}  [{result.primary_judge}]",
            flush=True,
        )
    # The summary's warnings reached the console once already, as the scan logged them ("scan: ..."), and run.log
    print(f"[scan] report: {Path(run_dir) / REPORT_FILE}", flush=True)
    return info


def cells_saved(path: Path) -> int:
    """Complete records in a ``scan.jsonl`` and in the per-rank streams beside it (``scan.rank<r>.jsonl``, left by
    a multi-process scan that was stopped before rank 0 merged them; a resumed scan keeps them too); 0 when there
    are none."""
    from lat_lightning.eval.scan.records import SHARD_GLOB

    total = 0
    for part in [path, *sorted(path.parent.glob(SHARD_GLOB))]:
        if part.is_file():
            with open(part, "rb") as fh:
                total += sum(1 for line in fh if line.endswith(b"\n"))
    return total


def saved(run_dir: Path) -> str | None:
    """What an interrupted scan keeps for ``--resume``: its finished cells (the pipeline's stop message)."""
    n = cells_saved(Path(run_dir) / "scan.jsonl")
    return f"{n} finished cells in scan.jsonl (kept)" if n else None


__all__ = [
    "PROBES_AUTO_MAX_PARAMETERS",
    "cells_saved",
    "load_contrast_prompts",
    "load_finetune_pairs",
    "load_scan_prompts",
    "probes_wanted",
    "run",
    "saved",
    "scan_model",
    "scan_model_config",
]
