"""Attack variants in scan lists: ``asa_random@alpha=0.5`` is ASA random with alpha 0.5, named by the whole spec."""

from __future__ import annotations

import pytest

from lat_lightning.attacks import (
    ASARandom,
    AttackSettings,
    attack_class,
    build_attack,
    check_attack_name,
    parse_attack_spec,
)


def test_a_variant_sets_its_knobs_and_keeps_its_spec_as_name():
    attack = build_attack("asa_random@alpha=0.25", AttackSettings(alpha=1.0, seed=3))
    assert isinstance(attack, ASARandom) and attack.name == "asa_random@alpha=0.25"
    assert attack.settings.alpha == 0.25 and attack.settings.seed == 3  # the rest from the settings given
    plain = build_attack("asa_random", AttackSettings(alpha=1.0))
    assert plain.name == "asa_random" and plain.settings.alpha == 1.0


def test_several_knobs_and_their_types():
    assert parse_attack_spec("pgd@eps=0.1,steps=4") == ("pgd", {"eps": 0.1, "steps": 4})
    assert attack_class("pgd@eps=0.1,steps=4").__name__ == "PGD"
    assert build_attack("pgd@steps=4").settings.steps == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("asa_random@beta=1", "bad attack variant"),
        ("asa_random@alpha", "bad attack variant"),
        ("asa_random@alpha=big", "is not a number"),
        ("asa_randm@alpha=0.5", "unknown attack 'asa_randm'"),
        ("asa_random@alpha=-1", "alpha"),
    ],
)
def test_bad_variants_fail_with_one_line(spec, message):
    with pytest.raises(ValueError, match=message):
        build_attack(spec)


def test_variants_are_for_scan_lists_only():
    assert check_attack_name("asa_random@alpha=0.5", "evaluation.attacks", scan=True) == "asa_random@alpha=0.5"
    with pytest.raises(ValueError, match="perturbation"):
        check_attack_name("asa_random@alpha=0.5", "perturbation.attack")
