"""Short LoRA fine-tunes of a copy of a model with the framework's training loop: the fine-tuning attack and
the trainability probe of the durability suite.

:func:`lora_finetune` copies the model (the caller's in-memory model and anything on disk stay untouched),
wraps the copy with fresh LoRA adapters, and trains it with the pieces ``fit`` is made of
(:class:`~lat_lightning.training.module.LatentAdversarialModule`, :class:`~lat_lightning.data.datamodule.SafetyDataModule`,
:func:`lat_lightning.training.fit.build_trainer`, :func:`lat_lightning.training.fit.validate_setup`) under the ``none``
perturbation, i.e. plain supervised fine-tuning: each ``(prompt, response)`` pair becomes a
:class:`~lat_lightning.data.schema.SafetyExample` whose ``safe_response`` slot holds the response to learn,
and the defence loss is ``toward`` CE on it (``away`` 0, no utility term, no callbacks). For the
fine-tuning attack the responses are the harmful targets; for trainability they are benign answers.

``fit`` itself is not called because it also exports a merged full model re-loaded from
``model.name_or_path``, which an in-memory model (the organism pipeline) does not have; and the suite needs
no resumable checkpoints. Only the small LoRA adapter is saved, to ``out_dir/final``: the run directory,
never the model's. A ``measure(model) -> dict`` function is evaluated before the first step and after
every optimiser step (eval mode, no grad), which gives the learning curves.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from torch import nn

from lat_lightning.data.schema import SafetyExample
from lat_lightning.data.templating import build_sequences, encode_prompt, encode_response
from lat_lightning.losses import causal_lm_loss

log = logging.getLogger(__name__)

Measure = Callable[[nn.Module], dict[str, float]]


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without PEFT wrappers (a LoRA model is merged into its copy's weights)."""
    twin = copy.deepcopy(model)
    if hasattr(twin, "merge_and_unload") and hasattr(twin, "peft_config"):
        twin = twin.merge_and_unload()
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


@torch.no_grad()
def response_loss(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], use_chat_template: bool = True,
                  system_prompt: str | None = None, batch_size: int = 16) -> float:
    """Mean token CE of each pair's response given its prompt (teacher-forced; prompt tokens masked)."""
    if not pairs:
        return float("nan")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            prompts = [encode_prompt(tokenizer, p, use_chat_template, system_prompt) for p, _ in chunk]
            responses = [encode_response(tokenizer, r) for _, r in chunk]
            b = build_sequences(prompts, responses, int(pad))
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                           use_cache=False).logits
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(causal_lm_loss(logits, b["labels"].to(device))) * n
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


class CurveRecorder(Callback):
    """Calls ``measure(model)`` before training and after every optimiser step; keeps the training loss."""

    def __init__(self, measure: Measure | None):
        super().__init__()
        self.measure = measure
        self.points: list[dict[str, float]] = []
        self.losses: list[float] = []
        self._last_step = -1

    def _record(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return
        self._last_step = step
        point: dict[str, float] = {"step": step}
        if self.measure is not None:
            point.update(self.measure(pl_module.model))
        self.points.append(point)

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, torch.Tensor):
            self.losses.append(float(outputs))
        elif isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))
        self._record(trainer, pl_module)


def _accelerator(model: nn.Module) -> str:
    try:
        dev = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return "cpu"
    return "gpu" if dev.type == "cuda" else "cpu"


def finetune_config(base_cfg, steps: int, lr: float, batch_size: int, accelerator: str, seed: int = 0):
    """The run config of the fine-tune: SFT (``none`` perturbation, ``toward`` only), no callbacks, no validation.

    ``base_cfg`` (a run config or ``None``) contributes the model's prompt formatting and the data length
    policy; everything that would change what is trained is overridden here.
    """
    from omegaconf import OmegaConf

    from lat_lightning.config import RunConfig

    cfg = OmegaConf.structured(RunConfig)
    if base_cfg is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.to_container(base_cfg, resolve=True))
    over = {
        "stages": ["fit"], "seed": int(seed),
        "perturbation": {"strategy": "none", "layers": []},
        "loss": {"toward": 1.0, "away": 0.0, "utility": 0.0, "mask_prompt": True},
        "trainer": {"max_steps": int(steps), "lr": float(lr), "scheduler": "constant", "warmup_ratio": 0.0,
                    "accumulate_grad_batches": 1, "val_check_interval": None, "accelerator": accelerator,
                    "devices": 1, "num_nodes": 1, "strategy": "auto", "checkpoint_every_n_steps": None,
                    "weight_decay": 0.0, "gradient_clip_val": 1.0, "log_every_n_steps": 1},
        "callbacks": {"kl_teacher": {"enabled": False}, "fragile_layers": {"enabled": False, "layers": []},
                      "weight_interpolation": {"enabled": False}},
        "data": {"harmful": None, "benign": None, "eval_harmful": None, "eval_benign": None, "asabench": None,
                 "batch_size": int(batch_size), "shuffle": True, "num_workers": 0, "truncation": "right",
                 "max_examples": None},
        "evaluation": {"utility_data": None},
        "logging": {"tensorboard": False},
    }
    if str(cfg.trainer.precision).startswith("16"):
        over["trainer"]["precision"] = "32-true"
    cfg = OmegaConf.merge(cfg, over)
    OmegaConf.set_struct(cfg, True)
    return cfg


