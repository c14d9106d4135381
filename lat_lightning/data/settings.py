"""Where the safety and benign data come from: the run config's ``data`` section as frozen settings.

The run config's schema (:mod:`lat_lightning.config`) is generated from these classes (``config.schema_of``), so a
key's type, default and comment live here, beside the code that reads it. Stages build them once from the run config
(:mod:`lat_lightning.stages.settings`) and pass them down; library code never reads the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lat_lightning.checks import setting, validate


@dataclass(frozen=True)
class DataSettings:
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
    default_target: Optional[str] = None  # harmful target y* of every prompt when the data has none (ASAgrad, PGD)
    filter: dict[str, Any] = field(default_factory=dict)  # keep safety rows whose column == value (or is in a list)
    max_examples: Optional[int] = setting(None, check=">= 1")
    max_length: int = setting(512, check=">= 1")
    truncation: str = setting("error", choices=("error", "left", "right", "drop"))
    batch_size: int = setting(8, check=">= 1")
    num_workers: int = setting(
        0, check=">= 0", resume="data-loading processes only: the same batches in the same order"
    )
    shuffle: bool = True

    def __post_init__(self) -> None:
        validate(self)


__all__ = ["DataSettings"]
