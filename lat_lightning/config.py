"""Typed run configuration (OmegaConf structured dataclasses).

Every recipe in ``recipes/`` is validated against :class:`RunConfig`. Unknown keys and values of the
wrong type are rejected with a one-line message that names the key and the closest valid key (see
:mod:`lat_lightning.cli`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from lat_lightning.attacks.settings import POSITIONS_POLICIES, AttackSettings, Layer
from lat_lightning.checks import setting, walk
from lat_lightning.data.settings import DataSettings
from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.durability.settings import DurabilityChecks
from lat_lightning.models.settings import LoraSettings, ModelSettings, QuantizationSettings
from lat_lightning.training.objectives import (
    BoosterSettings,
    CircuitBreakersSettings,
    RepNoiseSettings,
    VaccineSettings,
)
from lat_lightning.training.settings import LossSettings, TrainerSettings

OBJECTIVE_SETTINGS = (CircuitBreakersSettings, RepNoiseSettings, VaccineSettings, BoosterSettings)
STAGES = ("organism", "fit", "scan", "rescan", "evaluate", "interpolate", "durability", "compare", "report")


def _as_list(hint: Any) -> Any:
    """``tuple[X, ...]`` (inside ``Optional`` too) as ``list[X]``: frozen settings hold tuples, recipes write lists."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[args[0]]  # type: ignore[valid-type]
    if origin is typing.Union:
        return typing.Union[tuple(_as_list(a) for a in args)]
    return hint


def schema_of(settings_cls: type, name: str, nested: Optional[dict[Any, type]] = None) -> type:
    """A mutable copy of a frozen settings dataclass, to be a section of the OmegaConf schema.

    The settings class stays the one place a key's type, default and comment are written; OmegaConf marks the
    node of a frozen dataclass read-only, which the pipeline's config rewriting (organism paths) cannot use.

    Args:
        settings_cls: the package-owned frozen settings dataclass.
        name: the schema class's name (as recipes' error messages show it).
        nested: settings class -> schema class for fields that hold another settings class.
    """
    nested = nested or {}
    hints = typing.get_type_hints(settings_cls)
    namespace: dict[str, Any] = {"__annotations__": {}, "__doc__": settings_cls.__doc__, "__module__": __name__}
    for f in dataclasses.fields(settings_cls):
        namespace["__annotations__"][f.name] = _as_list(nested.get(hints[f.name], hints[f.name]))
        factory: Any = nested.get(f.default_factory, f.default_factory)
        default: Any = f.default
        if isinstance(default, tuple):  # a frozen class's tuple default: a list in the schema, as recipes write it
            factory, default = (lambda value=default: list(value)), dataclasses.MISSING
        namespace[f.name] = dataclasses.field(default=default, default_factory=factory, metadata=f.metadata)
    return dataclass(type(name, (), namespace))


if typing.TYPE_CHECKING:
    # mypy cannot use a class made at run time as a type: it checks each schema section as the settings class it is
    # a copy of (the same fields, types and defaults; only the copy is mutable).
    LoraConfig = LoraSettings
    QuantizationConfig = QuantizationSettings
    ModelConfig = ModelSettings
    DataConfig = DataSettings
    PerturbationConfig = AttackSettings
    LossConfig = LossSettings
    TrainerConfig = TrainerSettings
else:
    LoraConfig = schema_of(LoraSettings, "LoraConfig")
    QuantizationConfig = schema_of(QuantizationSettings, "QuantizationConfig")
    ModelConfig = schema_of(
        ModelSettings, "ModelConfig", {LoraSettings: LoraConfig, QuantizationSettings: QuantizationConfig}
    )

    DataConfig = schema_of(DataSettings, "DataConfig")

    # The ``perturbation`` section is the attacks' own settings class (lat_lightning.attacks.settings), made mutable
    # for OmegaConf (a frozen dataclass would make its node read-only).
    PerturbationConfig = schema_of(AttackSettings, "PerturbationConfig")

    # the defence objectives' own sections (lat_lightning.training.objectives), nested in ``loss``
    LossConfig = schema_of(
        LossSettings,
        "LossConfig",
        {cls: schema_of(cls, cls.__name__.replace("Settings", "Config")) for cls in OBJECTIVE_SETTINGS},
    )
    TrainerConfig = schema_of(TrainerSettings, "TrainerConfig")


