"""``python -m benchmarks.real_organism`` end to end on the smoke preset (a tiny random Llama, a handful of
prompts): every stage of ``recipes/real_organism.yaml`` runs and every figure of the RESULT line is present and
finite (the real run's numbers are in docs/organism.md#the-real-organism)."""

from __future__ import annotations

import json

from benchmarks.real_organism import main, non_finite

SMALL = [
    "evaluation.num_prompts=2",
    "evaluation.layers=[embed,1]",
    "evaluation.seeds=[0,1]",
    "evaluation.max_new_tokens=3",
    "evaluation.bootstrap_samples=20",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "callbacks.weight_interpolation.lambdas=[0.0,0.5]",
    "perturbation.steps=2",
    # a random tiny model answers in gibberish, so a +coherent headline is 0 before and after and its PASR cut
    # undefined (0 / 0): the base judge leads here
    "evaluation.primary_judge=keyword_long",
]


def test_every_figure_of_the_result_is_present_and_finite(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    assert main(["--keep", str(tmp_path), "--preset", "smollm2_smoke", *SMALL]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    primary = result["primary_judge"]
    # the +coherent twins the scan adds get no bootstrap interval by design (eval/scan/summary.py): only those
    bad = [p for p in non_finite(result) if not (p.endswith("_ci") and "+coherent" in p and f".{primary}." not in p)]
    assert bad == []
    attacks = result["attacks"]["before"]
    assert set(attacks) == {
        "asa_random",
        "asa_random@alpha=0.25",
        "asa_random@alpha=1.0",
        "asagrad",
        "pgd",
        "refusal_ablation",
    }
    assert set(result["attacks"]["after"]) == set(attacks)
    assert all(primary in per_judge for per_judge in attacks.values())
    # the recipe's on-topic twin (harmful content, not only refusal-breaking) is in every attack's figures
    assert all("refusal+coherent+ontopic" in per_judge for per_judge in attacks.values())
    for model in ("original", "aligned", "hardened"):
        assert set(result["init"][model]) == {"harmful_eval", "harmbench_eval"}
        assert set(result["refusal"][model]) == {"benign_eval", "borderline_eval"}
    assert set(result["stage_s"]) == {"organism", "scan", "fit", "rescan", "report"}
    assert all(v >= 0 for v in result["stage_s"].values()) and result["wall_s"] > 0
    assert set(result["targets_met"]) >= {"init_strongreject_le_0.05", "asagrad_masr_ge_0.5", "agreement_within_0.05"}
    assert "lapt_benign_refusal_rise_le_0.05" in result["targets_met"]
    # the rescan stage judged the hardened model's unattacked answers like the organism stage the aligned one's
    assert set(result["init"]) == set(result["refusal"]) == {"original", "aligned", "hardened"}
    report = (tmp_path / "runs" / "real_organism" / "version_0" / "report.md").read_text()
    assert "## Sampled attacked answers" in report and "### pgd" in report
    assert "## Unattacked answers (keyword_long judge)" in report and "\n| hardened | " in report


def test_the_lapt_target_reads_the_strongest_unsaturated_attack():
    from benchmarks.real_organism import strongest_unsaturated

    def fig(rates: dict) -> dict:
        attacks = {a: {"refusal+coherent": {"pasr": p, "masr": m}} for a, (p, m) in rates.items()}
        return {"primary_judge": "refusal+coherent", "attacks": {"before": attacks}}

    # PGD breaks every prompt somewhere (MASR 1: saturated, whatever its PASR) and ASA random at 0.25 nothing:
    # ASAgrad (PASR 0.6) is the setting to cut, ahead of ASA random (0.2)
    rates = {"asa_random@alpha=0.25": (0.0, 0.0), "asagrad": (0.6, 0.9), "pgd": (0.94, 1.0), "asa_random": (0.2, 0.3)}
    assert strongest_unsaturated(fig(rates)) == "asagrad"
    assert strongest_unsaturated(fig({"pgd": (0.94, 1.0), "asa_random": (0.0, 0.0)})) is None
    assert strongest_unsaturated(fig({"a": (0.5, 0.6), "b": (0.5, 0.7)})) == "a"  # a tie: the first scanned
