"""Exact resume: what a checkpoint holds besides the trainable weights, and how a run is stopped safely.

A checkpoint written by the fit stage (``checkpoints/last.ckpt``, ``step<N>.ckpt``) holds:

* the trainable weights only (the LoRA adapter with LoRA), the optimiser and LR-scheduler state and
  Lightning's loop counters (``global_step``, batches done in the epoch, epoch);
* the data position (``SafetyDataModule.state_dict``: epoch and samples consumed), so a resumed run
  continues with the next batch instead of restarting the epoch;
* ``checkpoint["lat_lightning"]`` (:meth:`LatentAdversarialModule.on_save_checkpoint`): the attacked
  layers, the micro-batch index inside the accumulation window and the gradients accumulated so far
  (a run stopped mid-window resumes the same window), the global RNG states (dropout), and how the
  perturbation noise is keyed. Noise is never drawn from a stateful generator: each draw is seeded by
  ``(perturbation.seed, global_step · accumulate_grad_batches + micro_step)`` (and ``7`` for PGD's random
  start), so it only needs the restored counters.

:class:`InterruptCheckpoint` makes SIGTERM (pre-emption, ``scancel``) and SIGINT (Ctrl+C) finish the
current micro-batch, write ``checkpoints/last.ckpt`` and stop with :class:`TrainingInterrupted`; a second
Ctrl+C aborts at once.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any, Optional, cast

import torch
from lightning.pytorch.callbacks import Callback

from lat_lightning.errors import RunInterrupted
from lat_lightning.interrupts import StopRequested

log = logging.getLogger(__name__)

LAST = "last.ckpt"
_REQUESTED: dict[str, Path] = {}


class TrainingInterrupted(RunInterrupted):
    """Training was stopped by SIGTERM/SIGINT after writing a checkpoint (exit status 128 + signal)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message, signum)


# ------------------------------------------------------------------------------------------ which checkpoint
def remember_checkpoint(run_dir: Path, checkpoint: Path) -> None:
    """``--resume RUN/checkpoints/X.ckpt``: load ``X.ckpt`` (not ``last.ckpt``) when ``run_dir`` is fitted."""
    _REQUESTED[str(Path(run_dir).resolve())] = Path(checkpoint)


def checkpoint_to_resume(run_dir: Path) -> Optional[Path]:
    """The checkpoint a fit in ``run_dir`` continues from: the one named by ``--resume``, else ``last.ckpt``."""
    requested = _REQUESTED.pop(str(Path(run_dir).resolve()), None)
    if requested is not None:
        return requested
    last = Path(run_dir) / "checkpoints" / LAST
    return last if last.exists() else None


def check_resume_checkpoint(run_dir: Path) -> None:
    """The checkpoint a resumed fit would continue from can be read (a file checkpoint is a zip archive whose
    directory sits at its end: a truncated or overwritten file fails here, in one line, instead of deep inside
    Lightning's restore; a sharded checkpoint directory is left to the restore).

    Raises:
        ConfigError: naming the file and the two ways out.
    """
    import zipfile

    from lat_lightning.errors import ConfigError

    path = _REQUESTED.get(str(Path(run_dir).resolve())) or Path(run_dir) / "checkpoints" / LAST
    if not path.is_file():
        return
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(
            f"checkpoint {path} cannot be read ({exc}): resume from an earlier one (--resume "
            f"{Path(run_dir) / 'checkpoints'}/step<N>.ckpt, when trainer.checkpoint_every_n_steps kept them) or "
            "start the run fresh (without --resume)"
        ) from None


