"""The defence comparison end to end on the smoke organism: every cell filled, and the same table twice."""

import json

import pytest

from lat_lightning.cli import main
from lat_lightning.eval.durability import prefix_only_caveat

pytestmark = pytest.mark.integration  # end-to-end: whole recipes

SMOKE = [
    "model.name_or_path=organism:smoke",
    "evaluation.num_prompts=4",
    "evaluation.seeds=[0,1]",
    "evaluation.max_new_tokens=6",
    "evaluation.bootstrap_samples=10",
    "evaluation.coherence.enabled=false",
    "trainer.max_steps=2",
    # no validation run in training (nothing here reads its val/* scalars; it costs ~4 s a defence): the repeated
    # run below keeps one; tests/test_tiny_recipes_run.py checks every defence recipe's val/* scalars
    "trainer.val_check_interval=null",
    "data.batch_size=4",
    "perturbation.steps=2",
    "perturbation.direction_prompts=8",
    "perturbation.direction_refresh=1",
    "callbacks.weight_interpolation.lambdas=[0.0,0.5,1.0]",
    "logging.tensorboard=false",
    "compare.seeds=[0]",  # one training run per defence (the seeded layout: test_seeds_give_intervals_and_marks)
]
FINETUNE = [
    "evaluation.durability.finetune_steps=4",
    "evaluation.durability.finetune_eval_every=2",
    "evaluation.durability.finetune_seeds=[0,1]",
    "evaluation.durability.num_prompts=4",
]


def _run(root, extra=()):
    assert main(["--recipe", "compare_defences", f"logging.root_dir={root}", *SMOKE, *FINETUNE, *extra]) == 0
    run = root / "compare_defences" / "version_0"
    return run, json.loads((run / "compare" / "compare_summary.json").read_text())


def _without_sft(row):
    return {**row, "cells": {k: {f: v for f, v in c.items() if f != "vs_baseline"} for k, c in row["cells"].items()}}


@pytest.fixture(scope="module")
def organism_cache(tmp_path_factory):
    """A cache of this module's own (not the user's): the smoke organism is built once for both tests."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch, organism_cache):
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(organism_cache))
    return tmp_path


def test_compare_defences_fills_every_cell_and_reproduces(isolated_cache):
    """Every defence: a row with every cell filled, its own model trained at the layers chosen once, its fine-tuning
    curve, the report and figures. Then a second run of one defence in a fresh run directory: its row and the
    starting model's equal those of the ten-model run, whatever else was compared beside them."""
    run, first = _run(isolated_cache / "a")
    table = first["table"]
    models = [r["model"] for r in table["rows"]]
    assert models == ["original", "sft", "lapt", "lat", "asagrad_at", "refat"] + [
        "circuit_breakers",
        "repnoise",
        "vaccine",
        "booster",
    ]
    ids = [c["id"] for c in table["columns"]]
    for attack in ("asa_random", "asagrad", "pgd", "refusal_ablation", "refusal_addition", "pgd@embed", "prefill_1"):
        assert attack in ids
    for row in table["rows"]:
        for col in table["columns"]:
            cell = row["cells"][col["id"]]
            if col["id"] == "lambda" and row["model"] == "original":
                assert cell["value"] is None  # the starting model is not interpolated
            elif col["kind"] == "steps":
                assert set(cell["per_seed"]) and cell["budget"] >= 1
            else:
                assert cell["value"] is not None, (row["model"], col["id"])
                if col["kind"] in ("rate", "utility"):
                    assert 0.0 <= cell["value"] <= 1.0
    for name in models[1:]:  # each defence trained its own attack at the layer chosen once on the original
        cfg = run / "compare" / name / "config.yaml"
        assert (run / "compare" / name / "defence.json").is_file() and not cfg.exists()
        marker = json.loads((run / "compare" / name / "defence.json").read_text())
        assert marker["fit"]["attack_layers"] == first["attack_layers"]
        assert (run / "compare" / name / "interpolation.json").is_file()
    for row in table["rows"]:  # the fine-tuning curve of every model: 2 seeds x steps 0, 2, 4
        curve = first["batteries"][row["model"]]["finetune"]
        assert curve["eval_steps"] == [0, 2, 4] and set(curve["success"]) == {"0", "1"}
        assert all(len(v) == 3 for v in curve["success"].values())
        # bare-prefix training responses are flagged as in the durability suite (docs/durability.md)
        assert curve.get("caveat") == prefix_only_caveat(curve["longest_response_tokens"])
    for rel in ("compare_report.md", "compare_heatmap.png", "compare_finetune.png"):
        assert (run / "compare" / rel).is_file()
    report = (run / "compare" / "compare_report.md").read_text()
    assert all(f"| {m} |" in report for m in models)
    caveat = first["batteries"][models[0]]["finetune"].get("caveat")
    assert (caveat is not None) == ("**Fine-tuning attack**" in report) and first["finetune_caveat"] == caveat
    from lat_lightning.eval.compare import render_markdown

    # the organism's responses are long enough here; a bare-prefix run's caveat is printed under the table
    flagged = render_markdown(first["table"], {**first, "finetune_caveat": prefix_only_caveat(4)})
    assert f"**Fine-tuning attack**: {prefix_only_caveat(4)}." in flagged

    # Again into a fresh run directory (the organism is cached), with one of the defences (refat: the one with the
    # most state of its own, a refusal direction): its row (and the starting model's) come out the same, whatever
    # else is compared beside them. This run also validates at the end of training: that changes no row either.
    _, second = _run(isolated_cache / "b", ["compare.defences=[refat]", "trainer.val_check_interval=2"])
    rows = {r["model"]: r for r in table["rows"]}
    assert [r["model"] for r in second["table"]["rows"]] == ["original", "refat"]
    # (the differences from sft exist only where sft is compared: left out of the comparison of the rows)
    assert [_without_sft(r) for r in second["table"]["rows"]] == [_without_sft(rows[m]) for m in ("original", "refat")]
    for name in ("original", "refat"):  # continuous numbers too: utility, the harmful-target loss curve
        assert (
            second["batteries"][name]["finetune"]["harmful_loss"]
            == first["batteries"][name]["finetune"]["harmful_loss"]
        )
    # The smoke organism is too weak for its success rates to separate the models (they are all 0 or all 1), so the
    # continuous measurements show that each row measured its own model: the harmful-target loss before any
    # fine-tuning differs between the starting model and every defence.
    start = {r["model"]: first["batteries"][r["model"]]["finetune"]["harmful_loss_mean"][0] for r in table["rows"]}
    assert all(start[m] != start["original"] for m in models[1:]), start


