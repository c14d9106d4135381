"""The defences x attacks table of the defence comparison (stage ``compare``, ``docs/defences.md``).

Every model of the comparison (the starting model and each defence, interpolated to the same utility tolerance)
has one *battery* result (a dict, written by the stage as ``compare/<model>/battery.json``)::

    {"description": str, "utility": float, "lambda": float | None,
     "init": rate without any attack,
     "attacks": {column: {"value": MASR (mean over seeds), "std": spread over seeds or None, "seeds": n}},
     "prefill": {k: rate},                    # the first k target tokens pre-filled, no perturbation
     "finetune": the fine-tuning attack curve (lat_lightning.eval.durability.finetune_attack_curve) or absent,
     "seconds": {...}}

:func:`build_table` turns them into one table (rows = models, columns = utility, λ, INIT, one column per attack,
pre-fill, fine-tuning steps to break); :func:`write_outputs` writes ``compare_report.md``, ``compare_summary.json``,
``compare_heatmap.png`` (success rates), ``compare_finetune.png`` (the fine-tuning curves) and TensorBoard.

Reading it: a success rate is the primary judge's share of prompts broken (MASR: at any scanned layer; lower is
more robust). Steps to break: fine-tuning steps until the fine-tuned copy complies with at least
``finetune_break_rate`` of the prompts (higher is more robust; ``> budget`` = never within the budget).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lat_lightning.eval.durability import (
    DurabilitySettings,
    HarmfulPrompts,
    median_steps_to_break,
    prefill_attack,
    resolve_judges,
)
from lat_lightning.eval.formatting import NOT_AVAILABLE, fmt_mean_std
from lat_lightning.eval.judging import coherence_scorer, finite  # finite: None for None / NaN / inf

REPORT_FILE = "compare_report.md"
SUMMARY_FILE = "compare_summary.json"


# ------------------------------------------------------------------------------------------------ pre-fill
def prefill_success(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    prompt_keys: Sequence[int],
    ks: Sequence[int],
    settings: DurabilitySettings,
) -> dict[str, dict[str, Any]]:
    """The pre-fill attack: the first ``k`` tokens of each harmful target forced after the generation prompt, then
    greedy decoding without perturbation; the judges see pre-fill + continuation.

    Args:
        model / tokenizer: the model under attack (eval mode) and its tokenizer.
        prompts / targets / prompt_keys: harmful prompts, their harmful targets and stable ids.
        ks: how many target tokens to pre-fill (one result per k).
        settings: judges, decoding, coherence and formatting
            (:class:`~lat_lightning.eval.durability.settings.DurabilitySettings`; the stage builds them from the
            run config).

    Returns:
        ``{str(k): {"rate": primary judge's success rate, "judges": {name: rate}, "sample": first answer,
        "per_prompt": the primary judge's 1 / 0 / None per prompt}}``.
    """
    s, judge_map = resolve_judges(settings)
    harmful = HarmfulPrompts.encode(tokenizer, prompts, targets, prompt_keys, s)
    res = prefill_attack(
        model,
        tokenizer,
        harmful,
        [int(k) for k in ks],
        s,
        judge_map,
        coherence_scorer(model, tokenizer, s.coherence, s.batch_size),
    )
    return {
        str(k): {
            "rate": res["rate"][i],
            "judges": {j: v[i] for j, v in res["judges"].items()},
            "sample": res["samples"][str(k)],
            "per_prompt": res["per_prompt"][i],
        }
        for i, k in enumerate(res["ks"])
    }


# ------------------------------------------------------------------------------------------------- table
def steps_past_loss(curve: Mapping[str, Any], reference_loss: float) -> dict[str, int | None]:
    """Per seed of a fine-tuning curve: steps to break minus the first evaluated step at which the harmful-target
    loss is down to ``reference_loss`` (the starting model's, before any fine-tuning).

    Steps to break mixes two things: how far a defence pushed the model from the harmful targets (distance) and how
    fast fine-tuning breaks it once it is as close as the starting model was (resistance). This is the second: a
    defence whose copy breaks as soon as it reaches the starting model's loss adds distance only. ``None`` where the
    seed did not break within the budget; a break before the loss is reached counts from the break (0).
    """
    out: dict[str, int | None] = {}
    steps = [int(k) for k in curve["eval_steps"]]
    for seed, broke in curve["steps_to_break"].items():
        if broke is None:
            out[seed] = None
            continue
        losses = curve["harmful_loss"][seed]
        reached = next((k for k, v in zip(steps, losses) if v is not None and v <= reference_loss), None)
        out[seed] = int(broke) - min(int(broke), reached if reached is not None else int(broke))
    return out


def build_table(
    results: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]],
    attack_columns: Sequence[str],
    prefill_ks: Sequence[int],
    finetune: bool,
    reference: str = "original",
    baseline: str = "sft",
    bootstrap_samples: int = 2000,
) -> dict[str, Any]:
    """One row per model, in the order of ``results``.

    Args:
        results: model name -> its battery result (module docstring), or a list of them, one per training seed
            (``compare.seeds``): each cell is then the mean over the seeds with a 95 % interval
            (:mod:`lat_lightning.eval.compare_stats`).
        attack_columns: the attack columns, in order (``asa_random``, ..., ``pgd@embed``).
        prefill_ks: the pre-fill columns.
        finetune: whether the fine-tuning columns are present.
        reference: the row whose harmful-target loss before fine-tuning the ``finetune_past_start`` column counts
            from (:func:`steps_past_loss`; no such column when that row is absent).
        baseline: the row every other is compared with (plain refusal SFT): each rate cell that can be resampled
            gets ``vs_baseline`` (the difference, its 95 % interval and whether it is beyond noise).
        bootstrap_samples: draws of the intervals' bootstrap.

    Returns:
        ``{"columns": [{"id", "label", "kind"}], "rows": [{"model", "description", "seeds", "cells": {id: {...}}}],
        "baseline": baseline}``; kind ``rate`` (lower = more robust), ``utility``, ``lambda`` or ``steps`` (higher =
        more robust). A cell is ``{"value": float | None, "std": float | None}``, plus ``"ci": [low, high]`` where
        an interval exists, ``"vs_baseline"`` for rates, ``"per_seed"`` for λ over seeds, and ``"per_seed"`` and
        ``"budget"`` for steps.

    Raises:
        ValueError: a battery lacks a column the table needs (an unfilled cell is a bug, never a blank).
    """
    from lat_lightning.eval.compare_stats import batteries_of, merged_finetune, row_cells

    by_model = {name: batteries_of(res) for name, res in results.items()}
    columns = _columns(attack_columns, prefill_ks, finetune, reference, by_model)
    reference_loss = None
    if any(c["id"] == "finetune_past_start" for c in columns):
        curve = merged_finetune(by_model[reference])
        start = [v[0] for v in curve["harmful_loss"].values() if v and v[0] is not None] if curve else []
        reference_loss = float(np.mean(start)) if start else None
    rows, runs = [], {}
    for name, batteries in by_model.items():
        cells, runs[name] = row_cells(name, batteries, attack_columns, prefill_ks, finetune, bootstrap_samples)
        ft = merged_finetune(batteries) if reference_loss is not None else None
        if reference_loss is not None and ft is not None:
            per_seed = steps_past_loss(ft, reference_loss)
            cells["finetune_past_start"] = {
                "value": finite(median_steps_to_break(list(per_seed.values()))),
                "std": None,
                "per_seed": per_seed,
                "budget": int(ft["budget"]),
            }
        desc = batteries[0].get("description", name)
        rows.append({"model": name, "description": desc, "seeds": len(batteries), "cells": cells})
    _mark_differences(rows, runs, baseline, bootstrap_samples)
    return {"columns": columns, "rows": rows, "baseline": baseline}


def _columns(attack_columns, prefill_ks, finetune: bool, reference: str, by_model) -> list[dict[str, str]]:
    columns = [
        {"id": "utility", "label": "utility", "kind": "utility"},
        {"id": "lambda", "label": "λ", "kind": "lambda"},
        {"id": "init", "label": "no attack", "kind": "rate"},
    ]
    columns += [{"id": c, "label": c, "kind": "rate"} for c in attack_columns]
    columns += [{"id": f"prefill_{k}", "label": f"prefill {k}", "kind": "rate"} for k in prefill_ks]
    if finetune:
        # fine-tunes stopped at their break (evaluation.durability.finetune_stop_at_break) end there, not at the budget
        stopped = any((b.get("finetune") or {}).get("stop_at_break") for bs in by_model.values() for b in bs)
        columns += [
            {
                "id": "finetune_rate",
                "label": "fine-tune success at its break (else budget)" if stopped else "fine-tune success at budget",
                "kind": "rate",
            },
            {"id": "finetune_steps", "label": "fine-tune steps to break", "kind": "steps"},
        ]
        if reference in by_model and any(b.get("finetune") for b in by_model[reference]):
            columns.append(
                {
                    "id": "finetune_past_start",
                    "label": f"fine-tune steps past {reference}'s start loss",
                    "kind": "steps",
                }
            )
    return columns


def _mark_differences(rows: list[dict], runs: Mapping[str, Mapping[str, Any]], baseline: str, samples: int) -> None:
    """``vs_baseline`` on every rate cell that differs from the baseline row's (:func:`difference_cells`)."""
    from lat_lightning.eval.compare_stats import difference_cells

    diffs = difference_cells(runs, baseline, samples)
    for row in rows:
        for col, d in diffs.get(row["model"], {}).items():
            row["cells"][col]["vs_baseline"] = d


def _fmt_cell(cell: Mapping[str, Any], kind: str) -> str:
    v = cell.get("value")
    if kind == "steps":
        per = cell.get("per_seed") or {}
        budget = cell.get("budget")
        seeds = ", ".join("—" if s is None else str(s) for s in per.values())
        head = f"> {budget}" if v is None else f"{v:g}"
        return f"{head} ({seeds})" if per else head
    if v is None:
        return "—" if kind == "lambda" else NOT_AVAILABLE
    if kind == "lambda":
        per = [x for x in cell.get("per_seed") or [] if x is not None]
        return f"{v:.2g} ({', '.join(f'{x:g}' for x in per)})" if len(set(per)) > 1 else f"{v:g}"
    ci = cell.get("ci")
    if ci:
        d = cell.get("vs_baseline") or {}
        mark = (" ↓" if d["diff"] < 0 else " ↑") if d.get("beyond_noise") else ""
        return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]{mark}"
    std = cell.get("std")
    return fmt_mean_std(v, std or None)  # a zero spread (one seed, a deterministic attack) is left out


def _difference_lines(table: Mapping[str, Any]) -> list[str]:
    """The differences from the baseline row as a second table (``*`` = beyond noise)."""
    cols = [
        c
        for c in table["columns"]
        if c["kind"] == "rate" and any("vs_baseline" in r["cells"][c["id"]] for r in table["rows"])
    ]
    rows = [r for r in table["rows"] if any("vs_baseline" in r["cells"][c["id"]] for c in cols)]
    if not rows:
        return []

    def fmt(d: Mapping[str, Any] | None) -> str:
        if not d:
            return NOT_AVAILABLE
        star = "*" if d["beyond_noise"] else ""
        return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{star}"

    lines = [
        "",
        f"Difference from `{table['baseline']}` (rate − {table['baseline']}'s, 95 % interval of the two-stage "
        "bootstrap over seeds and paired prompts; * = beyond noise, the interval excludes 0):",
        "",
        "| model | " + " | ".join(c["label"] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    lines += [
        f"| {r['model']} | " + " | ".join(fmt(r["cells"][c["id"]].get("vs_baseline")) for c in cols) + " |"
        for r in rows
    ]
    return lines


def training_cost(timings: Mapping[str, float], models: Sequence[str], baseline: str = "sft") -> dict[str, str]:
    """The training cost column: per model, the wall seconds of its training in this run (mean over its seeds;
    ``train_<model>[_seed_<s>]`` in ``timings``) and the ratio to ``baseline``'s, e.g. ``"24 s (2.1× sft)"``.
    Models not trained in this run (the starting model, or a defence a resumed run reused) get no entry."""
    means: dict[str, float] = {}
    for name in models:
        vals = [float(v) for k, v in timings.items() if k == f"train_{name}" or k.startswith(f"train_{name}_seed_")]
        if vals:
            means[name] = float(np.mean(vals))
    base = means.get(baseline)
    return {name: f"{m:.0f} s" + (f" ({m / base:.1f}× {baseline})" if base else "") for name, m in means.items()}


def render_markdown(table: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The report: settings, the defences x attacks table, how to read it."""
    cols = table["columns"]
    lines = [
        "# Defence comparison",
        "",
        f"Starting model: `{summary['model']}`; {summary['n_prompts']} held-out harmful prompts; judge "
        f"`{summary['primary_judge']}`; layers attacked in training: {summary['attack_layers']} "
        f"({summary['attack_layers_source']}); utility: {summary['utility_kind']}, interpolation tolerance "
        f"{summary['tolerance']}.",
        "",
        "| model | " + " | ".join(c["label"] for c in cols) + " | training cost |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    cost = training_cost(
        summary.get("timings") or {}, [r["model"] for r in table["rows"]], table.get("baseline", "sft")
    )
    for row in table["rows"]:
        cells = [_fmt_cell(row["cells"][c["id"]], c["kind"]) for c in cols] + [cost.get(row["model"], "—")]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    finetune = any(c["id"] == "finetune_steps" for c in cols)
    seeds = max((int(r.get("seeds", 1)) for r in table["rows"]), default=1)
    baseline = table.get("baseline", "sft")
    intervals = (
        f"Each defence trained over {seeds} seeds: a cell is the mean over its seeds with, in brackets, the 95 % "
        "interval of a two-stage bootstrap (seeds with replacement, then the held-out prompts with replacement, "
        "the same prompts for every model); utility: mean with a Student-t 95 % interval over seeds. "
        if seeds > 1
        else "In brackets: the 95 % interval of a bootstrap over the held-out prompts (and the attack's noise seeds). "
    )
    if any(r["model"] == baseline for r in table["rows"]):
        intervals += (
            f"↓ / ↑: lower / higher than `{baseline}` beyond noise (the 95 % interval of the paired difference "
            "excludes 0). "
        )
    lines += [
        "",
        intervals + "Success rates: share of prompts broken (attacks: at any scanned layer, mean over seeds where "
        "the attack is random); lower is more robust."
        + (
            " Fine-tune steps to break: the median over seeds (each seed in brackets, — = not broken) of the "
            "first evaluated step at which the fine-tuned copy complies with at least "
            f"{summary.get('finetune_break_rate')} of the prompts; higher is more robust, `> budget` = not "
            "broken within the budget. Steps past the start loss: the same, counted from the first step at "
            "which the copy's harmful-target loss is down to the starting model's before fine-tuning (distance "
            "from the harmful targets removed: what is left is resistance)."
            if finetune
            else ""
        )
        + " λ: the interpolation weight kept (θ = λ·θ_defence + (1 − λ)·θ_original), the largest within the "
        "utility tolerance.",
        "",
        "| model | defence |",
        "|---|---|",
    ]
    lines += [f"| {row['model']} | {row['description']} |" for row in table["rows"]]
    if finetune and summary.get("finetune_caveat"):
        lines += ["", f"**Fine-tuning attack**: {summary['finetune_caveat']}."]
    lines += _difference_lines(table)
    lines += [
        "",
        f"Wall time: {summary['timings'].get('total', 'n/a')} s "
        f"({', '.join(f'{k} {v} s' for k, v in summary['timings'].items() if k != 'total')}).",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- figures
def _curves(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model's fine-tuning curve, its training seeds' curves merged (one line per model, band over seeds)."""
    from lat_lightning.eval.compare_stats import batteries_of, merged_finetune

    out = {}
    for name, res in results.items():
        curve = merged_finetune(batteries_of(res))
        if curve is not None:
            out[name] = curve
    return out


def _figures(table: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    rate_cols = [c for c in table["columns"] if c["kind"] == "rate"]
    names = [r["model"] for r in table["rows"]]
    mat = np.array(
        [
            [np.nan if r["cells"][c["id"]]["value"] is None else r["cells"][c["id"]]["value"] for c in rate_cols]
            for r in table["rows"]
        ],
        dtype=float,
    )
    fig, ax = plt.subplots(figsize=(1.1 * len(rate_cols) + 2.5, 0.55 * len(names) + 1.8))
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(rate_cols)), [c["label"] for c in rate_cols], rotation=35, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(
                j,
                i,
                "n/a" if np.isnan(mat[i, j]) else f"{mat[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if not np.isnan(mat[i, j]) and mat[i, j] > 0.6 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, label="attack success (lower = more robust)")
    ax.set_title("Defences x attacks")
    fig.tight_layout()
    figs["compare_heatmap"] = fig
    curves = _curves(results)
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, ft in curves.items():
            steps = ft["eval_steps"]
            for ax, key in zip(axes, ("success", "harmful_loss")):
                arr = np.array([v for v in ft[key].values()], dtype=float)
                if arr.size == 0 or arr.shape[-1] != len(steps):
                    continue
                mean = np.nanmean(arr, axis=0)
                (line,) = ax.plot(steps, mean, marker="o", ms=3, label=name)
                if arr.shape[0] > 1:
                    ax.fill_between(
                        steps, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), alpha=0.15, color=line.get_color()
                    )
        axes[0].axhline(float(next(iter(curves.values()))["break_rate"]), color="grey", ls="--", lw=1)
        axes[0].set(
            xlabel="fine-tuning steps",
            ylabel="attack success (no perturbation)",
            ylim=(-0.02, 1.02),
            title="Fine-tuning attack: success (band = min..max over seeds)",
        )
        axes[1].set(
            xlabel="fine-tuning steps",
            ylabel="harmful-target CE (nats / token)",
            title="Fine-tuning attack: harmful-target loss",
        )
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        figs["compare_finetune"] = fig
    return figs


def write_outputs(
    table: Mapping[str, Any],
    results: Mapping[str, Any],
    summary: dict[str, Any],
    out: Path,
    tensorboard: bool = True,
) -> dict[str, str]:
    """Write the report, the summary JSON (table + every battery), the figures and TensorBoard into ``out``.

    Returns:
        ``{figure name: path}``.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = render_markdown(table, summary)
    figs = _figures(table, results)
    paths = {}
    for name, fig in figs.items():
        paths[name] = str(out / f"{name}.png")
        fig.savefig(paths[name], dpi=110)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        try:
            for row in table["rows"]:
                for c in table["columns"]:
                    v = row["cells"][c["id"]]["value"]
                    if v is not None:
                        writer.add_scalar(f"compare/{c['id']}/{row['model']}", float(v), 0)
            for name, ft in _curves(results).items():
                arr = np.array(list(ft["success"].values()), dtype=float)
                for step, column in zip(ft["eval_steps"], arr.T):
                    if not np.isnan(column).any():  # a step every seed reached (a stopped seed has no value)
                        writer.add_scalar(f"compare_finetune/success/{name}", float(column.mean()), int(step))
            for name, fig in figs.items():
                writer.add_figure(name, fig, 0)
            writer.add_text("compare/report", report, 0)
        finally:
            writer.close()
    for fig in figs.values():
        plt.close(fig)
    summary = {**summary, "table": table, "batteries": dict(results), "figures": paths}
    (out / REPORT_FILE).write_text(report)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return paths


__all__ = [
    "REPORT_FILE",
    "SUMMARY_FILE",
    "build_table",
    "prefill_success",
    "render_markdown",
    "steps_past_loss",
    "write_outputs",
]
