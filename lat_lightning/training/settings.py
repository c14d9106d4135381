"""The defence step's loss weights and the trainer's settings: the run config's ``loss`` and ``trainer`` sections.

The run config's schema (:mod:`lat_lightning.config`) is generated from these classes (``config.schema_of``), so a
key's type, default and comment live here, beside the code that reads it. Stages build them once from the run config
(:mod:`lat_lightning.stages.settings`) and pass them down; library code never reads the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lat_lightning.checks import setting, validate
from lat_lightning.training.objectives import (
    ADVERSARIAL,
    BoosterSettings,
    CircuitBreakersSettings,
    RepNoiseSettings,
    VaccineSettings,
    objective_names,
)

# Lightning's precision names (lightning.fabric.connector._PRECISION_INPUT_STR)
PRECISIONS = (
    "32-true",
    "32",
    "16-mixed",
    "16-true",
    "16",
    "bf16-mixed",
    "bf16-true",
    "bf16",
    "64-true",
    "64",
    "transformer-engine",
    "transformer-engine-float16",
)


@dataclass(frozen=True)
class LossSettings:
    """Defence-step loss weights (the outer update)."""

    toward_safe: float = setting(1.0, check=">= 0")  # CE toward the safe response y, with the attack applied
    away_from_harmful: float = setting(0.0, check=">= 0")  # -log(1 - p) pushing off the harmful response y*, attacked
    utility: float = setting(0.0, check=">= 0")  # CE on benign data, no attack
    # tokens with log p below this add nothing to away_from_harmful
    away_logp_floor: float = setting(-5.0, check="< 0")
    mask_prompt: bool = True  # false: the CE toward y also covers the prompt tokens (reference code)
    # adversarial: the training attack + the weights above; another name: that defence's objective replaces the
    # toward_safe / away_from_harmful terms (lat_lightning.training.objectives, docs/defences.md)
    objective: str = setting(ADVERSARIAL, choices=objective_names)
    circuit_breakers: CircuitBreakersSettings = field(default_factory=CircuitBreakersSettings)
    repnoise: RepNoiseSettings = field(default_factory=RepNoiseSettings)
    vaccine: VaccineSettings = field(default_factory=VaccineSettings)
    booster: BoosterSettings = field(default_factory=BoosterSettings)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class TrainerSettings:
    """Lightning trainer and optimiser settings."""

    max_steps: int = setting(
        100,
        check=">= 1",
        resume=(
            "may only grow: the fit continues from its last checkpoint to the new step count (the LR schedule is "
            "stretched to it), and the stages after fit run again on the new model"
        ),
    )
    accelerator: str = setting("auto", choices=("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu"))
    devices: Any = 1
    num_nodes: int = setting(1, check=">= 1")
    strategy: str = "auto"
    precision: str = setting("32-true", choices=PRECISIONS)
    accumulate_grad_batches: int = setting(1, check=">= 1")
    gradient_clip_val: Optional[float] = setting(1.0, check=">= 0")
    val_check_interval: Optional[int] = setting(None, check=">= 1")
    log_every_n_steps: int = setting(1, check=">= 1", resume="logging cadence only")
    # keep step<N>.ckpt history every N steps (None: last.ckpt only)
    checkpoint_every_n_steps: Optional[int] = setting(None, check=">= 1", resume="checkpoint cadence only")
    lr: float = setting(1e-4, check="> 0")
    weight_decay: float = setting(0.0, check=">= 0")
    scheduler: str = setting("cosine", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = setting(0.1, check="in [0, 1)")
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.999], check="each in [0, 1)")
    deterministic: bool = False
    fsdp_state_dict_type: str = setting("sharded", choices=("sharded", "full"))

    def __post_init__(self) -> None:
        validate(self)


__all__ = ["LossSettings", "TrainerSettings"]
