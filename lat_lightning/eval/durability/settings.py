"""The durability suite's settings: what it checks and how it generates and judges.

Frozen: a stage builds them once from its run config (:func:`lat_lightning.stages.durability_settings.
durability_settings`) and passes them down; nothing in evaluation reads the run config. Each check sits beside its
field, in ``__post_init__``, and raises a :class:`ValueError` that starts with the field's name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lat_lightning.attacks import check_attack_name
from lat_lightning.attacks.settings import AttackSettings, Layer
from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.judging import build_judge_map, primary_judge_of

log = logging.getLogger(__name__)

SECTIONS = ("rescan", "adaptive", "finetune", "trainability", "depth", "rewrites")
MODELS = ("original", "hardened")  # the two models the suite compares, in table order


# Counts that must be at least one (None, where a field allows it, means "the default").
_AT_LEAST_ONE = ("num_prompts", "max_k", "finetune_steps", "finetune_eval_every", "finetune_batch_size",
                 "finetune_lora_r", "benign_steps", "max_new_tokens")


def _names(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _ints(values: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class DurabilityChecks:
    """Which checks the suite runs and their knobs (the run config's ``evaluation.durability``; docs/durability.md).

    Runtime scales with ``num_prompts`` x (``random_seeds`` + adaptive attacks) x layers, ``max_k``,
    ``finetune_seeds`` x (``finetune_steps`` + ``num_prompts`` x evaluated steps), ``benign_steps`` and the number
    of ``rewrites``.
    """

    sections: tuple[str, ...] = SECTIONS           # the checks to run (see SECTIONS)
    num_prompts: Optional[int] = None              # cap on the harmful evaluation prompts (None: all)
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # ASA random seeds (>= 5 for a spread)
    fragile_layers: Optional[tuple[Layer, ...]] = None  # None: the peak layers of both models' ASA re-scans
    transfer: bool = True                          # also attack the hardened model with the original's vectors
    max_k: int = 5                                 # first-k curves for k = 1..max_k
    depth_attacks: tuple[str, ...] = ("asa_random", "asagrad")
    prefill_ks: Optional[tuple[int, ...]] = None   # None: 0..max_k
    finetune_steps: int = 64                       # fine-tuning attack: the step budget of each curve
    finetune_seeds: tuple[int, ...] = (0, 1, 2)    # one fine-tune per seed (LoRA init and data order)
    finetune_eval_every: int = 4                   # greedy answers + harmful-target CE every N steps
    finetune_break_rate: float = 0.5               # a seed breaks at the first evaluated step with success >= this
    finetune_lr: float = 1e-3                      # LoRA learning rate of the fine-tuning attack
    finetune_batch_size: int = 4                   # pairs per step (both fine-tunes)
    finetune_lora_r: int = 8                       # LoRA rank / alpha / modules of both fine-tunes
    finetune_lora_alpha: int = 16
    finetune_target_modules: Optional[tuple[str, ...]] = None  # None: the model's attention projections
    benign_steps: int = 4                          # trainability: benign LoRA steps
    benign_lr: float = 1e-3
    adaptive_attacks: tuple[str, ...] = ("asagrad", "pgd")
    rewrites: tuple[str, ...] = ("leetspeak", "char_spaced", "reversed_words", "rot13", "roleplay")
    max_new_tokens: Optional[int] = None           # overrides the evaluation-wide max_new_tokens when set

    def __post_init__(self) -> None:
        from lat_lightning.eval.rewrites import REWRITES

        # Sequences from a config node or a list become tuples: the settings stay hashable and immutable.
        for name in ("sections", "depth_attacks", "adaptive_attacks", "rewrites"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        for name in ("random_seeds", "finetune_seeds"):
            object.__setattr__(self, name, _ints(getattr(self, name)))
        for name in ("fragile_layers", "finetune_target_modules", "prefill_ks"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) if name == "prefill_ks" else v for v in value))
        for name in self.sections:
            if name not in SECTIONS:
                raise ValueError(f"sections: unknown durability section '{name}'; choose from {', '.join(SECTIONS)}")
        for name in self.rewrites:
            if name not in REWRITES:
                raise ValueError(f"rewrites: unknown rewrite '{name}'; choose from {', '.join(REWRITES)}")
        for key in ("depth_attacks", "adaptive_attacks"):
            for name in getattr(self, key):
                check_attack_name(name, key, scan=True)  # ValueError "<key>: unknown attack ..."
        if not self.random_seeds:
            raise ValueError("random_seeds is empty; give at least one seed (5 or more for a meaningful spread)")
        if not self.finetune_seeds:
            raise ValueError("finetune_seeds is empty; give at least one seed (3 or more for a spread of the "
                             "fine-tuning-attack curve)")
        for name in _AT_LEAST_ONE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("finetune_lr", "finetune_lora_alpha", "benign_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.finetune_break_rate <= 1:
            raise ValueError(f"finetune_break_rate must be in (0, 1], got {self.finetune_break_rate}")
        if len(self.random_seeds) < 5:
            log.warning("durability: ASA random over %d seed(s); the issue asks for >= 5 for a spread",
                        len(self.random_seeds))

    @property
    def finetune_targets(self) -> list[str] | None:
        """The fine-tunes' LoRA targets (``None``: the model's attention projections, the fine-tune's default)."""
        return None if self.finetune_target_modules is None else list(self.finetune_target_modules)


@dataclass(frozen=True)
class DurabilitySettings:
    """Everything the suite reads: its checks (``dur``) and the evaluation-wide generation, judging and
    formatting settings it shares with the scan.

    ``max_new_tokens`` is the generation budget actually used: ``dur.max_new_tokens`` replaces it when set.
    """

    dur: DurabilityChecks = field(default_factory=DurabilityChecks)
    perturbation: AttackSettings = field(default_factory=AttackSettings)  # the attacks' knobs (alpha, PGD...)
    judges: tuple[str, ...] = ("keyword",)
    primary_judge: str = "keyword"
    classifier_path: Optional[str] = None
    target_key_pattern: Optional[str] = None
    max_new_tokens: int = 50
    batch_size: int = 16
    bootstrap_samples: int = 200
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    positions: str = "prompt_last_and_generated"  # the generation-time positions policy of the re-scans
    refresh: str = "step"
    seed: int = 0
    max_length: int = 512
    coherence: CoherenceSettings = field(default_factory=CoherenceSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "judges", _names(self.judges))
        if self.dur.max_new_tokens is not None:  # the durability override wins (kept in dur for the summary)
            object.__setattr__(self, "max_new_tokens", int(self.dur.max_new_tokens))
        if self.primary_judge not in self.judges:
            raise ValueError(f"primary_judge: '{self.primary_judge}' is not among the judges {list(self.judges)}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def resolve_judges(settings: DurabilitySettings, judges: Sequence[str] | Mapping[str, Any] | None = None
                   ) -> tuple[DurabilitySettings, dict[str, Any]]:
    """The judges of a run and the settings that go with them.

    Args:
        settings: the suite's settings.
        judges: judge names or ``name -> judge`` replacing ``settings.judges`` (``None``: those).

    Returns:
        ``(settings, judge map)``: the map has the ``+coherent`` twins when the coherence check adds them. With
        ``judges`` given, the settings' judges become their names and the primary judge is the map's first when
        the configured one is not in the map; without, the settings come back unchanged (resolving twice is
        harmless).
    """
    judge_map = build_judge_map(settings.judges if judges is None else judges, settings.coherence,
                                settings.classifier_path, settings.target_key_pattern)
    if judges is None:  # every configured judge is in the map, the primary one too
        return settings, judge_map
    primary = primary_judge_of(judge_map, settings.primary_judge)
    names = tuple(str(name) for name in judges)  # a map's keys
    return dataclasses.replace(settings, judges=names if primary in names else names + (primary,),
                               primary_judge=primary), judge_map


__all__ = ["MODELS", "SECTIONS", "DurabilityChecks", "DurabilitySettings", "resolve_judges"]
