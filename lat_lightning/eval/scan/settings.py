"""What one layer scan runs: typed, frozen settings (:class:`ScanSettings`), its data (:class:`ScanPrompts`) and how
to run it (:class:`ScanOptions`).

Stages build these once from the run config (:func:`lat_lightning.stages.settings.scan_settings`); the library
never reads the raw config. A range or a choice is written beside its field (:func:`lat_lightning.checks.setting`);
``__post_init__`` validates them and the checks that span fields, each ``ValueError`` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lat_lightning.attacks import Attack
from lat_lightning.attacks.positions import GENERATION_POLICIES
from lat_lightning.attacks.settings import AttackSettings, Layer
from lat_lightning.checks import setting, settings_copy, validate
from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.generation import GenerationSettings

SPLIT_MODES = ("prompt", "layer_stratified")  # lat_lightning.eval.asabench's split modes


@dataclass(frozen=True)
class JudgeSettings:
    """Who rules on the answers.

    Raises:
        ValueError: no judge, or a primary judge that is neither a judge nor a ``+coherent`` twin of one.
    """

    # judge names (lat_lightning.eval.judges.JUDGES, `<judge>+coherent`), judge objects, or name -> judge
    judges: Union[Sequence[Any], Mapping[str, Any]] = ("keyword",)
    primary_judge: Optional[str] = None  # the headline judge (None: the first)
    classifier_path: Optional[str] = None  # local directory of the `classifier` judge
    target_key_pattern: Optional[str] = None  # regex extracting the key `target_match` looks for in each target

    def __post_init__(self):
        if not isinstance(self.judges, Mapping):
            object.__setattr__(self, "judges", tuple(self.judges))
        if not len(self.judges):
            raise ValueError("judges must name at least one judge")


@dataclass(frozen=True)
class ScanSettings:
    """What a layer scan computes: attacks, layers, seeds, the generation-time positions policy, decoding, judges,
    the coherence check, the statistics and the extras (probes, ASABench export).

    Raises:
        ValueError: a value out of range (the message names the field).
    """

    attacks: Sequence[Union[str, Attack]] = ("asa_random",)  # names (lat_lightning.attacks.ATTACKS) or Attack objects
    layers: Optional[Sequence[Layer]] = None  # layers to scan (None: every block; "embed": the input embeddings)
    seeds: Sequence[int] = (0,)  # perturbation seeds (deterministic attacks run the first only)
    # generation-time positions policy (paper: the last prompt token and every generated one)
    positions: str = setting("prompt_last_and_generated", choices=GENERATION_POLICIES)
    first_k: int = setting(1, check=">= 1")  # k of the first_k policy
    refresh: str = setting("step", choices=("step", "fixed"))  # asa_random: a fresh draw per step, or one fixed draw
    perturbation: AttackSettings = field(default_factory=AttackSettings)  # the attacks' knobs (alpha, eps, steps...)
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # decoding, batching, formatting
    judging: JudgeSettings = field(default_factory=JudgeSettings)  # judges and the headline judge
    coherence: CoherenceSettings = field(default_factory=CoherenceSettings)  # the coherence check of every answer
    bootstrap_samples: int = setting(1000, check=">= 0")  # resamples of the confidence intervals (0: none)
    probes: bool = False  # also the NLL probe and position KL (ASA noise)
    probe_seeds: Optional[Sequence[int]] = None  # the probes' noise seeds (None: seeds)
    # test share of the ASABench export (None: no export)
    asabench_test_fraction: Optional[float] = setting(0.4, check="in [0, 1]")
    # prompt (disjoint) or layer_stratified (the reference)
    asabench_split_mode: str = setting("prompt", choices=SPLIT_MODES)
    split_seed: int = 0  # seed of the ASABench split and of the bootstrap

    def __post_init__(self):
        object.__setattr__(self, "attacks", tuple(self.attacks))
        if not self.attacks:
            raise ValueError("attacks must name at least one attack")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.probe_seeds is not None:
            object.__setattr__(self, "probe_seeds", tuple(int(s) for s in self.probe_seeds))
        validate(self)
        # An object with the same fields (a config section) is taken as a copy, like build_attack does.
        object.__setattr__(self, "perturbation", settings_copy(AttackSettings, self.perturbation))
        object.__setattr__(self, "coherence", settings_copy(CoherenceSettings, self.coherence))

    def attack_names(self) -> list[str]:
        """The attacks' names (an attack object's own ``name``)."""
        return [a.name if isinstance(a, Attack) else str(a) for a in self.attacks]


@dataclass(frozen=True)
class ScanPrompts:
    """The data of one scan: harmful prompts and what goes with each.

    Raises:
        ValueError: no prompt, or a per-prompt list whose length is not the number of prompts (named).
    """

    prompts: Sequence[str]  # harmful prompts (raw text; the chat template is applied per settings)
    targets: Optional[Sequence[Optional[str]]] = None  # harmful target completions (asagrad, pgd, target_match)
    prompt_keys: Optional[Sequence[int]] = None  # noise key of each prompt (None: 0..N-1; pass dataset indices)
    safe_responses: Optional[Sequence[str]] = None  # refusal per prompt (PGD's `away` term; None: the clean answers)
    harmless_prompts: Optional[Sequence[str]] = None  # harmless side of the refusal direction (refusal_* attacks)
    contrast_prompts: Optional[Sequence[str]] = None  # harmful side of the refusal direction (None: prompts)

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        n = len(self.prompts)
        if n == 0:
            raise ValueError("prompts must hold at least one prompt")
        for name in ("targets", "prompt_keys", "safe_responses"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} prompts")

    def keys(self) -> list[int]:
        """The noise key of every prompt."""
        return list(range(len(self.prompts))) if self.prompt_keys is None else [int(k) for k in self.prompt_keys]


@dataclass(frozen=True)
class ScanOptions:
    """How a scan runs (not what it computes: none of these change its records).

    Raises:
        ValueError: a shard that is not ``(rank, world_size)`` with ``0 <= rank < world_size``.
    """

    resume: bool = True  # continue an interrupted scan found in out_dir (skip finished cells)
    progress: bool = True  # a tqdm progress bar
    figures: bool = True  # PNG figures in out_dir
    tensorboard: bool = True  # figures and headline numbers in out_dir/tensorboard
    log_warnings: bool = True  # log the summary's warnings (they are in the summary either way)
    shard: Optional[tuple[int, int]] = None  # (rank, world_size) of a distributed scan (needs out_dir)
    reuse: Optional[tuple[Union[str, Path], Sequence[int]]] = None  # (directory, prompt keys) of an earlier scan

    def __post_init__(self):
        if self.shard is not None:
            rank, world = (int(v) for v in self.shard)
            if world < 1 or not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {self.shard}")


def generation_positions(
    positions: Optional[str], first_k: Optional[int], refresh: Optional[str], perturbation: AttackSettings
) -> tuple[str, int, str]:
    """The generation-time positions policy, first_k and refresh of a scan.

    The scan's own values (``evaluation.positions`` / ``first_k`` / ``refresh``) win when they are set. Otherwise
    ``perturbation.positions`` is used when it is a generation policy (``prompt_last_and_generated``, ``first_k``,
    ``all``); the training-only policies (``response``, ``prompt``, LAPT's default) fall back to the paper's attack,
    ``prompt_last_and_generated``.

    Args:
        positions / first_k / refresh: the scan's own values (``None``: not set).
        perturbation: the attacks' settings (the training attack's policy).
    """
    if positions is None:
        positions = (
            perturbation.positions if perturbation.positions in GENERATION_POLICIES else "prompt_last_and_generated"
        )
    first_k = int(first_k) if first_k is not None else int(perturbation.first_k)
    refresh = str(refresh) if refresh is not None else str(perturbation.refresh)
    return positions, first_k, refresh


__all__ = [
    "AttackSettings",
    "CoherenceSettings",
    "GenerationSettings",
    "JudgeSettings",
    "ScanOptions",
    "ScanPrompts",
    "ScanSettings",
    "generation_positions",
]
