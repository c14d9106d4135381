"""One launcher for the whole pipeline: ``trainer.devices=N`` (× ``trainer.num_nodes``) means N processes per node for
every stage, started by Lightning's own launcher before the first stage.

Who starts the processes, in order:

1. **torchrun or srun** (``TORCHELASTIC_RUN_ID`` in the environment, or a SLURM job with several tasks): the
   environment wins. Nothing is launched here; the world is the launcher's (a ``trainer.devices`` that disagrees
   is named in the launch line, and the stages still share their work over the launcher's processes).
2. **A process Lightning started** (``LOCAL_RANK`` and ``WORLD_SIZE`` > 1 in the environment: a child of step 3,
   or a node of a manual multi-node launch): it joins that world.
3. **Otherwise**, with ``trainer.devices × trainer.num_nodes > 1`` and at least one stage that shares its work out:
   ``Fabric(strategy=DDPStrategy(...)).launch()``. On this node Lightning's ``_SubprocessScriptLauncher``
   re-runs the command line ``devices - 1`` times with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, and every
   process then initialises the default process group (gloo on the CPU, NCCL on GPUs). The stages find the group
   initialised and share out prompts × layers × seeds as under torchrun; the ``fit`` stage's Trainer finds the
   processes already there and launches nothing.

With devices > 1 but no stage that shares its work out, one process runs and :attr:`World.note` says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from lat_lightning.errors import ConfigError
from lat_lightning.training.distributed import _cuda_requested, _devices_per_node, _slurm_tasks, launch_rank
from lat_lightning.training.settings import TrainerSettings

log = logging.getLogger(__name__)

# A rank waiting in a collective while rank 0 runs a stage that does not share its work out (an evaluation, a
# comparison of five defences) can wait for hours; torch's default of 30 minutes would end such runs.
GROUP_TIMEOUT = timedelta(hours=24)
LIGHTNING = "Lightning's script launcher"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")  # what the script launcher starts processes for here


@dataclass(frozen=True)
class World:
    """The processes of this run.

    Attributes:
        size: processes in the run (1: a single process).
        rank: this process's global rank.
        devices: processes per node that ``trainer.devices`` asks for.
        num_nodes: ``trainer.num_nodes``.
        launcher: who starts the processes (``one process``, Lightning's script launcher, ``torchrun``, ``srun``).
        note: why the run has a size other than the one ``trainer.devices × trainer.num_nodes`` asks for.
    """

    size: int
    rank: int
    devices: int
    num_nodes: int
    launcher: str
    note: Optional[str] = None

    def describe(self) -> str:
        """One line for the console and ``run.log``."""
        asked = f"trainer.devices={self.devices} x trainer.num_nodes={self.num_nodes}"
        if self.size == 1:
            line = f"[launch] world size 1 (one process; {asked})"
        else:
            line = f"[launch] world size {self.size}: {self.size} processes started by {self.launcher} ({asked})"
        return f"{line}; {self.note}" if self.note else line

    def as_dict(self) -> dict[str, Any]:
        """What the stage markers and summaries record."""
        return {
            "world_size": self.size,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "launcher": self.launcher,
        }


def external_launcher() -> Optional[tuple[str, int]]:
    """``(name, world size)`` of a launcher that started this process itself, or ``None``."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("WORLD_SIZE", "").isdigit():
        return "torchrun", int(os.environ["WORLD_SIZE"])
    if os.environ.get("SLURM_JOB_ID") and _slurm_tasks() > 1:
        return "srun", _slurm_tasks()
    return None


def _lightning_child_world() -> int:
    """World size of a launch by Lightning this process belongs to (``LOCAL_RANK`` set), else 0."""
    size = os.environ.get("WORLD_SIZE", "")
    return int(size) if "LOCAL_RANK" in os.environ and size.isdigit() and int(size) > 1 else 0


def plan_world(trainer: TrainerSettings, sharing: list[str], stages: list[str]) -> World:
    """Decide how many processes run, before anything is written.

    Args:
        trainer: the trainer settings (``devices``, ``num_nodes``, ``accelerator``).
        sharing: the stages of this run that share their work out over processes.
        stages: every stage of this run (for the note when none shares).

    Raises:
        ConfigError: more processes than this machine has devices for (GPUs, or CPU cores), or an accelerator
            the script launcher does not start processes for.
    """
    devices, nodes = _devices_per_node(trainer), int(trainer.num_nodes)
    asked = devices * nodes
    external = external_launcher()
    if external is not None:
        name, size = external
        note = None if size == asked else f"{name} started {size} processes: its count is used"
        return World(size, launch_rank(), devices, nodes, name, note)
    child = _lightning_child_world()
    if child:
        return World(child, launch_rank(), devices, nodes, LIGHTNING)
    if asked <= 1:
        return World(1, 0, devices, nodes, "one process")
    if not sharing:
        note = (
            f"none of the stages to run ({', '.join(stages) or 'none left'}) shares its work out over processes, "
            "so one process runs them (docs/distributed.md)"
        )
        return World(1, 0, devices, nodes, "one process", note)
    check_devices(trainer, devices)
    return World(asked, 0, devices, nodes, LIGHTNING)


def check_devices(trainer: TrainerSettings, devices: int) -> None:
    """``trainer.devices`` processes per node must fit this machine.

    Raises:
        ConfigError: an accelerator other than cpu/gpu/cuda/auto, more processes than visible GPUs, or (on the
            CPU) more processes than usable cores.
    """
    accelerator = str(trainer.accelerator)
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"trainer.devices={trainer.devices} with trainer.accelerator={accelerator}: the pipeline starts several "
            "processes on cpu or CUDA GPUs only; set trainer.devices=1 or trainer.accelerator=cpu/gpu"
        )
    if _cuda_requested(trainer):
        import torch

        visible = torch.cuda.device_count()
        if devices > visible:
            raise ConfigError(
                f"trainer.devices={trainer.devices} asks for {devices} processes, one per GPU, but {visible} "
                f"CUDA device(s) are visible; set trainer.devices<={visible} (or CUDA_VISIBLE_DEVICES)"
            )
        return
    from lat_lightning.threads import usable_cores

    cores = usable_cores()
    if devices > cores:
        raise ConfigError(
            f"trainer.devices={trainer.devices} starts {devices} processes on the CPU but this process may use "
            f"{cores} core(s); set trainer.devices<={cores}, or spread the processes over nodes "
            "(trainer.num_nodes, torchrun, srun)"
        )


