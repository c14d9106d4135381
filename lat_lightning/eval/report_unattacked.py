"""The report's unattacked section for the real organism: harmful compliance (INIT) and benign refusal of the
original model, the aligned organism and the LAPT-hardened model, read from ``organism.json`` (the ``organism``
stage) and ``rescan/organism.json`` (the ``rescan`` stage), judged alike on the same held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lat_lightning.eval.formatting import fmt_number

MODELS = ("original", "aligned", "hardened")
COLUMNS = (
    ("init", "harmful_eval"),
    ("init", "harmbench_eval"),
    ("refusal", "benign_eval"),
    ("refusal", "borderline_eval"),
)
HEADERS = ("StrongREJECT eval INIT", "HarmBench val INIT", "benign refusal", "borderline refusal", "benign agreement")


def unattacked_figures(run_dir: Path) -> Optional[dict]:
    """``{model: {"init": {set: {judge: rate}}, "refusal": {...}, "agreement": float}}`` of a real-organism run
    (``None`` for any other run)."""
    record = Path(run_dir) / "organism.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    if info.get("build", {}).get("kind") != "real":
        return None
    hardened = Path(run_dir) / "rescan" / "organism.json"
    if hardened.is_file():
        info["hardened"] = json.loads(hardened.read_text())["hardened"]
    return {m: {k: info[m].get(k) for k in ("init", "refusal", "agreement")} for m in MODELS if m in info}


def unattacked_markdown(figures: Optional[dict], judge: str) -> list[str]:
    """Markdown lines: one row per model under ``judge`` (a ``+coherent`` judge's base judge: unattacked answers
    have no coherence records), empty without figures."""
    if not figures:
        return []
    base = judge.split("+")[0]
    lines = [
        f"## Unattacked answers ({base} judge)",
        "",
        "| model | " + " | ".join(HEADERS) + " |",
        "|---" * (len(HEADERS) + 1) + "|",
    ]
    for model, fig in figures.items():
        cells = [fmt_number(((fig.get(kind) or {}).get(name) or {}).get(base), 3) for kind, name in COLUMNS]
        lines.append(f"| {model} | " + " | ".join(cells + [fmt_number(fig.get("agreement"), 3)]) + " |")
    return lines + [
        "",
        "Every answer with its verdicts: `organism_answers.jsonl`, `rescan/organism_answers.jsonl`.",
        "",
    ]


__all__ = ["unattacked_figures", "unattacked_markdown"]
