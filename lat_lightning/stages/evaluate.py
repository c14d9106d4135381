"""Stage ``evaluate``: the evaluation metrics (:class:`lat_lightning.eval.evaluate.SafetyEvaluator`) of
``evaluation.model_path`` (or ``model``), written to ``evaluation.json`` / ``evaluation.md``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from lat_lightning.eval.evaluate import EvaluationData
from lat_lightning.stages.common import load_stage_model


def load_evaluation_data(cfg) -> EvaluationData:
    """Read ``data.eval_harmful``, ``data.eval_benign`` and ``evaluation.utility_data`` (each optional)."""
    from lat_lightning.data.loaders import load_benign_examples, load_safety_examples

    data = EvaluationData(
        utility_kind=cfg.evaluation.utility_kind, over_refusal_judge=str(cfg.evaluation.over_refusal_judge)
    )
    if cfg.data.eval_harmful:
        data.harmful = load_safety_examples(
            cfg.data.eval_harmful,
            cfg.data.harmful_split,
            dict(cfg.data.harmful_columns or {}),
            cfg.data.default_safe_response,
            cfg.evaluation.num_prompts,
            default_target=cfg.data.default_target,
            require_target=False,
            row_filter=dict(cfg.data.filter or {}),
        )
    if cfg.data.eval_benign:
        data.benign_prompts = [
            ex.prompt
            for ex in load_benign_examples(
                cfg.data.eval_benign,
                cfg.data.benign_split,
                dict(cfg.data.benign_columns or {}),
                cfg.evaluation.num_prompts,
            )
        ]
    if cfg.evaluation.utility_data:
        from lat_lightning.eval.utility import load_utility_rows

        data.utility_rows = load_utility_rows(cfg.evaluation.utility_data, cfg.evaluation.utility_kind)
    return data


def run(cfg, run_dir: Path) -> dict:
    """Evaluate the model on the held-out data of the config.

    Returns:
        ``{"metrics": {name: value or None}}``.
    """

    from lat_lightning.eval.evaluate import SafetyEvaluator, write_evaluation
    from lat_lightning.models.layers import parse_layers
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.stages.settings import model_settings, validation_settings

    mcfg = model_settings(cfg)
    if cfg.evaluation.model_path:
        mcfg = dataclasses.replace(
            mcfg,
            name_or_path=str(cfg.evaluation.model_path),
            gguf_file=None,
            lora=dataclasses.replace(mcfg.lora, enabled=False),
        )
    model = load_stage_model(cfg, mcfg)
    tokenizer = load_tokenizer(mcfg)
    layers = None if cfg.evaluation.layers is None else parse_layers(cfg.evaluation.layers, "evaluation.layers")
    evaluator = SafetyEvaluator(validation_settings(cfg), load_evaluation_data(cfg), layers)
    metrics = evaluator.run(model, tokenizer, sample_limit=cfg.logging.sample_generations)
    write_evaluation(run_dir, metrics, evaluator.samples)
    return {"metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()}}


__all__ = ["load_evaluation_data", "run"]
