"""The attacks' settings: one frozen dataclass every attack reads (the run config's ``perturbation`` section).

The run config's schema (:mod:`lat_lightning.config`) is generated from this class, so a key's default and its
comment live here, beside the attacks that read it. Stages build an :class:`AttackSettings` once from the run
config (:mod:`lat_lightning.stages.settings`) and pass it down; library code never reads the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

# A layer: a block index (0-based: the output of that decoder block) or "embed" (the input embeddings); see
# lat_lightning.models.layers.parse_layers.
Layer = Union[int, str]


@dataclass(frozen=True)
class AttackSettings:
    """The attack used by training and the settings every attack reads (``lat_lightning/attacks``, docs/attacks).

    ``attack`` names the training attack (``none`` = plain SFT). The other keys are the attacks' knobs; the
    scan, validation loop and durability suite build their attacks (``evaluation.attacks``) from the same
    section, with the generation-time positions policy of ``evaluation.positions`` when that is set.
    """


    attack: str = "none"                 # registry name (lat_lightning.attacks.ATTACKS)
    layers: list[Layer] = field(default_factory=list)  # attacked layers (0-based block outputs, or embed)
    positions: str = "response"          # positions policy (lat_lightning.attacks.positions)
    first_k: int = 1                     # k of the first_k policy
    refresh: str = "step"                # asa_random: new draw per step/position, or one fixed draw
    alpha: float = 1.0                   # magnitude multiplier after Eq. 1 (asa_random, asagrad)
    seed: int = 0                        # keys every random draw
    probability: float = 1.0             # asa_random training: fraction of steps perturbed
    layer_sampling: str = "all"          # asa_random training: all listed layers, or one drawn per step
    sign: str = "descend"                # asagrad: descend = toward the harmful target (-sign(g))
    steps: int = 16                      # pgd: optimisation steps
    eps: float = 6.0                     # pgd: ball radius
    eps_mode: str = "absolute"           # pgd: absolute, or relative to the clean activation norm
    norm: str = "l2"                     # pgd: l2 or linf ball
    norm_scope: str = "token"            # pgd: per token or per sequence norm
    optimizer: str = "adamw"             # pgd: adamw (LAT reference) or sign steps
    lr: float = 1e-3                     # pgd: step size
    init: str = "zero"                   # pgd: zero or random start
    early_stop_loss: Optional[float] = None  # pgd: stop once the attack loss is this low
    toward_harmful: float = 1.0          # pgd attack loss: weight of CE toward the harmful target y*
    away_from_safe: float = 0.0          # pgd attack loss: weight of -log(1 - p) pushing off the refusal y
    direction_token: int = -1            # refusal_*: prompt position the direction is read at (-1: last token)
    direction_scale: float = -1.0        # refusal_addition: h <- h + scale * r[l] (< 0 removes refusal)
    direction_prompts: int = 64          # refusal_* (scan, validation, durability): prompts per contrast set
    direction_refresh: int = 4           # refusal_* training: recompute the direction every N micro-batches


__all__ = ["AttackSettings", "Layer"]
