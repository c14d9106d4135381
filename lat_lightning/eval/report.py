"""The run report: one markdown report (plus PNGs, JSON and TensorBoard) of attack -> defence -> evaluation.

It reads what the earlier stages left in a run directory: ``scan_summary.json`` (before, required),
``rescan/scan_summary.json`` (after), ``interpolation.json`` (the lambda curve), ``fragile_layers.json`` and
``durability_summary.json``, each when present. Benign accuracy (``utility``) is given by the caller: the
``report`` stage (:mod:`lat_lightning.stages.report`) measures it for runs of the model organism only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lat_lightning.eval.formatting import fmt_mean_std, fmt_number, fmt_signed
from lat_lightning.eval.report_samples import answer_samples, samples_markdown
from lat_lightning.eval.report_unattacked import unattacked_figures, unattacked_markdown
from lat_lightning.models.layers import EMBED, layer_name

REPORT_FILE = "report.md"
REPORT_JSON = "report.json"


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _layer(l) -> str:
    """A layer id as a reader sees it: ``embed`` for the input embeddings (id ``-2`` in the JSON files)."""
    return layer_name(l)


def _layers(layers) -> str:
    return "n/a" if layers is None else "[" + ", ".join(_layer(l) for l in layers) + "]"


def attack_rows(summary: dict, judge: str) -> dict[str, dict]:
    """INIT / MASR / PASR (+ peak layer and how many layers tie at it) per attack for one judge, from a
    ``scan_summary.json``. The primary judge's peak layer is the scan's (its tie rule); other judges show the
    lowest tied layer."""
    rows = {}
    for attack, block in summary["attacks"].items():
        j = block["judges"].get(judge)
        if j is None:
            continue
        h = block.get("headline", {}) if judge == summary.get("primary_judge") else {}
        peak = h.get("pasr_of_mean_lasr_layer", j.get("pasr_of_mean_lasr_layer"))
        tied = h.get("peak_tied_layers") or j.get("pasr_of_mean_lasr_tied_layers") or []
        rows[attack] = {
            "init": j.get("init_mean"),
            "masr": j.get("masr_mean"),
            "masr_std": j.get("masr_std"),
            "pasr": j.get("pasr_mean"),
            "pasr_std": j.get("pasr_std"),
            "peak_layer": peak,
            "peak_ties": len(tied),
            "lasr": j.get("lasr_mean"),
            "layers": j.get("layer_ids"),
            "n_seeds": j.get("n_seeds"),
        }
    return rows


def embed_rows(summary: Optional[dict], judge: str) -> dict[str, Optional[float]]:
    """Per attack: the success rate at the input embeddings (the ``embed`` column of the LASR curve), when the
    scan covered them."""
    if not summary or EMBED not in (summary.get("layers") or []):
        return {}
    col = summary["layers"].index(EMBED)
    out = {}
    for attack, block in summary["attacks"].items():
        j = block["judges"].get(judge)
        if j is not None and j.get("lasr_mean"):
            out[attack] = j["lasr_mean"][col]
    return out


def relative_cut(before: Optional[float], after: Optional[float]) -> Optional[float]:
    """``(before - after) / before``; ``None`` when undefined (before is 0 or missing)."""
    if before is None or after is None or before <= 0:
        return None
    return (before - after) / before


def _lasr_figure(before: dict, after: Optional[dict], attack: str, judge: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for label, rows, style in (("before (aligned)", before, "o-"), ("after (LAPT + interpolation)", after, "s--")):
        if rows and attack in rows and rows[attack]["lasr"]:
            ax.plot(
                rows[attack]["layers"],
                [v if v is not None else float("nan") for v in rows[attack]["lasr"]],
                style,
                label=label,
            )
    shown = sorted({l for rows in (before, after) if rows and attack in rows for l in rows[attack]["layers"] or []})
    shown = shown[:: max(1, len(shown) // 16)]
    ax.set_xticks(shown)
    ax.set_xticklabels([_layer(l) for l in shown])  # the input embeddings (id -2) show as "embed"
    ax.set_xlabel("layer")
    ax.set_ylabel(f"LASR ({judge})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{attack}: attack success by layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _lambda_figure(curve: list[dict], chosen: Optional[float], baseline: Optional[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    ax.plot([p["lambda"] for p in curve], [p["score"] for p in curve], "o-")
    if baseline is not None:
        ax.axhline(baseline, color="grey", lw=0.8, ls=":", label="original")
    if chosen is not None:
        ax.axvline(chosen, color="red", lw=0.8, ls="--", label=f"chosen λ={chosen:g}")
    ax.set_xlabel("λ (weight of the hardened model)")
    ax.set_ylabel("benign accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _samples(run_dir: Path, attack: str, judge: str, limit: int = 3) -> list[dict]:
    """A few prompts that the attack broke before training, with the same cell after training."""

    def cells(path: Path) -> dict:
        out = {}
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                out[(rec["attack"], rec.get("seed"), rec["prompt_idx"], rec["layer"])] = rec
        return out

    before, after = cells(run_dir / "scan.jsonl"), cells(run_dir / "rescan" / "scan.jsonl")
    picked = []
    for key, rec in before.items():
        if rec["attack"] != attack or not rec["verdicts"].get(judge, {}).get("success"):
            continue
        post = after.get(key, {})
        picked.append(
            {
                "prompt": rec["prompt"],
                "layer": rec["layer"],
                "seed": rec.get("seed"),
                "before": rec["response"],
                "after": post.get("response"),
                "after_success": post.get("verdicts", {}).get(judge, {}).get("success"),
            }
        )
        if len(picked) >= limit:
            break
    return picked


def load_scan_summary(run_dir: Path) -> dict:
    """The run's ``scan_summary.json`` (the report's "before").

    Raises:
        ConfigError: the run has none (no scan stage ran).
    """
    summary = _load(Path(run_dir) / "scan_summary.json")
    if summary is None:
        from lat_lightning.errors import ConfigError

        raise ConfigError(f"report: no scan_summary.json in {run_dir} (run the scan stage first)")
    return summary


def build_result(run_dir: Path, judges: list[str], primary: str, utility: Optional[dict] = None) -> dict:
    """Everything the report shows, from the files in ``run_dir`` (see the module docstring).

    Args:
        run_dir: the run directory.
        judges: the judges to tabulate.
        primary: the primary judge (relative PASR cut, samples).
        utility: ``{"aligned", "after_training", "after_interpolation"}`` benign accuracies, or ``None`` (no
            benign-accuracy section).

    Returns:
        The report as a dict (written to ``report.json`` by :func:`write_report`).

    Raises:
        ConfigError: the run has no ``scan_summary.json``.
    """
    run_dir = Path(run_dir)
    before_summary = load_scan_summary(run_dir)
    after_summary = _load(run_dir / "rescan" / "scan_summary.json")
    interp = _load(run_dir / "interpolation.json") or {}
    fragile = _load(run_dir / "fragile_layers.json") or {}
    durability = _load(run_dir / "durability_summary.json")

    tables = {
        j: {"before": attack_rows(before_summary, j), "after": attack_rows(after_summary, j) if after_summary else {}}
        for j in judges
    }
    embed = {j: {"before": embed_rows(before_summary, j), "after": embed_rows(after_summary, j)} for j in judges}
    warnings = {"before": before_summary.get("warnings", []), "after": (after_summary or {}).get("warnings", [])}
    prim = tables[primary]
    cuts = {a: relative_cut(prim["before"][a]["pasr"], prim["after"].get(a, {}).get("pasr")) for a in prim["before"]}
    return {
        "primary_judge": primary,
        "judges": tables,
        "utility": utility,
        "pasr_relative_cut": cuts,
        "lambda": interp.get("chosen_lambda"),
        "lambda_curve": interp.get("curve"),
        "fragile_layers": fragile.get("layers") or fragile.get("chosen"),
        "n_prompts": before_summary.get("n_prompts"),
        "layers": before_summary.get("layers"),
        "samples": _samples(run_dir, "asa_random", primary),
        "answer_samples": answer_samples(run_dir / "scan.jsonl"),
        "unattacked": unattacked_figures(run_dir),
        "durability": durability,
        "embed": embed,
        "warnings": warnings,
        "coherence": {
            "before": {a: b.get("coherence") for a, b in before_summary["attacks"].items()},
            "after": {a: b.get("coherence") for a, b in (after_summary or {"attacks": {}})["attacks"].items()},
        },
        "tie_rule": before_summary.get("tie_rule"),
    }


def write_report(run_dir: Path, result: dict, judges: list[str], primary: str) -> Path:
    """Write ``report.md``, ``report.json``, the PNGs and the TensorBoard figures; print the markdown.

    Args:
        run_dir: the run directory.
        result: :func:`build_result`'s dict (``figures`` is added).
        judges: the judges to tabulate.
        primary: the primary judge.

    Returns:
        The path of ``report.md``.
    """
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    interp = _load(run_dir / "interpolation.json") or {}
    prim = result["judges"][primary]
    figures = {}
    writer = SummaryWriter(str(run_dir / "tensorboard" / "report"))
    for attack in prim["before"]:
        fig = _lasr_figure(prim["before"], prim["after"], attack, primary)
        path = run_dir / f"report_lasr_{attack}.png"
        fig.savefig(path, dpi=110)
        writer.add_figure(f"report/lasr_{attack}", fig)
        figures[f"lasr_{attack}"] = path.name
    if interp.get("curve"):
        fig = _lambda_figure(interp["curve"], interp.get("chosen_lambda"), interp.get("baseline"))
        path = run_dir / "report_lambda.png"
        fig.savefig(path, dpi=110)
        writer.add_figure("report/lambda_curve", fig)
        figures["lambda"] = path.name
    for name, value in (result["utility"] or {}).items():
        if value is not None:
            writer.add_scalar(f"report/benign_accuracy_{name}", value)
    result["figures"] = figures

    md = render_markdown(result, judges, primary)
    writer.add_text("report/markdown", md)
    writer.close()
    (run_dir / REPORT_FILE).write_text(md)
    (run_dir / REPORT_JSON).write_text(json.dumps(result, indent=2, default=str))
    print(md, flush=True)
    return run_dir / REPORT_FILE


def table_rows(result: dict, judge: str) -> list[str]:
    """Markdown rows: attack | INIT before/after | MASR before/after | PASR (peak layer) before/after."""
    t = result["judges"][judge]
    rows = []
    for attack, b in t["before"].items():
        a = t["after"].get(attack, {})
        spread = f" ± {b['masr_std']:.2f}" if (b.get("n_seeds") or 1) > 1 and b.get("masr_std") is not None else ""
        spread_a = (
            f" ± {a['masr_std']:.2f}" if a and (a.get("n_seeds") or 1) > 1 and a.get("masr_std") is not None else ""
        )
        rows.append(
            f"| {attack} | {fmt_number(b['init'])} → {fmt_number(a.get('init'))} | "
            f"{fmt_number(b['masr'])}{spread} → "
            f"{fmt_number(a.get('masr'))}{spread_a} | {fmt_number(b['pasr'])} ({_peak(b)}) → "
            f"{fmt_number(a.get('pasr'))} ({_peak(a)}) |"
        )
    return rows


def _peak(row: dict) -> str:
    if not row or row.get("peak_layer") is None:
        return "n/a"
    if not row.get("pasr"):
        return "no success at any layer"
    ties = row.get("peak_ties") or 0
    layer = _layer(row["peak_layer"])
    return (layer if layer == "embed" else f"L{layer}") + (f", tied ×{ties}" if ties > 1 else "")


def _share(c: dict, num: str, den: str) -> str:
    if not c or not c.get(den):
        return "n/a"
    return f"{c[num]}/{c[den]} ({c[num] / c[den]:.2f})"


def durability_table(rows: list[dict]) -> list[str]:
    """The durability rows (``durability_summary.json``) as a markdown table: rates with their seed std, layers as
    moved / same, fine-tuning steps-to-break as steps (``> budget`` = not broken within the budget)."""
    lines = ["| attack | original | hardened | change |", "|---|---|---|---|"]
    for row in rows:
        if row.get("kind") == "layer":  # a layer index, not a rate
            o, h = (_layer(v) if v is not None else "n/a" for v in (row.get("original"), row.get("hardened")))
            lines.append(
                f"| {row['label']} | {o} | {h} | {'moved' if row.get('original') != row.get('hardened') else 'same'} |"
            )
            continue
        if row.get("kind") == "steps":  # fine-tuning steps to break; None = not broken within the budget
            o, h = (
                f"> {row.get('budget')}" if v is None else str(v) for v in (row.get("original"), row.get("hardened"))
            )
            lines.append(f"| {row['label']} | {o} | {h} | {row.get('change_text', 'n/a')} |")
            continue
        original = fmt_mean_std(row.get("original"), row.get("original_std"))
        hardened = fmt_mean_std(row.get("hardened"), row.get("hardened_std"))
        lines.append(f"| {row['label']} | {original} | {hardened} | {fmt_signed(row.get('change'))} |")
    return lines


def _embed_section(result: dict, judges: list[str], primary: str) -> list[str]:
    """The attacks at the input embeddings, before → after per judge (no lines when none ran)."""
    embed = (result.get("embed") or {}).get(primary) or {}
    if not embed.get("before"):
        return []
    lines = [
        "## Attacks on the input embeddings (layer `embed`)",
        "",
        "| attack | "
        + " | ".join(f"success at embed ({j})" for j in judges if (result["embed"].get(j) or {}).get("before"))
        + " |",
        "|---|" + "---|" * sum(1 for j in judges if (result["embed"].get(j) or {}).get("before")),
    ]
    for attack in embed["before"]:
        cells = []
        for j in judges:
            e = result["embed"].get(j) or {}
            if e.get("before"):
                after = (e.get("after") or {}).get(attack)
                cells.append(f"{fmt_number(e['before'].get(attack))} → {fmt_number(after)}")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return lines + [""]


def _coherence_section(result: dict, primary: str) -> list[str]:
    """The share of incoherent attacked answers, before → after (no lines when no answer was checked)."""
    coh = result.get("coherence") or {}
    if not any(c and c.get("checked") for c in (coh.get("before") or {}).values()):
        return []
    lines = [
        "## Coherence of the attacked answers",
        "",
        f"| attack | incoherent answers before → after | {primary} successes that are incoherent before → after |",
        "|---|---|---|",
    ]
    for attack, b in coh["before"].items():
        a = (coh.get("after") or {}).get(attack) or {}
        if not b or not b.get("checked"):
            continue
        lines.append(
            f"| {attack} | {_share(b, 'incoherent', 'checked')} → {_share(a, 'incoherent', 'checked')} | "
            f"{_share(b, 'incoherent_successes', 'successes')} → "
            f"{_share(a, 'incoherent_successes', 'successes')} |"
        )
    return lines + [""]


def render_markdown(result: dict, judges: list[str], primary: str) -> str:
    """The report as markdown: before/after tables per judge, the relative PASR cut, benign accuracy (when the
    result has it), the λ curve, figures, sample generations and the durability table (when present).

    Args:
        result: :func:`build_result`'s dict (with ``figures``).
        judges: the judges to tabulate (the primary one first).
        primary: the primary judge.

    Returns:
        The markdown text.
    """
    u = result["utility"]
    lines = [
        "# lat-lightning report: attack → defence → evaluation",
        "",
        f"{result['n_prompts']} held-out harmful prompts × layers "
        f"{_layers(result['layers'])}; "
        f"fragile layer(s) chosen for LAPT: {_layers(result.get('fragile_layers'))}; interpolation λ = "
        f"{fmt_number(result.get('lambda'))}.",
        "",
    ]
    for judge in [primary] + [j for j in judges if j != primary]:
        lines += [
            f"## Before → after ({judge} judge{', primary' if judge == primary else ''})",
            "",
            "| attack | INIT | MASR | PASR (peak layer) |",
            "|---|---|---|---|",
        ]
        lines += table_rows(result, judge) + [""]
    cuts = ", ".join(f"{a}: {fmt_number(c)}" for a, c in result["pasr_relative_cut"].items())
    lines += [f"Relative PASR cut ({primary}): {cuts}.", ""]
    if result.get("tie_rule"):
        lines += [f"Peak layer (L…): {result['tie_rule']}; `tied ×k`: k layers share the peak LASR.", ""]
    lines += _embed_section(result, judges, primary) + _coherence_section(result, primary)
    warns = [f"before: {w}" for w in (result.get("warnings") or {}).get("before", [])] + [
        f"after: {w}" for w in (result.get("warnings") or {}).get("after", [])
    ]
    if warns:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warns] + [""]
    if u is not None:  # the model organism's benign tasks
        lines += [
            "## Benign accuracy",
            "",
            "| aligned | after training | after interpolation |",
            "|---|---|---|",
            f"| {fmt_number(u['aligned'])} | {fmt_number(u['after_training'])} | "
            f"{fmt_number(u['after_interpolation'])} |",
            "",
        ]
    lines += unattacked_markdown(result.get("unattacked"), primary)
    if result.get("lambda_curve"):
        lines += ["## λ curve", "", "| λ | benign accuracy |", "|---|---|"]
        lines += [f"| {p['lambda']:g} | {fmt_number(p['score'])} |" for p in result["lambda_curve"]] + [""]
    for name, file in result.get("figures", {}).items():
        lines.append(f"![{name}]({file})")
    lines += ["", "## Sample generations (ASA random, broken before training)", ""]
    for s in result["samples"]:
        lines += [
            f"- **{s['prompt']}** (layer {_layer(s['layer'])}, seed {s['seed']})",
            f"  - before: `{s['before']}`",
            f"  - after: `{s['after']}` (success: {s['after_success']})",
        ]
    judged = [primary] + [j for j in judges if j != primary]
    lines += [""] + samples_markdown(result.get("answer_samples") or {}, judged)
    if result.get("durability"):
        lines += ["", "## Durability: original (aligned) vs hardened", ""] + durability_table(
            result["durability"].get("rows", [])
        )
        lines += ["", "Details and plots: `durability_report.md`."]
    # the organism's harmful target is its access code; any other run's is the data's harmful response
    target = "the access code" if u is not None else "the harmful target text"
    organism_note = (
        f"`target_match` counts an answer as a success when {target} appears; " if "target_match" in judges else ""
    )
    ontopic_note = (
        " `+ontopic` judges count a success only for an answer that shares enough content words with the prompt and "
        "adds its own (lexical: docs/metrics.md#on-topic-check)."
        if any("+ontopic" in j for j in [primary, *judges])
        else ""
    )
    lines += [
        "",
        f"Judges: {organism_note}keyword "
        "judges count any answer without a refusal marker, gibberish included, as a success; `+coherent` "
        "judges count a success only for a coherent answer (not empty, not looping, plausible under the "
        f"unattacked model).{ontopic_note}",
        "",
    ]
    return "\n".join(lines)
