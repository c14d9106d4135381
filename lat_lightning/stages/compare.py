"""Stage ``compare``: which defence holds against which attack, at equal utility (``docs/defences.md``).

1. The starting model (``model``) is attacked by the battery (``compare.include_original``), which also gives the
   LASR per layer that picks the attacked layers once for every defence (``callbacks.fragile_layers``; or
   ``perturbation.layers`` when that callback is off).
2. Each defence of ``compare.defences`` (:data:`lat_lightning.stages.defences.DEFENCES`) is trained by the
   ``fit`` stage into ``compare/<defence>/`` from the same model and data, then interpolated with the original to
   the same utility tolerance (``callbacks.weight_interpolation``), then attacked by the same battery.
3. The battery, per model (``compare/<model>/battery.json``): utility; ``evaluation.attacks`` at
   ``evaluation.layers`` (MASR); ``compare.embed_attacks`` at the input embeddings; the pre-fill attack
   (``compare.prefill_tokens``); the fine-tuning attack curve (``compare.finetune``,
   ``evaluation.durability.finetune_*``).
4. ``compare/compare_report.md``, ``compare_summary.json``, ``compare_heatmap.png``, ``compare_finetune.png`` and
   TensorBoard (``compare/tensorboard``).

A resumed run keeps every finished defence (``compare/<defence>/defence.json``) and battery.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lat_lightning.stages.common import load_stage_model

ORIGINAL = "original"


def _masr(scan, suffix: str = "") -> dict[str, dict]:
    """Per attack of a scan: the primary judge's MASR (mean, std over seeds when random), every judge's, and the
    per-prompt outcomes per seed (broken at any layer: what the comparison's intervals resample)."""
    from lat_lightning.eval.compare_stats import any_layer_outcomes

    out = {}
    for a in scan.attacks:
        h = scan.headline(a)
        seeds = len(scan.seeds_run[a])
        judges = scan.summary["attacks"][a]["judges"]
        index = [scan.seeds.index(sd) for sd in scan.seeds_run[a]]
        out[f"{a}{suffix}"] = {
            "value": h["masr_mean"],
            "std": h["masr_std"] if seeds > 1 else None,
            "seeds": seeds,
            "peak_layer": h["pasr_of_mean_lasr_layer"],
            "judges": {j: v.get("masr_mean") for j, v in judges.items()},
            "per_prompt": any_layer_outcomes(scan.success[a][scan.primary_judge], index),
        }
    return out


@dataclass(frozen=True)
class _Kit:
    """What every battery shares: the tokenizer, the held-out prompts, targets and ids, the utility score and the
    fine-tuning attack's training pairs."""

    tokenizer: Any
    prompts: list
    targets: list
    keys: list
    score_fn: Any
    pairs: Any


def _as_list(result: Any) -> list[dict]:
    return [result] if isinstance(result, dict) else list(result)


def _battery(cfg, model, kit: _Kit, out: Path, extra: dict) -> dict:
    """Attack one model with the whole battery (or read the battery it finished before)."""
    from lat_lightning.eval.compare import prefill_success
    from lat_lightning.eval.compare_stats import outcomes
    from lat_lightning.stages.durability_settings import durability_settings
    from lat_lightning.stages.scan import scan_model

    tokenizer, prompts, targets, keys, score_fn, pairs = (
        kit.tokenizer,
        kit.prompts,
        kit.targets,
        kit.keys,
        kit.score_fn,
        kit.pairs,
    )
    done = out / "battery.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmp = cfg.compare
    settings = durability_settings(cfg)  # judges, decoding, formatting and the fine-tuning attack's knobs
    t0 = time.time()
    res: dict[str, Any] = {**extra, "utility": float(score_fn(model)), "attacks": {}, "seconds": {}}
    res["seconds"]["utility"] = round(time.time() - t0, 2)
    t0 = time.time()
    scan = scan_model(cfg, model, tokenizer, out / "scan", probes=False, progress=False)
    res["init"] = scan.headline()["init"]
    res["init_per_prompt"] = [outcomes(list(scan.clean_success[scan.primary_judge]))]
    res["attacks"].update(_masr(scan))
    if cmp.embed_attacks:
        emb = scan_model(
            cfg,
            model,
            tokenizer,
            out / "embed",
            attacks=list(cmp.embed_attacks),
            layers=["embed"],
            probes=False,
            progress=False,
        )
        res["attacks"].update(_masr(emb, suffix="@embed"))
    res["seconds"]["scan"] = round(time.time() - t0, 2)
    if cmp.prefill_tokens:
        t0 = time.time()
        res["prefill"] = prefill_success(model, tokenizer, prompts, targets, keys, list(cmp.prefill_tokens), settings)
        res["seconds"]["prefill"] = round(time.time() - t0, 2)
    if cmp.finetune:
        from lat_lightning.eval.durability import DurabilityData, finetune_attack_curve
        from lat_lightning.training.finetune import lora_finetune

        t0 = time.time()
        data = DurabilityData(prompts, targets, prompt_keys=keys, finetune_pairs=pairs)
        res["finetune"] = finetune_attack_curve(
            model, tokenizer, data, settings, lora_finetune, out_dir=out / "finetune"
        )
        res["seconds"]["finetune"] = round(time.time() - t0, 2)
    done.write_text(json.dumps(res, indent=2))
    return res


def _attack_layers(cfg, model, tokenizer, out: Path, prompts: list[str]) -> tuple[list | None, str]:
    """The layers every defence attacks in training, chosen once on the starting model."""
    f = cfg.callbacks.fragile_layers
    if not f.enabled:
        return list(cfg.perturbation.layers), "perturbation.layers"
    from lat_lightning.stages.fit_setup import fragile_layer_callback
    from lat_lightning.stages.settings import scan_settings

    selector = fragile_layer_callback(cfg, out / ORIGINAL / "scan", scan_settings(cfg, probes=False))
    selector.prompts = list(prompts)
    result = selector.select(model, tokenizer)
    (out / "fragile_layers.json").write_text(json.dumps(result, indent=2, default=str))
    print(
        f"[compare] attacked layers for every defence: {result['layers']} "
        f"(callbacks.fragile_layers.method={result['method_used']})",
        flush=True,
    )
    return list(result["layers"]), f"callbacks.fragile_layers.method={result['method_used']} on the starting model"


def training_seeds(cfg) -> list[int]:
    """``compare.seeds``, or the run's ``seed`` alone."""
    seeds = cfg.compare.seeds
    return [int(cfg.seed)] if seeds is None else [int(sd) for sd in seeds]


def _seeded(cfg, seed: int, own_battery_seeds: bool):
    """``cfg`` with run seed ``seed``; with ``own_battery_seeds`` the battery's random parts keyed by it too (one ASA
    random noise seed and one fine-tuning LoRA seed: ``compare.battery_seeds=training_seed``)."""
    from omegaconf import OmegaConf

    extra: dict[str, Any] = {"seed": int(seed)}
    if own_battery_seeds:
        extra["evaluation"] = {"seeds": [int(seed)], "durability": {"finetune_seeds": [int(seed)]}}
    return OmegaConf.merge(cfg, extra)


def _defence(cfg, name: str, seed: int, sub: Path, layers, timings: dict, kit: _Kit) -> dict:
    """Train defence ``name`` with training seed ``seed`` into ``sub`` (or keep the one trained before), then
    attack it with the battery."""
    from lat_lightning.models.settings import ModelSettings
    from lat_lightning.stages import fit as fit_stage
    from lat_lightning.stages.defences import DEFENCES, defence_config
    from lat_lightning.stages.rescan import trained_model_path

    several = len(training_seeds(cfg)) > 1
    scfg = _seeded(cfg, seed, several and str(cfg.compare.battery_seeds) == "training_seed")
    tag = f"{name}_seed_{seed}" if several else name
    marker = sub / "defence.json"
    if not marker.is_file():
        t0 = time.time()
        sub.mkdir(parents=True, exist_ok=True)
        info = fit_stage.run(defence_config(scfg, name, layers), sub)
        interp = sub / "interpolation.json"
        lam = json.loads(interp.read_text())["chosen_lambda"] if interp.is_file() else None
        marker.write_text(json.dumps({"fit": info, "lambda": lam, "seconds": round(time.time() - t0, 1)}))
        timings[f"train_{tag}"] = round(time.time() - t0, 1)
    trained = json.loads(marker.read_text())
    path = trained_model_path(sub)
    t0 = time.time()
    model = load_stage_model(scfg, ModelSettings(name_or_path=str(path), dtype=str(cfg.model.dtype)))
    extra = {
        "description": DEFENCES[name].description,
        "lambda": trained["lambda"],
        "model_path": str(path),
        "seed": int(seed),
    }
    res = _battery(scfg, model, kit, sub, extra)
    timings[f"battery_{tag}"] = round(time.time() - t0, 1)
    return res


def run(cfg, run_dir: Path) -> dict:
    """Train every defence, attack every model, write the table.

    Returns:
        The report and summary paths and the table's cells per model.

    Raises:
        ConfigError: an unknown defence or a bad override, no utility rows, no harmful targets.
    """
    from lat_lightning.eval.compare import REPORT_FILE, SUMMARY_FILE, build_table, write_outputs
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.stages.defences import defence_config
    from lat_lightning.stages.fit_setup import utility_score_settings
    from lat_lightning.stages.scan import load_finetune_pairs, load_scan_prompts
    from lat_lightning.stages.settings import model_settings
    from lat_lightning.training.interpolation import utility_score_fn

    t_start = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    cmp = cfg.compare
    for name in cmp.defences:  # fail before any training on a bad name or override
        defence_config(cfg, str(name))
    tokenizer = load_tokenizer(model_settings(cfg))
    score_fn = utility_score_fn(utility_score_settings(cfg), tokenizer)
    prompts, targets, keys = load_scan_prompts(cfg, require_target=bool(cmp.finetune or cmp.prefill_tokens))
    pairs = None
    # the fine-tuning attack trains on evaluation.durability.finetune_data, else data.harmful's training pairs
    if (cfg.evaluation.durability.finetune_data or cfg.data.harmful) and cmp.finetune:
        pairs = load_finetune_pairs(cfg)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    kit = _Kit(tokenizer, prompts, targets, keys, score_fn, pairs)
    model = load_stage_model(cfg)
    if cmp.include_original:
        t0 = time.time()
        results[ORIGINAL] = _battery(
            cfg, model, kit, out / ORIGINAL, {"description": "the starting model, no defence", "lambda": None}
        )
        timings[f"battery_{ORIGINAL}"] = round(time.time() - t0, 1)
    layers, layers_source = _attack_layers(cfg, model, tokenizer, out, prompts)
    del model
    seeds = training_seeds(cfg)
    for name in [str(n) for n in cmp.defences]:
        batteries = [
            _defence(cfg, name, sd, out / name if len(seeds) == 1 else out / name / f"seed_{sd}", layers, timings, kit)
            for sd in seeds
        ]
        results[name] = batteries[0] if len(seeds) == 1 else batteries  # one seed: the earlier layout
    attack_columns = [str(a) for a in cfg.evaluation.attacks] + [f"{a}@embed" for a in cmp.embed_attacks]
    table = build_table(
        results,
        attack_columns,
        [int(k) for k in cmp.prefill_tokens],
        bool(cmp.finetune),
        bootstrap_samples=int(cmp.bootstrap_samples),
    )
    timings["total"] = round(time.time() - t_start, 1)
    ft = next((b["finetune"] for r in results.values() for b in _as_list(r) if b.get("finetune")), None)
    summary = {
        "model": str(cfg.model.name_or_path),
        "n_prompts": len(prompts),
        "primary_judge": str(cfg.evaluation.primary_judge),
        "attack_layers": layers,
        "attack_layers_source": layers_source,
        "utility_kind": str(cfg.callbacks.weight_interpolation.utility),
        "tolerance": float(cfg.callbacks.weight_interpolation.tolerance)
        if cfg.callbacks.weight_interpolation.enabled
        else None,
        "finetune_break_rate": ft["break_rate"] if ft else None,
        # the same training pairs for every model: one caveat holds for all of them (bare-prefix responses)
        "finetune_caveat": ft.get("caveat") if ft else None,
        "seeds": seeds,
        "battery_seeds": str(cmp.battery_seeds),
        "timings": timings,
    }
    figures = write_outputs(table, results, summary, out, tensorboard=bool(cfg.logging.tensorboard))
    print((out / REPORT_FILE).read_text(), flush=True)
    return {
        "report": str(out / REPORT_FILE),
        "summary": str(out / SUMMARY_FILE),
        "figures": figures,
        "timings": timings,
        "cells": {r["model"]: {k: c["value"] for k, c in r["cells"].items()} for r in table["rows"]},
    }


def saved(run_dir: Path) -> str | None:
    """What an interrupted comparison keeps for ``--resume``: its finished defences and batteries."""
    out = Path(run_dir) / "compare"
    trained = sorted(str(p.parent.relative_to(out)) for p in out.glob("**/defence.json"))
    attacked = sorted(str(p.parent.relative_to(out)) for p in out.glob("**/battery.json"))
    if not trained and not attacked:
        return None
    return f"defences trained: {', '.join(trained) or 'none'}; batteries done: {', '.join(attacked) or 'none'} (kept)"


__all__ = ["run", "saved", "training_seeds"]
