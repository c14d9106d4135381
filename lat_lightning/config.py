"""Typed run configuration (OmegaConf structured dataclasses).

Every recipe in ``recipes/`` is validated against :class:`RunConfig`. Unknown keys and values of the
wrong type are rejected with a one-line message that names the key and the closest valid key (see
:mod:`lat_lightning.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

STAGES = ("organism", "fit", "scan", "rescan", "evaluate", "interpolate", "durability", "report")


@dataclass
class LoraConfig:
    """LoRA adapters through peft. ``enabled=False`` means full fine-tuning."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers_to_transform: Optional[list[int]] = None


@dataclass
class QuantizationConfig:
    """bitsandbytes quantisation (the ``quant`` extra). At most one of the two flags."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = "organism"
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    use_chat_template: bool = True
    require_chat_template: bool = False
    system_prompt: Optional[str] = None
    device_map: Optional[Any] = None     # scan/evaluate/durability/interpolate: "auto" or {module: device} (accelerate)
    offload_folder: Optional[str] = None  # where a device_map's "disk" weights go
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class DataConfig:
    """Safety data (prompt / safe_response / harmful_response) and benign utility data."""

    harmful: Optional[str] = None
    harmful_split: str = "train"
    harmful_columns: dict[str, str] = field(default_factory=dict)
    benign: Optional[str] = None
    benign_split: str = "train"
    benign_columns: dict[str, str] = field(default_factory=dict)
    eval_harmful: Optional[str] = None
    eval_benign: Optional[str] = None
    asabench: Optional[str] = None
    default_safe_response: str = "I'm sorry, but I cannot help with that request."
    max_examples: Optional[int] = None
    max_length: int = 512
    truncation: str = "error"
    batch_size: int = 8
    num_workers: int = 0
    shuffle: bool = True


@dataclass
class PerturbationConfig:
    """The attack used by training and the settings every attack reads (``lat_lightning/attacks``, docs/attacks).

    ``attack`` names the training attack (``none`` = plain SFT). The other keys are the attacks' knobs; the
    scan, validation loop and durability suite build their attacks (``evaluation.attacks``) from the same
    section, with the generation-time positions policy of ``evaluation.positions`` when that is set.
    """

    attack: str = "none"                 # registry name (lat_lightning.attacks.ATTACKS)
    layers: list[int] = field(default_factory=list)  # attacked layers (0-based block outputs)
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


@dataclass
class LossConfig:
    """Defence-step loss weights (the outer update)."""

    toward_safe: float = 1.0             # CE toward the safe response y, with the attack applied
    away_from_harmful: float = 0.0       # -log(1 - p) pushing off the harmful response y*, attack applied
    utility: float = 0.0                 # CE on benign data, no attack
    away_logp_floor: float = -5.0        # tokens with log p below this add nothing to away_from_harmful
    mask_prompt: bool = True             # false: the CE toward y also covers the prompt tokens (reference code)


@dataclass
class TrainerConfig:
    """Lightning trainer and optimiser settings."""

    max_steps: int = 100
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    val_check_interval: Optional[int] = None
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: Optional[int] = None  # keep step<N>.ckpt history every N steps (None: last.ckpt only)
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    deterministic: bool = False
    fsdp_state_dict_type: str = "sharded"


@dataclass
class LoggingConfig:
    """Where runs are written."""

    root_dir: str = "runs"
    name: Optional[str] = None
    version: Optional[str] = None
    tensorboard: bool = True
    sample_generations: int = 4


@dataclass
class KLTeacherConfig:
    enabled: bool = False
    weight: float = 0.1
    direction: str = "teacher_student"
    chunk_size: int = 128


@dataclass
class FragileLayersConfig:
    enabled: bool = False
    method: str = "explicit"
    layers: list[int] = field(default_factory=list)
    top_k: int = 1
    num_prompts: int = 8
    candidate_layers: Optional[list[int]] = None


@dataclass
class WeightInterpolationConfig:
    enabled: bool = False
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    tolerance: float = 0.05
    utility: str = "multiple_choice"


@dataclass
class CallbacksConfig:
    kl_teacher: KLTeacherConfig = field(default_factory=KLTeacherConfig)
    fragile_layers: FragileLayersConfig = field(default_factory=FragileLayersConfig)
    weight_interpolation: WeightInterpolationConfig = field(default_factory=WeightInterpolationConfig)


@dataclass
class DurabilityConfig:
    """The durability suite (stage ``durability``, ``docs/durability.md``): original vs hardened model.

    Runtime scales with ``num_prompts`` x (``random_seeds`` + adaptive attacks) x layers, ``max_k``,
    ``finetune_steps`` / ``benign_steps`` and the number of ``rewrites``.
    """

    sections: list[str] = field(default_factory=lambda: ["rescan", "adaptive", "finetune", "trainability", "depth",
                                                         "rewrites"])
    num_prompts: Optional[int] = None
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    fragile_layers: Optional[list[int]] = None
    transfer: bool = True
    max_k: int = 5
    depth_attacks: list[str] = field(default_factory=lambda: ["asa_random", "asagrad"])
    prefill_ks: Optional[list[int]] = None
    finetune_steps: int = 8
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 4
    finetune_lora_r: int = 8
    finetune_lora_alpha: int = 16
    finetune_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    benign_steps: int = 4
    benign_lr: float = 1e-3
    adaptive_attacks: list[str] = field(default_factory=lambda: ["asagrad", "pgd"])
    rewrites: list[str] = field(default_factory=lambda: ["leetspeak", "char_spaced", "reversed_words", "rot13",
                                                         "roleplay"])
    max_new_tokens: Optional[int] = None


@dataclass
class EvaluationConfig:
    """Scan / evaluation settings."""

    attacks: list[str] = field(default_factory=lambda: ["asa_random"])
    layers: Optional[list[int]] = None
    positions: Optional[str] = None      # generation-time positions policy (None: perturbation.positions when it
    first_k: Optional[int] = None        # is a generation policy, else prompt_last_and_generated); first_k and
    refresh: Optional[str] = None        # refresh default to the perturbation section's
    seeds: list[int] = field(default_factory=lambda: [0])
    judges: list[str] = field(default_factory=lambda: ["keyword"])
    primary_judge: str = "keyword"
    classifier_path: Optional[str] = None
    target_key_pattern: Optional[str] = None
    max_new_tokens: int = 50
    do_sample: bool = False
    temperature: float = 1.0
    batch_size: int = 256                # rows per batched generation / teacher-forced pass (scan, durability); large
                                         # batches amortise each decode step's weight reads (lower if memory is short)
    share_prefix: bool = True            # compute each prompt's KV cache up to its last token once per chunk and
                                         # share it across the chunk's rows (false: the unshared path; same tokens)
    probes: Optional[bool] = None        # NLL probe + position KL after the scan; null = on only where cheap (models of
                                         # at most 50M parameters, e.g. the tiny models and the organism), see docs/scan
    num_prompts: Optional[int] = None
    bootstrap_samples: int = 1000
    utility_data: Optional[str] = None
    utility_kind: str = "multiple_choice"
    split_test_fraction: float = 0.4
    split_mode: str = "prompt"
    model_path: Optional[str] = None
    compare_path: Optional[str] = None
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)


@dataclass
class OrganismConfig:
    """The embedded CPU model organism (see ``lat_lightning/organism``). Which organism is set by
    ``model.name_or_path`` (``organism`` or ``organism:<preset>``); it is built once, then cached. The
    pipeline builds (or reuses) it before any stage runs and replaces every organism name, ``organism://``
    data name and ``organism`` utility kind by paths (:func:`lat_lightning.stages.organism.resolve_organism`).
    ``rebuild`` builds it again even when cached (a fresh run with the ``organism`` stage only)."""

    rebuild: bool = False


@dataclass
class RunConfig:
    """A whole run: what it does (``stages``) and every setting it needs."""

    stages: list[str] = field(default_factory=lambda: ["fit"])
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


# Values that must come from a fixed set (attack names and positions policies come from their registries in
# lat_lightning.attacks and are checked by lat_lightning.cli). Checked after merging so that a typo in a string
# option fails loudly instead of silently falling through to a default branch.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.truncation": ("error", "left", "right", "drop"),
    "evaluation.refresh": ("step", "fixed"),
    "perturbation.refresh": ("step", "fixed"),
    "perturbation.layer_sampling": ("all", "one"),
    "perturbation.sign": ("descend", "ascend"),
    "perturbation.eps_mode": ("absolute", "relative"),
    "perturbation.norm": ("l2", "linf"),
    "perturbation.norm_scope": ("token", "sequence"),
    "perturbation.optimizer": ("adamw", "sign"),
    "perturbation.init": ("zero", "random"),
    "trainer.scheduler": ("cosine", "linear", "constant"),
    "trainer.fsdp_state_dict_type": ("sharded", "full"),
    "callbacks.kl_teacher.direction": ("teacher_student", "student_teacher"),
    "callbacks.fragile_layers.method": ("explicit", "nll_probe", "grad_norm", "scan"),
    # organism: the organism's benign tasks, replaced by `contains` on its data file before any stage runs
    "callbacks.weight_interpolation.utility": ("multiple_choice", "exact_match", "contains", "organism"),
    "evaluation.utility_kind": ("multiple_choice", "exact_match", "contains", "organism"),
    "evaluation.split_mode": ("prompt", "layer_stratified"),
}

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
