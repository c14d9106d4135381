"""The defences x attacks table and the pre-fill attack of the defence comparison."""

import json

import pytest

from lat_lightning.cli import load_config
from lat_lightning.eval.compare import build_table, prefill_success, render_markdown, write_outputs


def _battery(util, init, masr, prefill, steps, success_end):
    return {
        "description": "d",
        "utility": util,
        "lambda": 0.6,
        "init": init,
        "attacks": {"asa_random": {"value": masr, "std": 0.05}, "pgd@embed": {"value": 0.0, "std": None}},
        "prefill": {"1": {"rate": prefill}},
        "finetune": {
            "budget": 8,
            "eval_steps": [0, 4, 8],
            "seeds": [0, 1],
            "break_rate": 0.5,
            "success": {"0": [0.0, 0.2, success_end], "1": [0.0, 0.6, success_end]},
            "harmful_loss": {"0": [2.0, 1.0, 0.5], "1": [2.0, 0.8, 0.4]},
            "steps_to_break": {"0": 8 if success_end >= 0.5 else None, "1": 4},
            "steps_to_break_median": 6 if success_end >= 0.5 else None,
        },
    }


def test_every_cell_is_filled_from_its_battery(tmp_path):
    results = {"original": _battery(0.8, 0.0, 0.6, 0.9, 4, 1.0), "lapt": _battery(0.78, 0.0, 0.1, 0.3, None, 0.25)}
    table = build_table(results, ["asa_random", "pgd@embed"], [1], finetune=True)
    ids = [c["id"] for c in table["columns"]]
    assert ids == [
        "utility",
        "lambda",
        "init",
        "asa_random",
        "pgd@embed",
        "prefill_1",
        "finetune_rate",
        "finetune_steps",
        "finetune_past_start",
    ]
    cells = {r["model"]: r["cells"] for r in table["rows"]}
    assert cells["original"]["asa_random"] == {"value": 0.6, "std": 0.05}
    assert cells["lapt"]["prefill_1"]["value"] == 0.3
    assert cells["original"]["finetune_rate"]["value"] == pytest.approx(1.0)  # mean over seeds at the budget
    assert cells["lapt"]["finetune_steps"] == {"value": None, "std": None, "per_seed": {"0": None, "1": 4}, "budget": 8}
    summary = {
        "model": "m",
        "n_prompts": 4,
        "primary_judge": "target_match",
        "attack_layers": [3],
        "attack_layers_source": "x",
        "utility_kind": "contains",
        "tolerance": 0.05,
        "finetune_break_rate": 0.5,
        "timings": {"total": 1.0},
    }
    md = render_markdown(table, summary)
    # no per-prompt outcomes in these batteries: the attack cells keep mean ± std over noise seeds, the fine-tuning
    # success (two LoRA seeds) gets the seeds' bootstrap interval
    assert "| lapt | 0.78 | 0.6 | 0.00 | 0.10 ± 0.05 | 0.00 | 0.30 | 0.25 [0.25, 0.25] | > 8 (—, 4) | 4 (—, 4) |" in md
    assert (
        "| original | 0.80 | 0.6 | 0.00 | 0.60 ± 0.05 | 0.00 | 0.90 | 1.00 [1.00, 1.00] | 6 (8, 4) | 4 (8, 4) |" in md
    )
    figs = write_outputs(table, results, summary, tmp_path, tensorboard=True)
    assert set(figs) == {"compare_heatmap", "compare_finetune"}
    saved = json.loads((tmp_path / "compare_summary.json").read_text())
    assert saved["table"] == table and set(saved["batteries"]) == {"original", "lapt"}
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_missing_attack_column_is_an_error_not_a_blank():
    with pytest.raises(ValueError, match="no result for attack column 'pgd'"):
        build_table({"sft": _battery(0.8, 0.0, 0.6, 0.9, 4, 1.0)}, ["pgd"], [], finetune=False)


