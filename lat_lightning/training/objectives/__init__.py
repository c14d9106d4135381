"""Defence objectives that are not "a training attack + loss weights": one file per defence, one registry line.

The default objective, ``adversarial``, is the module's own: the training attack's perturbation and the
``toward_safe`` / ``away_from_harmful`` weights (SFT, LAPT, LAT, sign-gradient AT, ReFAT). An objective named in
:data:`OBJECTIVES` replaces those safety terms by its own (``loss.objective``; its settings: ``loss.<name>``, a
frozen dataclass in its file). To add one: a file here with the equation in its module docstring, a subclass of
:class:`~lat_lightning.training.objectives.base.Objective` and its settings class, a line in :data:`OBJECTIVES`
and its settings field in :class:`lat_lightning.training.settings.LossSettings`.
"""

from __future__ import annotations

from typing import Any, Optional

from lat_lightning.training.objectives.base import Objective
from lat_lightning.training.objectives.booster import Booster, BoosterSettings
from lat_lightning.training.objectives.circuit_breakers import CircuitBreakers, CircuitBreakersSettings
from lat_lightning.training.objectives.repnoise import RepNoise, RepNoiseSettings
from lat_lightning.training.objectives.vaccine import Vaccine, VaccineSettings

ADVERSARIAL = "adversarial"  # the module's attack + loss-weights objective

OBJECTIVES: dict[str, type[Objective]] = {
    "circuit_breakers": CircuitBreakers,  # Zou et al. 2024: representation rerouting
    "repnoise": RepNoise,  # Rosati et al. 2024: harmful representations -> Gaussian noise
    "vaccine": Vaccine,  # Huang et al. 2024: alignment under worst-case attention-output perturbation
    "booster": Booster,  # Huang et al. 2024: penalty on a look-ahead harmful step's loss drop
}


def objective_names() -> tuple[str, ...]:
    """The values ``loss.objective`` accepts."""
    return (ADVERSARIAL, *OBJECTIVES)


def check_objective_attack(objective: str, attack: str) -> None:
    """A defence objective trains without a training attack (its own terms replace the attacked ones).

    Raises:
        ValueError: an objective other than ``adversarial`` with an attack other than ``none``.
    """
    if objective != ADVERSARIAL and attack != "none":
        raise ValueError(
            f"loss.objective={objective} replaces the training attack's loss: set perturbation.attack=none "
            "(or loss.objective=adversarial)"
        )


def build_objective(loss: Any) -> Optional[Objective]:
    """The objective ``loss.objective`` names, with its ``loss.<name>`` settings; ``None`` for ``adversarial``.

    Raises:
        ValueError: an unknown name.
    """
    name = str(loss.objective)
    if name == ADVERSARIAL:
        return None
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss.objective '{name}'; choose from {', '.join(objective_names())}")
    return OBJECTIVES[name](getattr(loss, name), toward_safe=float(loss.toward_safe))


__all__ = [
    "ADVERSARIAL",
    "OBJECTIVES",
    "Booster",
    "BoosterSettings",
    "CircuitBreakers",
    "CircuitBreakersSettings",
    "Objective",
    "RepNoise",
    "RepNoiseSettings",
    "Vaccine",
    "VaccineSettings",
    "build_objective",
    "check_objective_attack",
    "objective_names",
]
