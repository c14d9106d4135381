"""``python -m benchmarks.real_organism_mix`` on the smoke preset: the variant trains and is judged on a fold of the
training prompts only, never on the preset's evaluation prompts."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.real_organism_mix import main
from lat_lightning.organism.real import REAL_PRESETS
from lat_lightning.organism.real_data import split_sets


def test_the_variant_sees_training_prompts_only(tmp_path, capsys):
    result = main(["v", "--out", str(tmp_path), "--preset", "smollm2_smoke", "distill_repeats=2"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
    assert json.loads(line[len("RESULT ") :]) == json.loads(json.dumps(result))
    assert result["overrides"] == {"distill_repeats": 2}
    for key in ("val_harmful_init", "val_benign_refusal", "val_borderline_refusal", "val_agreement"):
        assert math.isfinite(result[key]) and 0.0 <= result[key] <= 1.0
    preset = split_sets(REAL_PRESETS["smollm2_smoke"].data)
    evaluation = ("harmful_eval", "harmbench_eval", "benign_eval", "borderline_eval")
    held_out = {r["prompt"] for k in evaluation for r in preset[k]}
    training = {r["prompt"] for k in ("harmful_train", "benign_train", "borderline_train") for r in preset[k]}
    seen = {json.loads(x)["prompt"] for x in (tmp_path / "answers-v.jsonl").read_text().splitlines()}
    assert seen and seen <= training and not seen & held_out


def test_an_unknown_setting_is_refused_before_any_build(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["v", "--out", str(tmp_path / "mix"), "--preset", "smollm2_smoke", "stepz=3"])
    assert exc.value.code == 2 and "'stepz=3' is not setting=value" in capsys.readouterr().err
    assert not (tmp_path / "mix").exists()


def _sources(monkeypatch, held_prompts: set[str]):
    """StrongREJECT replaced by the smoke preset's training prompts, ``held_prompts`` from source "AdvBench"."""
    import benchmarks.real_organism_mix as mix

    rows = split_sets(REAL_PRESETS["smollm2_smoke"].data)["harmful_train"]
    fake = [{"prompt": r["prompt"], "category": "c", "source": "AdvBench" if r["prompt"] in held_prompts else "custom"}
            for r in rows]  # fmt: skip
    monkeypatch.setattr(mix, "read_strongreject", lambda: fake)
    return rows


def test_held_out_sources_leave_the_fit_part_and_become_the_out_of_source_fold(tmp_path, monkeypatch):
    import csv

    from benchmarks.real_organism_mix import training_only_data

    train = split_sets(REAL_PRESETS["smollm2_smoke"].data)["harmful_train"]
    held = {train[0]["prompt"], train[1]["prompt"]}
    _sources(monkeypatch, held)
    data = training_only_data(REAL_PRESETS["smollm2_smoke"].data, tmp_path, ("AdvBench",))

    def prompts(name: str) -> set[str]:
        with open(tmp_path / name, newline="") as fh:
            return {r["forbidden_prompt"] for r in csv.DictReader(fh)}

    assert prompts("held.csv") == held and not prompts("harmful.csv") & held
    assert prompts("harmful.csv") | held == {r["prompt"] for r in train}
    assert data.harmbench.path.endswith("held.csv") and data.harmbench.limit is None


def test_an_unknown_source_is_refused_before_any_build(tmp_path, monkeypatch, capsys):
    _sources(monkeypatch, set())
    with pytest.raises(SystemExit) as exc:
        main(["v", "--out", str(tmp_path / "mix"), "--preset", "smollm2_smoke", "--holdout-sources", "AdvBnech"])
    assert exc.value.code == 2 and "not StrongREJECT sources" in capsys.readouterr().err
    assert not (tmp_path / "mix").exists()
