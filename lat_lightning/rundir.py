"""Run directories: ``<root>/<name>/version_<n>``, never overwritten, with the resolved config saved."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from lat_lightning.errors import ConfigError


def _versions(parent: Path) -> list[int]:
    if not parent.is_dir():
        return []
    return sorted(int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name)))


def create_run_dir(cfg: DictConfig, recipe: str, resume: Optional[str] = None) -> Path:
    """Pick the run directory and save ``config.yaml`` into it.

    A fresh run always gets a new ``version_<n>`` directory, so earlier results are never overwritten.
    ``resume='last'`` reuses the newest version of this run name; ``resume=PATH`` reuses a run directory
    (or the run directory containing a checkpoint file).

    Raises:
        ConfigError: if the directory to resume does not exist.
    """
    name = cfg.logging.name or Path(recipe).stem
    parent = Path(cfg.logging.root_dir) / name
    if resume:
        if resume == "last":
            versions = _versions(parent)
            if not versions:
                raise ConfigError(f"--resume last: no earlier run under {parent}")
            run_dir = parent / f"version_{versions[-1]}"
        else:
            path = Path(resume)
            if not path.exists():
                raise ConfigError(f"--resume: '{resume}' does not exist")
            run_dir = path if path.is_dir() else next(p for p in path.parents if (p / "config.yaml").exists())
    elif cfg.logging.version is not None:
        run_dir = parent / str(cfg.logging.version)
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} already exists; pick another logging.version or use --resume")
    else:
        versions = _versions(parent)
        run_dir = parent / f"version_{(versions[-1] + 1) if versions else 0}"
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / ("config.yaml" if not (run_dir / "config.yaml").exists() else "config.resumed.yaml")
    OmegaConf.save(cfg, target, resolve=True)
    return run_dir


def stage_done(run_dir: Path, stage: str) -> bool:
    """Whether ``stage`` finished in this run directory (its marker file exists)."""
    return (run_dir / "stages" / f"{stage}.done.json").exists()


def mark_stage_done(run_dir: Path, stage: str, info: Optional[dict] = None) -> None:
    """Record that ``stage`` finished, with a small JSON payload (written atomically)."""
    out = run_dir / "stages"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stage}.tmp"
    tmp.write_text(json.dumps(info or {}, indent=2, default=str))
    tmp.replace(out / f"{stage}.done.json")
