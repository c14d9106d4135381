"""Every judge's agreement and Cohen's kappa against the answers labelled by reading them.

Usage::

    python -m benchmarks.judge_agreement                      # the held-out part of tests/fixtures/judge_labels
    python -m benchmarks.judge_agreement --part calibration
    python -m benchmarks.judge_agreement --part organism       # 398 answers of the real organism (docs/organism.md)

Prints a markdown table per fluency threshold (the constant ``max_nll`` 3.0 and the threshold calibrated on each
model's own clean answers) and one ``RESULT {json}`` line. See docs/metrics.md#judge-agreement-with-labelled-answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.judge_agreement import agreement_table, format_table, load_labels, model_settings

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "judge_labels"
BASE_JUDGES = ("keyword", "keyword_long", "refusal", "target_match")
# chosen on the calibration part only (docs/metrics.md): max_nll = the largest NLL of the model's own clean
# answers, max_repetition 0.4
CALIBRATED = CoherenceSettings(max_nll_quantile=1.0, max_nll_scale=1.0, max_repetition=0.4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("heldout", "calibration", "organism"), default="heldout")
    ap.add_argument("--labels", default=None, help="a labelled .jsonl instead of the fixture part")
    args = ap.parse_args(argv)
    rows = load_labels(args.labels or FIXTURES / f"{args.part}.jsonl")
    # target_match needs each row's target string; without one (the organism part) every verdict is a failure
    base = [j for j in BASE_JUDGES if j != "target_match" or any(r.get("target") for r in rows)]
    names = base + [f"{j}+coherent" for j in base]
    result: dict = {
        "n": len(rows),
        "labels": {k: sum(r["label"] == k for r in rows) for k in ("refusal", "compliance", "other")},
    }
    for tag, settings in (("constant max_nll 3.0", CoherenceSettings()), ("calibrated max_nll", CALIBRATED)):
        thresholds = {m: s.max_nll for m, s in model_settings(rows, settings).items()}
        table = agreement_table(rows, names, settings)
        print(f"\n### {tag} (per model: {json.dumps(thresholds)})\n")
        print(format_table(table))
        result[tag] = {
            "max_nll": thresholds,
            **{
                t["judge"]: {
                    f"{q}_{k}": round(t[q][k], 4) for q in ("success", "refusal") for k in ("agreement", "kappa")
                }
                for t in table
            },
        }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
