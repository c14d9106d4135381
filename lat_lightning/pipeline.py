"""Run the stages a recipe names, in order, in one run directory.

Each stage is a function ``stage(cfg, run_dir) -> dict`` in a plain name -> function map. A stage that
finished in this run directory is skipped when the run is resumed (``--resume``).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from lat_lightning.rundir import create_run_dir, mark_stage_done, stage_done

log = logging.getLogger(__name__)

# name -> "module:function"; imported lazily so `--print-config` stays fast.
STAGE_FUNCTIONS: dict[str, str] = {
    "organism": "lat_lightning.organism.build:organism_stage",
    "fit": "lat_lightning.training.fit:fit_stage",
    "scan": "lat_lightning.eval.scan:scan_stage",
    "rescan": "lat_lightning.eval.scan:rescan_stage",
    "evaluate": "lat_lightning.eval.evaluate:evaluate_stage",
    "interpolate": "lat_lightning.training.interpolation:interpolate_stage",
    "durability": "lat_lightning.eval.durability:durability_stage",
    "report": "lat_lightning.organism.report:report_stage",
}


def get_stage(name: str) -> Callable[[DictConfig, Path], dict]:
    module_name, func = STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(module_name), func)


def run_pipeline(cfg: DictConfig, recipe: str, resume: Optional[str] = None) -> Path:
    """Create (or resume) the run directory and run every stage of ``cfg.stages``.

    Returns:
        The run directory.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lat_lightning.preflight import preflight

    preflight(cfg)  # bad settings fail here, before a run directory exists or a weight is loaded
    run_dir = create_run_dir(cfg, recipe, resume)
    from lat_lightning.resources import RUN_DIR_ENV

    os.environ[RUN_DIR_ENV] = str(run_dir)  # lets recipes name earlier stages' outputs as run://<file>
    print(f"run directory: {run_dir}", flush=True)
    for stage in cfg.stages:
        if resume and stage_done(run_dir, stage):
            print(f"[{stage}] already done in {run_dir}, skipping", flush=True)
            continue
        print(f"[{stage}] starting", flush=True)
        info = get_stage(stage)(cfg, run_dir) or {}
        mark_stage_done(run_dir, stage, info)
        print(f"[{stage}] done", flush=True)
    return run_dir
