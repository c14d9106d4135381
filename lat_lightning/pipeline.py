"""Run the stages a recipe names, in order, in one run directory.

Each stage is a function ``lat_lightning.stages.<name>.run(cfg, run_dir) -> dict`` (:mod:`lat_lightning.stages`).
A stage that finished in this run directory is skipped when the run is resumed (``--resume``).

Order: the checks that need no model (:func:`lat_lightning.preflight.check_config`); the model organism is
built or reused and every organism name in the config replaced by a path
(:func:`lat_lightning.stages.organism.resolve_organism`, whenever the config names the organism); the checks
that read the model's config (:func:`lat_lightning.preflight.check_model`); the run directory (its
``config.yaml`` is the config as given); then the stages, with the resolved config. In a multi-process launch
(torchrun, ``srun``, or the processes Lightning starts for a fit) ranks > 0 join only
:data:`DISTRIBUTED_STAGES`.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from lat_lightning.config import STAGES
from lat_lightning.rundir import create_run_dir, mark_stage_done, stage_done
from lat_lightning.training.distributed import launch_rank

log = logging.getLogger(__name__)

# Stages every process of a multi-process launch joins (fit: DDP/FSDP; the scans: prompts shared out); the others
# run on rank 0 only.
DISTRIBUTED_STAGES = ("fit", "scan", "rescan", "durability")

# name -> "module:function"; imported lazily so `--print-config` stays fast.
STAGE_FUNCTIONS: dict[str, str] = {name: f"lat_lightning.stages.{name}:run" for name in STAGES}


def get_stage(name: str) -> Callable[[DictConfig, Path], dict]:
    """The function of stage ``name`` (imported on first use)."""
    module_name, func = STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(module_name), func)


def run_pipeline(cfg: DictConfig, recipe: str, resume: Optional[str] = None) -> Path:
    """Create (or resume) the run directory and run every stage of ``cfg.stages``.

    Returns:
        The run directory.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lat_lightning.preflight import check_config, check_model
    from lat_lightning.stages.organism import resolve_organism

    check_config(cfg)  # bad settings fail here, before a run directory exists or a weight is loaded
    from lat_lightning.threads import apply_thread_policy

    apply_thread_policy()  # threads from the cores free now (again before every stage); LAT_LIGHTNING_THREADS
    # The organism (when named) is built or reused now; a resumed run never rebuilds it.
    resolved = resolve_organism(cfg, rebuild=False if resume else None)
    check_model(resolved)
    run_dir = create_run_dir(cfg, recipe, resume)
    from lat_lightning.resources import RUN_DIR_ENV

    os.environ[RUN_DIR_ENV] = str(run_dir)  # lets recipes name earlier stages' outputs as run://<file>
    print(f"run directory: {run_dir}", flush=True)
    follower = launch_rank() != 0
    for stage in resolved.stages:
        if resume and stage_done(run_dir, stage):
            print(f"[{stage}] already done in {run_dir}, skipping", flush=True)
            continue
        if follower and (stage not in DISTRIBUTED_STAGES or stage_done(run_dir, stage)):
            # A rank > 0 joins only the stages that share their work out; a stage rank 0 finished before this
            # process existed (Lightning's launcher starts the others at fit) is not run again.
            continue
        print(f"[{stage}] starting", flush=True)
        apply_thread_policy()
        info = get_stage(stage)(resolved, run_dir) or {}
        mark_stage_done(run_dir, stage, info)
        print(f"[{stage}] done", flush=True)
    return run_dir
