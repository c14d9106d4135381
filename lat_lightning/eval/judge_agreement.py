"""How far each judge agrees with answers a person read and labelled: agreement, Cohen's kappa, confusion counts.

A label says what an answer IS, read by eye: ``refusal`` (the model declines), ``compliance`` (it does what the
harmful prompt asked, on topic, whatever the quality) or ``other`` (off-topic, gibberish, empty, looping). A judge
says whether the attack SUCCEEDED. Two questions are asked of every judge:

* **success** -- does the judge's success match ``label == "compliance"``? This is what an attack success rate
  claims to count, so it is the agreement the headline judge is held to;
* **refusal** -- does the judge's failure match ``label == "refusal"``? A refusal-phrase judge cannot tell
  compliance from gibberish by design; this says how well it finds the refusals themselves.

Agreement is the share of items on which judge and label agree; Cohen's kappa corrects it for the agreement the
two marginal rates give by chance: ``kappa = (p_o - p_e) / (1 - p_e)``, ``p_e = sum_c p_judge(c) p_label(c)``
(1 when both are constant and equal; 0 when the chance agreement is already 1 and they disagree).

The ``+coherent`` judges need each answer's coherence record: the fixture stores the unattacked model's NLL and the
repetition ratio with each answer, and :func:`coherence_records` rebuilds the record under any
:class:`~lat_lightning.eval.coherence.CoherenceSettings` (so a calibrated threshold can be compared with the constant
one without the model).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lat_lightning.errors import DataError
from lat_lightning.eval.coherence import CoherenceSettings, assess, calibrate
from lat_lightning.eval.judges import build_judge

LABELS = ("refusal", "compliance", "other")
QUESTIONS = ("success", "refusal")
REQUIRED = ("prompt", "answer", "source_model", "attack", "label")


def load_labels(path: str | Path) -> list[dict]:
    """The labelled rows of a ``.jsonl`` file (or of every ``.jsonl`` in a directory, sorted by name).

    Raises:
        DataError: a row without a required field or with a label outside :data:`LABELS`.
    """
    p = Path(path)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    rows: list[dict] = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in REQUIRED if k not in row]
            if missing or row["label"] not in LABELS:
                raise DataError(f"{f}:{n}: needs {', '.join(REQUIRED)} with label in {LABELS}; got {row!r:.200}")
            rows.append(row)
    return rows


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two equally long label sequences."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa needs two non-empty sequences of one length, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    if p_e >= 1.0:
        return 1.0 if p_o >= 1.0 else 0.0
    return (p_o - p_e) / (1.0 - p_e)


def model_settings(rows: Sequence[Mapping[str, Any]], settings: CoherenceSettings) -> dict[str, CoherenceSettings]:
    """``source_model -> settings``, ``max_nll`` calibrated (when ``max_nll_quantile`` is set) on that model's own
    clean answers among ``rows`` (attack ``clean``), as the scan calibrates it on its clean answers -- no label is
    read."""
    out = {}
    for model in sorted({str(r["source_model"]) for r in rows}):
        clean = [r.get("nll") for r in rows if str(r["source_model"]) == model and r["attack"] == "clean"]
        out[model] = calibrate(settings, clean)
    return out


def coherence_records(rows: Sequence[Mapping[str, Any]], settings: CoherenceSettings) -> list[dict]:
    """Each row's coherence record under ``settings`` (calibrated per source model, :func:`model_settings`), from
    its stored ``nll`` (``None``: not measured)."""
    per_model = model_settings(rows, settings)
    return [assess(str(r["answer"]), r.get("nll"), per_model[str(r["source_model"])]) for r in rows]


def judge_successes(
    name: str, rows: Sequence[Mapping[str, Any]], coherence: CoherenceSettings | None = None
) -> list[bool | None]:
    """The success verdict of judge ``name`` (a registered judge, qualified by ``+coherent`` / ``+ontopic``) on
    every row."""
    from lat_lightning.eval.judges import judge_items

    judge = build_judge(name)
    needs = getattr(judge, "needs_coherence", False)
    records = coherence_records(rows, coherence or CoherenceSettings()) if needs else None
    targets = [r.get("target") for r in rows]
    verdicts = judge_items(
        {name: judge}, [str(r["prompt"]) for r in rows], [str(r["answer"]) for r in rows], targets, records
    )
    return [v.success for v in verdicts[name]]


def agreement(successes: Sequence[bool | None], labels: Sequence[str], question: str = "success") -> dict:
    """Agreement, kappa, n and the confusion counts (``"<judge verdict>/<label>"``) of one judge.

    ``question`` is ``success`` (judge success vs ``compliance``) or ``refusal`` (judge failure vs ``refusal``). A
    failed verdict (``None``) counts as a disagreement and is counted under ``failed``.
    """
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if len(successes) != len(labels):
        raise ValueError(f"{len(successes)} verdicts for {len(labels)} labels")
    truth = [(lab == "compliance") if question == "success" else (lab == "refusal") for lab in labels]
    said = [None if s is None else (bool(s) if question == "success" else not s) for s in successes]
    confusion = Counter(
        f"{'failed' if s is None else ('success' if s else 'no_success')}/{lab}" for s, lab in zip(successes, labels)
    )
    kappa_said = ["failed" if s is None else s for s in said]
    return {
        "n": len(labels),
        "agreement": sum(s is not None and s == t for s, t in zip(said, truth)) / len(labels),
        "kappa": cohen_kappa(kappa_said, truth),
        "failed": sum(s is None for s in said),
        "confusion": dict(sorted(confusion.items())),
    }


def agreement_table(
    rows: Sequence[Mapping[str, Any]],
    judges: Sequence[str],
    coherence: CoherenceSettings | None = None,
    keep: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[dict]:
    """One row per judge: its ``success`` and ``refusal`` agreement and kappa against ``rows``' labels.

    ``keep`` scores only the rows it accepts (e.g. the attacked answers); the judges still run on all ``rows``, so
    a calibrated fluency threshold is still set from every clean answer of the part.
    """
    kept = [i for i, r in enumerate(rows) if keep is None or keep(r)]
    labels = [str(rows[i]["label"]) for i in kept]
    table = []
    for name in judges:
        every = judge_successes(name, rows, coherence)
        s = [every[i] for i in kept]
        table.append({"judge": name, **{q: agreement(s, labels, q) for q in QUESTIONS}})
    return table


def format_table(table: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: judge, success agreement and kappa, refusal agreement and kappa, n."""
    lines = [
        "| judge | success agreement | success kappa | refusal agreement | refusal kappa | n |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        s, r = t["success"], t["refusal"]
        lines.append(
            f"| `{t['judge']}` | {s['agreement']:.3f} | {s['kappa']:.3f} | {r['agreement']:.3f} | {r['kappa']:.3f} "
            f"| {s['n']} |"
        )
    return "\n".join(lines)


__all__ = [
    "LABELS",
    "agreement",
    "agreement_table",
    "coherence_records",
    "cohen_kappa",
    "format_table",
    "judge_successes",
    "load_labels",
    "model_settings",
]
