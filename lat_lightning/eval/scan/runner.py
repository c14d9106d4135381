"""The scan itself: :func:`run_scan` generates every cell's answer under its attack, judges it, checks its
coherence, streams the records, then assembles, plots and reports (the package docstring has the outputs)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lat_lightning.attacks import Attack, build_attack
from lat_lightning.data.templating import encode_response
from lat_lightning.eval.coherence import CoherenceScorer
from lat_lightning.eval.generation import (
    CLEAN,
    AttackPlan,
    GenerationSettings,
    RowKeys,
    encode_prompts,
    generate_under_attack,
)
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
    settings_fingerprint,
)
from lat_lightning.eval.scan.report import REPORT_FILE, render_report
from lat_lightning.eval.scan.settings import ScanOptions, ScanPrompts, ScanSettings
from lat_lightning.eval.scan.summary import SUMMARY_FILE, ScanAxes, ScanResult, assemble
from lat_lightning.models.layers import check_layer_indices, num_layers

log = logging.getLogger(__name__)

JudgeLike = Callable[..., list]
ALL_ROWS = 2**31  # the chunk size of generation.batch_size=None: more rows than any scan has


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


def _judge_all(
    judges: Mapping[str, JudgeLike],
    prompts: list[str],
    responses: list[str],
    targets: list[str | None],
    coherence: list[dict] | None = None,
) -> dict[str, list[dict]]:
    """``judge -> [verdict dict per item]``. A judge that raises fails every item of the call (recorded)."""
    from lat_lightning.eval.judges import judge_items

    verdicts = judge_items(dict(judges), prompts, responses, targets, coherence)
    return {
        name: [{"success": v.success, "failed": bool(v.failed), "reason": v.reason} for v in vs]
        for name, vs in verdicts.items()
    }


@dataclass
class _ScanRun:
    """Everything one :func:`run_scan` call settled before generating: the validated axes, the encoded prompts,
    the judges, where the records go and this process's share of the prompts."""

    model: nn.Module
    tokenizer: Any
    settings: ScanSettings
    options: ScanOptions
    prompts: list[str]
    keys: list[int]
    targets: list[str | None]
    layers: list[int]
    seeds: list[int]
    attacks: list[Attack]
    requested: dict[str, JudgeLike]  # the judges asked for
    judges: dict[str, JudgeLike]  # ... with the `+coherent` twins
    primary: str
    out_path: Path | None
    rank: int = 0
    world: int = 1
    pad_id: int = 0
    prompt_ids: list[list[int]] = field(default_factory=list)
    target_ids: list[list[int]] = field(default_factory=list)

    @property
    def step(self) -> int:
        """Rows (cells) per batched generation (``batch_size=None``: every cell in one)."""
        size = self.settings.generation.batch_size
        return max(1, int(size)) if size is not None else ALL_ROWS

    @property
    def mine(self) -> list[int]:
        """This rank's prompts (round-robin, so a prompt's whole layer sweep stays in one generation)."""
        return [i for i in range(len(self.prompts)) if i % self.world == self.rank]

    @property
    def seeds_run(self) -> dict[str, list[int]]:
        """``attack -> seeds`` (deterministic attacks run the first seed only)."""
        return {a.name: (self.seeds if a.seed_dependent else self.seeds[:1]) for a in self.attacks}

    def generation(self, sampling: bool = False) -> GenerationSettings:
        """The settings of one generation call: the scan chunks the rows itself (one forward per call); the
        best-of-N samples (``sampling``) always sample."""
        gen = self.settings.generation
        if sampling:
            return dataclasses.replace(gen, batch_size=None, do_sample=True)
        return dataclasses.replace(gen, batch_size=None, top_p=gen.top_p if gen.do_sample else 1.0)

    def record_settings(self) -> dict:
        """What ``scan_settings.json`` holds (the resume guard and the reuse check compare it)."""
        gen = self.settings.generation
        return {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "use_chat_template": gen.use_chat_template,
            "system_prompt": gen.system_prompt,
            "best_of_n": int(gen.best_of_n),
            "top_p": gen.top_p if gen.best_of_n > 1 else None,
            "coherence": dataclasses.asdict(self.settings.coherence),
            "attacks": {a.name: a.describe() for a in self.attacks},
            "prompt_keys": settings_fingerprint({"k": self.keys}),
            "prompts": settings_fingerprint({"p": self.prompts}),
        }


