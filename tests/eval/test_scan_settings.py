"""The scan's typed settings: every bad value is refused beside its field, and the run config becomes the same
settings for every caller (lat_lightning.stages.settings)."""

from __future__ import annotations

import dataclasses

import pytest

from lat_lightning.attacks.settings import AttackSettings
from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.generation import GenerationSettings
from lat_lightning.eval.probes import ProbeSettings
from lat_lightning.eval.scan import JudgeSettings, ScanOptions, ScanPrompts, ScanSettings


@pytest.mark.parametrize(
    "build,field",
    [
        (lambda: GenerationSettings(best_of_n=0), "best_of_n"),
        (lambda: GenerationSettings(batch_size=0), "batch_size"),
        (lambda: ScanSettings(positions="response"), "positions"),
        (lambda: ScanSettings(first_k=0), "first_k"),
        (lambda: ScanSettings(attacks=()), "attacks"),
        (lambda: ScanSettings(bootstrap_samples=-1), "bootstrap_samples"),
        (lambda: ScanSettings(asabench_test_fraction=1.5), "asabench_test_fraction"),
        (lambda: ScanSettings(asabench_split_mode="random"), "asabench_split_mode"),
        (lambda: JudgeSettings(judges=()), "judges"),
        (lambda: ScanPrompts([]), "prompts"),
        (lambda: ScanPrompts(["a", "b"], targets=["x"]), "targets"),
        (lambda: ScanPrompts(["a", "b"], prompt_keys=[1, 2, 3]), "prompt_keys"),
        (lambda: ScanPrompts(["a"], safe_responses=[]), "safe_responses"),
        (lambda: ScanOptions(shard=(2, 2)), "shard"),
        (lambda: CoherenceSettings(max_nll=-1.0), "max_nll"),
        (lambda: CoherenceSettings(max_repetition=-0.1), "max_repetition"),
        (lambda: ProbeSettings(batch_size=0), "batch_size"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_settings_are_frozen_and_normalised():
    s = ScanSettings(attacks=["asa_random"], seeds=[1, 2], layers=[0, "embed"])
    assert s.attacks == ("asa_random",) and s.seeds == (1, 2) and s.layers == (0, "embed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seeds = (3,)
    assert ScanPrompts(["a", 7]).prompts == ("a", "7") and ScanPrompts(["a", "b"]).keys() == [0, 1]


def test_a_config_section_is_copied_into_the_settings_class():
    """A config section with the same fields (what the durability suite holds) is taken as a settings copy."""
    from lat_lightning.config import CoherenceConfig, PerturbationConfig

    s = ScanSettings(perturbation=PerturbationConfig(alpha=3.0), coherence=CoherenceConfig(max_nll=4.0))
    assert type(s.perturbation) is AttackSettings and s.perturbation.alpha == 3.0
    assert type(s.coherence) is CoherenceSettings and s.coherence.max_nll == 4.0


def test_the_config_schema_and_the_coherence_settings_agree():
    """evaluation.coherence (lat_lightning.config) and CoherenceSettings have the same keys and defaults: the
    scan's settings record (scan_settings.json) is written from the latter."""
    from lat_lightning.config import CoherenceConfig

    assert dataclasses.asdict(CoherenceConfig()) == dataclasses.asdict(CoherenceSettings())


def test_the_run_config_becomes_scan_settings():
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError
    from lat_lightning.stages.settings import scan_settings, validation_settings

    cfg = load_config(
        "asa_scan_tiny",
        [
            "evaluation.positions=first_k",
            "evaluation.first_k=2",
            "evaluation.refresh=fixed",
            "evaluation.seeds=[3,4]",
            "evaluation.max_new_tokens=7",
            "evaluation.share_prefix=false",
            "perturbation.alpha=2.5",
            "evaluation.coherence.max_nll=4.5",
        ],
    )
    s = scan_settings(cfg)
    assert (s.positions, s.first_k, s.refresh, s.seeds) == ("first_k", 2, "fixed", (3, 4))
    assert s.generation.max_new_tokens == 7 and s.generation.share_prefix is False
    assert s.perturbation.alpha == 2.5 and s.coherence.max_nll == 4.5
    assert s.judging.primary_judge == cfg.evaluation.primary_judge
    # the validation loop: the configured positions policy, one seed, no intervals or exports
    v = validation_settings(cfg)
    assert (v.positions, v.first_k, v.refresh) == ("first_k", 2, "fixed")
    assert v.seeds == (3,) and v.bootstrap_samples == 0 and v.asabench_test_fraction is None and not v.probes
    assert v.attack_names() == [str(a) for a in cfg.evaluation.validation_attacks]
    with pytest.raises(ConfigError, match="unknown attack"):
        scan_settings(cfg, attacks=["asa_nonsense"])


def test_the_validation_loop_scans_with_the_configured_positions(tiny_llama, monkeypatch):
    """The validation scan used to drop evaluation.positions / first_k / refresh (run_scan's defaults ran)."""
    from lat_lightning.cli import load_config
    from lat_lightning.data.schema import SafetyExample
    from lat_lightning.eval.evaluate import EvaluationData, SafetyEvaluator
    from lat_lightning.stages.settings import validation_settings

    model, tok = tiny_llama
    cfg = load_config(
        "asa_scan_tiny",
        [
            "evaluation.positions=first_k",
            "evaluation.first_k=2",
            "evaluation.refresh=fixed",
            "evaluation.max_new_tokens=3",
        ],
    )
    import lat_lightning.eval.scan as scan_pkg

    seen = []
    real = scan_pkg.run_scan
    monkeypatch.setattr(
        scan_pkg, "run_scan", lambda m, t, data, settings, *a: seen.append(settings) or real(m, t, data, settings, *a)
    )
    examples = [SafetyExample(prompt="Open the vault.", safe_response="No.", harmful_response="Sure", index=4)]
    SafetyEvaluator(validation_settings(cfg), EvaluationData(harmful=examples), layers=[1]).attack_batch(
        model, tok, examples
    )
    assert [(s.positions, s.first_k, s.refresh, s.layers) for s in seen] == [("first_k", 2, "fixed", (1,))]
