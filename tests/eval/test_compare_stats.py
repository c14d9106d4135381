"""Intervals of the defence comparison: the two-stage bootstrap over seeds and prompts, differences from SFT."""

import numpy as np
import pytest

from lat_lightning.eval.compare import build_table, render_markdown
from lat_lightning.eval.compare_stats import (
    any_layer_outcomes,
    cell_interval,
    difference_interval,
    merged_finetune,
    t_interval,
)


def _runs(rates, n_prompts=32, seed=0):
    """Per seed: ``round(rate * n)`` broken prompts (a random subset of the prompts, fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rates:
        row = np.zeros(n_prompts)
        row[rng.choice(n_prompts, int(round(r * n_prompts)), replace=False)] = 1.0
        out.append(row.tolist())
    return out


def test_any_layer_outcomes_reproduce_the_masr_and_keep_unjudged_prompts_apart():
    s = np.full((3, 2, 2), np.nan)
    s[:, :, 0] = [[0, 1], [0, 0], [np.nan, 0]]
    s[:, :, 1] = [[1, 1], [np.nan, np.nan], [0, 0]]
    assert any_layer_outcomes(s, [0, 1]) == [[1.0, 0.0, 0.0], [1.0, None, 0.0]]


def test_the_interval_holds_the_mean_and_narrows_with_more_prompts():
    few, many = _runs([0.5, 0.5, 0.5], 16), _runs([0.5, 0.5, 0.5], 256)
    lo_f, hi_f = cell_interval(few)
    lo_m, hi_m = cell_interval(many)
    assert lo_f < 0.5 < hi_f and lo_m < 0.5 < hi_m
    assert hi_m - lo_m < 0.5 * (hi_f - lo_f)  # ~1/sqrt(16) of the width: prompt sampling noise is in it
    # the seeds' spread widens it: the same prompts, seeds that disagree
    spread = cell_interval(_runs([0.2, 0.5, 0.8], 256))
    assert spread[1] - spread[0] > 2 * (hi_m - lo_m)


def test_a_one_prompt_difference_is_noise_and_a_large_one_is_not():
    sft = _runs([0.03, 0.03, 0.03])
    same_ish = _runs([0.0, 0.0, 0.0])
    d = difference_interval(same_ish, sft)
    assert d["diff"] == pytest.approx(-1 / 32) and not d["beyond_noise"] and d["low"] < 0 <= d["high"]
    broken = _runs([0.8, 0.75, 0.85])
    d = difference_interval(broken, sft)
    assert d["beyond_noise"] and d["low"] > 0.5
    with pytest.raises(ValueError, match="not paired"):
        difference_interval(_runs([0.5], 16), _runs([0.5], 32))


def test_the_t_interval_matches_the_table():
    lo, hi = t_interval([0.1, 0.2, 0.3])
    assert (lo + hi) / 2 == pytest.approx(0.2)
    assert (hi - lo) / 2 == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-4)
    assert t_interval([0.4]) is None


def _battery(seed, masr, prefill, per_prompt=True, finetune_steps=4):
    runs = _runs([masr], 32, seed)
    bat = {
        "description": "d",
        "seed": seed,
        "utility": 0.8 + 0.01 * seed,
        "lambda": 1.0 if seed else 0.6,
        "init": 0.0,
        "init_per_prompt": [[0.0] * 32],
        "attacks": {"asagrad": {"value": float(np.mean(runs[0])), "std": None}},
        "prefill": {"1": {"rate": prefill}},
        "finetune": {
            "budget": 8,
            "eval_steps": [0, 4, 8],
            "seeds": [seed],
            "break_rate": 0.5,
            "success": {str(seed): [0.0, 0.6, 1.0]},
            "harmful_loss": {str(seed): [2.0, 1.0, 0.5]},
            "steps_to_break": {str(seed): finetune_steps},
            "steps_to_break_median": finetune_steps,
        },
    }
    if per_prompt:
        bat["attacks"]["asagrad"]["per_prompt"] = runs
        bat["prefill"]["1"]["per_prompt"] = [1.0] * int(prefill * 32) + [0.0] * (32 - int(prefill * 32))
    return bat


def test_seeded_rows_show_means_intervals_and_marks_against_sft():
    results = {
        "sft": [_battery(s, 0.78, 0.5) for s in (0, 1, 2)],
        "lat": [_battery(s, m, 0.5) for s, m in zip((0, 1, 2), (0.1, 0.2, 0.15))],
        "lapt": [_battery(s, m, 0.5) for s, m in zip((0, 1, 2), (0.75, 0.72, 0.78))],
    }
    table = build_table(results, ["asagrad"], [1], finetune=True, bootstrap_samples=500)
    cells = {r["model"]: r["cells"] for r in table["rows"]}
    assert cells["lat"]["asagrad"]["value"] == pytest.approx(0.15, abs=0.01)
    assert cells["lat"]["asagrad"]["vs_baseline"]["beyond_noise"]
    assert not cells["lapt"]["asagrad"]["vs_baseline"]["beyond_noise"]
    assert "vs_baseline" not in cells["sft"]["asagrad"]
    # the fine-tuning success keeps no per-prompt outcomes: an interval over seeds, no verdict against sft
    assert cells["lat"]["finetune_rate"]["ci"] and "vs_baseline" not in cells["lat"]["finetune_rate"]
    assert cells["lat"]["utility"]["ci"][0] < 0.81 < cells["lat"]["utility"]["ci"][1]
    assert cells["lat"]["lambda"]["per_seed"] == [0.6, 1.0, 1.0]
    assert set(cells["lat"]["finetune_steps"]["per_seed"]) == {"0:0", "1:1", "2:2"}
    md = render_markdown(
        table,
        {
            "model": "m",
            "n_prompts": 32,
            "primary_judge": "target_match",
            "attack_layers": [3],
            "attack_layers_source": "x",
            "utility_kind": "contains",
            "tolerance": 0.05,
            "finetune_break_rate": 0.5,
            "timings": {"total": 1.0},
        },
    )
    lat_row = next(line for line in md.splitlines() if line.startswith("| lat | 0.81"))
    assert " ↓ |" in lat_row and "0.87 (0.6, 1, 1)" in lat_row
    assert "Difference from `sft`" in md
    assert any(line.startswith("| lat | +0.00") and "-0.6" in line and "*" in line for line in md.splitlines())


def test_merged_curves_keep_every_training_seed():
    merged = merged_finetune([_battery(0, 0.5, 0.5, finetune_steps=4), _battery(1, 0.5, 0.5, finetune_steps=8)])
    assert merged["steps_to_break"] == {"0:0": 4, "1:1": 8}
    assert merged["success_mean"] == [0.0, 0.6, 1.0]
    assert merged["steps_to_break_median"] == 4  # lower median of two seeds


def test_curves_stopped_at_their_break_give_no_mean_where_a_seed_stopped():
    """A seed whose fine-tune stopped at its break (stop_at_break) has no value after it: the merged curve gives
    no mean there, and the table's success column reads each seed's last evaluated step."""
    early, late = _battery(0, 0.5, 0.5, finetune_steps=4), _battery(1, 0.5, 0.5, finetune_steps=8)
    for bat in (early, late):
        bat["finetune"]["stop_at_break"] = True
    early["finetune"]["success"] = {"0": [0.0, 0.75, None]}
    early["finetune"]["harmful_loss"] = {"0": [2.0, 1.0, None]}
    late["finetune"]["success"] = {"1": [0.0, 0.25, 0.5]}
    merged = merged_finetune([early, late])
    assert merged["stop_at_break"] and merged["success_mean"] == [0.0, 0.5, None]
    assert merged["harmful_loss_mean"] == [2.0, 1.0, None]
    table = build_table({"sft": [early, late]}, ["asagrad"], [1], finetune=True, bootstrap_samples=200)
    column = next(c for c in table["columns"] if c["id"] == "finetune_rate")
    assert column["label"] == "fine-tune success at its break (else budget)"
    cell = table["rows"][0]["cells"]["finetune_rate"]
    assert cell["value"] == pytest.approx((0.75 + 0.5) / 2)  # seed 0 at its break (step 4), seed 1 at the budget
