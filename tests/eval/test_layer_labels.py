"""The input embeddings' layer reads ``embed`` wherever a person reads it (report.md, its sampled answers and LASR
figures, evaluation.md, the durability tables); the JSON files keep the scan's integer id ``-2`` (``scan.jsonl``,
``report.json``'s ``answer_samples``, ``fragile_layers.json``), which the code that reads them compares against."""

from __future__ import annotations

import json

from lat_lightning.eval.evaluate import write_evaluation
from lat_lightning.eval.formatting import fmt_value
from lat_lightning.eval.report import _lasr_figure, durability_table, render_markdown
from lat_lightning.eval.report_samples import answer_samples, samples_markdown
from lat_lightning.models.layers import EMBED


def _scan_jsonl(path):
    with open(path, "w") as fh:
        for i, layer in enumerate([EMBED, 6, EMBED, 14]):
            rec = {"attack": "pgd", "seed": 0, "prompt_idx": i, "layer": layer, "prompt": f"p{i}"}
            fh.write(json.dumps({**rec, "response": f"a{i}", "verdicts": {"refusal": {"success": True}}}) + "\n")


def _row(peak):
    return {"init": 0.0, "masr": 0.5, "masr_std": None, "pasr": 0.5, "peak_layer": peak, "peak_ties": 1}


def _result(samples):
    rows = {"pgd": {**_row(EMBED), "lasr": [0.5, 0.0], "layers": [EMBED, 6], "n_seeds": 1}}
    return {
        "primary_judge": "refusal",
        "judges": {"refusal": {"before": rows, "after": rows}},
        "utility": None,
        "pasr_relative_cut": {"pgd": 0.0},
        "lambda": 0.5,
        "lambda_curve": None,
        "fragile_layers": [EMBED],
        "n_prompts": 4,
        "layers": [EMBED, 6],
        "samples": [{"prompt": "p0", "layer": EMBED, "seed": 0, "before": "a", "after": "b", "after_success": False}],
        "answer_samples": samples,
        "durability": None,
        "embed": {},
        "warnings": {},
        "coherence": {},
        "tie_rule": None,
    }


def test_sampled_answers_show_embed_and_keep_the_id_in_json(tmp_path):
    _scan_jsonl(tmp_path / "scan.jsonl")
    samples = answer_samples(tmp_path / "scan.jsonl")
    assert {r["layer"] for r in samples["pgd"]} == {EMBED, 6, 14}  # report.json keeps the integer id
    lines = samples_markdown(samples, ["refusal"])
    rows = [line for line in lines if line.startswith("| ") and "| p" in line and "prompt" not in line]
    assert sorted(r.split("|")[1].strip() for r in rows) == ["14", "6", "embed", "embed"]


def test_report_markdown_names_the_embeddings_embed(tmp_path):
    _scan_jsonl(tmp_path / "scan.jsonl")
    md = render_markdown(_result(answer_samples(tmp_path / "scan.jsonl")), ["refusal"], "refusal")
    assert "layers [embed, 6]; fragile layer(s) chosen for LAPT: [embed]" in md
    assert "(layer embed, seed 0)" in md and "| embed | 0 | p0 |" in md
    assert "0.50 (embed)" in md  # the peak layer column
    assert "-2" not in md


def test_lasr_figure_and_durability_rows_label_embed(tmp_path):
    rows = _result({})["judges"]["refusal"]["before"]
    fig = _lasr_figure(rows, rows, "pgd", "refusal")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["embed", "6"]
    table = durability_table([{"kind": "layer", "label": "Most fragile layer", "original": EMBED, "hardened": 6}])
    assert "| Most fragile layer | embed | 6 | moved |" in table
    assert fmt_value(EMBED, kind="layer") == "embed" and fmt_value(3, kind="layer") == "3"


def test_evaluation_markdown_names_the_embeddings_embed(tmp_path):
    sample = {"prompt": "p", "attack": "asa_random", "layer": EMBED, "clean": "c", "attacked": "x"}
    write_evaluation(tmp_path, {"attack_success": 0.5}, [sample])
    assert "(asa_random, layer embed)" in (tmp_path / "evaluation.md").read_text()
    assert json.loads((tmp_path / "evaluation.json").read_text())["samples"][0]["layer"] == EMBED
