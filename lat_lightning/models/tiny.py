"""``tiny:<arch>[:<layers>x<hidden>]`` model names: tiny random models built on first use, then cached.

``model.name_or_path: tiny:llama`` gives a 4-layer, hidden-64 random Llama with the locally trained tiny
tokenizer (:mod:`lat_lightning.models.tiny_factory`); ``tiny:llama:8x256`` an 8-layer, hidden-256 one. The
directory lives under ``$LAT_LIGHTNING_CACHE`` (default ``~/.cache/lat_lightning``) in ``tiny/<name>`` and is
written atomically, so concurrent runs never see a half-written model. Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from lat_lightning.errors import ModelLoadError
from lat_lightning.resources.pypi import cache_root  # one cache root for tiny models, GGUF and pip:// files

TINY_PREFIX = "tiny:"
_SPEC = re.compile(r"^tiny:(?P<arch>[a-z0-9_]+)(?::(?P<layers>\d+)x(?P<hidden>\d+))?$")


def is_tiny_spec(name: str) -> bool:
    return isinstance(name, str) and name.startswith(TINY_PREFIX)


def _parse(spec: str) -> tuple[str, str, dict]:
    """``(architecture, cache directory name, build_tiny_model keyword arguments)`` of a ``tiny:`` name.

    Raises:
        ModelLoadError: malformed spec or unknown architecture.
    """
    from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES

    m = _SPEC.match(spec.strip())
    if m is None:
        raise ModelLoadError(
            f"bad tiny model name '{spec}'; write tiny:<arch> or tiny:<arch>:<layers>x<hidden>, "
            f"e.g. tiny:llama or tiny:llama:8x256"
        )
    arch = m.group("arch")
    if arch not in TINY_ARCHITECTURES:
        raise ModelLoadError(f"unknown tiny architecture '{arch}'; choose from {', '.join(TINY_ARCHITECTURES)}")
    if not m.group("layers"):
        return arch, arch, {}
    kwargs = {"num_layers": int(m.group("layers")), "hidden": int(m.group("hidden"))}
    if kwargs["num_layers"] < 1 or kwargs["hidden"] < 1:
        raise ModelLoadError(f"bad tiny model name '{spec}': layers and hidden size must be >= 1")
    return arch, f"{arch}-{kwargs['num_layers']}x{kwargs['hidden']}", kwargs


def tiny_model_config(spec: str):
    """The transformers config of the model ``spec`` names, without building it (its layer count, width and
    module names are those of the built model; the vocabulary size may differ).

    Raises:
        ModelLoadError: malformed spec or unknown architecture.
    """
    from lat_lightning.models.tiny_factory import tiny_config

    arch, name, kwargs = _parse(spec)
    built = cache_root() / "tiny" / name / "config.json"
    if built.is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(built.parent)
    return tiny_config(arch, vocab_size=384, **kwargs)  # the tiny tokenizer's size (tiny_factory.build_tokenizer)


def ensure_tiny_model(spec: str) -> Path:
    """Build (once) and return the directory of the tiny model ``spec`` names.

    Raises:
        ModelLoadError: malformed spec or unknown architecture.
    """
    from lat_lightning.models.tiny_factory import build_tiny_model

    arch, name, kwargs = _parse(spec)
    target = cache_root() / "tiny" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_model(arch, tmp, **kwargs)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race (target exists and is not empty)
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["TINY_PREFIX", "cache_root", "ensure_tiny_model", "is_tiny_spec", "tiny_model_config"]
