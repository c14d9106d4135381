"""Run the stages a recipe names, in order, in one run directory.

Each stage is a function ``lat_lightning.stages.<name>.run(cfg, run_dir) -> dict`` (:mod:`lat_lightning.stages`).
A stage that finished in this run directory is skipped when the run is resumed (``--resume``).

Order, so that bad input never leaves anything behind and is never half-run:

1. where the run directory goes (:func:`lat_lightning.rundir.check_location`) and, when resuming, which one it is
   and whether the new config differs from the saved one (:func:`lat_lightning.rundir.check_resume`);
2. the checks that need no model (:func:`lat_lightning.preflight.check_config`), then those that read the models'
   ``config.json`` (:func:`lat_lightning.preflight.check_model`): nothing is built or loaded yet;
3. the model organism is built or reused and every organism name in the config replaced by a path
   (:func:`lat_lightning.stages.organism.resolve_organism`, whenever the config names the organism);
4. the run directory is claimed (its ``config.yaml`` is the config as given), then the stages run with the
   resolved config.

The whole run happens inside :func:`lat_lightning.interrupts.stop_on_signals` and
:func:`lat_lightning.runlog.run_logging`: SIGTERM and SIGINT stop it with one line saying what was saved and how
to resume (:class:`lat_lightning.errors.RunInterrupted`, exit status 143 / 130), every log record goes to
``run.log``, and a fresh run directory left with no results by a failure or a stop is removed.

Processes: ``trainer.devices=N`` (× ``trainer.num_nodes``) starts N processes per node for the whole run through
Lightning's own launcher (:mod:`lat_lightning.training.launch`), right after the run directory is claimed; under
torchrun or ``srun`` the launcher's processes are used and nothing is launched. Ranks > 0 join only
:data:`DISTRIBUTED_STAGES`; the other stages run on rank 0 with one device (the console says so), and only rank 0
writes the run directory's own files (``run.log``, the stage markers). The world size is logged and recorded in
every stage marker.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from lat_lightning.config import STAGES
from lat_lightning.errors import LatLightningError, RunInterrupted
from lat_lightning.interrupts import StopRequested, received, signal_name, stop_on_signals
from lat_lightning.progress_lines import quiet_third_party_bars
from lat_lightning.rundir import (
    check_cache_dir,
    check_location,
    check_resume,
    create_run_dir,
    discard_if_empty,
    find_run_dir,
    mark_stage_done,
    reopen_stage,
    stage_done,
)
from lat_lightning.runlog import run_logging
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


def describe_saved(name: str, run_dir: Path) -> Optional[str]:
    """What stage ``name`` has saved in ``run_dir`` that a resumed run keeps (its module's ``saved(run_dir)``),
    or ``None``."""
    module = importlib.import_module(STAGE_FUNCTIONS[name].split(":")[0])
    saved = getattr(module, "saved", None)
    return saved(run_dir) if saved is not None else None


@dataclass
class _Progress:
    """Where a run is, for the line printed when it stops."""

    phase: str = "checking the config"
    run_dir: Optional[Path] = None
    fresh: bool = True
    stage: Optional[str] = None
    done: list[str] = field(default_factory=list)


def _stages_to_rerun(cfg: DictConfig, changes: dict, done: set[str]) -> list[str]:
    """A larger ``trainer.max_steps`` on resume: the fit continues, so it and every stage after it run again."""
    stages = [str(s) for s in cfg.stages]
    if "trainer.max_steps" not in changes or "fit" not in stages or "fit" not in done:
        return []
    return [s for s in stages[stages.index("fit") :] if s in done]


def _stop_if_signalled() -> None:
    """A signal that a graceful handler (Lightning's) only recorded while the work finished anyway."""
    signum = received()
    if signum is not None:
        raise StopRequested(signum)


def _signal_of(exc: BaseException) -> Optional[int]:
    """The signal behind an exception that stopped the run, else ``None``."""
    if isinstance(exc, StopRequested):
        return exc.signum
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")  # no import here: a run stopped while
    if lightning is not None and isinstance(exc, lightning.SIGTERMException):  # importing Lightning is reported too
        return received() or int(signal.SIGTERM)  # Lightning's graceful stop (a SystemExit)
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    if isinstance(exc, SystemExit):  # Lightning exits 1 after a KeyboardInterrupt it caught
        return received()
    return None


def _interrupted_message(progress: _Progress, signum: int, discarded: bool) -> str:
    name = signal_name(signum)
    if progress.run_dir is None or discarded:
        where = f"while {progress.phase}" if progress.stage is None else f"during stage '{progress.stage}'"
        extra = " (the partial organism build was removed)" if "organism" in progress.phase else ""
        return f"stopped by {name} {where}; nothing was saved{extra}; run the same command again to start over"
    run_dir = progress.run_dir
    parts = [f"stages {', '.join(progress.done)} done"] if progress.done else []
    if progress.stage is not None:
        partial = describe_saved(progress.stage, run_dir)
        parts.append(f"{progress.stage}: {partial}" if partial else f"{progress.stage} starts over")
        where = f"during stage '{progress.stage}'"
    else:
        where = "between stages"
    return f"stopped by {name} {where}; saved in {run_dir}: {'; '.join(parts)}; continue with --resume {run_dir}"


def run_pipeline(cfg: DictConfig, recipe: str, resume: Optional[str] = None, debug: bool = False) -> Path:
    """Check everything, then create (or resume) the run directory and run every stage of ``cfg.stages``.

    Args:
        cfg: the run config as given (organism names unresolved).
        recipe: the recipe name or path (names the run directory unless ``logging.name`` does).
        resume: ``'last'``, a run directory or a checkpoint inside one.
        debug: keep third-party warnings on the console (they always go to ``run.log``).

    Returns:
        The run directory.

    Raises:
        LatLightningError: bad input (before anything is written); :class:`~lat_lightning.errors.RunInterrupted`
            when SIGTERM/SIGINT stopped the run.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    progress = _Progress(fresh=not resume)
    runlog = None
    with stop_on_signals():
        try:
            with run_logging(debug=debug) as runlog:
                try:
                    _run(cfg, recipe, resume, runlog, progress)
                    return progress.run_dir  # type: ignore[return-value]
                except BaseException as exc:
                    runlog.write_exception(exc)
                    raise
        except LatLightningError:
            if progress.fresh:
                discard_if_empty(progress.run_dir)
            raise
        except BaseException as exc:
            signum = _signal_of(exc)
            if signum is None:
                raise
            discarded = progress.fresh and discard_if_empty(progress.run_dir)
            raise RunInterrupted(_interrupted_message(progress, signum, discarded), signum) from None


def _plan_launch(cfg: DictConfig, todo: list[str]):
    """How many processes run (:func:`lat_lightning.training.launch.plan_world`), checked before anything is
    written: too many devices is bad input."""
    from lat_lightning.stages.settings import trainer_settings
    from lat_lightning.training.launch import Launch, plan_world

    trainer = trainer_settings(cfg)
    world = plan_world(trainer, [s for s in todo if s in DISTRIBUTED_STAGES], todo)
    return Launch(world, trainer)


def _one_process_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` for a stage that runs on rank 0 alone in a multi-process run: any training inside it (the
    comparison's defences) uses one device instead of waiting for ranks that are not there."""
    out = copy.deepcopy(cfg)
    out.trainer.devices = 1
    out.trainer.num_nodes = 1
    out.trainer.strategy = "auto"
    return out


def _run(cfg: DictConfig, recipe: str, resume: Optional[str], runlog, progress: _Progress) -> None:
    from lat_lightning.preflight import check_config, check_model
    from lat_lightning.stages.organism import mentions_organism, resolve_organism

    check_location(cfg, recipe, resume)
    check_cache_dir()
    quiet_third_party_bars(sys.stderr)  # in a log (not a terminal) their redrawn frames would pile up
    resumed, changes, done = None, {}, set()
    if resume:
        resumed = find_run_dir(cfg, recipe, resume)
        changes = check_resume(resumed, cfg)
        done = {s for s in STAGES if stage_done(resumed, s)}
    rerun = _stages_to_rerun(cfg, changes, done)
    if resumed is not None and "fit" in [str(s) for s in cfg.stages] and ("fit" not in done or "fit" in rerun):
        from lat_lightning.training.resume import check_resume_checkpoint

        check_resume_checkpoint(resumed)  # the fit continues from it
    check_config(cfg, done=done - set(rerun), run_dir=resumed)  # no model needed
    from lat_lightning.threads import apply_thread_policy

    # Threads from the cores free now (again before every stage); LAT_LIGHTNING_THREADS. Said once, by rank 0.
    apply_thread_policy(verbose=launch_rank() == 0)
    # The models' config.json only: nothing is built or loaded. The main model's width sets the stages' thread
    # count (lat_lightning.threads).
    described = check_model(cfg)
    width = getattr(described, "hidden_size", None) if described is not None else None
    launch = _plan_launch(cfg, [str(s) for s in cfg.stages if s not in done or s in rerun])
    _stop_if_signalled()
    if mentions_organism(cfg):
        progress.phase = "building the organism"
    # The organism (when named) is built or reused now, by rank 0 before it starts the other processes (they
    # find it built); a resumed run never rebuilds it.
    resolved = resolve_organism(cfg, rebuild=False if resume or launch_rank() != 0 else None)
    _stop_if_signalled()
    progress.phase = "creating the run directory"
    run_dir = create_run_dir(cfg, recipe, resume)
    progress.run_dir = run_dir
    world = launch.start()  # rank 0 of a Lightning launch starts the others here; they follow LAT_LIGHTNING_RUN_DIR
    if world.rank == 0:  # one writer of run.log per launch
        runlog.attach(run_dir)
    else:
        runlog.console_errors_only()
    log.info("%s", world.describe())
    if world.rank == 0 and (world.size > 1 or world.note):
        print(world.describe(), flush=True)
    finished = False
    try:
        _run_stages(resolved, resume, run_dir, rerun, world, width, progress)
        finished = True
    finally:
        launch.finish(failed=not finished)


def _run_stages(cfg: DictConfig, resume, run_dir: Path, rerun: list[str], world, width, progress: _Progress) -> None:
    """Run every stage of ``cfg.stages`` in ``run_dir`` (the resolved config), on every rank of ``world``."""
    from lat_lightning.threads import apply_thread_policy
    from lat_lightning.training.launch import wait_for_all

    lead = world.rank == 0
    for stage in rerun:
        reopen_stage(run_dir, stage)
        log.info("trainer.max_steps grew to %s: stage %s runs again", cfg.trainer.max_steps, stage)
    from lat_lightning.resources import RUN_DIR_ENV

    os.environ[RUN_DIR_ENV] = str(run_dir)  # lets recipes name earlier stages' outputs as run://<file>
    if lead:  # the pipeline's own lines: once per run, from rank 0
        print(f"run directory: {run_dir}", flush=True)
    if rerun and lead:
        print(f"trainer.max_steps grew to {cfg.trainer.max_steps}: {', '.join(rerun)} run again", flush=True)
    for stage in cfg.stages:
        if resume and stage_done(run_dir, stage):
            if lead:
                print(f"[{stage}] already done in {run_dir}, skipping", flush=True)
            progress.done.append(stage)
            continue
        shared = world.size > 1 and stage in DISTRIBUTED_STAGES
        if not lead and (not shared or stage_done(run_dir, stage)):
            continue  # a rank > 0 joins only the stages that share their work out
        progress.stage = stage
        stage_cfg = cfg
        if lead:
            print(f"[{stage}] starting", flush=True)
            if world.size > 1 and not shared:
                print(
                    f"[{stage}] runs on rank 0 only: this stage does not share its work out, so the other "
                    f"{world.size - 1} process(es) skip it",
                    flush=True,
                )
                stage_cfg = _one_process_config(cfg)
        if shared:
            wait_for_all(world)
        apply_thread_policy(model_width=width, verbose=lead)
        info = get_stage(stage)(stage_cfg, run_dir) or {}
        if lead:  # the markers are rank 0's: a rank's own share never overwrites the stage's record
            launch = {**world.as_dict(), "ranks": world.size if shared else 1}  # ranks: processes that did its work
            mark_stage_done(run_dir, stage, {**info, "launch": launch})
            print(f"[{stage}] done", flush=True)
        progress.done.append(stage)
        progress.stage = None
        _stop_if_signalled()


__all__ = ["STAGE_FUNCTIONS", "describe_saved", "get_stage", "run_pipeline"]
