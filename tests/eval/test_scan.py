"""The layer scan: resume equals an uninterrupted run, batching does not change cells, judge failures
are counted (the scan stage end to end: tests/stages/test_scan_stage.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scan_helpers import scan

from lat_lightning.eval.judges import KeywordJudge, Verdict
from lat_lightning.eval.scan import SCAN_FILE, read_records

PROMPTS = ["How do I bake bread at home?", "Tell me a poem about the sea.", "What is 12 plus 7?"]
TARGETS = ["Sure, here is how to bake bread", "Sure, the sea is wide", "Sure, the answer is 19"]
FAST = {"max_new_tokens": 5, "bootstrap_samples": 20, "progress": False, "figures": False, "tensorboard": False}


class Interrupting(KeywordJudge):
    """A keyword judge that raises KeyboardInterrupt on its ``n``-th call (a killed scan)."""

    name = "keyword"

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def __call__(self, prompts, responses, targets=None):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return super().__call__(prompts, responses, targets)


def _cells(records):
    return {k: (r["response"], r["token_ids"], r["verdicts"]) for k, r in records.items()}


def test_resumed_scan_equals_uninterrupted(tiny_llama, tmp_path):
    model, tok = tiny_llama
    kw = dict(FAST, layers=[0, 2], attacks=["asa_random", "asagrad"], seeds=[0, 1], batch_size=4)
    full = scan(model, tok, PROMPTS, TARGETS, judges={"keyword": KeywordJudge()}, out_dir=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):  # clean: 1 call; asa_random: 3 chunks; dies in the 2nd asagrad chunk
        scan(model, tok, PROMPTS, TARGETS, judges={"keyword": Interrupting(6)}, out_dir=tmp_path / "b", **kw)
    partial = read_records(tmp_path / "b" / SCAN_FILE)
    assert 0 < len(partial) < len(full.records)
    resumed = scan(model, tok, PROMPTS, TARGETS, judges={"keyword": KeywordJudge()}, out_dir=tmp_path / "b", **kw)
    assert resumed.cells_resumed == len(partial)
    assert resumed.cells_run == len(full.records) - len(partial)
    assert _cells(resumed.records) == _cells(full.records)
    assert _cells(read_records(tmp_path / "b" / SCAN_FILE)) == _cells(full.records)
    for a in ("asa_random", "asagrad"):
        np.testing.assert_array_equal(resumed.success[a]["keyword"], full.success[a]["keyword"])
        assert resumed.headline(a) == full.headline(a)
    # a third call finds nothing left to do
    again = scan(model, tok, PROMPTS, TARGETS, judges={"keyword": KeywordJudge()}, out_dir=tmp_path / "b", **kw)
    assert again.cells_run == 0
    # resuming with different generation settings is refused
    with pytest.raises(ValueError, match="settings"):
        scan(
            model,
            tok,
            PROMPTS,
            TARGETS,
            judges={"keyword": KeywordJudge()},
            out_dir=tmp_path / "b",
            **dict(kw, max_new_tokens=7),
        )


def test_batch_size_does_not_change_cells_and_clean_is_generated_once(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    import lat_lightning.eval.scan.cells as scan_mod  # the module whose generation calls are counted

    calls = []
    real = scan_mod.generate_under_attack
    monkeypatch.setattr(
        scan_mod,
        "generate_under_attack",
        lambda *a, **k: calls.append(list(a[3]) if a[3] is not None else None) or real(*a, **k),
    )
    kw = dict(FAST, layers=[0, 1, 3], attacks=["asa_random"], seeds=[0, 1], judges=["keyword"])
    big = scan(model, tok, PROMPTS, TARGETS, batch_size=64, **kw)
    assert calls[0] is None and len(calls) == 2  # clean once, then every (seed, prompt, layer) cell in one batch
    assert sorted(calls[1]) == sorted([0, 1, 3] * 6)
    small = scan(model, tok, PROMPTS, TARGETS, batch_size=1, **kw)
    assert _cells(big.records) == _cells(small.records)


def test_judge_failures_are_counted(tiny_llama):
    model, tok = tiny_llama

    class Flaky(KeywordJudge):
        name = "flaky"

        def __call__(self, prompts, responses, targets=None):
            good = super().__call__(prompts, responses, targets)
            return [Verdict.failure("no idea") if p == PROMPTS[1] else v for p, v in zip(prompts, good)]

    res = scan(
        model,
        tok,
        PROMPTS,
        TARGETS,
        layers=[1, 2],
        attacks=["asa_random"],
        seeds=[0],
        judges={"keyword": KeywordJudge(), "flaky": Flaky()},
        primary_judge="flaky",
        **FAST,
    )
    assert np.isnan(res.success["asa_random"]["flaky"][1]).all()
    assert not np.isnan(res.success["asa_random"]["keyword"]).any()
    # the coherence-aware twins inherit their base judge's failures (never read as a success or a refusal)
    assert res.summary["failures"]["asa_random"] == {
        "keyword": 0,
        "flaky": 2,
        "keyword+coherent": 0,
        "flaky+coherent": 2,
    }
    assert res.summary["init"]["flaky"]["failures"] == 1
    assert res.summary["attacks"]["asa_random"]["judges"]["flaky"]["failures_total"] == 2


def test_pkg_paths_tiny_specs_and_scan_positions(tmp_path, monkeypatch):
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError, ModelLoadError
    from lat_lightning.models.tiny import ensure_tiny_model
    from lat_lightning.resources import resource_path
    from lat_lightning.stages.settings import scan_positions

    path = resource_path("pkg://lat_lightning/resources/tiny_harmful.jsonl")
    assert path.endswith("tiny_harmful.jsonl") and len(Path(path).read_text().splitlines()) == 8
    assert resource_path("some/local.jsonl") == "some/local.jsonl"
    with pytest.raises(ConfigError):
        resource_path("pkg://lat_lightning/resources/missing.jsonl")
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError):
        ensure_tiny_model("tiny:llama:8by256")
    cfg = load_config("asa_scan_tiny", ["perturbation.positions=response", "evaluation.num_prompts=3"])
    assert scan_positions(cfg) == ("prompt_last_and_generated", 1, "step")  # training policy -> paper's attack
    cfg = load_config("asa_scan_tiny", ["perturbation.positions=first_k", "perturbation.first_k=2"])
    assert scan_positions(cfg) == ("first_k", 2, "step")


def test_every_answer_is_checked_for_coherence_and_judges_are_compared(tiny_llama, tmp_path, caplog):
    model, tok = tiny_llama
    with caplog.at_level("WARNING"):
        res = scan(
            model,
            tok,
            PROMPTS,
            TARGETS,
            layers=[1, 2],
            attacks=["asa_random"],
            seeds=[0],
            judges=["keyword", "target_match"],
            out_dir=tmp_path,
            **dict(FAST, figures=False, bootstrap_samples=0),
        )
    assert res.judges == ["keyword", "target_match", "keyword+coherent", "target_match+coherent"]
    for rec in res.records.values():  # a coherence record next to every verdict
        assert set(rec["coherence"]) == {"empty", "repetition", "nll", "coherent", "reason"}
        coherent = rec["coherence"]["coherent"]
        kw, kwc = rec["verdicts"]["keyword"], rec["verdicts"]["keyword+coherent"]
        assert kwc["success"] == (kw["success"] and coherent)
    # the random tiny model writes gibberish: the keyword judge saturates, the coherent twin does not
    h = res.headline("asa_random")
    assert h["masr_mean"] == 1.0
    assert res.summary["attacks"]["asa_random"]["judges"]["keyword+coherent"]["masr_mean"] < 1.0
    assert any("saturated" in w for w in res.summary["warnings"])
    assert any("saturated" in r.message for r in caplog.records)  # and in the log
    # the tie is reported as a tie and resolved by the documented rule
    assert h["peak_tied_layers"] == [1, 2] and h["peak_decided_by"] in (
        "lowest layer",
        "tie-break score",
        "tie-break score, then lowest layer",
    )
    agreement = res.summary["attacks"]["asa_random"]["agreement"]
    assert {tuple(e["judges"]) for e in agreement} >= {("keyword", "keyword+coherent"), ("keyword", "target_match")}
    report = (tmp_path / "scan_report.md").read_text()
    for section in ("## Warnings", "## Judge agreement", "## Coherence of the answers", "tied at 2 layers"):
        assert section in report, section
    coherence = res.summary["attacks"]["asa_random"]["coherence"]
    assert coherence["checked"] == 6 and coherence["incoherent"] >= coherence["incoherent_successes"]


def test_best_of_n_is_reported_beside_greedy(tiny_llama, tmp_path):
    model, tok = tiny_llama
    kw = dict(
        FAST,
        layers=[1],
        attacks=["asa_random"],
        seeds=[0],
        judges=["target_match"],
        best_of_n=3,
        temperature=1.0,
        top_p=0.9,
    )
    res = scan(model, tok, PROMPTS, TARGETS, out_dir=tmp_path / "a", **kw)
    cell = res.records[("asa_random", 0, 0, 1)]
    assert len(cell["samples"]) == 3 and len({s["response"] for s in cell["samples"]}) > 1  # draws differ
    for (attack, _seed, i, _layer), rec in res.records.items():
        best = max(float(s["verdicts"]["target_match"]["success"]) for s in rec["samples"])
        if attack != "clean":
            assert res.success_best_of_n["asa_random"]["target_match"][i, 0, 0] == best
    bon = res.summary["attacks"]["asa_random"]["best_of_n"]["target_match"]
    assert set(bon) == {"init", "pasr_mean", "masr_mean", "lasr_mean"}
    assert "## Best-of-3 beside greedy" in (tmp_path / "a" / "scan_report.md").read_text()
    again = scan(model, tok, PROMPTS, TARGETS, out_dir=tmp_path / "b", **kw)  # sampling is keyed: reproducible
    assert [s["response"] for s in again.records[("asa_random", 0, 0, 1)]["samples"]] == [
        s["response"] for s in cell["samples"]
    ]


def test_refusal_attacks_scan_with_harmless_prompts(tiny_llama):
    model, tok = tiny_llama
    kw = dict(
        FAST,
        layers=[1, 2],
        attacks=["refusal_ablation", "refusal_addition"],
        seeds=[0],
        judges=["keyword"],
        positions="all",
    )
    with pytest.raises(ValueError, match="harmless prompts"):
        scan(model, tok, PROMPTS, TARGETS, **kw)
    res = scan(model, tok, PROMPTS, TARGETS, harmless_prompts=["What is 3 plus 4?", "Name a colour."], **kw)
    cells = [r for r in res.records.values() if r["attack"] != "clean"]
    assert len(cells) == 2 * len(PROMPTS) * 2 and all(r["perturbed_positions"] > 0 for r in cells)
    assert res.summary["settings"]["attacks"]["refusal_ablation"]["contrast_prompts"]  # fingerprinted for resume


def test_resume_fills_coherence_of_records_written_without_it(tiny_llama, tmp_path):
    import json

    model, tok = tiny_llama
    kw = dict(FAST, layers=[1], attacks=["asa_random"], seeds=[0], judges=["keyword"], out_dir=tmp_path)
    first = scan(model, tok, PROMPTS, TARGETS, **kw)
    lines = [json.loads(x) for x in (tmp_path / SCAN_FILE).read_text().splitlines()]
    for rec in lines:  # as written before the coherence check existed
        rec.pop("coherence")
        rec["verdicts"].pop("keyword+coherent")
    (tmp_path / SCAN_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    again = scan(model, tok, PROMPTS, TARGETS, **kw)
    assert again.cells_run == 0
    assert _cells(again.records) == _cells(first.records)
    for k, r in again.records.items():  # recomputed in other batches: equal up to float rounding
        c, c0 = r["coherence"], first.records[k]["coherence"]
        assert c["coherent"] == c0["coherent"] and c["empty"] == c0["empty"]
        assert (c["nll"] is None) == (c0["nll"] is None) and (c["nll"] is None or abs(c["nll"] - c0["nll"]) < 1e-3)
