"""The one supervised fine-tuning driver: train a model on plain ``(prompt, response)`` pairs.

Used by the organism build (capability and alignment stages, with Gaussian noise augmentation), the
fine-tuning attack and the trainability check of the durability suite. It is the framework's own training
step (:class:`~lat_lightning.training.module.LatentAdversarialModule`: CE toward the response, any attack
applied during the forward) on a data module built from the pairs, so an organism build, a fine-tuning
attack and a LAPT run share one code path. Settings are a typed :class:`SFTSettings`; nothing else of a run
config is read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lat_lightning.attacks.base import Attack
from lat_lightning.data.datamodule import DataModuleSettings, SafetyDataModule
from lat_lightning.data.schema import SafetyExample
from lat_lightning.data.settings import DataSettings
from lat_lightning.training.module import LatentAdversarialModule, OptimSettings
from lat_lightning.training.settings import LossSettings


@dataclass
class SFTSettings:
    """What a supervised fine-tune needs to know."""

    steps: int  # optimiser steps
    lr: float  # peak learning rate (AdamW)
    batch_size: int = 8  # pairs per step
    scheduler: str = "constant"  # cosine, linear or constant after the warm-up
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    gradient_clip_val: Optional[float] = 1.0
    seed: int = 0  # data order (and anything seeded at trainer start)
    max_length: int = 512  # prompt + response tokens; longer pairs are cut on the right
    truncation: str = "right"
    use_chat_template: bool = True  # prompts formatted as the model's chat turns
    system_prompt: Optional[str] = None
    accelerator: str = "cpu"  # Lightning accelerator
    log_every_n_steps: int = 10
    progress: Optional[str] = None  # label of a progress bar over the steps (with an ETA); None: no bar


class LossRecorder(Callback):
    """Keeps the training loss of every step."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is not None:
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (GPU available, ...) off for the duration: a fine-tune inside a stage is a detail."""
    names = ["lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def sft_datamodule(tokenizer, pairs: Sequence[tuple[str, str]], settings: SFTSettings) -> SafetyDataModule:
    """Batches of the pairs in the data module's seeded order (``safe_*`` sequences only, no harmful target)."""
    examples = [
        SafetyExample(prompt=p, safe_response=r, harmful_response=None, index=i) for i, (p, r) in enumerate(pairs)
    ]
    data = DataModuleSettings(
        data=DataSettings(
            batch_size=int(settings.batch_size),
            max_length=int(settings.max_length),
            truncation=settings.truncation,
            shuffle=True,
            num_workers=0,
        ),
        seed=int(settings.seed),
        use_chat_template=settings.use_chat_template,
        system_prompt=settings.system_prompt,
    )
    return SafetyDataModule(data, tokenizer, safety_examples=examples)


def supervised_finetune(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    settings: SFTSettings,
    *,
    attack: Optional[Attack] = None,
    attack_layers: Sequence[int] = (),
    callbacks: Sequence[Callback] = (),
    logger=False,
) -> LatentAdversarialModule:
    """Fine-tune ``model`` in place on ``(prompt, response)`` pairs (CE on the response tokens).

    Args:
        model: the model to train (its trainable parameters are updated; put in train mode for the fit).
        tokenizer: its tokenizer.
        pairs: the training pairs.
        settings: steps, optimiser, data length policy and prompt formatting.
        attack: an attack applied during each training forward (e.g. ``asa_random`` noise augmentation);
            ``None`` = plain SFT.
        attack_layers: the layers it attacks.
        callbacks: extra Lightning callbacks (e.g. a curve recorder).
        logger: a Lightning logger, or ``False``.

    Returns:
        The trained module (``module.model`` is ``model``).

    Raises:
        ValueError: no pairs, or ``steps < 1``.
    """
    if not pairs:
        raise ValueError("supervised_finetune needs at least one (prompt, response) pair")
    if settings.steps < 1:
        raise ValueError(f"fine-tune steps must be >= 1, got {settings.steps}")
    from lat_lightning.attacks.none import NoAttack
    from lat_lightning.attacks.settings import AttackSettings

    attack = attack if attack is not None else NoAttack(AttackSettings())
    optim = OptimSettings(
        max_steps=int(settings.steps),
        lr=float(settings.lr),
        weight_decay=settings.weight_decay,
        betas=cast("tuple[float, float]", tuple(settings.betas)),
        scheduler=settings.scheduler,
        warmup_ratio=settings.warmup_ratio,
        accumulate_grad_batches=1,
        gradient_clip_val=settings.gradient_clip_val,
    )
    module = LatentAdversarialModule(
        model, attack, attack_layers, LossSettings(toward_safe=1.0), optim, tokenizer=tokenizer
    )
    datamodule = sft_datamodule(tokenizer, pairs, settings)
    pl.seed_everything(int(settings.seed), verbose=False)
    callbacks = list(callbacks)
    if settings.progress:
        from lat_lightning.training.progress import StepProgressBar

        callbacks.append(StepProgressBar(settings.progress))
    with quiet_lightning():
        trainer = pl.Trainer(
            max_steps=int(settings.steps),
            accelerator=settings.accelerator,
            devices=1,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=bool(settings.progress),
            enable_model_summary=False,
            callbacks=callbacks,
            log_every_n_steps=int(settings.log_every_n_steps),
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
        )
        model.train()
        trainer.fit(module, datamodule=datamodule)
    module.trainer_ref = trainer
    return module


__all__ = ["LossRecorder", "SFTSettings", "quiet_lightning", "sft_datamodule", "supervised_finetune"]
