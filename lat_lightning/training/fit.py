"""Training: checkpoints, the Lightning trainer, the fit and the exports (the ``fit`` stage builds the module, data
and callbacks from the run config in :mod:`lat_lightning.stages.fit_setup` and calls :func:`train`).

Outputs in the run directory: ``lora_targets.json`` (LoRA runs: which block weights got adapters, see
:mod:`lat_lightning.models.lora_targets`), ``tensorboard/`` (events), ``checkpoints/`` (trainable weights, optimiser,
scheduler, counters, data position, RNG; ``last.ckpt``, also written on SIGTERM/SIGINT, see
:mod:`lat_lightning.training.resume`), ``final/`` (LoRA adapter or full model, loadable with ``from_pretrained``),
``final_merged/`` (LoRA runs: the merged full model) and whatever the callbacks write (``interpolated/``
for weight interpolation).
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lat_lightning.data.datamodule import SafetyDataModule
from lat_lightning.models.loading import load_model
from lat_lightning.models.settings import ModelSettings
from lat_lightning.progress_lines import is_terminal
from lat_lightning.training.module import LatentAdversarialModule
from lat_lightning.training.progress import StepProgressBar
from lat_lightning.training.resume import InterruptCheckpoint, TrainingInterrupted, checkpoint_to_resume
from lat_lightning.training.settings import TrainerSettings

if TYPE_CHECKING:
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Lightning warns that checkpoints under manual optimisation hold the post-step weights; that is exactly
# what resuming needs (the optimiser state is saved alongside), so the warning is noise here.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# The data position is restored by SafetyDataModule.load_state_dict (epoch + samples consumed), which
# Lightning's check for a stateful DataLoader does not see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")


def _size_of(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file under a sharded (FSDP) checkpoint directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def human_size(n: int) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


class SizedCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that says in the log where each checkpoint went and how big it is."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            line = f"[fit] checkpoint {filepath}: {human_size(_size_of(Path(filepath)))}"
            bar = trainer.progress_bar_callback
            if bar is not None and getattr(bar, "is_enabled", False) and is_terminal(sys.stdout):
                bar.print(line)  # on its own line above the progress bar
            else:
                print(line, flush=True)


def checkpoint_callback(trainer: TrainerSettings, run_dir: Path) -> ModelCheckpoint:
    """One resumable checkpoint per run by default: ``checkpoints/last.ckpt``, written at the end (and on
    SIGTERM/SIGINT). With ``trainer.checkpoint_every_n_steps`` a history ``step<N>.ckpt`` is kept as well and
    ``last.ckpt`` is a link to the newest of them, never a second copy of the same state."""
    every = trainer.checkpoint_every_n_steps
    # No version counter: a resumed run overwrites last.ckpt (also written on SIGTERM) instead of last-v1.ckpt.
    common: dict[str, Any] = {
        "dirpath": run_dir / "checkpoints",
        "auto_insert_metric_name": False,
        "enable_version_counter": False,
    }
    if every:
        return SizedCheckpoint(
            filename="step{step}", save_last="link", every_n_train_steps=int(every), save_top_k=-1, **common
        )
    return SizedCheckpoint(
        filename="step{step}", save_last=True, every_n_train_steps=int(trainer.max_steps), save_top_k=0, **common
    )


def build_trainer(
    t: TrainerSettings, strategy, run_dir: Path, callbacks: Sequence[Callback], tensorboard: bool = True
) -> pl.Trainer:
    """A Lightning trainer configured from the trainer settings that logs to ``run_dir/tensorboard``.

    Args:
        t: the trainer settings.
        strategy: what ``pl.Trainer(strategy=...)`` takes (:func:`lat_lightning.training.distributed.build_strategy`).
        run_dir: the run directory (checkpoints, TensorBoard).
        callbacks: the callbacks (a step progress bar is added).
        tensorboard: log to TensorBoard.
    """
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="") if tensorboard else False
    return pl.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=cast("_PRECISION_INPUT", t.precision),  # a str that Lightning checks itself
        logger=logger,
        callbacks=list(callbacks) + [StepProgressBar("fit")],  # optimiser steps toward max_steps, with an ETA
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


LORA_TARGETS_FILE = "lora_targets.json"


def write_lora_targets(model, run_dir: Path) -> Optional[Path]:
    """Save what LoRA adapts (:class:`~lat_lightning.models.lora_targets.LoraTargets`) as ``lora_targets.json``;
    nothing for a model without LoRA."""
    import json

    from lat_lightning.models.lora_targets import lora_targets_of

    targets = lora_targets_of(model)
    if targets is None:
        return None
    path = Path(run_dir) / LORA_TARGETS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(targets.as_dict(), indent=2) + "\n")
    return path


def export_final(
    module: LatentAdversarialModule,
    tokenizer,
    out_dir: Path,
    merged_dir: Optional[Path] = None,
    model_settings: Optional[ModelSettings] = None,
) -> Path:
    """Save the trained model: the LoRA adapter (``PeftModel.from_pretrained``-loadable) or the full model
    (``AutoModelForCausalLM.from_pretrained``), plus the tokenizer. For LoRA, ``merged_dir`` (if given) also
    gets the merged full model, re-loaded from ``model_settings``.

    Call it on every rank: sharded (FSDP) weights are gathered first (a collective); rank 0 writes.
    """
    from lat_lightning.training.distributed_fsdp import full_state_dict
    from lat_lightning.training.interpolation import is_peft_model

    state = full_state_dict(module)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model = cast("PreTrainedModel | PeftModel", module.model)
    extra: dict[str, Any] = {"state_dict": state} if state is not None else {}
    model.save_pretrained(str(out_dir), **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if merged_dir is not None and model_settings is not None and is_peft_model(module.model):
        export_merged(model_settings, out_dir, merged_dir, tokenizer)
    return out_dir


def export_merged(model_settings: ModelSettings, adapter_dir: Path, out_dir: Path, tokenizer=None) -> Path:
    """Merge the LoRA adapter saved in ``adapter_dir`` into a fresh CPU copy of the base model (never
    quantised, in ``model.dtype``) and save it as a plain model (``AutoModelForCausalLM``-loadable)."""
    import dataclasses

    from peft import PeftModel

    from lat_lightning.training.interpolation import save_merged

    plain = dataclasses.replace(
        model_settings,
        gradient_checkpointing=False,
        quantization=dataclasses.replace(model_settings.quantization, load_in_4bit=False, load_in_8bit=False),
    )
    base = load_model(plain, train=False, with_lora=False)
    return save_merged(PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer, out_dir)


def train(
    module: LatentAdversarialModule,
    datamodule: SafetyDataModule,
    trainer: pl.Trainer,
    run_dir: Path,
    model_settings: ModelSettings,
    resume: Optional[str] = None,
) -> LatentAdversarialModule:
    """Fit ``module`` on ``datamodule`` with ``trainer`` (resuming from ``resume``), then export ``final/`` (and
    ``final_merged/`` for LoRA) into ``run_dir``.

    Args:
        module: the training module (attack, layers, losses, optimiser settings).
        datamodule: the training data.
        trainer: the Lightning trainer (its callbacks must include an :class:`InterruptCheckpoint`).
        run_dir: the run directory.
        model_settings: the model's settings (re-loads the base model to merge a LoRA adapter).
        resume: a checkpoint path, or a run directory (its --resume checkpoint, else last.ckpt).

    ``scan`` / ``validation`` are the run's scan settings and the validation loop's
    (:mod:`lat_lightning.stages.settings`); the fragile-layer selection and the validation loop need them when
    they are enabled.

    Returns:
        The trained module (its ``model`` holds the trained weights).

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT stopped the fit (a checkpoint was saved).
    """
    if trainer.is_global_zero:
        write_lora_targets(module.model, run_dir)
    ckpt_path = None
    if resume:
        ckpt = Path(resume) if Path(resume).suffix == ".ckpt" else checkpoint_to_resume(run_dir)
        ckpt_path = str(ckpt) if ckpt is not None else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Trainer.callbacks is assigned by Lightning's callback connector, not declared on the class
        stop = next(c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint))  # type: ignore[attr-defined]
        name = signal.Signals(stop.signum or signal.SIGTERM).name
        raise TrainingInterrupted(
            f"stopped by {name} at step {trainer.global_step}; checkpoint saved to {stop.saved}; "
            f"continue with --resume {run_dir}",
            stop.signum or signal.SIGTERM,
        ) from None
    module.trainer_ref = trainer
    export_final(
        module, module.tokenizer, run_dir / "final", merged_dir=run_dir / "final_merged", model_settings=model_settings
    )
    return module