def _prepare(
    model: nn.Module,
    tokenizer,
    data: ScanPrompts,
    settings: ScanSettings,
    out_dir: str | Path | None,
    options: ScanOptions,
) -> _ScanRun:
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
    run = _ScanRun(
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


class _Answerer:
    """Judges (and checks the coherence of) the answers of one generation call; draws best-of-N samples."""

    def __init__(self, run: _ScanRun, scorer: CoherenceScorer | None):
        self.run, self.scorer = run, scorer

    def records(self, row_prompts: list[int], texts: list[str], token_ids: list[list[int]]) -> list[dict]:
        """``response``, ``token_ids``, ``n_tokens``, ``coherence`` and every judge's verdict per row."""
        run = self.run
        coherence = (
            self.scorer([run.prompt_ids[i] for i in row_prompts], token_ids, texts) if self.scorer is not None else None
        )
        verdicts = _judge_all(
            run.judges, [run.prompts[i] for i in row_prompts], texts, [run.targets[i] for i in row_prompts], coherence
        )
        out = []
        for j in range(len(row_prompts)):
            rec = {
                "response": texts[j],
                "token_ids": token_ids[j],
                "n_tokens": len(token_ids[j]),
                "verdicts": {name: verdicts[name][j] for name in run.judges},
            }
            if coherence is not None:
                rec["coherence"] = coherence[j]
            out.append(rec)
        return out

    def samples(
        self, row_prompts: list[int], row_layers: list[int] | None, plan: AttackPlan | None, row_seeds: list[int] | None
    ) -> list[list[dict] | None]:
        """``best_of_n`` sampled answers per row under the same perturbation (``None`` per row when off)."""
        run = self.run
        n = int(run.settings.generation.best_of_n)
        if n <= 1:
            return [None] * len(row_prompts)
        rep = [r for r in range(len(row_prompts)) for _ in range(n)]
        keys = RowKeys(
            prompt_keys=[run.keys[row_prompts[r]] for r in rep],
            row_seeds=None if row_seeds is None else [row_seeds[r] for r in rep],
            sample_ids=[k for _ in row_prompts for k in range(n)],
        )
        res = generate_under_attack(
            run.model,
            run.tokenizer,
            [run.prompt_ids[row_prompts[r]] for r in rep],
            None if row_layers is None else [row_layers[r] for r in rep],
            None if plan is None else plan.select(rep),
            rows=keys,
            settings=run.generation(sampling=True),
            pad_token_id=run.pad_id,
        )
        recs = self.records([row_prompts[r] for r in rep], res.texts, res.token_ids)
        return [recs[r * n : (r + 1) * n] for r in range(len(row_prompts))]


def _merge_plans(plans: list[tuple[list[int], AttackPlan]], n_rows: int) -> AttackPlan:
    """Combine plans built for disjoint row subsets (same kind) into one plan over all rows."""
    first = plans[0][1]
    if len(plans) == 1 and plans[0][0] == list(range(n_rows)):
        return first
    vectors: list = [None] * n_rows
    masks: list = [None] * n_rows
    for rows, plan in plans:
        for j, r in enumerate(rows):
            if plan.vectors is not None:
                vectors[r] = plan.vectors[j]
            if plan.vector_masks is not None:
                masks[r] = plan.vector_masks[j]
    return dataclasses.replace(
        first,
        vectors=vectors if first.vectors is not None else None,
        vector_masks=masks if first.vector_masks is not None else None,
    )


def _clean_cells(
    run: _ScanRun, todo: list[int], records: dict[tuple, dict], answerer: _Answerer, sink: RecordSink
) -> None:
    """The clean answer of every prompt in ``todo`` (once per prompt)."""
    for start in range(0, len(todo), run.step):
        rows = todo[start : start + run.step]
        res = generate_under_attack(
            run.model,
            run.tokenizer,
            [run.prompt_ids[i] for i in rows],
            None,
            None,
            rows=RowKeys(prompt_keys=[run.keys[i] for i in rows]),
            settings=run.generation(),
            pad_token_id=run.pad_id,
        )
        answers = answerer.records(rows, res.texts, res.token_ids)
        samples = answerer.samples(rows, None, None, None)
        new = []
        for j, i in enumerate(rows):
            rec = {
                "attack": CLEAN_ATTACK,
                "seed": None,
                "prompt_idx": i,
                "layer": CLEAN,
                "prompt": run.prompts[i],
                **answers[j],
                **({"samples": samples[j]} if samples[j] is not None else {}),
            }
            records[cell_key(CLEAN_ATTACK, None, i, CLEAN)] = rec
            new.append(rec)
        sink.write(new)


def _safe_ids(run: _ScanRun, data: ScanPrompts, records: Mapping[tuple, dict]) -> list[list[int]]:
    """Each prompt's refusal (PGD's ``away`` term): ``data.safe_responses``, else the clean answers of this rank's
    prompts (the others are never attacked here)."""
    if data.safe_responses is not None:
        return [encode_response(run.tokenizer, s, add_eos=True) for s in data.safe_responses]
    return [
        list(records[cell_key(CLEAN_ATTACK, None, i, CLEAN)]["token_ids"])
        or encode_response(run.tokenizer, "", add_eos=True)
        if i % run.world == run.rank
        else []
        for i in range(len(run.prompts))
    ]


def _attack_plan(
    run: _ScanRun, attack: Attack, chunk: list[tuple[int, int, int]], safe_ids: list[list[int]]
) -> AttackPlan:
    """One plan over the rows ``(prompt, seed, layer)`` of a chunk: a plan per seed, merged (or the one plan of an
    attack keyed per row at apply time, which serves every seed)."""
    groups: dict[int, list[int]] = {}
    for r, (_, s, _) in enumerate(chunk):
        groups.setdefault(s, []).append(r)
    parts = []
    for s, rows in groups.items():
        plan = attack.plan(
            run.model,
            run.prompt_ids,
            run.target_ids,
            [chunk[r][0] for r in rows],
            [chunk[r][2] for r in rows],
            seed=s,
            safe_ids=safe_ids,
            pad_id=run.pad_id,
        )
        parts.append((rows, plan))
        if attack.one_plan_for_all_seeds:
            parts = [(list(range(len(chunk))), plan)]
            break
    return _merge_plans(parts, len(chunk))


def _attacked_cells(
    run: _ScanRun,
    attack: Attack,
    cells: list[tuple[int, int, int]],
    records: dict[tuple, dict],
    answerer: _Answerer,
    sink: RecordSink,
    safe_ids: list[list[int]],
    bar,
) -> None:
    """Every cell ``(prompt, seed, layer)`` of one attack, in chunks of rows (prompt-major, so a prompt's layer
    sweep shares one generation)."""
    for start in range(0, len(cells), run.step):
        chunk = cells[start : start + run.step]
        row_prompts, row_seeds, row_layers = [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk]
        plan = _attack_plan(run, attack, chunk, safe_ids)
        res = generate_under_attack(
            run.model,
            run.tokenizer,
            [run.prompt_ids[i] for i in row_prompts],
            row_layers,
            plan,
            rows=RowKeys(prompt_keys=[run.keys[i] for i in row_prompts], row_seeds=row_seeds),
            settings=run.generation(),
            pad_token_id=run.pad_id,
        )
        answers = answerer.records(row_prompts, res.texts, res.token_ids)
        samples = answerer.samples(row_prompts, row_layers, plan, row_seeds)
        new = []
        for j, (i, s, l) in enumerate(chunk):
            rec = {
                "attack": attack.name,
                "seed": s,
                "prompt_idx": i,
                "layer": l,
                "prompt": run.prompts[i],
                **answers[j],
                "perturbed_positions": int(res.perturbed_positions[j]),
                **({"samples": samples[j]} if samples[j] is not None else {}),
            }
            records[cell_key(attack.name, s, i, l)] = rec
            new.append(rec)
        sink.write(new)
        bar.update(len(chunk))


def _generate(run: _ScanRun, data: ScanPrompts, records: dict[tuple, dict], sink: RecordSink) -> int:
    """Generate, judge and stream every cell of this rank that ``records`` lacks; fill in what records read back
    lack (coherence, a judge added since). Returns the number of cells generated."""
    from tqdm.auto import tqdm

    clean_todo = [i for i in run.mine if cell_key(CLEAN_ATTACK, None, i, CLEAN) not in records]
    todo = {
        a.name: [
            (i, s, l)
            for i in run.mine
            for s in run.seeds_run[a.name]
            for l in run.layers
            if cell_key(a.name, s, i, l) not in records
        ]
        for a in run.attacks
    }
    # The bar counts attacked cells: the clean answers (one small batch, far slower per cell) would make the first
    # ETA extrapolate their rate to the whole scan; they show in the description while they run.
    total = sum(len(v) for v in todo.values())
    label = "scan" if run.world == 1 else f"scan (rank {run.rank}/{run.world})"
    bar = tqdm(
        total=total,
        desc=f"{label}: clean answers" if clean_todo else label,
        unit="cell",
        smoothing=0,
        disable=not run.options.progress or run.rank != 0,
        dynamic_ncols=True,
    )
    gen, coh = run.settings.generation, run.settings.coherence
    scorer = (
        CoherenceScorer(run.model, coh, run.pad_id, run.step, share_prefix=gen.share_prefix) if coh.enabled else None
    )
    answerer = _Answerer(run, scorer)
    was_training = run.model.training
    run.model.eval()
    try:
        _clean_cells(run, clean_todo, records, answerer, sink)
        if clean_todo:
            bar.reset(total=total)  # the clock (and the ETA's average rate) starts with the attacked cells
            bar.set_description(label)
        safe_ids = _safe_ids(run, data, records)
        for a in run.attacks:
            _attacked_cells(run, a, todo[a.name], records, answerer, sink, safe_ids, bar)
        # Records read back without coherence or a verdict of a judge added since: fill them (no generation).
        _fill_missing(
            run, {k: r for k, r in records.items() if int(r["prompt_idx"]) % run.world == run.rank}, scorer, sink
        )
    finally:
        bar.close()
        sink.close()
        run.model.train(was_training)
    return len(clean_todo) + total


def _fill_missing(run: _ScanRun, records: dict[tuple, dict], scorer: CoherenceScorer | None, sink: RecordSink) -> None:
    """Records (and best-of-N samples) read back without a coherence record or without some judge's verdict."""
    step = run.step

    def answers():  # every judged answer: (record to rewrite, the answer dict, prompt index)
        for key, rec in records.items():
            yield key, rec, int(rec["prompt_idx"])
            for sample in rec.get("samples") or []:
                yield key, sample, int(rec["prompt_idx"])

    changed: dict[tuple, dict] = {}
    if scorer is not None:
        todo = [(k, a, i) for k, a, i in answers() if "coherence" not in a]
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            coh = scorer(
                [run.prompt_ids[i] for _, _, i in part],
                [a.get("token_ids") or [] for _, a, _ in part],
                [a["response"] for _, a, _ in part],
            )
            for (k, a, _), c in zip(part, coh):
                a["coherence"] = c
                changed[k] = records[k]
    for name, judge in run.judges.items():
        todo = [(k, a, i) for k, a, i in answers() if name not in (a.get("verdicts") or {})]
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            part_coherence = [a.get("coherence") or {} for _, a, _ in part] if scorer is not None else None
            v = _judge_all(
                {name: judge},
                [records[k]["prompt"] for k, _, _ in part],
                [a["response"] for _, a, _ in part],
                [run.targets[i] for _, _, i in part],
                part_coherence,
            )[name]
            for (k, a, _), verdict in zip(part, v):
                a.setdefault("verdicts", {})[name] = verdict
                changed[k] = records[k]
    if changed:
        sink.write(list(changed.values()))


def _write_outputs(run: _ScanRun, result: ScanResult, records: Mapping[tuple, dict], clean_texts: list[str]) -> None:
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
    run_count = _generate(run, prompts, records, RecordSink(record_file))
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
    for w in result.summary["warnings"] if options.log_warnings else []:
        log.warning("scan: %s", w)
    if run.rank == 0:  # rank 0 writes the outputs; the others return the same assembled result
        _write_outputs(run, result, records, clean_texts)
    return result


__all__ = ["run_scan"]