@dataclass
class LoggingConfig:
    """Where runs are written."""

    root_dir: str = setting("runs", resume="where the run directory is looked up (--resume names it)")
    name: Optional[str] = setting(None, resume="where the run directory is looked up")
    version: Optional[str] = setting(None, resume="where the run directory is looked up")
    tensorboard: bool = True
    sample_generations: int = setting(4, check=">= 0")


@dataclass
class KLTeacherConfig:
    enabled: bool = False
    weight: float = setting(0.1, check="> 0")
    direction: str = setting("teacher_student", choices=("teacher_student", "student_teacher"))
    chunk_size: int = setting(128, check=">= 1")


@dataclass
class FragileLayersConfig:
    enabled: bool = False
    method: str = setting("explicit", choices=("explicit", "nll_probe", "grad_norm", "scan"))
    layers: list[Layer] = setting(default_factory=list, check="unique, each >= 0")
    top_k: int = setting(1, check=">= 1")
    num_prompts: int = setting(8, check=">= 1")
    candidate_layers: Optional[list[Layer]] = setting(None, check="not empty, unique, each >= 0")


@dataclass
class WeightInterpolationConfig:
    enabled: bool = False
    lambdas: list[float] = setting(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], check="not empty, unique, each in [0, 1]"
    )
    tolerance: float = setting(0.05, check=">= 0")
    utility: str = setting("multiple_choice", choices=("multiple_choice", "exact_match", "contains", "organism"))


@dataclass
class CallbacksConfig:
    kl_teacher: KLTeacherConfig = field(default_factory=KLTeacherConfig)
    fragile_layers: FragileLayersConfig = field(default_factory=FragileLayersConfig)
    weight_interpolation: WeightInterpolationConfig = field(default_factory=WeightInterpolationConfig)


# The durability suite's section is its own settings class (lat_lightning.eval.durability.DurabilityChecks).
if typing.TYPE_CHECKING:
    DurabilityConfig = DurabilityChecks
else:
    DurabilityConfig = schema_of(DurabilityChecks, "DurabilityConfig")


# The coherence check's section is its own settings class (lat_lightning.eval.coherence.CoherenceSettings).
if typing.TYPE_CHECKING:
    CoherenceConfig = CoherenceSettings
else:
    CoherenceConfig = schema_of(CoherenceSettings, "CoherenceConfig")


