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


def attack_names(scan: bool = False) -> list[str]:
    """Registered names; ``scan=True`` leaves out ``none`` (nothing to scan)."""
    return [n for n in ATTACKS if not (scan and n == "none")]


def check_attack_name(name: str, key: str = "perturbation.attack", scan: bool = False) -> str:
    """``name`` if registered.

    Raises:
        ValueError: one line naming ``key``, the valid names and, for an old name, its new one.
    """
    if name in RENAMED_ATTACKS:
        raise ValueError(f"{key}: attack '{name}' was renamed '{RENAMED_ATTACKS[name]}'")
    valid = attack_names(scan)
    if name not in valid:
        raise ValueError(f"{key}: unknown attack '{name}'; choose from {', '.join(valid)}")
    return name


def build_attack(name: str, settings: AttackSettings | None = None, **overrides) -> Attack:
    """Instantiate the attack ``name`` with ``settings`` (a copy, ``overrides`` applied).

    Args:
        name: a key of :data:`ATTACKS`.
        settings: the attacks' settings (defaults when ``None``; an object with the same fields is copied).
        overrides: fields of ``settings`` to replace in the copy (e.g. the scan's ``positions``).

    Raises:
        ValueError: for an unknown name or an invalid setting (e.g. ``eps <= 0``, ``steps < 1``).
    """
    check_attack_name(name)
    settings = dataclasses.replace(settings_copy(AttackSettings, settings), **overrides)
    return ATTACKS[name](settings)


__all__ = [
    "ATTACKS",
    "POLICIES",
    "RENAMED_ATTACKS",
    "Attack",
    "AttackPlan",
    "Perturbation",
    "Transfer",
    "attack_names",
    "build_attack",
    "check_attack_name",
    "normalise_to",
    "policy_mask",
    "position_mask",
]
