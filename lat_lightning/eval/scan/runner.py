"""The scan itself: :func:`run_scan` generates every cell's answer under its attack, judges it, checks its
coherence, streams the records, then assembles, plots and reports (the package docstring has the outputs)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lat_lightning.attacks import Attack, build_attack
from lat_lightning.data.templating import encode_response
from lat_lightning.eval.generation import (
    CLEAN,
    encode_prompts,
)
from lat_lightning.eval.scan.cells import JudgeLike, ScanRun, generate_cells
from lat_lightning.eval.scan.figures import tensorboard_text, write_figures
from lat_lightning.eval.scan.records import (
    CLEAN_ATTACK,
    SCAN_FILE,
    SHARD_FILE,
    RecordSink,
    all_gather,
    cell_key,
    merge_ranks,
    open_records,
    reusable_records,
)
from lat_lightning.eval.scan.report import REPORT_FILE, render_report
from lat_lightning.eval.scan.settings import ScanOptions, ScanPrompts, ScanSettings
from lat_lightning.eval.scan.summary import SUMMARY_FILE, ScanAxes, ScanResult, assemble
from lat_lightning.models.layers import check_layer_indices, num_layers

log = logging.getLogger(__name__)


def _build_judges(
    judges: Sequence[Any] | Mapping[str, Any],
    classifier_path: str | None = None,
    target_key_pattern: str | None = None,
    coherent: bool = False,
) -> dict[str, JudgeLike]:
    """Judges by name (or as given); ``coherent`` adds ``<judge>+coherent`` for every judge that has none."""
    from lat_lightning.eval.judges import build_judges, with_coherent_judges

    out = dict(judges) if isinstance(judges, Mapping) else build_judges(judges, classifier_path, target_key_pattern)
    return with_coherent_judges(out) if coherent else out


def _prepare(
    model: nn.Module,
    tokenizer,
    data: ScanPrompts,
    settings: ScanSettings,
    out_dir: str | Path | None,
    options: ScanOptions,
) -> ScanRun:
    """Validate the scan against the model and build its attacks and judges.

    Raises:
        ValueError: duplicate layers or attacks, a missing target or harmless prompts an attack needs, no judge, a
            primary judge that is not a judge, ``+coherent`` judges without the coherence check, a distributed scan
            without ``out_dir``.
    """
    prompts = list(data.prompts)
    n = len(prompts)
    layers = (
        list(range(num_layers(model))) if settings.layers is None else check_layer_indices(model, list(settings.layers))
    )
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {layers}")
    attacks = [
        a
        if isinstance(a, Attack)
        else build_attack(
            a, settings.perturbation, positions=settings.positions, first_k=settings.first_k, refresh=settings.refresh
        )
        for a in settings.attacks
    ]
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate attacks in {names}")
    for a in attacks:
        if a.needs_target and (data.targets is None or any(not t for t in data.targets)):
            raise ValueError(f"attack '{a.name}' needs a harmful target for every prompt")
    coh, jset = settings.coherence, settings.judging
    requested = _build_judges(jset.judges, jset.classifier_path, jset.target_key_pattern)
    judges = _build_judges(requested, coherent=coh.enabled and coh.judges)
    if not judges:
        raise ValueError("run_scan needs at least one judge")
    primary = jset.primary_judge or list(judges)[0]
    if primary not in judges:
        raise ValueError(f"primary judge '{primary}' is not among the judges {list(judges)}")
    needs_coherence = [j for j, jd in judges.items() if getattr(jd, "needs_coherence", False)]
    if needs_coherence and not coh.enabled:
        raise ValueError(f"judges {needs_coherence} need the coherence check; enable it (evaluation.coherence.enabled)")
    rank, world = (int(options.shard[0]), int(options.shard[1])) if options.shard is not None else (0, 1)
    out_path = Path(out_dir) if out_dir is not None else None
    if world > 1 and out_path is None:
        raise ValueError("a distributed scan (shard=...) needs out_dir: the ranks exchange records through files")
    run = ScanRun(
        model,
        tokenizer,
        settings,
        options,
        prompts,
        data.keys(),
        list(data.targets) if data.targets is not None else [None] * n,
        layers,
        [int(s) for s in settings.seeds] or [0],
        attacks,
        requested,
        judges,
        primary,
        out_path,
        rank,
        world,
    )
    run.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    gen = settings.generation
    run.prompt_ids = encode_prompts(tokenizer, prompts, gen.use_chat_template, gen.system_prompt)
    run.target_ids = [encode_response(tokenizer, t, add_eos=False) if t else [] for t in run.targets]
    contrastive = [a for a in attacks if a.needs_harmless and a.contrast is None]
    if contrastive:
        if not data.harmless_prompts:
            raise ValueError(
                f"attack '{contrastive[0].name}' needs harmless prompts for the refusal direction "
                "(data.eval_benign or data.benign)"
            )
        harmful_side = encode_prompts(
            tokenizer, [str(p) for p in (data.contrast_prompts or prompts)], gen.use_chat_template, gen.system_prompt
        )
        harmless_side = encode_prompts(
            tokenizer, [str(p) for p in data.harmless_prompts], gen.use_chat_template, gen.system_prompt
        )
        for a in contrastive:
            a.set_contrast_prompts(harmful_side, harmless_side)
    return run


def _write_outputs(run: ScanRun, result: ScanResult, records: Mapping[tuple, dict], clean_texts: list[str]) -> None:
    """Rank 0's extras and files: the probes, the ASABench export, figures, summary, report, TensorBoard text."""
    settings, options, out_path = run.settings, run.options, run.out_path
    n = len(run.prompts)
    if settings.probes:
        from lat_lightning.eval.probes import ProbeSettings, response_probe

        probe = ProbeSettings(
            alpha=settings.perturbation.alpha,
            positions="prompt_last_and_generated",
            batch_size=run.step,
            share_prefix=settings.generation.share_prefix,
        )
        pr = response_probe(
            run.model,
            run.prompt_ids,
            [records[cell_key(CLEAN_ATTACK, None, i, CLEAN)]["token_ids"] for i in range(n)],
            run.layers,
            list(settings.probe_seeds) if settings.probe_seeds is not None else run.seeds,
            settings=probe,
            prompt_keys=run.keys,
            pad_id=run.pad_id,
        )
        result.probes = pr.summary()
        result.summary["probes"] = result.probes
    if out_path is not None and settings.asabench_test_fraction is not None:
        from lat_lightning.eval.asabench import export_asabench, instances_from_records

        inst = instances_from_records(
            records.values(), dict(enumerate(clean_texts)), run.primary, [a.name for a in run.attacks]
        )
        result.summary["asabench"] = {
            k: v
            for k, v in export_asabench(
                inst, out_path, settings.asabench_test_fraction, settings.asabench_split_mode, settings.split_seed
            ).items()
        }
        result.summary["asabench"]["judge"] = run.primary
    if out_path is not None:
        figs = write_figures(result, out_path, tensorboard=options.tensorboard) if options.figures else {}
        result.summary["figures"] = figs
        (out_path / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=2, default=str))
        report = render_report(result)
        (out_path / REPORT_FILE).write_text(report)
        if options.tensorboard:
            tensorboard_text(out_path, result, report)


