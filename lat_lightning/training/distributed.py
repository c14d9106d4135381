"""Map ``trainer.strategy`` to a Lightning strategy, and keep every process of a launch in one run directory.

- ``auto``, ``ddp``, ``ddp_spawn``, ``ddp_fork``: passed through to Lightning (``ddp`` also works under
  ``torchrun`` and SLURM, which Lightning detects).
- ``fsdp2``: FSDP2 (``fully_shard`` per decoder layer, then the root) through Lightning's
  ``ModelParallelStrategy`` over all ``num_nodes × devices`` processes; runs on CPU with gloo too. The
  sharding itself is :meth:`LatentAdversarialModule.configure_model`.
- ``fsdp``: Lightning's FSDP1 ``FSDPStrategy`` (GPUs only): ``use_orig_params``, wrapping and activation
  checkpointing by decoder-layer class (:func:`lat_lightning.training.distributed_fsdp.decoder_layer_classes`).

Run directories: rank 0 picks (or creates) the run directory; every other rank must use the same one.
Processes started by Lightning's own launcher (``trainer.strategy=ddp trainer.devices=N``) re-run the
command line, so rank 0 publishes its choice in ``LAT_LIGHTNING_RUN_DIR``, which the children inherit.
Processes started together by ``torchrun`` or ``srun`` cannot see that, so they name the directory after
the launch: ``logging.version`` if given, else ``job<SLURM_JOB_ID>`` / ``run<TORCHELASTIC_RUN_ID>``. A
requeued SLURM job therefore lands in the same directory and resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal, Optional, cast

from lat_lightning.errors import ConfigError
from lat_lightning.models.settings import ModelSettings
from lat_lightning.training.settings import TrainerSettings

PASS_THROUGH = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device")
SHARDED = ("fsdp", "fsdp2")
SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")  # strategies that start their own processes in the fit
RUN_DIR_ENV = "LAT_LIGHTNING_RUN_DIR"


def _cuda_requested(trainer: TrainerSettings) -> bool:
    import torch

    accelerator = trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def _devices_per_node(trainer: TrainerSettings) -> int:
    """Number of processes per node that ``trainer.devices`` asks for (``auto``/-1: every visible GPU, or 1)."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.lstrip("-").isdigit() and int(text) > 0:
        return int(text)
    if _cuda_requested(trainer):
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def check_distributed_config(trainer: TrainerSettings, early_stop_loss: Optional[float] = None) -> None:
    """Settings that cannot work under the chosen strategy (checked before anything runs).

    Args:
        trainer: the trainer settings (``trainer.strategy``, ``trainer.accelerator``).
        early_stop_loss: the training attack's ``perturbation.early_stop_loss``.

    Raises:
        ConfigError: FSDP1 without CUDA, an unknown strategy, or an attack whose step count can differ
            between processes under a sharded strategy (every rank must run the same forwards).
    """
    name = trainer.strategy
    if name not in PASS_THROUGH + SHARDED:
        raise ConfigError(f"unknown trainer.strategy '{name}'; choose from {', '.join(PASS_THROUGH + SHARDED)}")
    if name == "fsdp" and not _cuda_requested(trainer):
        raise ConfigError(
            "trainer.strategy=fsdp (FSDP1) needs CUDA GPUs; on CPU use trainer.strategy=fsdp2 "
            "(FSDP2 through ModelParallelStrategy, runs with gloo)"
        )
    if name in SHARDED and early_stop_loss is not None:
        raise ConfigError(
            f"perturbation.early_stop_loss cannot be used with trainer.strategy={name}: ranks would "
            "run different numbers of sharded forwards and hang; set it to null"
        )


