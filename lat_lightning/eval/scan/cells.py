"""The cells of a scan: the state one :func:`~lat_lightning.eval.scan.runner.run_scan` call settled
(:class:`ScanRun`), the clean and attacked generations in prompt-major chunks, the judging, the coherence check and
the best-of-N samples of every answer, and the refill of records read back without a verdict."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lat_lightning.attacks import Attack
from lat_lightning.data.templating import encode_response
from lat_lightning.eval.coherence import CoherenceScorer, assess, calibrate
from lat_lightning.eval.generation import (
    CLEAN,
    AttackPlan,
    GenerationSettings,
    RowKeys,
    generate_under_attack,
)
from lat_lightning.eval.kv_cache import reused_prefixes
from lat_lightning.eval.scan.records import (
    CLEAN_ATTACK,
    RecordSink,
    cell_key,
    settings_fingerprint,
)
from lat_lightning.eval.scan.settings import ScanOptions, ScanPrompts, ScanSettings
from lat_lightning.progress_lines import LineProgress

log = logging.getLogger(__name__)

JudgeLike = Callable[..., list]
ALL_ROWS = 2**31  # the chunk size of generation.batch_size=None: more rows than any scan has


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
class ScanRun:
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
            # from_attacked_layer: how the NLL is computed, not what (the same values to float rounding)
            "coherence": {
                k: v for k, v in dataclasses.asdict(self.settings.coherence).items() if k != "from_attacked_layer"
            },
            "attacks": {a.name: a.describe() for a in self.attacks},
            "prompt_keys": settings_fingerprint({"k": self.keys}),
            "prompts": settings_fingerprint({"p": self.prompts}),
        }


class Answerer:
    """Judges (and checks the coherence of) the answers of one generation call; draws best-of-N samples."""

    def __init__(self, run: ScanRun, scorer: CoherenceScorer | None):
        self.run, self.scorer = run, scorer

    @property
    def captures(self) -> bool:
        """Whether attacked generations should capture their clean states for the coherence check's clean pass."""
        return self.scorer is not None and self.scorer.settings.from_attacked_layer

    def records(
        self,
        row_prompts: list[int],
        texts: list[str],
        token_ids: list[list[int]],
        states: tuple[list, list[int]] | None = None,
    ) -> list[dict]:
        """``response``, ``token_ids``, ``n_tokens``, ``coherence`` and every judge's verdict per row (``states``:
        the generation's clean states and the rows' layers, for the coherence check)."""
        run = self.run
        coherence = (
            self.scorer([run.prompt_ids[i] for i in row_prompts], token_ids, texts, *(states or (None, None)))
            if self.scorer is not None
            else None
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
    run: ScanRun, todo: list[int], records: dict[tuple, dict], answerer: Answerer, sink: RecordSink
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


def _safe_ids(run: ScanRun, data: ScanPrompts, records: Mapping[tuple, dict]) -> list[list[int]]:
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
    run: ScanRun, attack: Attack, chunk: list[tuple[int, int, int]], safe_ids: list[list[int]]
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
    run: ScanRun,
    attack: Attack,
    cells: list[tuple[int, int, int]],
    records: dict[tuple, dict],
    answerer: Answerer,
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
            capture_states=answerer.captures,
        )
        answers = answerer.records(row_prompts, res.texts, res.token_ids, (res.clean_states, row_layers))
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


def calibrate_coherence(run: ScanRun, records: Mapping[tuple, dict], scorer: CoherenceScorer | None) -> None:
    """With ``coherence.max_nll_quantile`` set: the NLL threshold from the clean answers' NLL
    (:func:`~lat_lightning.eval.coherence.calibrate`), given to ``scorer``; a record read or written before whose
    coherence changes under it is re-assessed and loses its ``+coherent`` verdicts (``fill_missing`` re-judges them).

    Raises:
        ValueError: a distributed scan (each rank holds only its own clean answers).
    """
    coh = run.settings.coherence
    if scorer is None or coh.max_nll_quantile is None:
        return
    if run.world > 1:
        raise ValueError("evaluation.coherence.max_nll_quantile needs a one-process scan (not a distributed one)")
    clean = [r for r in records.values() if r["attack"] == CLEAN_ATTACK]
    scorer.settings = calibrate(coh, [(r.get("coherence") or {}).get("nll") for r in clean])
    log.info("coherence: max_nll calibrated on %d clean answers: %.3f", len(clean), scorer.settings.max_nll)
    needs = [n for n, j in run.judges.items() if getattr(j, "needs_coherence", False)]
    for rec in records.values():
        old = rec.get("coherence")
        if old is None:
            continue
        new = assess(rec["response"], old.get("nll"), scorer.settings)
        if new != old:
            rec["coherence"] = new
            for n in needs:
                (rec.get("verdicts") or {}).pop(n, None)


def generate_cells(run: ScanRun, data: ScanPrompts, records: dict[tuple, dict], sink: RecordSink) -> int:
    """Generate, judge and stream every cell of this rank that ``records`` lacks; fill in what records read back
    lack (coherence, a judge added since). Returns the number of cells generated."""

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
    bar = LineProgress(  # a bar on a terminal, a line per tenth in a log
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
    answerer = Answerer(run, scorer)
    was_training = run.model.training
    run.model.eval()
    try:
        with reused_prefixes():  # the model is fixed during the scan: a chunk's clean prompt prefixes run once
            _clean_cells(run, clean_todo, records, answerer, sink)
            calibrate_coherence(run, records, scorer)
            if clean_todo:
                bar.reset(total=total)  # the clock (and the ETA's average rate) starts with the attacked cells
                bar.set_description(label)
            safe_ids = _safe_ids(run, data, records)
            for a in run.attacks:
                _attacked_cells(run, a, todo[a.name], records, answerer, sink, safe_ids, bar)
            # Records read back without coherence or a verdict of a judge added since: fill them (no generation).
            fill_missing(
                run, {k: r for k, r in records.items() if int(r["prompt_idx"]) % run.world == run.rank}, scorer, sink
            )
    finally:
        bar.close()
        sink.close()
        run.model.train(was_training)
    return len(clean_todo) + total


def fill_missing(run: ScanRun, records: dict[tuple, dict], scorer: CoherenceScorer | None, sink: RecordSink) -> None:
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


__all__ = ["ALL_ROWS", "Answerer", "JudgeLike", "ScanRun", "calibrate_coherence", "fill_missing", "generate_cells"]
