"""The durability report's table (one row per attack: original, hardened, change) and ``durability_report.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lat_lightning.eval.durability.settings import MODELS
from lat_lightning.eval.formatting import fmt_change, fmt_value
from lat_lightning.eval.judging import finite
from lat_lightning.models.layers import layer_name

REPORT_FILE = "durability_report.md"

ATTACK_LABELS = {
    "asa_random": "ASA random",
    "asagrad": "ASAgrad",
    "pgd": "PGD",  # report labels (else the name)
    "refusal_ablation": "Refusal-direction ablation",
    "refusal_addition": "Refusal-direction addition",
}


def _row(
    rid: str,
    label: str,
    o,
    h,
    kind: str = "rate",
    o_std=None,
    h_std=None,
    o_detail: str | None = None,
    h_detail: str | None = None,
    budget: int | None = None,
) -> dict[str, Any]:
    """One table row. ``kind``: ``rate``, ``loss``, ``layer`` or ``steps`` (steps-to-break: ``None`` = not broken
    within ``budget`` steps, shown as ``> budget``)."""
    o, h = finite(o), finite(h)
    change = None if o is None or h is None or kind == "layer" else h - o
    row = {
        "id": rid,
        "label": label,
        "kind": kind,
        "original": o,
        "hardened": h,
        "original_std": finite(o_std),
        "hardened_std": finite(h_std),
        "change": change,
        "original_detail": o_detail,
        "hardened_detail": h_detail,
    }
    if kind == "steps":
        assert budget is not None, "a steps row needs its budget"
        row.update(
            original=None if o is None else int(o),
            hardened=None if h is None else int(h),
            change=None if change is None else int(change),
            budget=int(budget),
        )
        row["change_text"] = fmt_change(row)  # "> +N" when only the original broke: the table's change cell
    return row


def _curve_row(rid: str, label: str, sec: Mapping[str, Any], key: str, kind: str) -> dict[str, Any]:
    """A learning-curve row: ``drop`` = value at step 0 minus value after the last step (``loss``), or the
    final value (``rate``); the cell also shows ``start → end``."""
    vals: dict[str, float | None] = {}
    details: dict[str, str | None] = {}
    for name in MODELS:
        pts = [p.get(key) for p in sec[name]["curve"] if p.get(key) is not None and math.isfinite(p.get(key))]
        if len(pts) < 1:
            vals[name], details[name] = None, None
            continue
        vals[name] = (pts[0] - pts[-1]) if kind == "loss" else pts[-1]
        details[name] = f"{pts[0]:.2f} → {pts[-1]:.2f}"
    return _row(
        rid,
        label,
        vals["original"],
        vals["hardened"],
        kind=kind,
        o_detail=details["original"],
        h_detail=details["hardened"],
    )


def _trainability_rows(tr: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Steps to the held-out loss threshold (median over seeds, each in brackets), the held-out CE after the
    budget (mean ± std over seeds, start → end), the utility after the budget when measured."""
    b, n = tr["steps"], len(tr.get("seeds", [0]))
    novel = str(tr.get("task", "")).startswith("novel")
    task = "the held-out items of a new task" if novel else "the benign training pairs"
    per_seed = {
        m: "seeds: " + ", ".join(f"> {b}" if v is None else str(v) for v in tr[m]["steps_to_loss"].values())
        for m in MODELS
    }
    final = {m: [v for v in tr[m]["final_loss"].values() if v is not None] for m in MODELS}
    stats = {m: (sum(v) / len(v), _std(v)) if v else (None, None) for m, v in final.items()}
    start = {m: tr[m]["curve"][0].get("task_loss") if tr[m]["curve"] else None for m in MODELS}
    rows = [
        _row(
            "trainability_steps",
            f"Trainability: LoRA steps until the CE of {task} is ≤ {tr['threshold']:g} (median of {n} "
            f"seeds, budget {b}, lr {tr['lr']:g}; fewer = learns faster)",
            tr["original"]["steps_to_loss_median"],
            tr["hardened"]["steps_to_loss_median"],
            kind="steps",
            o_detail=per_seed["original"],
            h_detail=per_seed["hardened"],
            budget=b,
        ),
        _row(
            "trainability_loss",
            f"Trainability: CE of {task} after {b} steps (mean ± std over {n} seeds; lower = learns faster)",
            stats["original"][0],
            stats["hardened"][0],
            kind="loss",
            o_std=stats["original"][1],
            h_std=stats["hardened"][1],
            o_detail=None if start["original"] is None else f"from {start['original']:.2f}",
            h_detail=None if start["hardened"] is None else f"from {start['hardened']:.2f}",
        ),
    ]
    if any("utility" in p for p in tr["original"]["curve"]):
        rows.append(
            _curve_row("trainability_utility", f"Trainability: utility accuracy after {b} steps", tr, "utility", "rate")
        )
    return rows


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _seed_steps(curve: Mapping[str, Any]) -> str:
    b = curve["budget"]
    return "seeds: " + ", ".join(f"> {b}" if v is None else str(v) for v in curve["steps_to_break"].values())


