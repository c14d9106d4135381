"""What model to load and how: the run config's ``model`` section as frozen settings.

The run config's schema (:mod:`lat_lightning.config`) is generated from these classes (``config.schema_of``), so a
key's type, default and comment live here, beside the code that reads it. Stages build them once from the run config
(:mod:`lat_lightning.stages.settings`) and pass them down; library code never reads the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lat_lightning.checks import setting, validate


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through peft. ``enabled=False`` means full fine-tuning."""

    enabled: bool = False  # false: full fine-tuning
    r: int = setting(16, check=">= 1")  # adapter rank
    alpha: int = setting(32, check="> 0")  # scaling alpha / r
    dropout: float = setting(0.05, check="in [0, 1)")  # 0 is forced where fused expert weights are adapted (peft)
    # None: every linear layer of the decoder blocks + fused experts
    target_modules: Optional[list[str]] = setting(None, check="not empty, unique")
    # None: every decoder layer
    layers_to_transform: Optional[list[int]] = setting(None, check="not empty, unique, each >= 0")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class QuantizationSettings:
    """bitsandbytes quantisation (the ``quant`` extra). At most one of the two flags."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = setting("nf4", choices=("nf4", "fp4"))
    bnb_4bit_compute_dtype: str = setting("bfloat16", choices=("float32", "bfloat16", "float16"))
    bnb_4bit_use_double_quant: bool = True

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how."""

    name_or_path: str = "organism"
    gguf_file: Optional[str] = None  # a .gguf file inside name_or_path (a directory or hub id); see docs/models.md
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"))
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    use_chat_template: bool = True
    require_chat_template: bool = False
    system_prompt: Optional[str] = None
    device_map: Optional[Any] = None  # scan/evaluate/durability/interpolate: "auto" or {module: device} (accelerate)
    offload_folder: Optional[str] = None  # where a device_map's "disk" weights go
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)

    def __post_init__(self) -> None:
        validate(self)


__all__ = ["LoraSettings", "ModelSettings", "QuantizationSettings"]
