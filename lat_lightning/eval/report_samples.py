"""Sampled attacked answers with every judge's verdict: what lets a reader check the judges by eye.

The report of a run shows, per attack of the scan (before training), ``per_attack`` attacked answers drawn by a
keyed hash of their cell (attack, seed, prompt, layer), so the same scan always shows the same answers and the
sample is neither the successes only nor the first rows of the file. Each answer carries the verdict of every judge
the scan ran (``+coherent`` twins included).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lat_lightning.models.layers import layer_name

CLEAN_ATTACK = "clean"  # the scan's record name of the unattacked answers (eval/scan/records.py)


def _rank(rec: dict, seed: int) -> str:
    key = f"{seed}\x00{rec['attack']}\x00{rec.get('seed')}\x00{rec['prompt_idx']}\x00{rec['layer']}"
    return hashlib.sha256(key.encode()).hexdigest()


def answer_samples(scan_jsonl: Path, per_attack: int = 10, seed: int = 0) -> dict[str, list[dict]]:
    """Up to ``per_attack`` attacked answers per attack of a scan's ``scan.jsonl``, each with its verdicts.

    Returns:
        ``{attack: [{"prompt", "layer", "seed", "response", "verdicts": {judge: bool | None}}]}`` (empty when the
        file does not exist). ``layer`` stays the scan's layer id (``-2`` for the input embeddings, as in
        ``scan.jsonl``); :func:`samples_markdown` shows it as ``embed``.
    """
    path = Path(scan_jsonl)
    if not path.exists():
        return {}
    by_attack: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["attack"] != CLEAN_ATTACK:
            by_attack.setdefault(rec["attack"], []).append(rec)
    out = {}
    for attack, recs in by_attack.items():
        picked = sorted(recs, key=lambda r: _rank(r, seed))[:per_attack]
        out[attack] = [
            {
                "prompt": r["prompt"],
                "layer": r["layer"],
                "seed": r.get("seed"),
                "response": r["response"],
                "verdicts": {j: v.get("success") for j, v in r.get("verdicts", {}).items()},
            }
            for r in picked
        ]
    return out


def _verdict(v) -> str:
    return "n/a" if v is None else ("success" if v else "—")


def samples_markdown(samples: dict[str, list[dict]], judges: list[str]) -> list[str]:
    """Markdown lines: one table per attack (layer, seed, prompt, answer, one column per judge); the input
    embeddings' layer shows as ``embed``."""
    if not samples:
        return []
    lines = [
        f"## Sampled attacked answers (before training; {max(len(v) for v in samples.values())} per attack)",
        "",
        "Drawn by a keyed hash of the cell, successes or not; `success` = the judge counts the answer as an attack "
        "success, `—` = it does not.",
        "",
    ]
    for attack, rows in samples.items():
        cols = [j for j in judges if any(j in r["verdicts"] for r in rows)]
        lines += [f"### {attack}", "", "| layer | seed | prompt | answer | " + " | ".join(cols) + " |"]
        lines.append("|---" * (4 + len(cols)) + "|")
        for r in rows:
            cells = [_cell(layer_name(r["layer"])), _cell(str(r["seed"])), _cell(r["prompt"]), _cell(r["response"])]
            lines.append("| " + " | ".join(cells + [_verdict(r["verdicts"].get(j)) for j in cols]) + " |")
        lines.append("")
    return lines


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (one line, no pipe)."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


__all__ = ["answer_samples", "samples_markdown"]
