"""Attacks on the residual stream, one file each, registered under ONE name.

The name is what training (``perturbation.attack``), the layer scan and the validation loop
(``evaluation.attacks``) and the durability suite (``evaluation.durability.adaptive_attacks`` /
``depth_attacks``) use. Each attack owns both what it adds during a teacher-forced training forward
(:meth:`~lat_lightning.attacks.base.Attack.make`) and what it adds during batched generation
(:meth:`~lat_lightning.attacks.base.Attack.plan`); positions policies live in
:mod:`lat_lightning.attacks.positions`.

Adding an attack: write ``lat_lightning/attacks/<name>.py`` with a subclass of
:class:`~lat_lightning.attacks.base.Attack` (docstring: the equation, the knobs, the cost) and add one line to
:data:`ATTACKS` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses

from lat_lightning.attacks.asa_random import ASARandom
from lat_lightning.attacks.asagrad import ASAGrad
from lat_lightning.attacks.base import Attack, Perturbation, normalise_to
from lat_lightning.attacks.none import NoAttack
from lat_lightning.attacks.pgd import PGD
from lat_lightning.attacks.plan import AttackPlan
from lat_lightning.attacks.positions import POLICIES, policy_mask, position_mask
from lat_lightning.attacks.refusal_ablation import RefusalAblation
from lat_lightning.attacks.refusal_addition import RefusalAddition
from lat_lightning.attacks.settings import AttackSettings
from lat_lightning.attacks.transfer import Transfer
from lat_lightning.checks import settings_copy

ATTACKS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "asa_random": ASARandom,
    "asagrad": ASAGrad,
    "pgd": PGD,
    "refusal_ablation": RefusalAblation,
    "refusal_addition": RefusalAddition,
}

# Names used before the one-stack redesign: a recipe that still uses them gets a one-line pointer.
RENAMED_ATTACKS = {"gaussian_normalised": "asa_random", "sign_gradient": "asagrad"}


# Scan lists may also name a variant of an attack with some of its numeric knobs set: ``asa_random@alpha=0.5`` or
# ``pgd@eps=0.1,steps=4`` (the rest from the perturbation section). The whole spec is the variant's name in every
# table, so one scan can sweep a knob (e.g. ASA random over alpha).
SPEC_SEPARATOR = "@"


def parse_attack_spec(spec: str, key: str = "evaluation.attacks") -> tuple[str, dict[str, float | int]]:
    """``(registry name, {knob: value})`` of ``name`` or ``name@knob=value,...``.

    Raises:
        ValueError: a knob that is not a numeric field of :class:`AttackSettings`, or a value that is not a number.
    """
    name, sep, params = str(spec).partition(SPEC_SEPARATOR)
    if not sep:
        return name, {}
    numeric = {f.name: f.type for f in dataclasses.fields(AttackSettings) if f.type in ("float", "int")}
    out: dict[str, float | int] = {}
    for part in params.split(","):
        knob, eq, value = part.partition("=")
        if not eq or knob.strip() not in numeric:
            raise ValueError(
                f"{key}: bad attack variant '{spec}'; write <attack>@<knob>=<number>[,...] with knobs from "
                f"{', '.join(sorted(numeric))}"
            )
        try:
            number = float(value) if numeric[knob.strip()] == "float" else int(value)
        except ValueError:
            raise ValueError(f"{key}: '{value}' in attack variant '{spec}' is not a number") from None
        out[knob.strip()] = number
    return name, out


def attack_class(spec: str) -> type[Attack]:
    """The registered class of an attack name or variant spec (``asa_random@alpha=0.5`` -> ``ASARandom``)."""
    return ATTACKS[parse_attack_spec(spec)[0]]


def attack_names(scan: bool = False) -> list[str]:
    """Registered names; ``scan=True`` leaves out ``none`` (nothing to scan)."""
    return [n for n in ATTACKS if not (scan and n == "none")]


def check_attack_name(name: str, key: str = "perturbation.attack", scan: bool = False) -> str:
    """``name`` if registered.

    Raises:
        ValueError: one line naming ``key``, the valid names and, for an old name, its new one.
    """
    base, knobs = parse_attack_spec(name, key)
    if knobs and not scan:
        raise ValueError(f"{key}: attack variants ('{name}') are for scan lists; set the knob in perturbation.*")
    if base in RENAMED_ATTACKS:
        raise ValueError(f"{key}: attack '{base}' was renamed '{RENAMED_ATTACKS[base]}'")
    valid = attack_names(scan)
    if base not in valid:
        raise ValueError(f"{key}: unknown attack '{base}'; choose from {', '.join(valid)}")
    return name


def build_attack(name: str, settings: AttackSettings | None = None, **overrides) -> Attack:
    """Instantiate the attack ``name`` with ``settings`` (a copy, ``overrides`` applied).

    Args:
        name: a key of :data:`ATTACKS`, or a variant spec ``<key>@<knob>=<number>,...`` (its knobs win over
            ``settings`` and ``overrides``; the attack's ``name`` is the whole spec).
        settings: the attacks' settings (defaults when ``None``; an object with the same fields is copied).
        overrides: fields of ``settings`` to replace in the copy (e.g. the scan's ``positions``).

    Raises:
        ValueError: for an unknown name or an invalid setting (e.g. ``eps <= 0``, ``steps < 1``).
    """
    check_attack_name(name, "attack", scan=SPEC_SEPARATOR in name)
    base, knobs = parse_attack_spec(name)
    settings = dataclasses.replace(settings_copy(AttackSettings, settings), **{**overrides, **knobs})
    attack = ATTACKS[base](settings)
    if knobs:
        attack.name = name  # the variant is its own row in every table
    return attack


__all__ = [
    "ATTACKS",
    "POLICIES",
    "RENAMED_ATTACKS",
    "Attack",
    "AttackPlan",
    "Perturbation",
    "Transfer",
    "attack_class",
    "attack_names",
    "build_attack",
    "check_attack_name",
    "normalise_to",
    "parse_attack_spec",
    "policy_mask",
    "position_mask",
]
