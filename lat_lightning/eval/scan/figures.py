"""The scan's figures: a success heatmap (prompts x layers) and a LASR-by-layer plot with its bootstrap band per
attack, the probe plots, as PNGs and in TensorBoard."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lat_lightning.eval.scan.summary import ScanResult, fmt
from lat_lightning.models.layers import layer_name

log = logging.getLogger(__name__)


def _heatmap_figure(matrix: np.ndarray, layers: list[int], title: str):
    from matplotlib.figure import Figure

    n = matrix.shape[0]
    fig = Figure(figsize=(max(4.0, 0.35 * len(layers) + 2), max(3.0, min(0.25 * n + 1.5, 14))))
    ax = fig.add_subplot(111)
    masked = np.ma.masked_invalid(matrix)
    cmap = _cmap()
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("prompt")
    step = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([layer_name(layers[k]) for k in range(0, len(layers), step)])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="success rate (grey: judge failure)")
    fig.tight_layout()
    return fig


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")


def _lasr_figure(layers: list[int], band: dict, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(111)
    y = np.array([np.nan if v is None else v for v in band["lasr"]], dtype=float)
    ax.plot(layers, y, marker="o", label="LASR (mean over seeds)")
    if band.get("low") is not None:
        lo = np.array([np.nan if v is None else v for v in band["low"]], dtype=float)
        hi = np.array([np.nan if v is None else v for v in band["high"]], dtype=float)
        ax.fill_between(layers, lo, hi, alpha=0.25, label="95% bootstrap CI")
    ax.set_ylim(-0.02, 1.02)
    ticks = layers[:: max(1, len(layers) // 16)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([layer_name(l) for l in ticks])  # the input embeddings show as "embed"
    ax.set_xlabel("layer")
    ax.set_ylabel("LASR")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _probe_figures(probes: dict):
    from matplotlib.figure import Figure

    layers = probes["layers"]
    fig_nll = Figure(figsize=(6, 3.5))
    ax = fig_nll.add_subplot(111)
    mean = [probes["nll"][str(l)]["delta_nll_mean"] for l in layers]
    std = [probes["nll"][str(l)]["delta_nll_std"] or 0.0 for l in layers]
    ax.errorbar(layers, [np.nan if m is None else m for m in mean], yerr=std, marker="o", capsize=2)
    ax.axhline(0.0, color="grey", lw=0.8)
    ticks = list(layers)[:: max(1, len(layers) // 16)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([layer_name(l) for l in ticks])  # the input embeddings show as "embed"
    ax.set_xlabel("layer")
    ax.set_ylabel("ΔNLL of the clean answer")
    ax.set_title("NLL probe (ASA noise vs clean)", fontsize=9)
    fig_nll.tight_layout()
    fig_kl = Figure(figsize=(6, 3.5))
    ax = fig_kl.add_subplot(111)
    for l in layers:
        curve = probes["position_kl"].get(str(l)) or []
        ax.plot(range(len(curve)), [np.nan if v is None else v for v in curve], label=f"layer {layer_name(l)}", lw=1)
    ax.set_xlabel("generated position t")
    ax.set_ylabel("KL(clean || perturbed)")
    ax.set_title("Position KL (teacher-forced on the clean answer)", fontsize=9)
    if len(layers) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig_kl.tight_layout()
    return fig_nll, fig_kl


def write_figures(result: ScanResult, out_dir: Path, tensorboard: bool = True) -> dict[str, str]:
    """Heatmaps, LASR plots (and probe plots) as PNGs in ``out_dir`` and figures in TensorBoard."""
    figs: dict[str, Any] = {}
    for a in result.attacks:
        arr = result.success[a][result.primary_judge]
        with np.errstate(all="ignore"):
            rate = (
                np.where(
                    np.isfinite(arr).any(axis=2), np.nanmean(np.where(np.isfinite(arr), arr, np.nan), axis=2), np.nan
                )
                if arr.shape[2]
                else np.full(arr.shape[:2], np.nan)
            )
        title = (
            f"{a}: success ({result.primary_judge}) over {arr.shape[2]} seed(s), "
            f"{len(result.prompts)} prompts x {len(result.layers)} layers"
        )
        figs[f"scan_heatmap_{a}"] = _heatmap_figure(rate, result.layers, title)
        h = result.summary["attacks"][a]["headline"]
        title = (
            f"{a}: LASR by layer ({result.primary_judge}); PASR {fmt(h['pasr_mean'])}, "
            f"MASR {fmt(h['masr_mean'])}, INIT {fmt(h['init'])}"
        )
        figs[f"scan_lasr_{a}"] = _lasr_figure(result.layers, result.summary["attacks"][a]["lasr_band"], title)
    if result.probes:
        figs["probe_nll"], figs["probe_position_kl"] = _probe_figures(result.probes)
    paths, pngs = {}, {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)  # rendered once: the same PNG goes to disk and TensorBoard
        pngs[name] = buf.getvalue()
        path = out_dir / f"{name}.png"
        path.write_bytes(pngs[name])
        paths[name] = str(path.name)
    if tensorboard:
        try:
            from PIL import Image
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            try:
                for name, png in pngs.items():
                    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                    writer.add_image(f"scan/{name}", img, dataformats="HWC")
                for a in result.attacks:
                    band = result.summary["attacks"][a]["lasr_band"]["lasr"]
                    for l, v in zip(result.layers, band):
                        if v is not None:
                            writer.add_scalar(f"scan/{a}/lasr", v, global_step=l)
            finally:
                writer.close()
        except Exception as exc:  # noqa: BLE001 - figures on disk are the primary output
            log.warning("could not write TensorBoard figures: %s", exc)
    return paths


def tensorboard_text(out_dir: Path, result: ScanResult, report: str) -> None:
    """The report and the headline numbers in ``out_dir/tensorboard`` (a failure is logged, not raised)."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        writer.add_text("scan/report", report)
        for a in result.attacks:
            h = result.summary["attacks"][a]["headline"]
            for k in ("pasr_mean", "masr_mean", "init"):
                if h.get(k) is not None:
                    writer.add_scalar(f"scan/{a}/{k}", h[k], 0)
        writer.close()
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write TensorBoard text: %s", exc)


__all__ = ["tensorboard_text", "write_figures"]