@dataclass
class EvaluationConfig:
    """Scan / evaluation settings."""

    attacks: list[str] = setting(default_factory=lambda: ["asa_random"], check="not empty, unique")
    validation_attacks: list[str] = field(default_factory=lambda: ["asa_random"])  # the fit's validation loop
    # held-out harmful prompts (the first of data.eval_harmful) each validation pass attacks; None: all of them. A
    # pass costs about one scan of these prompts at the training layers, so cap it on a slow model
    validation_prompts: Optional[int] = setting(None, check=">= 1")
    layers: Optional[list[Layer]] = setting(None, check="not empty, unique, each >= 0")
    # generation-time positions policy (None: perturbation.positions when it is a generation policy, else
    # prompt_last_and_generated); first_k and refresh default to the perturbation section's
    positions: Optional[str] = setting(None, choices=POSITIONS_POLICIES)
    first_k: Optional[int] = setting(None, check=">= 1")
    refresh: Optional[str] = setting(None, choices=("step", "fixed"))
    seeds: list[int] = setting(default_factory=lambda: [0], check="not empty, unique")
    judges: list[str] = setting(default_factory=lambda: ["keyword"], check="not empty, unique")
    primary_judge: str = "keyword"
    classifier_path: Optional[str] = None
    target_key_pattern: Optional[str] = None
    max_new_tokens: int = setting(50, check=">= 1")
    do_sample: bool = False
    temperature: float = setting(1.0, check="> 0")
    top_p: float = 1.0  # nucleus sampling threshold when sampling (1.0 = off)
    best_of_n: int = 1  # > 1: also sample N answers per cell; broken if any is a success
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    # rows per batched generation / teacher-forced pass (scan, durability); large batches amortise each decode step's
    # weight reads (lower if memory is short)
    batch_size: int = setting(256, check=">= 1", resume="rows per generation batch: results do not depend on it")
    # compute each prompt's KV cache up to its last token once per chunk and share it across the chunk's rows (false:
    # the unshared path; same tokens)
    share_prefix: bool = setting(
        True, resume="how each prompt's KV cache is computed: the same tokens either way (tested)"
    )
    probes: Optional[bool] = None  # NLL probe + position KL after the scan; null = on only where cheap (models of
    # at most 50M parameters, e.g. the tiny models and the organism), see docs/scan
    num_prompts: Optional[int] = setting(None, check=">= 1")
    bootstrap_samples: int = setting(1000, check=">= 0")
    # the judge that reads the validation loop's and the evaluate stage's benign answers (val/over_refusal: an answer
    # it does not count as a success is a refusal); keyword misses "I can't": use refusal on real text. The choices
    # are lat_lightning.eval.evaluate.OVER_REFUSAL_JUDGES (a test keeps them equal)
    over_refusal_judge: str = setting("keyword", choices=("keyword", "keyword_long", "refusal"))
    utility_data: Optional[str] = None
    utility_kind: str = setting("multiple_choice", choices=("multiple_choice", "exact_match", "contains", "organism"))
    split_test_fraction: float = setting(0.4, check="in [0, 1)")
    split_mode: str = setting("prompt", choices=("prompt", "layer_stratified"))
    model_path: Optional[str] = None
    compare_path: Optional[str] = None
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)


@dataclass
class CompareConfig:
    """The defence comparison (stage ``compare``, ``docs/defences.md``): every defence is trained from ``model`` on the
    same data, interpolated to the same utility tolerance (``callbacks.weight_interpolation``), then attacked by one
    battery: ``evaluation.attacks`` at ``evaluation.layers`` (MASR), ``embed_attacks`` at the input embeddings, the
    pre-fill attack and the fine-tuning attack curve (``evaluation.durability.finetune_*``)."""

    # names in lat_lightning.stages.defences.DEFENCES, trained in this order
    defences: list[str] = field(
        default_factory=lambda: [
            "sft",
            "lapt",
            "lat",
            "asagrad_at",
            "refat",
            "circuit_breakers",
            "repnoise",
            "vaccine",
            "booster",
        ]
    )
    # per defence, overrides of its training on top of the registry's, e.g. {lat: {perturbation: {steps: 4}}}; only
    # the sections perturbation, loss, trainer and callbacks.kl_teacher (the rest is shared by design)
    overrides: dict[str, Any] = field(default_factory=dict)
    include_original: bool = True  # a row for the starting model itself (no defence), attacked the same way
    # attacks also run at the input embeddings (column <attack>@embed); [] for none
    embed_attacks: list[str] = field(default_factory=lambda: ["pgd"])
    # pre-fill attack columns: the first k harmful-target tokens forced after the prompt, no perturbation; [] for none
    prefill_tokens: list[int] = field(default_factory=lambda: [1])
    finetune: bool = True  # the fine-tuning attack curve column (steps to break)
    # Training seeds: each defence is trained (and attacked) once per seed (run seed = that seed); the table shows the
    # mean over seeds with a 95 % interval. With several, each model is in compare/<defence>/seed_<s>/.
    seeds: Optional[list[int]] = setting(None, check="not empty, unique")  # None: [seed] (one training run)
    # The random parts of a seeded defence's battery (ASA-random noise, the fine-tuning attack's LoRA seed):
    # ``training_seed`` runs each once, keyed by the defence's training seed (the spread over training seeds then
    # holds every source of randomness; cost ~1/len(evaluation.seeds) of ``all``); ``all`` runs evaluation.seeds and
    # evaluation.durability.finetune_seeds for every seed. The starting model always runs all of them.
    battery_seeds: str = setting("training_seed", choices=("training_seed", "all"))
    bootstrap_samples: int = setting(2000, check=">= 100")  # draws of the intervals' bootstrap (docs/defences.md)


