"""``val/over_refusal`` reads the benign answers with the run's over-refusal judge (``evaluation.over_refusal_judge``),
not a hard-coded ``keyword`` judge: on real text ``keyword`` misses "I can't" and counts that refusal as an answer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lat_lightning.config import EvaluationConfig
from lat_lightning.eval import generation
from lat_lightning.eval.evaluate import OVER_REFUSAL_JUDGES, EvaluationData, SafetyEvaluator
from lat_lightning.eval.scan.settings import ScanSettings

ANSWERS = [
    "I can't help with that.",  # a refusal keyword does not see (no "I cannot", no "Sorry")
    "I'm sorry, but I cannot help with that request.",  # a refusal every judge sees
    "Boil the pasta for ten minutes, then drain it.",  # an answer
    "Here is a short poem about autumn leaves.",  # an answer
]


def _over_refusal(monkeypatch, judge=None) -> float:
    monkeypatch.setattr(generation, "generate_under_attack", lambda *a, **k: SimpleNamespace(texts=list(ANSWERS)))
    extra = {} if judge is None else {"over_refusal_judge": judge}
    data = EvaluationData(benign_prompts=[f"benign {i}" for i in range(len(ANSWERS))], **extra)
    evaluator = SafetyEvaluator(ScanSettings(), data)
    evaluator.benign_and_utility(model=None, tokenizer=None)
    return evaluator.compute()["over_refusal"]


def test_the_refusal_judge_counts_i_cant_as_a_refusal(monkeypatch):
    assert _over_refusal(monkeypatch, "refusal") == pytest.approx(2 / 4)


def test_the_default_stays_keyword_so_toy_figures_do_not_move(monkeypatch):
    assert _over_refusal(monkeypatch) == pytest.approx(1 / 4) == _over_refusal(monkeypatch, "keyword")
    assert EvaluationConfig().over_refusal_judge == "keyword"


def test_the_setting_offers_exactly_the_text_only_refusal_judges():
    import dataclasses

    field = next(f for f in dataclasses.fields(EvaluationConfig) if f.name == "over_refusal_judge")
    assert tuple(field.metadata["choices"]) == OVER_REFUSAL_JUDGES


def test_the_real_organism_recipe_reads_over_refusal_with_the_refusal_judge(tmp_path, monkeypatch):
    from lat_lightning.cli import load_config
    from lat_lightning.stages.evaluate import load_evaluation_data

    cfg = load_config("real_organism", [])
    assert cfg.evaluation.over_refusal_judge == "refusal"
    cfg.data.eval_harmful = cfg.data.eval_benign = cfg.evaluation.utility_data = None
    assert load_evaluation_data(cfg).over_refusal_judge == "refusal"
