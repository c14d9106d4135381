"""Re-judge a finished scan's answers with today's judges, without the model: MASR / PASR / INIT per attack and judge.

A scan stores every answer (``scan.jsonl``: the response and its coherence record, the unattacked model's NLL and
repetition measured when it ran). When a judge changes -- a refusal phrase added from the labelled calibration
answers, a ``+ontopic`` twin -- this script scores the *same* answers again, so a figure before and after the change
differs by the judge only, never by a regeneration. Coherence comes from each record's stored verdict (the run's own
thresholds); nothing is generated and no model is loaded.

Usage::

    python -m benchmarks.rescore_scan RUN_DIR/scan.jsonl --judges refusal+coherent refusal+coherent+ontopic
    python -m benchmarks.rescore_scan RUN_DIR/rescan/scan.jsonl --samples 0    # point estimates only (fast)

Prints a table per attack and one ``RESULT {json}`` line: ``attack -> judge -> {init, masr, masr_ci, pasr, pasr_ci,
peak_layer}`` (the same definitions as the scan's summary: the mean over seeds, 95 % two-stage bootstrap intervals).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lat_lightning.eval.judges import build_judge, judge_items
from lat_lightning.eval.metrics import summarise_seeds
from lat_lightning.eval.scan.records import read_records

CLEAN = "clean"


def read_scan(path: Path) -> list[dict]:
    """The records of one ``scan.jsonl``, read as the scan reads them (:func:`read_records`: a cell's last record
    wins, a torn last line is skipped)."""
    return list(read_records(path).values())


def successes(judge_name: str, records: list[dict]) -> list[float]:
    """1.0 / 0.0 per record (NaN where the judge failed), judged again on the stored text and coherence."""
    judge = build_judge(judge_name)
    coherence = [r.get("coherence") or {} for r in records] if getattr(judge, "needs_coherence", False) else None
    verdicts = judge_items(
        {judge_name: judge}, [r["prompt"] for r in records], [r["response"] for r in records], None, coherence
    )[judge_name]
    return [float("nan") if v.failed else float(bool(v.success)) for v in verdicts]


def rescore(records: list[dict], judges: list[str], samples: int) -> dict:
    """``attack -> judge -> metrics`` over the records' own prompts, layers and seeds."""
    n = 1 + max(int(r["prompt_idx"]) for r in records)
    clean = sorted((r for r in records if r["attack"] == CLEAN), key=lambda r: r["prompt_idx"])
    if len(clean) != n:
        raise SystemExit(f"the scan has {len(clean)} clean answers for {n} prompts: is it finished?")
    attacks = sorted({r["attack"] for r in records} - {CLEAN})
    verdicts = {j: dict(zip(map(id, records), successes(j, records))) for j in judges}
    out: dict = {}
    for attack in attacks:
        recs = [r for r in records if r["attack"] == attack]
        layers = sorted({int(r["layer"]) for r in recs})
        seeds = sorted({int(r["seed"]) for r in recs})
        out[attack] = {}
        for j in judges:
            arr = np.full((n, len(layers), len(seeds)), np.nan)
            for r in recs:
                arr[int(r["prompt_idx"]), layers.index(int(r["layer"])), seeds.index(int(r["seed"]))] = verdicts[j][
                    id(r)
                ]
            s = summarise_seeds(
                arr, np.array([verdicts[j][id(r)] for r in clean]), layers, samples=samples, seed_ids=seeds
            )
            out[attack][j] = {
                "init": s["init_mean"],
                "masr": s["masr_mean"],
                "masr_ci": s.get("masr_mean_ci"),
                "pasr": s["pasr_mean"],
                "pasr_ci": s.get("pasr_mean_ci"),
                "peak_layer": s["pasr_of_mean_lasr_layer"],
            }
    return out


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scan", help="a scan.jsonl")
    ap.add_argument("--judges", nargs="+", default=["refusal", "refusal+coherent", "refusal+coherent+ontopic"])
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (0: point estimates only)")
    args = ap.parse_args(argv)
    path = Path(args.scan)
    if not path.is_file():
        print(f"error: {path} is not a file (give a scan's scan.jsonl)", file=sys.stderr)
        raise SystemExit(2)
    for j in args.judges:
        try:
            build_judge(j)
        except Exception as e:  # an unknown judge name: say so before any work
            print(f"error: judge {j!r}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    result = rescore(read_scan(path), args.judges, args.samples)
    for attack, per_judge in result.items():
        print(f"\n{attack}")
        for j, m in per_judge.items():
            print(
                f"  {j:>26}: INIT {m['init']:.2f}  MASR {m['masr']:.2f}{_ci(m['masr_ci'])}  "
                f"PASR {m['pasr']:.2f}{_ci(m['pasr_ci'])} (layer {m['peak_layer']})"
            )
    print("RESULT " + json.dumps({"scan": str(path), "judges": args.judges, "attacks": result}))


if __name__ == "__main__":
    main()