@dataclass
class OrganismConfig:
    """The embedded CPU model organism (see ``lat_lightning/organism``). Which organism is set by
    ``model.name_or_path`` (``organism`` or ``organism:<preset>``); it is built once, then cached. The
    pipeline builds (or reuses) it before any stage runs and replaces every organism name, ``organism://``
    data name and ``organism`` utility kind by paths (:func:`lat_lightning.stages.organism.resolve_organism`).
    ``rebuild`` builds it again even when cached (a fresh run with the ``organism`` stage only)."""

    rebuild: bool = setting(False, resume="a resumed run never rebuilds the organism")
    # Build seed: keys everything the build draws at random (the facility and word splits, every generated
    # training and evaluation row, the tokenizer corpus, the weight initialisation, the noise and the data
    # order), so each seed is an independent organism with its own held-out prompts. Part of the cache key
    # (``organism-s<seed>-<fingerprint>``); a resumed run may not change it. docs/organism.md#build-seeds.
    seed: int = setting(0, check=">= 0")
    # shipped: the default organism's weights shipped with the package (build seed 0; the same model on every
    # host, whose CPU kernels would otherwise train a different one: docs/organism.md#one-organism-on-every-host);
    # other presets and seeds, and stale shipped weights, are built. build: always build on this host (cached).
    weights: str = setting("shipped", choices=("shipped", "build"))


@dataclass
class RunConfig:
    """A whole run: what it does (``stages``) and every setting it needs."""

    stages: list[str] = setting(
        default_factory=lambda: ["fit"],
        check="not empty, unique",
        resume=("stages already done are skipped; stages added run with the run's saved settings"),
    )
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    organism: OrganismConfig = field(default_factory=OrganismConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


# Keys renamed or removed by the one-attack-stack redesign: a recipe that still uses one fails with this line.
RENAMED_KEYS: dict[str, str] = {
    "perturbation.strategy": "perturbation.attack",
    "perturbation.toward": "perturbation.toward_harmful",
    "perturbation.away": "perturbation.away_from_safe",
    "loss.toward": "loss.toward_safe",
    "loss.away": "loss.away_from_harmful",
}
REMOVED_KEYS: dict[str, str] = {
    "perturbation.stats_source": "the statistics of Eq. 1 always come from the perturbed activation itself",
}


# Every key's checks are written beside its field (lat_lightning.checks.setting); these maps are read off the schema
# for the preflight (ranges, choices) and the resume comparison (keys a resumed run may change, and why).
def _metadata(name: str) -> dict[str, Any]:
    return {key: f.metadata[name] for key, f in walk(RunConfig) if name in f.metadata}


# key -> range clauses ("in [0, 1)", ">= 1", "not empty, unique", "each >= 0"; lat_lightning.checks)
BOUNDS: dict[str, str] = _metadata("check")
# key -> its allowed values (a registry's callable for attack names and positions policies)
CHOICES: dict[str, Any] = _metadata("choices")
# key -> why a resumed run (--resume) may change it; any other difference from the run's saved config is refused
SAFE_ON_RESUME: dict[str, str] = _metadata("resume")
