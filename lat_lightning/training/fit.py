"""Training from a run config: build model, data, module, callbacks and trainer, then train (the ``fit`` stage,
:mod:`lat_lightning.stages.fit`, calls :func:`fit`).

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
import warnings
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lat_lightning.attacks import build_attack
from lat_lightning.data.datamodule import SafetyDataModule
from lat_lightning.errors import ConfigError
from lat_lightning.models.layers import check_layer_indices, parse_layers
from lat_lightning.models.loading import load_model, load_tokenizer
from lat_lightning.training.module import LatentAdversarialModule, OptimSettings
from lat_lightning.training.progress import StepProgressBar
from lat_lightning.training.resume import InterruptCheckpoint, TrainingInterrupted, checkpoint_to_resume

log = logging.getLogger(__name__)

# Lightning warns that checkpoints under manual optimisation hold the post-step weights; that is exactly
# what resuming needs (the optimiser state is saved alongside), so the warning is noise here.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# The data position is restored by SafetyDataModule.load_state_dict (epoch + samples consumed), which
# Lightning's check for a stateful DataLoader does not see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")


def build_callbacks(cfg: DictConfig, run_dir: Path, scan=None) -> list[Callback]:
    """The callbacks the ``callbacks`` config section enables, plus checkpointing (``scan``: the run's
    :class:`~lat_lightning.eval.scan.ScanSettings`, for the fragile-layer selection)."""
    from lat_lightning.callbacks import build_training_callbacks

    return [checkpoint_callback(cfg, run_dir), InterruptCheckpoint(run_dir)] + build_training_callbacks(cfg, run_dir,
                                                                                                      scan)


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
            if bar is not None and getattr(bar, "is_enabled", False):
                bar.print(line)  # on its own line above the progress bar
            else:
                print(line, flush=True)


def checkpoint_callback(cfg: DictConfig, run_dir: Path) -> ModelCheckpoint:
    """One resumable checkpoint per run by default: ``checkpoints/last.ckpt``, written at the end (and on
    SIGTERM/SIGINT). With ``trainer.checkpoint_every_n_steps`` a history ``step<N>.ckpt`` is kept as well and
    ``last.ckpt`` is a link to the newest of them, never a second copy of the same state."""
    every = cfg.trainer.checkpoint_every_n_steps
    # No version counter: a resumed run overwrites last.ckpt (also written on SIGTERM) instead of last-v1.ckpt.
    common = {"dirpath": run_dir / "checkpoints", "auto_insert_metric_name": False, "enable_version_counter": False}
    if every:
        return SizedCheckpoint(filename="step{step}", save_last="link", every_n_train_steps=int(every), save_top_k=-1,
                               **common)
    return SizedCheckpoint(filename="step{step}", save_last=True, every_n_train_steps=int(cfg.trainer.max_steps),
                           save_top_k=0, **common)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback]) -> pl.Trainer:
    """A Lightning trainer configured from ``cfg.trainer`` that logs to ``run_dir/tensorboard``."""
    from lat_lightning.training.distributed import build_strategy as build_dist_strategy

    t = cfg.trainer
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="") if cfg.logging.tensorboard \
        else False
    return pl.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_dist_strategy(cfg),
        precision=t.precision,
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


def validate_setup(cfg: DictConfig, model) -> None:
    """Checks that need the loaded model (layer indices) or span config sections.

    Raises:
        ConfigError: with one actionable line.
    """
    if getattr(cfg.model, "device_map", None) is not None:
        raise ConfigError("model.device_map places a model over devices for the scan, evaluate, durability and "
                          "interpolate stages; training shards with trainer.strategy=fsdp2 (set model.device_map=null "
                          "for the fit)")
    try:
        attack = build_attack(cfg.perturbation.attack, cfg.perturbation)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        check_layer_indices(model, parse_layers(cfg.perturbation.layers, "perturbation.layers"),
                            what="perturbation.layers")
        check_layer_indices(model, parse_layers(cfg.callbacks.fragile_layers.layers, "callbacks.fragile_layers.layers"),
                            what="callbacks.fragile_layers.layers")
    except (IndexError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if attack.needs_harmless and not cfg.data.benign:
        raise ConfigError(f"perturbation.attack={attack.name} contrasts each batch's harmful prompts with harmless "
                          "ones: set data.benign (e.g. organism://benign_train)")
    if (attack.name != "none" and not cfg.perturbation.layers and not cfg.callbacks.fragile_layers.enabled
            and not cfg.data.asabench):
        raise ConfigError("perturbation.layers is empty; list layers or enable callbacks.fragile_layers")
    if cfg.trainer.accumulate_grad_batches < 1:
        raise ConfigError("trainer.accumulate_grad_batches must be >= 1")


def build_module(cfg: DictConfig, model, tokenizer=None, evaluator=None,
                 module_class: type[LatentAdversarialModule] = LatentAdversarialModule) -> LatentAdversarialModule:
    """The training module for a run config: its attack, layers, loss weights and optimiser settings (the
    module itself takes these typed objects and never reads the run config). ``module_class`` lets a test or
    an extension use a subclass."""
    from omegaconf import OmegaConf

    loss = cfg.loss if not OmegaConf.is_config(cfg.loss) else OmegaConf.to_object(cfg.loss)
    layers = check_layer_indices(model, parse_layers(cfg.perturbation.layers, "perturbation.layers"),
                                 what="perturbation.layers")
    return module_class(model, build_attack(cfg.perturbation.attack, cfg.perturbation), layers, loss,
                                   OptimSettings.from_trainer(cfg.trainer),
                                   tokenizer=tokenizer, evaluator=evaluator,
                                   sample_generations=int(cfg.logging.sample_generations))


def build_evaluator(cfg: DictConfig, validation=None):
    """The validation-loop evaluator when any held-out data is configured, else ``None``.

    Args:
        cfg: the run config (the held-out data and ``evaluation.layers``).
        validation: the validation scan's :class:`~lat_lightning.eval.scan.ScanSettings`
            (:func:`lat_lightning.stages.settings.validation_settings`).

    Raises:
        ValueError: held-out data is configured but ``validation`` is missing.
    """
    if not (cfg.data.eval_harmful or cfg.data.eval_benign or cfg.evaluation.utility_data):
        return None
    if validation is None:
        raise ValueError("the validation loop needs its scan settings: pass "
                         "validation=lat_lightning.stages.settings.validation_settings(cfg)")
    from lat_lightning.eval.evaluate import SafetyEvaluator, load_evaluation_data

    layers = None if cfg.evaluation.layers is None else parse_layers(cfg.evaluation.layers, "evaluation.layers")
    return SafetyEvaluator(validation, load_evaluation_data(cfg), layers)


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


def export_final(module: LatentAdversarialModule, tokenizer, out_dir: Path, merged_dir: Optional[Path] = None,
                 model_cfg=None) -> Path:
    """Save the trained model: the LoRA adapter (``PeftModel.from_pretrained``-loadable) or the full model
    (``AutoModelForCausalLM.from_pretrained``), plus the tokenizer. For LoRA, ``merged_dir`` (if given) also
    gets the merged full model, re-loaded from ``model_cfg`` (the ``model`` section).

    Call it on every rank: sharded (FSDP) weights are gathered first (a collective); rank 0 writes.
    """
    from lat_lightning.training.distributed_fsdp import full_state_dict
    from lat_lightning.training.interpolation import is_peft_model

    state = full_state_dict(module)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(out_dir, **({"state_dict": state} if state is not None else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if merged_dir is not None and model_cfg is not None and is_peft_model(module.model):
        export_merged(model_cfg, out_dir, merged_dir, tokenizer)
    return out_dir


def export_merged(model_cfg, adapter_dir: Path, out_dir: Path, tokenizer=None) -> Path:
    """Merge the LoRA adapter saved in ``adapter_dir`` into a fresh CPU copy of the base model (never
    quantised, in ``model.dtype``) and save it as a plain model (``AutoModelForCausalLM``-loadable)."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    from lat_lightning.training.interpolation import save_merged

    mcfg = OmegaConf.merge(model_cfg, {"gradient_checkpointing": False,
                                       "quantization": {"load_in_4bit": False, "load_in_8bit": False}})
    base = load_model(mcfg, train=False, with_lora=False)
    return save_merged(PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer, out_dir)


