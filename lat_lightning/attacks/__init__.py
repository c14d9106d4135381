"""Residual-stream perturbation strategies, chosen by name (``perturbation.strategy``)."""

from lat_lightning.config import PerturbationConfig
from lat_lightning.attacks.base import Perturbation, PerturbationStrategy, normalise_to, position_mask
from lat_lightning.attacks.asa_random import GaussianNormalised
from lat_lightning.attacks.none import NoPerturbation
from lat_lightning.attacks.pgd import PGD
from lat_lightning.attacks.asagrad import SignGradient

STRATEGIES: dict[str, type[PerturbationStrategy]] = {
    "none": NoPerturbation,
    "gaussian_normalised": GaussianNormalised,
    "sign_gradient": SignGradient,
    "pgd": PGD,
}


def build_strategy(cfg: PerturbationConfig) -> PerturbationStrategy:
    """Instantiate the strategy ``cfg.strategy`` names.

    Raises:
        ValueError: for an unknown name or an invalid setting (e.g. ``eps <= 0``, ``steps < 1``).
    """
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown perturbation strategy '{cfg.strategy}'; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)


__all__ = ["STRATEGIES", "build_strategy", "Perturbation", "PerturbationStrategy", "normalise_to", "position_mask"]
