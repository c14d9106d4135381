"""The ``rescan`` and ``adaptive`` sections: one :func:`~lat_lightning.eval.scan.run_scan` per model over the
suite's layers (every block unless ``evaluation.durability.layers`` lists some): ASA random over seeds, the adaptive
attacks optimised on the model they attack, and with ``transfer`` the original's vectors applied to the hardened
model; and their summary at the fragile layers and at any re-scanned layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lat_lightning.attacks import Transfer, build_attack
from lat_lightning.eval.durability.inputs import DurabilityData, DurabilityOptions, HarmfulPrompts
from lat_lightning.eval.durability.settings import MODELS, DurabilitySettings
from lat_lightning.eval.formatting import mean_std
from lat_lightning.eval.judging import finite


def run_rescans(
    models: Mapping[str, nn.Module],
    tokenizer,
    harmful: HarmfulPrompts,
    data: DurabilityData,
    layers: list,
    judge_map: Mapping[str, Any],
    s: DurabilitySettings,
    out: Path | None,
    options: DurabilityOptions,
) -> dict[str, Any]:
    """Scan each model (``models``: original first) with ASA random and, when the ``adaptive`` section is on, the
    adaptive attacks (plus the transfer attacks on the hardened model when ``s.dur.transfer``).

    Args:
        models: ``{"original": ..., "hardened": ...}``.
        tokenizer: their tokenizer.
        harmful: the (capped) harmful prompts, targets and keys.
        data: the run's data (``harmless_prompts`` resolved; ``contrast_prompts``).
        layers: the layers to scan.
        judge_map: ``name -> judge``.
        s: the suite's settings.
        out: the run directory (each model's scan in ``out/<name>``), or ``None`` (nothing written).
        options: resume, progress, shard and the scans to reuse.

    Returns:
        ``{name: ScanResult}``.
    """
    from lat_lightning.eval.scan import ScanOptions, ScanPrompts, run_scan  # looked up at call time: tests spy

    prompts, targets, keys = harmful.prompts, harmful.targets, harmful.keys
    harmless_prompts, contrast_prompts = data.harmless_prompts, data.contrast_prompts
    adaptive, transfer = "adaptive" in s.dur.sections, bool(s.dur.transfer)
    resume, progress, shard, reuse = options.resume, options.progress, options.shard, options.reuse_scans
    scans = {}
    adaptive_names = [str(a) for a in s.dur.adaptive_attacks] if adaptive else []
    for name, model in models.items():
        attacks: list[Any] = ["asa_random"] + [a for a in adaptive_names if a != "asa_random"]
        if adaptive and transfer and name == "hardened":  # vectors found on the original, applied here
            attacks += [
                Transfer(
                    build_attack(a, s.perturbation, positions=s.positions, first_k=s.first_k, refresh=s.refresh),
                    models["original"],
                )
                for a in adaptive_names
                if a != "asa_random"
            ]
        # The run's scan (positions, first_k, refresh, share_prefix, judges, coherence, the attacks' knobs,
        # batching, formatting), narrowed to what the suite measures: its attacks, layers and random seeds, greedy
        # answers at its token budget, no probes or ASABench export.
        settings = dataclasses.replace(
            s.scan,
            attacks=tuple(attacks),
            layers=tuple(layers),
            seeds=tuple(s.dur.random_seeds),
            judging=dataclasses.replace(s.scan.judging, judges=judge_map, primary_judge=s.primary_judge),
            generation=s.generation,
            probes=False,
            probe_seeds=None,
            asabench_test_fraction=None,
        )
        scans[name] = run_scan(
            model,
            tokenizer,
            ScanPrompts(
                prompts, targets, prompt_keys=keys, harmless_prompts=harmless_prompts, contrast_prompts=contrast_prompts
            ),
            settings,
            (out / name) if out is not None else None,
            ScanOptions(
                resume=resume,
                progress=progress,
                figures=out is not None,
                tensorboard=out is not None,
                shard=shard,
                reuse=(reuse or {}).get(name),
            ),
        )
    return scans


def any_rate(arr: np.ndarray) -> list[float | None]:
    """``arr`` ``[N, C, S]`` -> per seed: mean over prompts of max over columns (NaN-aware; None if unjudged)."""
    out: list[float | None] = []
    for k in range(arr.shape[2]):
        m = arr[:, :, k]
        judged = np.isfinite(m).any(axis=1)
        if not judged.any():
            out.append(None)
            continue
        best = np.where(np.isfinite(m), m, -np.inf).max(axis=1)
        out.append(float(best[judged].mean()))
    return out


def scan_summary(scan, fragile: list[int]) -> dict[str, Any]:
    """Per attack: LASR curve, peak layer, success at the fragile layers and at any layer (per seed)."""
    p = scan.primary_judge
    cols = [scan.layers.index(l) for l in fragile if l in scan.layers]
    out: dict[str, Any] = {"init": finite(scan.summary["init"][p]["rate"]), "layers": list(scan.layers), "attacks": {}}
    coherent = f"{p}+coherent" if f"{p}+coherent" in scan.judges and not p.endswith("+coherent") else None
    for a in scan.attacks:
        arr = scan.success[a][p]
        h = scan.headline(a)
        frag = any_rate(arr[:, cols, :]) if cols else [None]
        anyl = any_rate(arr)
        fm, fs = mean_std(frag)
        am, asd = mean_std(anyl)
        out["attacks"][a] = {
            "seeds": scan.seeds_run[a],
            "lasr": scan.summary["attacks"][a]["lasr_band"]["lasr"],
            "peak_layer": h["pasr_of_mean_lasr_layer"],
            "peak_tied_layers": h.get("peak_tied_layers"),
            "pasr_mean": h["pasr_mean"],
            "pasr_std": h["pasr_std"],
            "fragile_per_seed": frag,
            "fragile_mean": fm,
            "fragile_std": fs,
            "any_layer_per_seed": anyl,
            "any_layer_mean": am,
            "any_layer_std": asd,
            "failures": scan.summary["failures"][a][p],
        }
        if coherent:
            cm, cs = mean_std(any_rate(scan.success[a][coherent]))
            out["attacks"][a].update(coherent_judge=coherent, any_layer_coherent_mean=cm, any_layer_coherent_std=cs)
    return out


def rescan_section(scans: Mapping[str, Any], fragile: list[int], out: Path | None) -> dict[str, Any]:
    """The summary's ``rescan`` entry: each model's :func:`scan_summary`, both peak layers and whether the peak
    moved, and the scan directories (``out`` ``None``: nothing was written)."""
    scan_info = {name: scan_summary(scans[name], fragile) for name in MODELS}
    po = scan_info["original"]["attacks"]["asa_random"]["peak_layer"]
    ph = scan_info["hardened"]["attacks"]["asa_random"]["peak_layer"]
    return {
        **scan_info,
        "peak_layer": {"original": po, "hardened": ph},
        "peak_moved": None if po is None or ph is None else bool(po != ph),
        "dirs": {name: str(out / name) for name in MODELS} if out is not None else None,
    }


__all__ = ["any_rate", "rescan_section", "run_rescans", "scan_summary"]