def run_scan(
    model: nn.Module,
    tokenizer,
    prompts: ScanPrompts,
    settings: ScanSettings = ScanSettings(),
    out_dir: str | Path | None = None,
    options: ScanOptions = ScanOptions(),
) -> ScanResult:
    """Scan prompts x layers x seeds for every attack; judge, check coherence, summarise, plot, report.

    A distributed scan (``options.shard = (rank, world_size)``, an initialised ``torch.distributed`` process group
    over ``world_size`` processes, every one calling ``run_scan`` with the same arguments) deals the prompts out
    round-robin (prompt ``i`` to rank ``i % world_size``, so a prompt's whole layer sweep stays in one batched
    generation); each rank streams its records to ``scan.rank<r>.jsonl``; then every rank reads all of them and
    assembles the same result, and rank 0 alone writes the merged ``scan.jsonl``, summary, report, figures, probes
    and ASABench files. Resume works per rank (and across a change of world size). The records equal a
    one-process scan's.

    ``options.reuse = (directory, prompt keys)`` of an earlier scan of the same model (e.g. the durability suite
    reusing the run's ``scan`` / ``rescan`` stages): its cells that this scan would generate identically are taken
    over (:func:`~lat_lightning.eval.scan.records.reusable_records`) and judged here instead of generated again.

    Args:
        model / tokenizer: the model under test (put in eval mode for the scan).
        prompts: the scan's data (:class:`ScanPrompts`: prompts, targets, noise keys, refusals, contrast sets).
        settings: what the scan computes (:class:`ScanSettings`).
        out_dir: where to stream ``scan.jsonl`` and write figures / report / summary (``None``: in memory).
        options: how it runs (:class:`ScanOptions`: resume, progress bar, figures, TensorBoard, warnings, shard,
            reuse).

    Returns:
        A :class:`~lat_lightning.eval.scan.summary.ScanResult`.

    Raises:
        ValueError: an invalid scan (see :func:`_prepare`), or an out_dir whose settings or prompts differ when
            resuming.
    """
    t0 = time.time()
    run = _prepare(model, tokenizer, prompts, settings, out_dir, options)
    record_settings = run.record_settings()
    out_path = run.out_path
    records = (
        open_records(out_path, record_settings, run.prompts, options.resume, (run.rank, run.world))
        if out_path is not None
        else {}
    )
    reused = 0
    if options.reuse is not None:
        for k, rec in reusable_records(
            options.reuse[0], record_settings, run.prompts, run.keys, options.reuse[1], run.layers
        ).items():
            if k not in records:
                records[k] = rec
                reused += 1
    resumed = len(records) - reused
    record_file = out_path / (SCAN_FILE if run.world == 1 else SHARD_FILE.format(rank=run.rank)) if out_path else None
    run_count = generate_cells(run, prompts, records, RecordSink(record_file))
    if run.world > 1:  # every rank's records, in one place; rank 0 writes them as the one scan.jsonl
        run_count = sum(all_gather(run_count))  # every rank read every record at the start: resumed is shared
        n = len(run.prompts)
        expected = [cell_key(CLEAN_ATTACK, None, i, CLEAN) for i in range(n)] + [
            cell_key(a.name, s, i, l)
            for a in run.attacks
            for i in range(n)
            for s in run.seeds_run[a.name]
            for l in run.layers
        ]
        assert out_path is not None  # a distributed scan has an output directory (checked in _prepare)
        records = merge_ranks(out_path, run.rank, expected)
    clean_texts = [records[cell_key(CLEAN_ATTACK, None, i, CLEAN)]["response"] for i in range(len(run.prompts))]

    gen_seconds = time.time() - t0
    axes = ScanAxes(
        run.prompts,
        run.layers,
        run.seeds,
        run.attacks,
        run.seeds_run,
        run.judges,
        run.primary,
        ci_judges=set(run.requested) | {run.primary},
    )
    result = assemble(axes, records, clean_texts, settings, out_path)
    result.cells_run, result.cells_resumed = run_count, resumed
    result.summary["cells"] = {"run": run_count, "resumed": resumed, "reused": reused, "seconds": round(gen_seconds, 3)}
    result.summary["settings"] = record_settings
    result.summary["world_size"] = options.shard[1] if options.shard is not None else 1  # processes that shared it
    for w in result.summary["warnings"] if options.log_warnings else []:
        log.warning("scan: %s", w)
    if run.rank == 0:  # rank 0 writes the outputs; the others return the same assembled result
        _write_outputs(run, result, records, clean_texts)
    return result


__all__ = ["run_scan"]
