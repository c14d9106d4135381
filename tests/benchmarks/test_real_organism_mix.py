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
