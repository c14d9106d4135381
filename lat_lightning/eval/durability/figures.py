"""The durability suite's figures (``durability_*.png``) and outputs: the PNGs, the report and TensorBoard."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lat_lightning.eval.durability.settings import MODELS
from lat_lightning.eval.durability.table import REPORT_FILE, render_report

log = logging.getLogger(__name__)

STYLES: dict[str, dict[str, Any]] = {
    "original": dict(color="tab:blue", ls="-"),
    "hardened": dict(color="tab:red", ls="--"),
}


def _nan(values) -> list[float]:
    """``None`` -> NaN, so that a missing point is a gap in the line."""
    return [np.nan if v is None else v for v in values]


def _lasr_figure(rs: Mapping[str, Any], fragile: list[int]):
    """The LASR curves of both models per re-scan attack, the fragile layers dotted."""
    from matplotlib.figure import Figure

    attacks = [a for a in rs["original"]["attacks"] if a in rs["hardened"]["attacks"]]
    fig = Figure(figsize=(4.2 * len(attacks), 3.4))
    for j, a in enumerate(attacks):
        ax = fig.add_subplot(1, len(attacks), j + 1)
        for name in MODELS:
            ax.plot(rs[name]["layers"], _nan(rs[name]["attacks"][a]["lasr"]), marker="o", label=name, **STYLES[name])
        for l in fragile:
            ax.axvline(l, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
        layers = rs["original"]["layers"]
        ax.set_xticks(layers[:: max(1, len(layers) // 16)])
        ax.set_xlabel("layer")
        ax.set_ylabel("LASR")
        ax.set_title(f"{a} (dotted: fragile layers)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _first_k_figure(dp: Mapping[str, Any]):
    """Success of each depth attack on the first k positions only, per model (ASA random with its seed spread)."""
    from matplotlib.figure import Figure

    ks = dp["original"]["ks"]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(111)
    for name in MODELS:
        for a, fk in dp[name]["first_k"].items():
            y = np.array(_nan(fk["mean"]), dtype=float)
            err = np.array([0.0 if v is None else v for v in fk["std"]], dtype=float)
            ax.errorbar(
                ks,
                y,
                yerr=err if a == "asa_random" else None,
                marker="o" if a == "asa_random" else "s",
                capsize=2,
                label=f"{name}: {a}",
                color=STYLES[name]["color"],
                ls="-" if a == "asa_random" else "--",
            )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ks)
    ax.set_xlabel("k (perturbed positions: last prompt token + first k-1 generated)")
    ax.set_ylabel("attack success")
    ax.set_title("Refusal depth: perturbation on the first k positions only", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _prefill_figure(dp: Mapping[str, Any]):
    """Success of the pre-fill attack per number of pre-filled target tokens, per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(111)
    for name in MODELS:
        pf = dp[name]["prefill"]
        ax.plot(pf["ks"], _nan(pf["rate"]), marker="o", label=name, **STYLES[name])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(dp["original"]["prefill"]["ks"])
    ax.set_xlabel("k (harmful target tokens pre-filled)")
    ax.set_ylabel("attack success")
    ax.set_title("Prefill attack (no perturbation)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _attack_panel(ax, fa: Mapping[str, Any], key: str, ylabel: str) -> None:
    """One fine-tuning-attack panel (``success`` or ``harmful_loss``): mean over seeds, band = min..max."""
    for name in MODELS:
        c = fa[name]
        per_seed = np.array([_nan(vals) for vals in c[key].values()], dtype=float)
        mean = np.array(_nan(c[f"{key}_mean"]), dtype=float)
        ax.plot(
            c["eval_steps"], mean, marker="o", ms=3, label=f"{name} (mean of {len(c['seeds'])} seeds)", **STYLES[name]
        )
        if per_seed.shape[0] > 1:
            # only where every seed was measured (a fine-tune stopped at its break has no later points), like the mean
            reached = ~np.isnan(mean) if c.get("stop_at_break") else np.ones(per_seed.shape[1], bool)
            with warnings.catch_warnings():  # an unjudged step of every seed: no band there
                warnings.simplefilter("ignore", RuntimeWarning)
                low, high = np.nanmin(per_seed, axis=0), np.nanmax(per_seed, axis=0)
            ax.fill_between(
                c["eval_steps"],
                np.where(reached, low, np.nan),
                np.where(reached, high, np.nan),
                color=STYLES[name]["color"],
                alpha=0.15,
                lw=0,
            )
        stb = c["steps_to_break_median"]
        if key == "success" and stb is not None:
            ax.axvline(stb, color=STYLES[name]["color"], lw=0.8, ls=":")
    if key == "success":
        ax.axhline(fa["break_rate"], color="grey", lw=0.8, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(
            f"fine-tuning attack: success (dashed: break rate {fa['break_rate']:g},\n"
            "dotted: median steps to break; band: min..max over seeds)",
            fontsize=8,
        )
    else:
        start = fa["original"]["harmful_loss_mean"][0]
        if start is not None:  # where the original started: crossing it is distance covered, not resistance
            ax.axhline(start, color="grey", lw=0.8, ls=":")
        ax.set_title("fine-tuning attack: harmful-target CE\n(dotted: the original's at step 0)", fontsize=8)
    ax.set_xlabel("LoRA step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _curve_panel(ax, summary: Mapping[str, Any], sec: str, key: str) -> None:
    """One learning-curve panel of a section (``trainability``): ``key`` per optimiser step, per model."""
    for name in MODELS:
        c = summary[sec][name]["curve"]
        ax.plot(
            [p["step"] for p in c],
            [np.nan if p.get(key) is None else p[key] for p in c],
            marker="o",
            label=name,
            **STYLES[name],
        )
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(key)
    ax.set_title(f"{sec}: {key}", fontsize=9)
    ax.legend(fontsize=7)


def _finetune_figure(summary: Mapping[str, Any]):
    """The fine-tuning attack's panels and the trainability curves side by side (``None``: neither ran)."""
    from matplotlib.figure import Figure

    fa = summary.get("finetune_attack") if (summary.get("finetune_attack") or {}).get("original") else None
    attack_panels = [("success", "attack success"), ("harmful_loss", "harmful-target CE")] if fa else []
    curves = [
        (k, key)
        for k, key in (("trainability", "task_loss"), ("trainability", "utility"))
        if summary.get(k) and "original" in summary[k] and any(key in p for p in summary[k]["original"]["curve"])
    ]
    if not (attack_panels or curves):
        return None
    n_panels = len(attack_panels) + len(curves)
    fig = Figure(figsize=(4.2 * n_panels, 3.4))
    for j, (key, ylabel) in enumerate(attack_panels):
        assert fa is not None  # attack_panels is empty without it
        _attack_panel(fig.add_subplot(1, n_panels, j + 1), fa, key, ylabel)
    for j, (sec, key) in enumerate(curves, start=len(attack_panels)):
        _curve_panel(fig.add_subplot(1, n_panels, j + 1), summary, sec, key)
    fig.tight_layout()
    return fig


def figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``name -> matplotlib Figure`` of every section the summary has."""
    figs: dict[str, Any] = {}
    rs = summary.get("rescan")
    if rs:
        figs["durability_lasr"] = _lasr_figure(rs, summary.get("fragile_layers", {}).get("layers", []))
    dp = summary.get("depth")
    if dp:
        figs["durability_first_k"] = _first_k_figure(dp)
        figs["durability_prefill"] = _prefill_figure(dp)
    fig = _finetune_figure(summary)
    if fig is not None:
        figs["durability_finetune"] = fig
    return figs


def _add_scalars(writer, tag: str, points: Iterable[tuple[Any, Any]], steps: bool = False) -> None:
    """Each ``(x, value)`` point with a value as a TensorBoard scalar of ``tag``. ``steps``: a learning curve (``x``
    an optimiser step, written as an int; non-finite values are skipped too)."""
    for x, v in points:
        if v is None or (steps and not math.isfinite(v)):
            continue
        writer.add_scalar(tag, v, int(x) if steps else x)


def _rescan_scalars(writer, rs: Mapping[str, Any] | None, name: str) -> None:
    """LASR by layer of each re-scan attack."""
    if not rs:
        return
    for a, e in rs.get("attacks", {}).items():
        _add_scalars(writer, f"durability/lasr_{a}/{name}", zip(rs["layers"], e["lasr"]))


def _depth_scalars(writer, dp: Mapping[str, Any] | None, name: str) -> None:
    """First-k success of each depth attack and pre-fill success, by k."""
    if not dp:
        return
    for a, fk in dp["first_k"].items():
        _add_scalars(writer, f"durability/first_k_{a}/{name}", zip(dp["ks"], fk["mean"]))
    _add_scalars(writer, f"durability/prefill/{name}", zip(dp["prefill"]["ks"], dp["prefill"]["rate"]))


def _finetune_attack_scalars(writer, fa: Mapping[str, Any] | None, name: str) -> None:
    """The fine-tuning attack's mean success and harmful-target CE, by step."""
    if not fa:
        return
    for key in ("success_mean", "harmful_loss_mean"):
        _add_scalars(writer, f"durability/finetune_attack_{key}/{name}", zip(fa["eval_steps"], fa[key]), steps=True)


def _trainability_scalars(writer, e: Mapping[str, Any] | None, name: str) -> None:
    """Each trainability curve value (held-out task loss, utility; mean over seeds), by step."""
    for p in (e or {}).get("curve", []):
        for key, v in p.items():
            if key != "step" and not key.endswith("_std"):
                _add_scalars(writer, f"durability/trainability_{key}/{name}", [(p["step"], v)], steps=True)


def _curve_scalars(writer, summary: Mapping[str, Any], name: str) -> None:
    """One model's curves as TensorBoard scalars: LASR by layer, first-k and pre-fill by k, the fine-tuning attack
    and trainability by step."""
    _rescan_scalars(writer, (summary.get("rescan") or {}).get(name), name)
    _depth_scalars(writer, (summary.get("depth") or {}).get(name), name)
    _finetune_attack_scalars(writer, (summary.get("finetune_attack") or {}).get(name), name)
    _trainability_scalars(writer, (summary.get("trainability") or {}).get(name), name)


def _write_tensorboard(summary: Mapping[str, Any], out: Path, pngs: Mapping[str, bytes], report: str) -> None:
    """The rows and curves as scalars, the figures as images and the report as text, in ``out/tensorboard``."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    try:
        for r in summary["rows"]:
            for name in MODELS:
                if r[name] is not None:
                    writer.add_scalar(f"durability/{r['id']}/{name}", r[name], 0)
            if r["change"] is not None:
                writer.add_scalar(f"durability/{r['id']}/change", r["change"], 0)
        for name in MODELS:
            _curve_scalars(writer, summary, name)
        for name, png in pngs.items():
            writer.add_image(
                f"durability/{name}", np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), dataformats="HWC"
            )
        writer.add_text("durability/report", report)
    finally:
        writer.close()


def write_outputs(summary: dict[str, Any], out: Path) -> dict[str, str]:
    """Figures (PNG + TensorBoard images), TensorBoard scalars and the report. Returns figure name -> file."""
    pngs: dict[str, bytes] = {}
    paths: dict[str, str] = {}
    for name, fig in figures(summary).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        pngs[name] = buf.getvalue()
        (out / f"{name}.png").write_bytes(pngs[name])
        paths[name] = f"{name}.png"
    summary["figures"] = paths
    report = render_report(summary)
    (out / REPORT_FILE).write_text(report)
    try:
        _write_tensorboard(summary, out, pngs, report)
    except Exception as exc:  # noqa: BLE001 - files on disk are the primary output
        log.warning("could not write TensorBoard output: %s", exc)
    return paths


__all__ = ["figures", "write_outputs"]
