"""Stage ``evaluate``: the evaluation metrics (:class:`lat_lightning.eval.evaluate.SafetyEvaluator`) of
``evaluation.model_path`` (or ``model``), written to ``evaluation.json`` / ``evaluation.md``."""

from __future__ import annotations

import math
from pathlib import Path

from lat_lightning.stages.common import load_stage_model


def run(cfg, run_dir: Path) -> dict:
    """Evaluate the model on the held-out data of the config.

    Returns:
        ``{"metrics": {name: value or None}}``.
    """
    from omegaconf import OmegaConf

    from lat_lightning.eval.evaluate import SafetyEvaluator, load_evaluation_data, write_evaluation
    from lat_lightning.models.layers import parse_layers
    from lat_lightning.models.loading import load_tokenizer

    mcfg = cfg.model
    if cfg.evaluation.model_path:
        mcfg = OmegaConf.merge(cfg.model, {"name_or_path": cfg.evaluation.model_path, "gguf_file": None})
        mcfg.lora.enabled = False
    model = load_stage_model(cfg, mcfg)
    tokenizer = load_tokenizer(mcfg)
    layers = None if cfg.evaluation.layers is None else parse_layers(cfg.evaluation.layers, "evaluation.layers")
    # SafetyEvaluator's annotation (eval/evaluate.py) says int layers; it hands them to run_scan, which expands "all"
    evaluator = SafetyEvaluator(cfg, load_evaluation_data(cfg), layers)  # type: ignore[arg-type]
    metrics = evaluator.run(model, tokenizer, sample_limit=cfg.logging.sample_generations)
    write_evaluation(run_dir, metrics, evaluator.samples)
    return {"metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()}}


__all__ = ["run"]
