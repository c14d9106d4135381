"""The report's sampled attacked answers: a fixed draw per attack, every judge's verdict beside each answer."""

from __future__ import annotations

import json

from lat_lightning.eval.report_samples import answer_samples, samples_markdown


def _write(path, n=30):
    with open(path, "w") as fh:
        for i in range(n):
            for attack in ("clean", "asa_random", "pgd"):
                rec = {
                    "attack": attack,
                    "seed": 0,
                    "prompt_idx": i,
                    "layer": i % 3,
                    "prompt": f"prompt {i}",
                    "response": f"answer | {attack} {i}",
                    "verdicts": {"keyword": {"success": i % 2 == 0}, "keyword+coherent": {"success": None}},
                }
                fh.write(json.dumps(rec) + "\n")


def test_ten_answers_per_attack_drawn_the_same_way_every_time(tmp_path):
    _write(tmp_path / "scan.jsonl")
    first = answer_samples(tmp_path / "scan.jsonl")
    assert set(first) == {"asa_random", "pgd"}  # the clean answers are not an attack
    assert all(len(rows) == 10 for rows in first.values())
    assert first == answer_samples(tmp_path / "scan.jsonl")
    picked = {r["prompt"] for r in first["asa_random"]}
    assert picked != {f"prompt {i}" for i in range(10)}  # not just the first rows of the file
    verdicts = [r["verdicts"]["keyword"] for r in first["asa_random"]]
    assert True in verdicts and False in verdicts  # successes and failures alike


def test_markdown_has_a_column_per_judge_and_escapes_pipes(tmp_path):
    _write(tmp_path / "scan.jsonl")
    lines = samples_markdown(answer_samples(tmp_path / "scan.jsonl"), ["keyword", "keyword+coherent"])
    header = next(line for line in lines if line.startswith("| layer"))
    assert header.endswith("| keyword | keyword+coherent |")
    rows = [line for line in lines if line.startswith("| ") and "answer \\|" in line]
    assert len(rows) == 20 and all(line.endswith("n/a |") for line in rows)


def test_no_scan_no_section(tmp_path):
    assert answer_samples(tmp_path / "missing.jsonl") == {} and samples_markdown({}, ["keyword"]) == []
