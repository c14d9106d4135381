"""The default organism's built weights, shipped with the package, so that every host starts from the same model.

The build (:mod:`lat_lightning.organism.build`) repeats bitwise on one host, but its ~1000 optimiser steps
amplify the last-bit differences between CPU kernel paths (the vectorised ATen kernels of the host's instruction
set, MKL's code path) into a different organism: docs/organism.md#one-organism-on-every-host. The files of one
build (default preset, build seed 0) therefore ship in ``lat_lightning/resources/organism-s0-shipped/``, and
``organism.weights: shipped`` (the default) uses them instead of building.

Their ``organism.json`` records the build's cache key (:func:`~lat_lightning.organism.build.fingerprint`: recipe,
seed, build version and the data generators' source) and the SHA-256 of ``model.safetensors``. Shipped weights
are used only when both still hold: a change to the recipe or the data generators makes them stale, and the run
builds instead (saying why); ``tests/organism/test_shipped.py`` fails on a stale file, and
``python -m benchmarks.shipped_organism`` rebuilds them and compares (``--write`` refreshes the shipped files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

from lat_lightning.organism import build

SHIPPED_SEED = 0
SHIPPED_DIRNAME = f"organism-s{SHIPPED_SEED}-shipped"
# What from_pretrained and the pipeline read (the build's logs/ stay out of the wheel).
SHIPPED_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "organism.json",
)
WEIGHTS_CHOICES = ("shipped", "build")


def shipped_dir() -> Path:
    """Where the shipped organism lies inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("lat_lightning.resources"))) / SHIPPED_DIRNAME


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_info(root: Optional[Path] = None) -> Optional[dict]:
    """The shipped ``organism.json`` (``None`` when the package holds no shipped organism)."""
    path = Path(root or shipped_dir()) / "organism.json"
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_organism(recipe, seed: int, root: Optional[Path] = None) -> tuple[Optional[Path], str]:
    """The shipped organism's directory when it is the build of ``(recipe, seed)``, else ``(None, why)``.

    Args:
        recipe: the :class:`~lat_lightning.organism.build.OrganismRecipe` asked for.
        seed: the build seed asked for.
        root: the shipped directory (default :func:`shipped_dir`; tests pass a copy).

    Returns:
        ``(path, "")`` when the shipped files are this recipe's and seed's build and intact; otherwise
        ``(None, why)`` with ``why`` empty when nothing is shipped for this recipe and seed (another preset or
        seed: building is the normal way), or a sentence when shipped weights exist for it but are stale or damaged.
    """
    from lat_lightning.organism.build import fingerprint

    root = Path(root or shipped_dir())
    info = shipped_info(root)
    if info is None or int(info.get("seed", -1)) != seed or info.get("recipe") != _plain(recipe):
        return None, ""
    want = fingerprint(recipe, seed)
    if info.get("fingerprint") != want:
        return None, (
            f"the shipped organism was built for cache key {info.get('fingerprint')}, this code's is {want} (the "
            "recipe, the build version or organism/data.py changed): refresh it with "
            "`python -m benchmarks.shipped_organism --write`"
        )
    missing = [name for name in SHIPPED_FILES if not (root / name).is_file()]
    if missing:
        return None, f"the shipped organism in {root} lacks {', '.join(missing)}"
    if sha256_file(root / "model.safetensors") != info.get("model_sha256"):
        return None, f"{root / 'model.safetensors'} does not match the SHA-256 its organism.json records"
    return root, ""


def _plain(recipe) -> dict:
    """The recipe as organism.json stores it (JSON turns tuples into lists)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def export_build(build_dir: Path, dest: Path) -> dict:
    """Copy one build's files into ``dest`` (the shipped folder) with the metadata the check above reads.

    Returns:
        The written ``organism.json``: the build's own (recipe, seed, losses, timings) plus ``fingerprint``,
        ``model_sha256`` and ``built_with``: torch, transformers, the ATen CPU capability the build ran on and the
        kernel-path variables set for it (:data:`~lat_lightning.organism.build.KERNEL_ENV`); a build that predates
        these records gets this process's, so export on the host and settings it was built with.
    """
    import torch
    import transformers

    from lat_lightning.organism.build import fingerprint, kernel_env, recipe_from_dict

    build_dir, dest = Path(build_dir), Path(dest)
    info = json.loads((build_dir / "organism.json").read_text())
    seed = int(info["seed"])
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES[:-1]:
        shutil.copyfile(build_dir / name, dest / name)
    info["fingerprint"] = fingerprint(recipe_from_dict(info["recipe"]), seed)
    info["model_sha256"] = sha256_file(dest / "model.safetensors")
    # the build's own record when it has one (builds before it did: this process's, which exports on the same host)
    info["built_with"] = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": kernel_env(),
        **info.get("built_with", {}),
        "transformers": transformers.__version__,
    }
    (dest / "organism.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_organism(
    seed: int = 0,
    cache_dir: Optional[str] = None,
    rebuild: bool = False,
    recipe: Optional[build.OrganismRecipe] = None,
    preset: str = "default",
    weights: str = "shipped",
) -> Path:
    """The organism's directory: the shipped build when there is one for this recipe and seed (and ``weights`` is
    ``"shipped"``), else the cached build, building it first when it is not cached (or ``rebuild``).

    Args:
        recipe: an explicit recipe; otherwise ``PRESETS[preset]``.
        weights: ``"shipped"`` uses the package's weights where they are this recipe's and seed's build
            (:func:`shipped_organism`; stale ones are refused with a printed line and the organism is
            built); ``"build"`` always builds (or reuses the cached build). ``rebuild`` implies ``"build"``.
    """
    recipe = recipe or build.PRESETS[preset]
    if weights == "shipped" and not rebuild:
        shipped, why = shipped_organism(recipe, seed)
        if shipped is not None:
            return shipped
        if why:
            print(f"[organism] not using the shipped weights: {why}; building on this host", flush=True)
    path = build.organism_dir(recipe, seed, cache_dir)
    if rebuild or not (path / "organism.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build.build_organism(path, recipe, seed)
    return path


__all__ = [
    "SHIPPED_DIRNAME",
    "SHIPPED_FILES",
    "SHIPPED_SEED",
    "WEIGHTS_CHOICES",
    "ensure_organism",
    "export_build",
    "sha256_file",
    "shipped_dir",
    "shipped_info",
    "shipped_organism",
]
