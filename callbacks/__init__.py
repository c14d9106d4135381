"""Training callbacks shipped as lat_lightning.callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback

from lat_lightning.callbacks.fragile_layers import FragileLayerSelector
from lat_lightning.callbacks.kl_teacher import KLTeacher, kl_divergence_chunked
from lat_lightning.callbacks.weight_interpolation import WeightInterpolation


def build_training_callbacks(cfg, run_dir: Optional[str | Path] = None, scan=None) -> list[Callback]:
    """The callbacks ``cfg.callbacks`` enables, in order: FragileLayerSelector, KLTeacher,
    WeightInterpolation. ``scan``: the run's :class:`~lat_lightning.eval.scan.ScanSettings` (the layer selector
    needs them).

    The order matters: the layer selector runs in ``setup`` before anything else reads
    ``attack_layers``, and the interpolation runs last at the end of fit.
    """
    c = cfg.callbacks
    out: list[Callback] = []
    if c.fragile_layers.enabled:
        out.append(FragileLayerSelector.from_config(cfg, run_dir, scan))
    if c.kl_teacher.enabled:
        out.append(KLTeacher.from_config(cfg))
    if c.weight_interpolation.enabled:
        out.append(WeightInterpolation.from_config(cfg, run_dir))
    return out


__all__ = ["FragileLayerSelector", "KLTeacher", "WeightInterpolation", "build_training_callbacks",
           "kl_divergence_chunked"]
