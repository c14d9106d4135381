"""The attacks' settings: one frozen dataclass every attack reads (the run config's ``perturbation`` section).

The run config's schema (:mod:`lat_lightning.config`) is generated from this class, so a key's default and its
comment live here, beside the attacks that read it. Stages build an :class:`AttackSettings` once from the run
config (:mod:`lat_lightning.stages.settings`) and pass it down; library code never reads the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from lat_lightning.checks import setting, validate

# A layer: a block index (0-based: the output of that decoder block) or "embed" (the input embeddings); see
# lat_lightning.models.layers.parse_layers.
Layer = Union[int, str]


# The registries that hold the valid names, looked up when a value is checked (they import this module).
ATTACK_NAMES = "lat_lightning.attacks:attack_names"
POSITIONS_POLICIES = "lat_lightning.attacks.positions:policy_names"


@dataclass(frozen=True)
class AttackSettings:
    """The attack used by training and the settings every attack reads (``lat_lightning/attacks``, docs/attacks).

    ``attack`` names the training attack (``none`` = plain SFT). The other keys are the attacks' knobs; the
    scan, validation loop and durability suite build their attacks (``evaluation.attacks``) from the same
    section, with the generation-time positions policy of ``evaluation.positions`` when that is set.
    """

    attack: str = setting("none", choices=ATTACK_NAMES)  # registry name (lat_lightning.attacks.ATTACKS)
    # attacked layers (0-based block outputs, or embed)
    layers: list[Layer] = setting(default_factory=list, check="unique, each >= 0")
    # positions policy (lat_lightning.attacks.positions)
    positions: str = setting("response", choices=POSITIONS_POLICIES)
    first_k: int = setting(1, check=">= 1")  # k of the first_k policy
    # asa_random: new draw per step/position, or one fixed draw
    refresh: str = setting("step", choices=("step", "fixed"))
    alpha: float = setting(1.0, check="> 0")  # magnitude multiplier after Eq. 1 (asa_random, asagrad)
    seed: int = 0  # keys every random draw
    probability: float = setting(1.0, check="in (0, 1]")  # asa_random training: fraction of steps perturbed
    # asa_random training: all listed layers, or one drawn per step
    layer_sampling: str = setting("all", choices=("all", "one"))
    # asagrad: descend = toward the harmful target (-sign(g))
    sign: str = setting("descend", choices=("descend", "ascend"))
    steps: int = setting(16, check=">= 1")  # pgd: optimisation steps
    eps: float = setting(6.0, check="> 0")  # pgd: ball radius
    # pgd: absolute, or relative to the clean activation norm
    eps_mode: str = setting("absolute", choices=("absolute", "relative"))
    norm: str = setting("l2", choices=("l2", "linf"))  # pgd: l2 or linf ball
    norm_scope: str = setting("token", choices=("token", "sequence"))  # pgd: per token or per sequence norm
    optimizer: str = setting("adamw", choices=("adamw", "sign"))  # pgd: adamw (LAT reference) or sign steps
    lr: float = setting(1e-3, check="> 0")  # pgd: step size
    init: str = setting("zero", choices=("zero", "random"))  # pgd: zero or random start
    early_stop_loss: Optional[float] = None  # pgd: stop once the attack loss is this low
    toward_harmful: float = setting(1.0, check=">= 0")  # pgd attack loss: weight of CE toward the harmful target y*
    # pgd attack loss: weight of -log(1 - p) pushing off the refusal y
    away_from_safe: float = setting(0.0, check=">= 0")
    direction_token: int = -1  # refusal_*: prompt position the direction is read at (-1: last token)
    direction_scale: float = -1.0  # refusal_addition: h <- h + scale * r[l] (< 0 removes refusal)
    direction_prompts: int = 64  # refusal_* (scan, validation, durability): prompts per contrast set
    direction_refresh: int = 4  # refusal_* training: recompute the direction every N micro-batches

    def __post_init__(self) -> None:
        validate(self)


__all__ = ["AttackSettings", "Layer"]
