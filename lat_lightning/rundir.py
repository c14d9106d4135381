"""Run directories: ``<root>/<name>/version_<n>``, never overwritten, with the resolved config saved."""

from __future__ import annotations

import json
import os
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
    (or the run directory containing a checkpoint, which is then the one loaded instead of ``last.ckpt``).
    In a multi-process launch every rank gets rank 0's directory (see :mod:`lat_lightning.training.distributed`).

    Raises:
        ConfigError: if the directory to resume does not exist.
    """
    from lat_lightning.training.distributed import follower_run_dir, launch_rank, launch_version, publish_run_dir
    from lat_lightning.training.resume import remember_checkpoint

    name = cfg.logging.name or Path(recipe).stem
    parent = Path(cfg.logging.root_dir) / name
    follower = None if resume else follower_run_dir(parent, cfg.logging.version)  # ranks > 0: rank 0's choice
    if follower is not None:
        return follower
    shared = launch_version() if cfg.logging.version is None and not resume else None
    if shared is not None:  # torchrun/SLURM: named after the launch; a requeued job reuses it
        run_dir = parent / shared
    elif resume:
        if resume == "last":
            versions = _versions(parent)
            if not versions:
                raise ConfigError(f"--resume last: no earlier run under {parent}")
            run_dir = parent / f"version_{versions[-1]}"
        else:
            path = Path(resume)
            if not path.exists():
                raise ConfigError(f"--resume: '{resume}' does not exist")
            found = [p for p in (path, *path.parents) if (p / "config.yaml").is_file()]
            if not found:
                raise ConfigError(f"--resume: no run directory (with config.yaml) contains '{resume}'")
            run_dir = found[0]
            if path != run_dir:  # --resume RUN/checkpoints/step2.ckpt: that checkpoint, not last.ckpt
                remember_checkpoint(run_dir, path)
    elif cfg.logging.version is not None:
        run_dir = parent / str(cfg.logging.version)
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} already exists; pick another logging.version or use --resume")
    else:
        versions = _versions(parent)
        run_dir = parent / f"version_{(versions[-1] + 1) if versions else 0}"
    if launch_rank() != 0:  # resuming on a rank > 0: the same directory, written by rank 0 only
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / ("config.yaml" if not (run_dir / "config.yaml").exists() else "config.resumed.yaml")
    OmegaConf.save(cfg, target, resolve=True)
    publish_run_dir(run_dir)
    return run_dir


def stage_done(run_dir: Path, stage: str) -> bool:
    """Whether ``stage`` finished in this run directory (its marker file exists)."""
    return (run_dir / "stages" / f"{stage}.done.json").exists()


def mark_stage_done(run_dir: Path, stage: str, info: Optional[dict] = None) -> None:
    """Record that ``stage`` finished, with a small JSON payload (written atomically)."""
    out = run_dir / "stages"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stage}.{os.getpid()}.tmp"  # per process: every rank of a launch marks the stage
    tmp.write_text(json.dumps(info or {}, indent=2, default=str))
    tmp.replace(out / f"{stage}.done.json")