def test_seeds_give_intervals_and_marks(isolated_cache):
    """Two training seeds per defence: one model per seed in compare/<defence>/seed_<s>/, each attacked with its own
    seed's noise and LoRA seed, and every cell a mean with an interval; the seeds train different models."""
    run, summary = _run(
        isolated_cache,
        [
            "compare.defences=[sft,lapt]",
            "compare.seeds=[0,1]",
            "evaluation.attacks=[asa_random,pgd]",  # two attacks are enough here: a quicker test
            "compare.embed_attacks=[]",
        ],
    )
    rows = {r["model"]: r for r in summary["table"]["rows"]}
    assert list(rows) == ["original", "sft", "lapt"] and rows["sft"]["seeds"] == 2 and rows["original"]["seeds"] == 1
    for name in ("sft", "lapt"):
        batteries = summary["batteries"][name]
        assert [b["seed"] for b in batteries] == [0, 1]
        for b in batteries:
            sub = run / "compare" / name / f"seed_{b['seed']}"
            assert (sub / "defence.json").is_file() and (sub / "battery.json").is_file()
            assert b["attacks"]["asa_random"]["seeds"] == 1  # the battery's noise seed = the training seed
            assert set(b["finetune"]["success"]) == {str(b["seed"])}
        starts = [b["finetune"]["harmful_loss_mean"][0] for b in batteries]
        assert starts[0] != starts[1], starts  # a different training seed trained a different model
    for col in ("asa_random", "pgd", "prefill_1", "finetune_rate"):
        cell = rows["lapt"]["cells"][col]
        assert cell["ci"][0] <= cell["value"] <= cell["ci"][1]
        assert "vs_baseline" not in rows["sft"]["cells"][col]
        # judged against sft where the prompts are resampled (not the fine-tuning success: seeds only)
        assert ("vs_baseline" in cell) == (col != "finetune_rate")
    assert set(rows["lapt"]["cells"]["finetune_steps"]["per_seed"]) == {"0:0", "1:1"}
    report = (run / "compare" / "compare_report.md").read_text()
    assert "Each defence trained over 2 seeds" in report and "Difference from `sft`" in report