def test_prefill_of_the_whole_target_always_succeeds_and_of_nothing_equals_clean(tiny_llama):
    """Pre-filling every target token puts the target in the judged text (target_match must say success); k=0 is
    plain greedy decoding."""
    from lat_lightning.data.templating import encode_response
    from lat_lightning.eval.generation import GenerationSettings, RowKeys, encode_prompts, generate_under_attack
    from lat_lightning.stages.durability_settings import durability_settings

    model, tok = tiny_llama
    cfg = load_config(
        "asa_scan_tiny",
        [
            "evaluation.judges=[target_match]",
            "evaluation.primary_judge=target_match",
            "evaluation.max_new_tokens=4",
            "evaluation.coherence.enabled=false",
        ],
    )
    rows = [json.loads(line) for line in open("lat_lightning/resources/tiny_harmful.jsonl")][:3]
    prompts, targets = [r["prompt"] for r in rows], [r["target"] for r in rows]
    longest = max(len(encode_response(tok, t, add_eos=False)) for t in targets)
    settings = durability_settings(cfg)
    out = prefill_success(model, tok, prompts, targets, [0, 1, 2], [longest], settings)
    assert out[str(longest)]["rate"] == 1.0
    out0 = prefill_success(model, tok, prompts, targets, [0, 1, 2], [0], settings)
    clean = generate_under_attack(
        model,
        tok,
        encode_prompts(tok, prompts),
        None,
        None,
        pad_token_id=tok.pad_token_id,
        rows=RowKeys(prompt_keys=[0, 1, 2]),
        settings=GenerationSettings(max_new_tokens=4),
    )
    assert out0["0"]["sample"] == clean.texts[0]


def test_steps_past_the_start_loss_separate_distance_from_resistance():
    """A copy that starts far from the harmful targets but breaks as soon as it is as close as the starting model
    was adds distance only (0 steps past the start loss); steps to break alone would read as resistance."""
    from lat_lightning.eval.compare import steps_past_loss

    curve = {
        "eval_steps": [0, 4, 8, 12, 16],
        "steps_to_break": {"0": 12, "1": None, "2": 4},
        "harmful_loss": {
            "0": [3.0, 2.0, 0.9, 0.4, 0.1],
            "1": [3.0, 2.5, 2.0, 1.8, 1.5],
            "2": [3.0, 1.0, 0.5, 0.2, 0.1],
        },
    }
    assert steps_past_loss(curve, 1.0) == {"0": 4, "1": None, "2": 0}  # seed 2 broke at the step it got there
    assert steps_past_loss(curve, 0.05) == {"0": 0, "1": None, "2": 0}  # broke before reaching it: counted as 0
    results = {"original": _battery(0.8, 0.0, 0.6, 0.9, 4, 1.0), "lat": _battery(0.8, 0.0, 0.1, 0.2, 4, 1.0)}
    results["lat"]["finetune"]["harmful_loss"] = {"0": [9.0, 2.5, 1.0], "1": [9.0, 3.0, 1.5]}
    results["lat"]["finetune"]["steps_to_break"] = {"0": 8, "1": 8}
    table = build_table(results, ["asa_random", "pgd@embed"], [1], finetune=True)
    cells = {r["model"]: r["cells"]["finetune_past_start"] for r in table["rows"]}
    # the original's start loss is 2.0: the original breaks 8 and 4 steps past it; lat reaches 2.0 first at step 8
    # (seed 0) or never (seed 1, counted from its break) and breaks there: no resistance left
    assert cells["original"]["per_seed"] == {"0": 8, "1": 4} and cells["original"]["value"] == 4
    assert cells["lat"]["per_seed"] == {"0": 0, "1": 0} and cells["lat"]["value"] == 0


def test_training_cost_is_the_mean_over_seeds_relative_to_sft():
    from lat_lightning.eval.compare import training_cost

    timings = {
        "battery_original": 40.0,
        "train_sft_seed_0": 10.0,
        "train_sft_seed_1": 14.0,
        "train_lat_seed_0": 30.0,
        "train_lat_seed_1": 42.0,
        "battery_lat_seed_0": 20.0,
        "train_lapt": 12.0,  # one seed: the tag is the bare name
    }
    cost = training_cost(timings, ["original", "sft", "lat", "lapt", "refat"])
    assert cost == {"sft": "12 s (1.0× sft)", "lat": "36 s (3.0× sft)", "lapt": "12 s (1.0× sft)"}
    assert training_cost({"train_lat": 5.0}, ["lat"]) == {"lat": "5 s"}  # no baseline trained: seconds only
