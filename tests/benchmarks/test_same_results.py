"""benchmarks.same_results: the before/after check of a refactor finds every changed number and nothing else."""

from __future__ import annotations

import json

from benchmarks.same_results import compare_runs, main


def _run(root, value, seconds, records=None):
    root.mkdir()
    (root / "report.json").write_text(
        json.dumps({"masr": value, "cells": {"seconds": seconds}, "final": str(root / "final")})
    )
    (root / "rescan").mkdir()
    (root / "rescan" / "scan_summary.json").write_text(json.dumps({"init": 0.25, "seconds_per_seed": [seconds]}))
    rows = records or [{"attack": "pgd", "seed": 0, "prompt_idx": 0, "layer": 1, "response": "no"}]
    (root / "scan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_identical_runs_agree_despite_wall_times_and_paths(tmp_path, capsys):
    before, after = _run(tmp_path / "a", 0.5, 12.0), _run(tmp_path / "b", 0.5, 99.0)
    assert all(not d for d in compare_runs(before, after).values())
    assert main([str(before), str(after)]) == 0
    assert '"identical": true' in capsys.readouterr().out


def test_a_changed_number_or_record_is_reported(tmp_path, capsys):
    before = _run(tmp_path / "a", 0.5, 1.0)
    after = _run(
        tmp_path / "b",
        0.5000001,
        1.0,
        records=[{"attack": "pgd", "seed": 0, "prompt_idx": 0, "layer": 1, "response": "yes"}],
    )
    diffs = compare_runs(before, after)
    assert diffs["report.json"] == [".masr: 0.5 != 0.5000001"]
    assert len(diffs["scan.jsonl"]) == 1 and "response" in diffs["scan.jsonl"][0]
    assert main([str(before), str(after)]) == 1
    assert compare_runs(before, after, tolerance=1e-6)["report.json"] == []
    (after / "durability_summary.json").write_text("{}")
    assert compare_runs(before, after)["durability_summary.json"] == ["only in after"]


def test_a_missing_directory_exits_2(tmp_path):
    assert main([str(tmp_path / "nope"), str(tmp_path)]) == 2