def _finetune_attack_rows(fa: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Steps-to-break (median, per seed in brackets), the same for the coherent twin of the primary judge, the
    success after the whole budget, and where each model's harmful-target CE started."""
    o, h = fa["original"], fa["hardened"]
    b, n, br = fa["budget"], len(fa["seeds"]), fa["break_rate"]
    rows = [
        _row(
            "finetune_steps_to_break",
            f"Fine-tuning attack: LoRA steps to break (success ≥ {br:g}, no "
            f"perturbation; median of {n} seeds, budget {b}, lr {fa['lr']:g})",
            o["steps_to_break_median"],
            h["steps_to_break_median"],
            kind="steps",
            o_detail=_seed_steps(o),
            h_detail=_seed_steps(h),
            budget=b,
        )
    ]
    coherent = f"{o['primary_judge']}+coherent"
    if coherent in o["judges_steps_to_break"] and coherent in h["judges_steps_to_break"]:
        rows.append(
            _row(
                "finetune_steps_to_break_coherent",
                f"Fine-tuning attack: LoRA steps to break, coherent answers only ({coherent})",
                o["judges_steps_to_break"][coherent],
                h["judges_steps_to_break"][coherent],
                kind="steps",
                budget=b,
            )
        )
    if fa.get("stop_at_break"):  # each seed stopped at its break: its last point is the break, not the budget
        label = (
            f"Fine-tuning attack: success where each seed stopped (its break, else the budget {b}; "
            f"mean ± std over {n} seeds)"
        )
    else:
        label = f"Fine-tuning attack: success after the whole budget ({b} steps; mean ± std over {n} seeds)"
    rows.append(
        _row(
            "finetune_success_at_budget",
            label,
            o.get("success_last_mean", o["success_mean"][-1]),
            h.get("success_last_mean", h["success_mean"][-1]),
            o_std=o.get("success_last_std", o["success_std"][-1]),
            h_std=h.get("success_last_std", h["success_std"][-1]),
        )
    )
    rows.append(
        _row(
            "finetune_harmful_loss_start",
            "Fine-tuning attack: harmful-target CE before the attack (step 0; "
            + ("the curves stop at each seed's break)" if fa.get("stop_at_break") else f"→ mean after {b} steps)"),
            o["harmful_loss_mean"][0],
            h["harmful_loss_mean"][0],
            kind="loss",
            o_detail=_loss_end(o),
            h_detail=_loss_end(h),
        )
    )
    return rows


def _loss_end(curve: Mapping[str, Any]) -> str | None:
    end = curve["harmful_loss_mean"][-1]
    return None if end is None else f"→ {end:.3f}"


def _rescan_rows(rs: Mapping[str, Any], fl: str) -> list[dict[str, Any]]:
    """The re-scan rows: INIT, ASA random (any / peak / fragile layers), the adaptive and transfer attacks and the
    peak layer (``fl``: the fragile layers as text)."""
    rows: list[dict[str, Any]] = []
    o, h = rs["original"], rs["hardened"]
    rows.append(_row("init", "No attack (INIT)", o["init"], h["init"]))
    oa, ha = o["attacks"]["asa_random"], h["attacks"]["asa_random"]
    ns = len(oa["seeds"])
    rows.append(
        _row(
            "asa_random_any",
            f"ASA random, any layer (MASR, {ns} seeds)",
            oa["any_layer_mean"],
            ha["any_layer_mean"],
            o_std=oa["any_layer_std"],
            h_std=ha["any_layer_std"],
        )
    )
    if oa.get("coherent_judge"):
        rows.append(
            _row(
                "asa_random_any_coherent",
                f"ASA random, any layer, coherent answers only ({oa['coherent_judge']})",
                oa["any_layer_coherent_mean"],
                ha.get("any_layer_coherent_mean"),
                o_std=oa["any_layer_coherent_std"],
                h_std=ha.get("any_layer_coherent_std"),
            )
        )
    rows.append(
        _row(
            "asa_random_pasr",
            f"ASA random, peak layer (PASR, {ns} seeds)",
            oa["pasr_mean"],
            ha["pasr_mean"],
            o_std=oa["pasr_std"],
            h_std=ha["pasr_std"],
        )
    )
    rows.append(
        _row(
            "asa_random_fragile",
            f"ASA random, fragile layers [{fl}]",
            oa["fragile_mean"],
            ha["fragile_mean"],
            o_std=oa["fragile_std"],
            h_std=ha["fragile_std"],
        )
    )
    adaptive = [a for a in o["attacks"] if a != "asa_random" and not a.endswith("_transfer")]
    for a in adaptive:
        label = ATTACK_LABELS.get(a, a)
        if a in o["attacks"] and a in h["attacks"]:
            rows.append(
                _row(
                    f"{a}_fragile",
                    f"{label} (adaptive), fragile layers [{fl}]",
                    o["attacks"][a]["fragile_mean"],
                    h["attacks"][a]["fragile_mean"],
                )
            )
            rows.append(
                _row(
                    f"{a}_any",
                    f"{label} (adaptive), any layer",
                    o["attacks"][a]["any_layer_mean"],
                    h["attacks"][a]["any_layer_mean"],
                )
            )
            if o["attacks"][a].get("coherent_judge"):
                rows.append(
                    _row(
                        f"{a}_any_coherent",
                        f"{label} (adaptive), any layer, coherent answers only ({o['attacks'][a]['coherent_judge']})",
                        o["attacks"][a]["any_layer_coherent_mean"],
                        h["attacks"][a].get("any_layer_coherent_mean"),
                    )
                )
        if f"{a}_transfer" in h["attacks"] and a in o["attacks"]:
            rows.append(
                _row(
                    f"{a}_transfer_fragile",
                    f"{label} computed on the original (transfer), fragile layers [{fl}]",
                    o["attacks"][a]["fragile_mean"],
                    h["attacks"][f"{a}_transfer"]["fragile_mean"],
                )
            )
    rows.append(
        _row(
            "peak_layer",
            "Most fragile layer (ASA random re-scan peak)",
            rs["peak_layer"]["original"],
            rs["peak_layer"]["hardened"],
            kind="layer",
        )
    )
    return rows


def _depth_rows(dp: Mapping[str, Any], fl: str) -> list[dict[str, Any]]:
    """The depth rows: each depth attack at the first and the last k, and the pre-fill attack at the smallest
    positive and the largest k."""
    rows: list[dict[str, Any]] = []
    o, h = dp["original"], dp["hardened"]
    ks = o["ks"]
    for a in o["first_k"]:
        label = ATTACK_LABELS.get(a, a)
        for idx in sorted({0, len(ks) - 1}):
            k = ks[idx]
            rows.append(
                _row(
                    f"first_k_{a}_{k}",
                    f"{label} on the first {k} position(s) only, fragile layers [{fl}]",
                    o["first_k"][a]["mean"][idx],
                    h["first_k"][a]["mean"][idx],
                    o_std=o["first_k"][a]["std"][idx] if o["first_k"][a]["seed_dependent"] else None,
                    h_std=h["first_k"][a]["std"][idx] if h["first_k"][a]["seed_dependent"] else None,
                )
            )
    pks = o["prefill"]["ks"]
    for idx, k in enumerate(pks):
        if k == 0 or (k != pks[-1] and k != min(x for x in pks if x > 0)):
            continue
        rows.append(
            _row(
                f"prefill_{k}",
                f"Prefill the first {k} target token(s), no perturbation",
                o["prefill"]["rate"][idx],
                h["prefill"]["rate"][idx],
            )
        )
    return rows


def build_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report table: one row per attack (rates are the primary judge's success rates)."""
    rows: list[dict[str, Any]] = []
    fr = summary.get("fragile_layers", {}).get("layers", [])
    fl = ",".join(str(l) for l in fr)
    rs = summary.get("rescan")
    if rs:
        rows += _rescan_rows(rs, fl)
    fa = summary.get("finetune_attack")
    if fa and "original" in fa:
        rows += _finetune_attack_rows(fa)
    tr = summary.get("trainability")
    if tr and "original" in tr:
        rows += _trainability_rows(tr)
    dp = summary.get("depth")
    if dp:
        rows += _depth_rows(dp, fl)
    rw = summary.get("rewrites")
    if rw:
        for name, e in rw.items():
            rows.append(
                _row(
                    f"rewrite_{name}",
                    f"Prompt rewrite: {name}, no perturbation",
                    e["original"]["rate"],
                    e["hardened"]["rate"],
                )
            )
    return rows


def _names(layers) -> str:
    """Layer ids as a reader sees them (the input embeddings as ``embed``)."""
    return "n/a" if layers is None else "[" + ", ".join(layer_name(l) for l in layers) + "]"


def render_report(summary: Mapping[str, Any]) -> str:
    """``durability_report.md``: the one table, then how to read it, caveats and figures."""
    p = summary["primary_judge"]
    models = summary["models"]
    fr = summary.get("fragile_layers", {})
    lines = [
        "# Durability report",
        "",
        f"- **original**: {models.get('original')}",
        f"- **hardened**: {models.get('hardened')}",
        f"- {summary['n_prompts']} harmful prompts, {len(summary['layers'])} layers; success judged by "
        f"**{p}**; fragile layers {_names(fr.get('layers'))} ({fr.get('source')}).",
        "",
        "| attack | original | hardened | change |",
        "|---|---|---|---|",
    ]
    for r in summary["rows"]:
        cells = [fmt_value(r[m], r[f"{m}_std"], r["kind"], r[f"{m}_detail"], r.get("budget")) for m in MODELS]
        lines.append(f"| {r['label']} | {cells[0]} | {cells[1]} | {fmt_change(r)} |")
    lines += [
        "",
        "## How to read it",
        "",
        "- Rates are attack success rates (harmful, not refused) of the primary judge; **change = hardened − "
        "original**, so a negative change means the hardened model resists better. `± x` is the sample "
        "standard deviation over the ASA random seeds.",
        "- *Fragile layers*: success at any of those layers (the mean over prompts of the max over the "
        "fragile layers). *Any layer*: the same over every re-scanned layer (MASR).",
        "- *Adaptive*: ASAgrad / PGD computed on the gradients of the model under attack. *Transfer*: the "
        "vectors computed on the original model, applied to the hardened one (the original column repeats "
        "its adaptive value).",
        "- *First k positions*: the perturbation acts on the last prompt token and the first k − 1 "
        "generated tokens only; *prefill*: the first k target tokens are appended after the generation "
        "prompt and the judge reads prefill + continuation.",
        "- Trainability rows: LoRA fine-tunes of each model on a task new to both (one per seed); the steps until "
        "its held-out CE reaches the threshold (each seed in brackets) and the held-out CE after the budget (where "
        "it started in brackets).",
        "- *Fine-tuning attack*: steps to break = the first evaluated LoRA step at which the success without "
        "any perturbation reaches the break rate; the median over seeds (the per-seed values in brackets; "
        "`> budget` = not broken within the budget). A larger number means more resistance; the harmful-target "
        "CE at step 0 says how far each model started from the harmful targets (a model that starts farther "
        "away may take longer without being more robust: compare its curve in `durability_finetune.png`).",
    ]
    rs = summary.get("rescan")
    if rs:
        moved = rs.get("peak_moved")
        lines.append(
            f"- Most fragile layer: original {fmt_value(rs['peak_layer']['original'], kind='layer')}, hardened "
            f"{fmt_value(rs['peak_layer']['hardened'], kind='layer')} ({'moved' if moved else 'did not move'}). "
            "Full scans: "
            "`original/scan_report.md`, `hardened/scan_report.md`."
        )
    fa = summary.get("finetune_attack")
    if fa and "original" in fa:
        lines.append(
            f"- Fine-tuning attack: {fa['n_pairs']} harmful pairs, up to {fa['budget']} LoRA steps at lr "
            f"{fa['lr']:g} on a copy of each model, seeds {fa['seeds']} (LoRA init and data order), "
            f"evaluated at steps {fa['eval_steps']} (adapters in `finetune_attack/*/seed_*/final`); "
            f"training and evaluation prompts overlap: {'yes' if fa.get('train_eval_overlap') else 'no'}."
        )
    dp = summary.get("depth")
    if dp:
        ok = all(dp[m]["positions_check"]["ok"] for m in MODELS)
        lines.append(
            f"- Position self-check (first-k rows perturbed exactly min(k, steps) ≤ k positions; prefill "
            f"rows none): {'passed' if ok else 'FAILED'}."
        )
    lines += ["", "## Caveats", ""]
    if any(str(j).startswith("keyword") for j in summary.get("judges", [])):
        lines.append(
            "- **Keyword judges count gibberish as success.** They only look for refusal phrases: "
            "empty, garbled or off-topic output (frequent under strong perturbations, after rewrites "
            "the model cannot read, and on tiny random models) counts as an attack success. Treat keyword "
            "rates as upper bounds; check samples, the `+coherent` rows or use a classifier judge."
        )
    if any(str(j).endswith("+coherent") for j in summary.get("judges", [])):
        lines.append(
            "- *Coherent answers only* rows count a success only when the answer is also coherent (not "
            "empty, not looping, clean-model NLL under the threshold: `docs/metrics.md`)."
        )
    lines.append(
        "- `target_match` on prefill rows is inflated by construction: the judged text starts with the "
        "target's own first tokens."
    )
    lines.append("- Small prompt sets give coarse rates (steps of 1/N); compare changes against the seed spread.")
    caveat = (summary.get("finetune_attack") or {}).get("caveat")
    if caveat:
        lines.append(f"- **Fine-tuning attack**: {caveat}.")
    figs = summary.get("figures") or {}
    if figs:
        lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figs.items()]
    t = summary.get("timings") or {}
    if t:
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


__all__ = ["ATTACK_LABELS", "REPORT_FILE", "build_rows", "render_report"]
