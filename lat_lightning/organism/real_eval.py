"""What the real organism's alignment did: unattacked answers of a model to every held-out prompt set, judged.

For each held-out set (StrongREJECT evaluation part, HarmBench validation, benign, borderline) the model's greedy
answers are judged by every judge: on the harmful sets a judge's success rate is INIT (harmful compliance with no
attack); on the benign sets ``1 - success`` is the refusal rate (a keyword judge's "success" is "no refusal").
Benign agreement is the ``contains`` utility on the organism's ``agreement`` rows: the share of held-out benign
prompts whose answer still starts with the original model's first words.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lat_lightning.checks import setting, validate

HARMFUL_SETS = ("harmful_eval", "harmbench_eval")
BENIGN_SETS = ("benign_eval", "borderline_eval")


@dataclass(frozen=True)
class RealEvalSettings:
    """Judges (base names: a ``+coherent`` judge needs a scan's coherence records) and the generation budget."""

    judges: tuple[str, ...] = ("keyword",)
    max_new_tokens: int = setting(48, check=">= 1")
    batch_size: int = setting(32, check=">= 1")
    agreement_tokens: int = setting(16, check=">= 1")

    def __post_init__(self) -> None:
        object.__setattr__(self, "judges", tuple(str(j) for j in self.judges))
        validate(self)


def _rows(data_dir: Path, name: str) -> list[dict[str, Any]]:
    with open(Path(data_dir) / f"{name}.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rate(verdicts: Sequence[Any]) -> float | None:
    scored = [v.success for v in verdicts if v.success is not None]
    return sum(bool(s) for s in scored) / len(scored) if scored else None


def evaluate_real(model, tokenizer, data_dir: Path, settings: RealEvalSettings) -> dict[str, Any]:
    """Judged unattacked answers of ``model`` on every held-out set, and its benign agreement.

    Returns:
        ``{"init": {set: {judge: rate}}, "refusal": {set: {judge: rate}}, "agreement": float,
        "answers": [{"set", "prompt", "answer", "verdicts": {judge: bool | None}}]}``.
    """
    from lat_lightning.eval.judges import build_judges
    from lat_lightning.eval.utility import evaluate_utility
    from lat_lightning.organism.real import greedy_answers

    judges = build_judges(list(settings.judges))
    sets = {name: [str(r["prompt"]) for r in _rows(data_dir, name)] for name in HARMFUL_SETS + BENIGN_SETS}
    flat = [(name, p) for name, prompts in sets.items() for p in prompts]
    texts = greedy_answers(model, tokenizer, [p for _, p in flat], settings.max_new_tokens, settings.batch_size)
    out: dict[str, Any] = {"init": {}, "refusal": {}, "answers": []}
    verdicts: dict[str, list[Any]] = {}
    for jname, judge in judges.items():
        verdicts[jname] = list(judge([p for _, p in flat], texts, [None] * len(flat)))
    for name in sets:
        idx = [i for i, (n, _) in enumerate(flat) if n == name]
        rates = {j: _rate([verdicts[j][i] for i in idx]) for j in judges}
        if name in HARMFUL_SETS:
            out["init"][name] = rates
        else:
            out["refusal"][name] = {j: (None if r is None else 1.0 - r) for j, r in rates.items()}
    for i, (name, prompt) in enumerate(flat):
        out["answers"].append(
            {"set": name, "prompt": prompt, "answer": texts[i], "verdicts": {j: verdicts[j][i].success for j in judges}}
        )
    util = evaluate_utility(
        model, tokenizer, _rows(data_dir, "agreement"), kind="contains", max_new_tokens=settings.agreement_tokens
    )
    out["agreement"] = util["accuracy"]
    return out


__all__ = ["BENIGN_SETS", "HARMFUL_SETS", "RealEvalSettings", "evaluate_real"]
