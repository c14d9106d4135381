"""Stage ``report``: ``report.md``, ``report.json``, PNGs and TensorBoard figures of any run with a scan
(:mod:`lat_lightning.eval.report`).

Runs of the model organism (a run directory with ``organism.json``) also get its benign accuracy: aligned (from
``organism.json``), after training (``final/``) and after interpolation (``interpolated/``), measured here on
the organism's held-out benign tasks with the seed recorded in ``organism.json``. For the real organism that figure
is benign agreement (the ``contains`` utility on its ``agreement`` rows, :mod:`lat_lightning.organism.real_eval`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lat_lightning.stages.common import load_stage_model


def _benign_accuracy(cfg, model_dir: Path, seed: int) -> Optional[float]:
    """The organism's benign accuracy of a saved model, ``None`` when ``model_dir`` holds no model."""
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.models.settings import ModelSettings
    from lat_lightning.organism.utility import organism_accuracy

    if not (model_dir / "config.json").exists():
        return None
    mcfg = ModelSettings(name_or_path=str(model_dir))
    return organism_accuracy(load_stage_model(cfg, mcfg), load_tokenizer(mcfg), seed=seed)


def _agreement(cfg, model_dir: Path, organism: dict) -> Optional[float]:
    """The real organism's benign agreement of a saved model, ``None`` when ``model_dir`` holds no model."""
    from lat_lightning.eval.utility import evaluate_utility
    from lat_lightning.eval.utility_rows import load_utility_rows
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.models.settings import ModelSettings

    if not (model_dir / "config.json").exists():
        return None
    mcfg = ModelSettings(name_or_path=str(model_dir))
    rows = load_utility_rows(str(Path(organism["data"]) / "agreement.jsonl"), "contains")
    tokens = int(organism["build"]["settings"]["agreement_tokens"])
    model, tokenizer = load_stage_model(cfg, mcfg), load_tokenizer(mcfg)
    return evaluate_utility(model, tokenizer, rows, kind="contains", max_new_tokens=tokens)["accuracy"]


def _utility(cfg, run_dir: Path) -> Optional[dict]:
    """Benign accuracy (toy organism) or agreement (real organism): aligned, after training, after interpolation."""
    if not (run_dir / "organism.json").is_file():
        return None
    organism = json.loads((run_dir / "organism.json").read_text())
    if organism["build"].get("kind") == "real":
        return {
            "aligned": organism["aligned"]["agreement"],
            "after_training": _agreement(cfg, run_dir / "final", organism),
            "after_interpolation": _agreement(cfg, run_dir / "interpolated", organism),
        }
    seed = int(organism["build"]["seed"])
    return {
        "aligned": organism.get("benign_accuracy"),
        "after_training": _benign_accuracy(cfg, run_dir / "final", seed),
        "after_interpolation": _benign_accuracy(cfg, run_dir / "interpolated", seed),
    }


def run(cfg, run_dir: Path) -> dict:
    """Write the report of ``run_dir``.

    Returns:
        ``{"report": path of report.md}``.

    Raises:
        ConfigError: the run has no ``scan_summary.json``.
    """
    from lat_lightning.eval.report import build_result, load_scan_summary, write_report

    run_dir = Path(run_dir)
    primary = cfg.evaluation.primary_judge
    summary = load_scan_summary(run_dir)  # fail before measuring anything
    # the configured judges, then the coherence-aware twins the scan added
    judges = list(cfg.evaluation.judges)
    judges += [j for j in summary.get("judges", []) if j not in judges]
    utility = _utility(cfg, run_dir)
    result = build_result(run_dir, judges, primary, utility)
    return {"report": str(write_report(run_dir, result, judges, primary))}


__all__ = ["run"]
