"""Do two runs of the same recipe report the same results? (A refactor must not change a number.)

Compares the result files of two run directories (e.g. ``make demo`` before and after a change, or two runs of
``--recipe compare_defences``): ``report.json``, every ``*_summary.json`` (scan, rescan, durability, comparison) and
every ``scan.jsonl`` record, value by value. What legitimately differs between two runs is left out: wall times
(``seconds``, ``seconds_per_seed``, ``cells.seconds``,
durability's ``timings``), and the run directory's own path inside strings (replaced by
``<run>``). Floats must be equal exactly (``--tolerance`` relaxes that).

    python -m benchmarks.same_results runs/default/version_0 runs/default/version_1
    python -m benchmarks.same_results <before> <after> --tolerance 1e-9

Prints each difference (up to ``--show``), then one ``RESULT {json}`` line; exits 0 when the runs agree, 1 when
they differ, 2 when a directory is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Keys whose values are wall-clock measurements: two identical runs differ there by design.
VOLATILE_KEYS = frozenset({"seconds", "seconds_per_seed", "timings", "wall_s", "elapsed"})
RESULT_GLOBS = ("report.json", "**/*_summary.json", "**/scan.jsonl")


def _normalise(value: Any, run_dir: str) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, run_dir) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_normalise(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    return value


def _load(path: Path, run_dir: Path) -> Any:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        keyed = {json.dumps([r.get("attack"), r.get("seed"), r.get("prompt_idx"), r.get("layer")]): r for r in rows}
        return _normalise(keyed, str(run_dir))
    return _normalise(json.loads(path.read_text()), str(run_dir))


def differences(a: Any, b: Any, where: str = "", tolerance: float = 0.0) -> Iterator[str]:
    """Every place two JSON values differ, as ``path: a != b`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield f"{where}.{key}: only in {'after' if key not in a else 'before'}"
            else:
                yield from differences(a[key], b[key], f"{where}.{key}", tolerance)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{where}: {len(a)} entries != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{where}[{i}]", tolerance)
    elif isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= tolerance
        if not same:
            yield f"{where}: {a!r} != {b!r}"
    elif a != b:
        yield f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"


def compare_runs(before: Path, after: Path, tolerance: float = 0.0) -> dict[str, list[str]]:
    """``relative file -> its differences`` for every result file of either run (a file only one run has counts)."""
    files = sorted(
        {p.relative_to(root) for root in (before, after) for pattern in RESULT_GLOBS for p in root.glob(pattern)}
    )
    out: dict[str, list[str]] = {}
    for rel in files:
        if not (before / rel).is_file() or not (after / rel).is_file():
            out[str(rel)] = [f"only in {'after' if not (before / rel).is_file() else 'before'}"]
            continue
        out[str(rel)] = list(differences(_load(before / rel, before), _load(after / rel, after), "", tolerance))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="run directory before the change")
    parser.add_argument("after", type=Path, help="run directory after the change")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest accepted float difference (default 0)")
    parser.add_argument("--show", type=int, default=20, help="differences printed per file")
    args = parser.parse_args(argv)
    for d in (args.before, args.after):
        if not d.is_dir():
            print(f"error: no run directory {d}", file=sys.stderr)
            return 2
    result = compare_runs(args.before, args.after, args.tolerance)
    for rel, diffs in result.items():
        for line in diffs[: args.show]:
            print(f"{rel}{line}")
        if len(diffs) > args.show:
            print(f"{rel}: ... {len(diffs) - args.show} more")
    summary = {
        "before": str(args.before),
        "after": str(args.after),
        "files": len(result),
        "identical": all(not d for d in result.values()),
        "differences": {rel: len(d) for rel, d in result.items() if d},
    }
    print("RESULT " + json.dumps(summary), flush=True)
    return 0 if summary["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