def build_strategy(trainer: TrainerSettings, model: ModelSettings, early_stop_loss: Optional[float] = None):
    """Return what ``pl.Trainer(strategy=...)`` takes for ``trainer.strategy``.

    Args:
        trainer: the trainer settings.
        model: the model settings (FSDP1 wraps its decoder layers; ``gradient_checkpointing``).
        early_stop_loss: the training attack's ``perturbation.early_stop_loss``.

    Raises:
        ConfigError: see :func:`check_distributed_config`.
    """
    check_distributed_config(trainer, early_stop_loss)
    name = trainer.strategy
    if name in SPAWNING and _processes_started():
        # The run's processes exist already (trainer.devices launched them, or torchrun/srun): spawning or
        # forking more from inside the fit would start a second world.
        return "ddp"
    if name in PASS_THROUGH:
        return name
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lat_lightning.training.distributed_fsdp import decoder_layer_classes

        layer_cls = decoder_layer_classes(model)
        return FSDPStrategy(
            auto_wrap_policy=layer_cls or None,
            activation_checkpointing_policy=layer_cls if (layer_cls and model.gradient_checkpointing) else None,
            use_orig_params=True,
            state_dict_type=cast(Literal["full", "sharded"], trainer.fsdp_state_dict_type),  # a checked choice
        )
    # Pure FSDP: one data-parallel mesh dimension over every process (no tensor parallelism).
    world = int(trainer.num_nodes) * _devices_per_node(trainer)
    return _fsdp2_strategy_class()(
        data_parallel_size=world,
        tensor_parallel_size=1,
        save_distributed_checkpoint=trainer.fsdp_state_dict_type == "sharded",
    )


def _processes_started() -> bool:
    """Whether this process is one of several already (a process group of more than one rank is initialised)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fsdp2_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        """``ModelParallelStrategy`` whose sharded checkpoints may hold only some weights.

        Checkpoints keep the trainable weights only (``LatentAdversarialModule.on_save_checkpoint``);
        Lightning's sharded load asks torch.distributed.checkpoint for every weight of the model and
        fails on the frozen ones, so the load here lets it skip weights the checkpoint does not hold.
        """

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            import lightning.fabric.strategies.model_parallel as lightning_mp
            from torch.distributed.checkpoint import DefaultLoadPlanner, load

            original = lightning_mp._distributed_checkpoint_load
            lightning_mp._distributed_checkpoint_load = lambda state, path: load(
                state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True)
            )
            try:
                return super().load_checkpoint(checkpoint_path, weights_only)
            finally:
                lightning_mp._distributed_checkpoint_load = original

    return FSDP2Strategy


# ------------------------------------------------------------------------------------------ launches
def launch_rank() -> int:
    """This process's global rank as the launcher set it in the environment (0 when not launched)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit() and (key != "SLURM_PROCID" or _slurm_tasks() > 1):
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return local + node  # only compared with 0


def _slurm_tasks() -> int:
    text = os.environ.get("SLURM_NTASKS", "1")
    return int(text) if text.isdigit() else 1


def launch_version() -> Optional[str]:
    """A run version shared by every process of an external multi-process launch (SLURM, torchrun).

    Returns:
        ``job<SLURM_JOB_ID>`` or ``run<TORCHELASTIC_RUN_ID>``; ``None`` for a single process or a launch by
        Lightning itself.

    Raises:
        ConfigError: under ``torchrun`` without ``--rdzv-id``/``--standalone`` (no shared launch id).
    """
    if os.environ.get("SLURM_JOB_ID") and _slurm_tasks() > 1:
        return f"job{os.environ['SLURM_JOB_ID']}"
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id == "none":
            raise ConfigError(
                "torchrun without a run id: pass --standalone or --rdzv-id=<id>, or set "
                "logging.version=<name>, so that every rank writes to the same run directory"
            )
        return f"run{run_id}"
    return None


def follower_run_dir(parent: Path, version: Optional[str], timeout_s: float = 600.0) -> Optional[Path]:
    """For a rank other than 0: the run directory rank 0 chose, or ``None`` on rank 0.

    Raises:
        ConfigError: when the directory cannot be known (a manual multi-node launch without a version) or
            rank 0 did not create it in time.
    """
    if launch_rank() == 0:
        return None
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    version = version if version is not None else launch_version()
    if version is None:
        raise ConfigError(
            "this process is not rank 0 of a multi-process launch but cannot tell which run directory "
            "rank 0 uses; set logging.version=<name> on every process"
        )
    run_dir = parent / str(version)
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "config.yaml").exists():
        if time.monotonic() > deadline:
            raise ConfigError(f"rank 0 did not create {run_dir} within {timeout_s:.0f}s")
        time.sleep(0.5)
    return run_dir


def publish_run_dir(run_dir: Path) -> None:
    """Rank 0: let processes that Lightning launches from this one find the run directory."""
    os.environ[RUN_DIR_ENV] = str(run_dir)