class Launch:
    """The processes of a run: started by :meth:`start` (Lightning's launcher), awaited by :meth:`finish`."""

    def __init__(self, world: World, trainer: TrainerSettings) -> None:
        self.world = world
        self._fabric = _fabric(trainer) if world.launcher == LIGHTNING else None

    def start(self) -> World:
        """Start the other processes of this node (rank 0) and join the process group (every rank).

        Returns:
            The world, with this process's rank in the process group.
        """
        if self._fabric is None:
            return self.world
        self._fabric.launch()  # rank 0: re-runs the command line devices-1 times; all: init_process_group
        import torch.distributed as dist

        rank = dist.get_rank()
        self.world = World(dist.get_world_size(), rank, self.world.devices, self.world.num_nodes, LIGHTNING)
        return self.world

    def children(self) -> list[subprocess.Popen]:
        """The processes this one started (rank 0 of a node; empty elsewhere)."""
        launcher = getattr(getattr(self._fabric, "strategy", None), "launcher", None)
        return list(getattr(launcher, "procs", []) or [])

    def finish(self, failed: bool) -> None:
        """Wait for the processes this one started, so that the run ends when all of them have.

        Args:
            failed: this process stops with an error or a signal: the others are told to stop too (SIGTERM: a
                stage stops the way a pre-empted job does), so none is left waiting in a collective.

        Raises:
            RuntimeError: a process this one started exited with an error after this one finished its stages
                (while this one runs, Lightning's observer stops the whole launch when a child fails).
        """
        procs = self.children()
        if failed:
            _stop_observing()  # the children stopped below exit non-zero: Lightning's observer would SIGKILL us
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        bad = []
        for rank, proc in enumerate(procs, start=1):
            try:
                code = proc.wait(timeout=60 if failed else None)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code:
                bad.append(f"local rank {rank} exited with status {code}")
        if bad and not failed:
            raise RuntimeError(f"{'; '.join(bad)} (its own error line is above)")


def _stop_observing() -> None:
    """Retire Lightning's child-process observer (a thread that SIGKILLs this process when a child exits
    non-zero): when this process stops the children itself, it reports the stop and must not be killed first.
    An observer with no children to watch ends at its next poll."""
    import threading

    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_child_processes"):
            thread._child_processes = []


def wait_for_all(world: World) -> None:
    """Every rank waits here (a barrier) before a stage that shares its work out, when the process group exists:
    a stage that rank 0 ran alone just before (a comparison training the model the next stage loads) is then
    finished for all. Before the group exists (torchrun, srun) the stage's own group set-up is that wait."""
    import torch.distributed as dist

    if world.size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fabric(trainer: TrainerSettings):
    """The Fabric whose ``launch()`` starts this node's processes (built before the run directory, so that
    Lightning's own checks of accelerator and devices fail as bad input)."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.fabric.strategies import DDPStrategy

    if SLURMEnvironment.detect() and not _lightning_child_world():
        # Inside a SLURM job (of one task: several are srun's launch) Lightning leaves the processes to srun.
        raise ConfigError(
            f"trainer.devices={trainer.devices} inside a SLURM job with one task: under SLURM the processes are "
            "srun's to start; run srun with one task per device (--ntasks-per-node), or set trainer.devices=1"
        )
    accelerator = "cuda" if str(trainer.accelerator) == "gpu" else str(trainer.accelerator)
    try:
        fabric = Fabric(
            accelerator=accelerator,
            devices=trainer.devices,
            num_nodes=int(trainer.num_nodes),
            strategy=DDPStrategy(timeout=GROUP_TIMEOUT),
        )
        env = fabric.strategy.cluster_environment  # type: ignore[attr-defined]  # a DDPStrategy has one
        env.validate_settings(num_devices=_devices_per_node(trainer), num_nodes=int(trainer.num_nodes))
    except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException / ValueError: bad settings
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"trainer.devices={trainer.devices}: Lightning cannot start these processes: {first}"
        ) from None
    return fabric


__all__ = ["GROUP_TIMEOUT", "Launch", "World", "check_devices", "external_launcher", "plan_world", "wait_for_all"]