@contextlib.contextmanager
def _quiet_lightning():
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


def lora_finetune(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], out_dir: str | Path, *,
                  steps: int, lr: float, batch_size: int = 4, lora_r: int = 8, lora_alpha: int = 16,
                  target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                  base_cfg=None, measure: Measure | None = None, seed: int = 0,
                  save_adapter: bool = True) -> dict[str, Any]:
    """LoRA-fine-tune a COPY of ``model`` on ``(prompt, response)`` pairs with the framework's training loop.

    Args:
        model: the model to start from (not modified; a PEFT model is merged into the copy first).
        tokenizer: its tokenizer.
        pairs: ``(prompt, response)`` training pairs.
        out_dir: where the adapter goes (``final/``): the run directory, never the model's.
        steps / lr / batch_size: optimiser steps (constant LR, AdamW), learning rate, pairs per step.
        lora_r / lora_alpha / target_modules: the fresh LoRA adapters.
        base_cfg: run config whose ``model`` formatting and ``data.max_length`` are kept (``None``: defaults).
        measure: ``model -> {name: value}`` evaluated at step 0 and after every step.
        seed: the training seed (data order, LoRA init).
        save_adapter: save the trained LoRA adapter to ``out_dir/final`` (small; never a merged model).

    Returns:
        ``{"model": the fine-tuned copy (eval mode, on the input model's device), "curve": [{"step", ...}],
        "train_loss": [per step], "seconds": float, "out_dir": str}``.
    """
    from lat_lightning.config import LoraConfig, ModelConfig
    from lat_lightning.data.datamodule import SafetyDataModule
    from lat_lightning.models.loading import apply_lora
    from lat_lightning.training.module import LatentAdversarialModule
    from lat_lightning.training.fit import build_trainer, validate_setup

    if not pairs:
        raise ValueError("lora_finetune needs at least one (prompt, response) pair")
    if steps < 1:
        raise ValueError(f"fine-tune steps must be >= 1, got {steps}")
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    twin = plain_copy(model).to(device)
    mcfg = ModelConfig(lora=LoraConfig(enabled=True, r=int(lora_r), alpha=int(lora_alpha), dropout=0.0,
                                       target_modules=list(target_modules)))
    twin = apply_lora(twin, mcfg)
    cfg = finetune_config(base_cfg, steps, lr, batch_size, _accelerator(model), seed)
    examples = [SafetyExample(prompt=p, safe_response=r, harmful_response=r, index=i) for i, (p, r) in enumerate(pairs)]
    dm = SafetyDataModule(cfg, tokenizer, safety_examples=examples)
    recorder = CurveRecorder(measure)
    pl.seed_everything(int(seed), workers=True, verbose=False)
    twin.train()
    validate_setup(cfg, twin)
    module = LatentAdversarialModule(cfg, twin, tokenizer, evaluator=None)
    # No checkpoints (a save_top_k=0 checkpoint callback stops Lightning adding its default one); the
    # adapter alone is saved below.
    bar = TQDMProgressBar()
    bar.disable()  # a silent bar stops Lightning adding its default one
    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=False), bar, recorder]
    with _quiet_lightning():
        trainer = build_trainer(cfg, out, callbacks)
        trainer.fit(module, datamodule=dm)
    tuned = module.model.to(device)
    if save_adapter:
        tuned.save_pretrained(out / "final")
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return {"model": tuned, "curve": recorder.points, "train_loss": recorder.losses,
            "seconds": round(time.time() - t0, 3), "out_dir": str(out)}


__all__ = ["CurveRecorder", "finetune_config", "lora_finetune", "plain_copy", "response_loss"]