# ------------------------------------------------------------------------------------------ RNG and gradients
def rng_state() -> dict[str, Any]:
    """Global RNG states (dropout draws from these; the perturbation noise does not), as tensors and plain
    Python values so that ``torch.load(..., weights_only=True)`` still reads the checkpoint."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = cast(
        "tuple[str, np.ndarray, int, int, float]", np.random.get_state()
    )  # legacy=True: the tuple form
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def accumulated_gradients(
    params: dict[str, torch.nn.Parameter], world: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """CPU copies of the gradients accumulated so far in the window, averaged over data-parallel ranks.

    DDP averages ``.grad`` across ranks at the window's last backward, so starting every rank from the
    average of the partial sums gives the same final gradient. Collective under ``torch.distributed``:
    every rank must call it (Lightning calls ``on_save_checkpoint`` on every rank).

    Args:
        params: the trainable parameters.
        world: the fit's number of processes (its Trainer's ``world_size``); default: the process group's. A fit
            on one process of a larger run (the comparison's defences, on rank 0) averages over itself only.
    """
    dist = torch.distributed
    if world is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    out = {}
    for name, p in params.items():
        if p.grad is None:
            continue
        grad = p.grad.detach().clone()
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
        out[name] = grad.cpu()
    return out


NOISE_KEY = "seed=perturbation.seed, step=global_step*accumulate_grad_batches+micro_step"


def training_state(module) -> dict[str, Any]:
    """What ``LatentAdversarialModule.on_save_checkpoint`` adds besides layers and micro-step."""
    from lat_lightning.training.distributed_fsdp import is_fsdp2

    attack = module.attack
    state: dict[str, Any] = {
        "rng": rng_state(),
        "noise": {"attack": str(attack.name), "seed": int(attack.settings.seed), "key": NOISE_KEY},
    }
    if module._micro_step:
        if is_fsdp2(module.model):
            log.warning(
                "checkpoint taken inside an accumulation window under FSDP2: the %d micro-batch(es) "
                "accumulated so far are not saved",
                module._micro_step,
            )
        else:
            trainable = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
            trainer = getattr(module, "_trainer", None)
            world = int(trainer.world_size) if trainer is not None else None
            state["accumulated_grads"] = accumulated_gradients(trainable, world)
    return state


def restore_training_state(module, state: dict[str, Any]) -> None:
    """Inverse of :func:`training_state` (called when training starts after a resume)."""
    noise = state.get("noise", {})
    seed = int(module.attack.settings.seed)
    if noise and int(noise.get("seed", seed)) != seed:
        log.warning(
            "perturbation.seed changed on resume (%s -> %s): the noise differs from the original run",
            noise.get("seed"),
            seed,
        )
    if "rng" in state:
        set_rng_state(state["rng"])
    reapply_schedule(module)
    grads = state.get("accumulated_grads") or {}
    if grads:
        params = dict(module.model.named_parameters())
        for name, grad in grads.items():
            params[name].grad = grad.to(device=params[name].device, dtype=params[name].dtype)


def reapply_schedule(module) -> None:
    """Set the learning rate of the first resumed step from this run's schedule.

    It equals the restored one (the same expression on the same step) unless ``trainer.max_steps`` grew on
    resume: the schedule then spans the new step count, while the restored rate is the old schedule's last one
    (0 at the end of a cosine decay, which would make the extra steps change nothing).
    """
    from torch.optim.lr_scheduler import LambdaLR

    trainer = getattr(module, "_trainer", None)
    for config in getattr(trainer, "lr_scheduler_configs", None) or []:
        sched = config.scheduler
        if isinstance(sched, LambdaLR):
            for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


# ------------------------------------------------------------------------------------------ stopping safely
class InterruptCheckpoint(Callback):
    """SIGTERM/SIGINT: finish the micro-batch, save ``checkpoints/last.ckpt``, stop with an error.

    Lightning already turns SIGTERM into a stop after the current batch (raising ``SIGTERMException``, and
    broadcasting it to every rank); this callback routes SIGINT to the same path, writes the checkpoint
    when that exception passes, and remembers which signal it was.

    Args:
        run_dir: the run directory (``checkpoints/last.ckpt`` is written inside it).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "checkpoints" / LAST
        self.signum: Optional[int] = None
        self.saved: Optional[Path] = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning installed its SIGTERM handler
        self.signum, self.saved = None, None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            sigterm = signal.getsignal(signal.SIGTERM)
            if callable(sigterm):  # Lightning's notifier: record the signal before it runs

                def record_then_notify(s, f):
                    self._record(s)
                    return sigterm(s, f)

                signal.signal(signal.SIGTERM, record_then_notify)

    def _record(self, signum: int) -> None:
        if self.signum is None:
            self.signum = int(signum)
            print(
                f"received {signal.Signals(signum).name}: stopping after this micro-batch and saving {self.path}",
                flush=True,
            )

    def _on_sigint(self, signum, frame) -> None:
        if self.signum is not None:  # second Ctrl+C: abort now, no checkpoint (not KeyboardInterrupt, which
            raise StopRequested(signum)  # Lightning turns into sys.exit(1))
        self._record(signum)
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            if self.path.is_symlink():  # last.ckpt links to a step<N>.ckpt of the history: never write through it
                self.path.unlink()
            trainer.save_checkpoint(str(self.path))
            self.saved = self.path
            self.signum = self.signum or int(signal.SIGTERM)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


__all__ = [
    "check_resume_checkpoint",
    "InterruptCheckpoint",
    "TrainingInterrupted",
    "accumulated_gradients",
    "checkpoint_to_resume",
    "reapply_schedule",
    "remember_checkpoint",
    "restore_training_state",
    "rng_state",
    "set_rng_state",
    "training_state",
]