def fit(cfg: DictConfig, run_dir: Path, model=None, tokenizer=None, datamodule: Optional[SafetyDataModule] = None,
        resume: Optional[str] = None, extra_callbacks: Sequence[Callback] = (), *, scan=None,
        validation=None) -> LatentAdversarialModule:
    """Train as configured. Model, tokenizer and data are built from ``cfg`` unless given.

    ``scan`` / ``validation`` are the run's scan settings and the validation loop's
    (:mod:`lat_lightning.stages.settings`); the fragile-layer selection and the validation loop need them when
    they are enabled.

    Returns:
        The trained module (its ``model`` holds the trained weights).
    """
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    model = model if model is not None else load_model(cfg.model, train=True)
    model.train()
    validate_setup(cfg, model)
    module = build_module(cfg, model, tokenizer, evaluator=build_evaluator(cfg, validation))
    datamodule = datamodule or SafetyDataModule(
        cfg, tokenizer, require_target=module.attack.needs_target or bool(cfg.loss.away_from_harmful))
    callbacks = build_callbacks(cfg, run_dir, scan) + list(extra_callbacks)
    trainer = build_trainer(cfg, run_dir, callbacks)
    if trainer.is_global_zero:
        write_lora_targets(model, run_dir)
    ckpt_path = None
    if resume:  # a checkpoint path, or a run directory (its --resume checkpoint, else last.ckpt)
        ckpt = Path(resume) if Path(resume).suffix == ".ckpt" else checkpoint_to_resume(run_dir)
        ckpt_path = str(ckpt) if ckpt is not None else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stop = next(c for c in callbacks if isinstance(c, InterruptCheckpoint))
        name = signal.Signals(stop.signum or signal.SIGTERM).name
        raise TrainingInterrupted(f"stopped by {name} at step {trainer.global_step}; checkpoint saved to {stop.saved}; "
                                  f"continue with --resume {run_dir}", stop.signum or signal.SIGTERM) from None
    module.trainer_ref = trainer
    export_final(module, tokenizer, run_dir / "final", merged_dir=run_dir / "final_merged", model_cfg=cfg.model)
    return module
