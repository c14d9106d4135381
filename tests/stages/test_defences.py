"""The defence registry of the comparison: what each defence sets, what an override may change."""

import pytest

from lat_lightning.cli import load_config
from lat_lightning.errors import ConfigError
from lat_lightning.stages.defences import DEFENCES, OVERRIDABLE, defence_config


@pytest.fixture(scope="module")
def cfg():
    return load_config("compare_defences")


def test_every_defence_sets_its_own_training_attack(cfg):
    attacks = {name: str(defence_config(cfg, name).perturbation.attack) for name in DEFENCES}
    assert attacks == {
        "sft": "none",
        "lapt": "asa_random",
        "lat": "pgd",
        "asagrad_at": "asagrad",
        "refat": "refusal_ablation",
        "circuit_breakers": "none",
        "repnoise": "none",
        "vaccine": "none",
        "booster": "none",
    }
    objectives = {name: str(defence_config(cfg, name).loss.objective) for name in DEFENCES}
    assert {n for n, o in objectives.items() if o != "adversarial"} == {
        "circuit_breakers",
        "repnoise",
        "vaccine",
        "booster",
    }
    assert all(objectives[n] == n for n in ("circuit_breakers", "repnoise", "vaccine", "booster"))
    assert list(cfg.compare.defences) == list(DEFENCES)  # the recipe compares every registered defence
    lat = defence_config(cfg, "lat")
    assert (lat.loss.toward_safe, lat.loss.away_from_harmful) == (0.5, 0.5)
    assert DEFENCES["refat"].needs_benign
    # the utility loss is the comparison's, the same for every defence
    assert {float(defence_config(cfg, n).loss.utility) for n in DEFENCES} == {float(cfg.loss.utility)} == {1.0}


def test_everything_but_the_defence_is_shared(cfg):
    """Model, data, evaluation, interpolation and the optimiser budget are the comparison's own, for every defence."""
    for name in DEFENCES:
        d = defence_config(cfg, name, attack_layers=[3])
        assert list(d.stages) == ["fit"]
        assert d.model == cfg.model and d.data == cfg.data and d.evaluation == cfg.evaluation
        assert d.callbacks.weight_interpolation == cfg.callbacks.weight_interpolation
        assert d.trainer.max_steps == cfg.trainer.max_steps and d.trainer.lr == cfg.trainer.lr
        assert list(d.perturbation.layers) == [3] and d.callbacks.fragile_layers.enabled is False
        assert d.perturbation.eps == cfg.perturbation.eps  # the attack knobs stay the battery's
    assert cfg.perturbation.attack == "asa_random"  # the comparison's own config is not changed


def test_overrides_apply_to_one_defence_only():
    cfg = load_config(
        "compare_defences",
        ["compare.overrides.lat.perturbation.steps=3", "compare.overrides.lat.loss.away_from_harmful=0.9"],
    )
    lat, lapt = defence_config(cfg, "lat"), defence_config(cfg, "lapt")
    assert lat.perturbation.steps == 3 and lat.loss.away_from_harmful == 0.9
    assert lapt.perturbation.steps == cfg.perturbation.steps == 8 and lapt.loss.away_from_harmful == 0.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("compare.overrides.lat.perturbation.stepz=3", "did you mean 'compare.overrides.lat.perturbation.steps'"),
        ("compare.overrides.lat.data.batch_size=3", "compare.overrides.lat.data cannot differ between defences"),
        ("compare.overrides.lat.callbacks.weight_interpolation.tolerance=0.5", "compare.overrides.lat.callbacks"),
    ],
)
def test_bad_overrides_fail_with_one_line(override, fragment):
    cfg = load_config("compare_defences", [override])
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("'", ".")):
        defence_config(cfg, "lat")


def test_kl_teacher_is_the_one_callback_a_defence_may_change():
    assert "callbacks.kl_teacher" in OVERRIDABLE
    cfg = load_config("compare_defences", ["compare.overrides.lat.callbacks.kl_teacher.enabled=true"])
    assert defence_config(cfg, "lat").callbacks.kl_teacher.enabled is True
    assert defence_config(cfg, "sft").callbacks.kl_teacher.enabled is False


def test_unknown_defence(cfg):
    with pytest.raises(ConfigError, match="did you mean 'lapt'"):
        defence_config(cfg, "lapd")
