"""Training callbacks shipped as lat_lightning.callbacks."""

from __future__ import annotations

from lat_lightning.callbacks.fragile_layers import FragileLayerSelector
from lat_lightning.callbacks.kl_teacher import KLTeacher, kl_divergence_chunked
from lat_lightning.callbacks.weight_interpolation import WeightInterpolation

__all__ = ["FragileLayerSelector", "KLTeacher", "WeightInterpolation", "kl_divergence_chunked"]
