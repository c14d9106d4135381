"""Short LoRA fine-tunes of a COPY of a model: the fine-tuning attack and the trainability probe of the
durability suite.

:func:`lora_finetune` copies the model (the caller's in-memory model and anything on disk stay untouched),
wraps the copy with fresh LoRA adapters and trains it with the supervised fine-tuning driver
(:func:`lat_lightning.training.sft.supervised_finetune`) on plain ``(prompt, response)`` pairs: the harmful
targets for the fine-tuning attack, benign answers for trainability. Only the small LoRA adapter is saved,
to ``out_dir/final`` (the run directory, never the model's). A ``measure(model) -> dict`` function is
evaluated before the first step and after every optimiser step (or only at ``measure_steps``), which gives the
learning curves. ``seed`` keys both the LoRA initialisation and the data order, so one seed reproduces a
fine-tune exactly and different seeds give different ones (the durability suite's fine-tuning-attack curve runs
several).

The durability suite (evaluation) does not import this module: its stage passes :func:`lora_finetune` in.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lat_lightning.models.loading import apply_lora
from lat_lightning.models.lora_targets import attention_projections
from lat_lightning.training.sft import LossRecorder, SFTSettings, supervised_finetune

if TYPE_CHECKING:
    from lat_lightning.models.settings import ModelSettings

Measure = Callable[[nn.Module], dict[str, float]]


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without PEFT wrappers (a LoRA model is merged into its copy's weights)."""
    twin = copy.deepcopy(model)
    if hasattr(twin, "merge_and_unload") and hasattr(twin, "peft_config"):
        twin = cast(Any, twin).merge_and_unload()  # a peft model (nn.Module's __getattr__ types it as a Tensor)
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


class CurveRecorder(Callback):
    """Calls ``measure(model)`` before training and after every optimiser step (only at ``steps`` when given:
    a point per listed step, e.g. an expensive generation every few steps); ``stop(point)`` true ends the fit
    there (the fine-tuning attack's stop at its break)."""

    def __init__(
        self,
        measure: Measure | None,
        steps: Collection[int] | None = None,
        stop: Callable[[dict[str, float]], bool] | None = None,
    ):
        super().__init__()
        self.measure = measure
        self.steps = None if steps is None else {int(s) for s in steps}
        self.stop = stop
        self.points: list[dict[str, float]] = []
        self._last_step = -1

    def _record(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if step == self._last_step or (self.steps is not None and step not in self.steps):
            return
        self._last_step = step
        point: dict[str, float] = {"step": step}
        if self.measure is not None:
            point.update(self.measure(pl_module.model))
        self.points.append(point)
        if self.stop is not None and self.stop(point):
            trainer.should_stop = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)


def _accelerator(model: nn.Module) -> str:
    try:
        dev = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return "cpu"
    return "gpu" if dev.type == "cuda" else "cpu"


@dataclass(frozen=True)
class LoraFinetuneSettings:
    """One LoRA fine-tune (constant LR, AdamW, clip 1.0).

    Attributes:
        steps / lr / batch_size: optimiser steps, learning rate, pairs per step.
        lora_r / lora_alpha / target_modules: the fresh LoRA adapters (``target_modules=None``: the model's
            attention projections, :func:`~lat_lightning.models.lora_targets.attention_projections`).
        use_chat_template / system_prompt / max_length: prompt formatting and the length limit (right cut).
        seed: the LoRA initialisation (peft draws it from the global RNG, seeded with ``seed`` for that draw)
            and the training seed (data order).
        save_adapter: save the trained LoRA adapter to ``out_dir/final`` (small; never a merged model).
    """

    steps: int
    lr: float
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: Optional[tuple[str, ...]] = None
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    max_length: int = 512
    seed: int = 0
    save_adapter: bool = True

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(str(m) for m in self.target_modules))
        if self.steps < 1:
            raise ValueError(f"steps: fine-tune steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class _AdapterSpec:
    """Fresh adapters for :func:`~lat_lightning.models.loading.apply_lora`, which reads a model section's ``lora``:
    no dropout, every decoder layer."""

    r: int
    alpha: int
    target_modules: list[str]
    dropout: float = 0.0
    layers_to_transform: Optional[list[int]] = None


@dataclass(frozen=True)
class _ModelSpec:
    """The part of a model section :func:`~lat_lightning.models.loading.apply_lora` reads."""

    lora: _AdapterSpec


def lora_finetune(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    out_dir: str | Path,
    settings: LoraFinetuneSettings | Mapping[str, Any],
    *,
    measure: Measure | None = None,
    measure_steps: Collection[int] | None = None,
    stop: Callable[[dict[str, float]], bool] | None = None,
) -> dict[str, Any]:
    """LoRA-fine-tune a COPY of ``model`` on ``(prompt, response)`` pairs (constant LR, AdamW, clip 1.0).

    Args:
        model: the model to start from (not modified; a PEFT model is merged into the copy first).
        tokenizer: its tokenizer.
        pairs: ``(prompt, response)`` training pairs.
        out_dir: where the adapter goes (``final/``): the run directory, never the model's.
        settings: the fine-tune's settings, or a mapping of their fields (what the durability suite passes:
            evaluation does not import training).
        measure: ``model -> {name: value}`` evaluated at step 0 and after every step (see ``measure_steps``).
        measure_steps: evaluate ``measure`` only at these steps (0 = before the first step; ``None``: at every
            step). Steps past ``settings.steps`` are never reached.
        stop: ``point -> bool`` on each measured point (``{"step", **measure(model)}``): true ends the fine-tune
            after that point (fewer steps than ``settings.steps``; the curve ends there).

    Returns:
        ``{"model": the fine-tuned copy (eval mode, on the input model's device), "curve": [{"step", ...}],
        "train_loss": [per step], "seconds": float, "out_dir": str}``.

    Raises:
        ValueError: no pairs, ``steps < 1`` or an unknown settings field.
    """
    if not pairs:
        raise ValueError("lora_finetune needs at least one (prompt, response) pair")
    if not isinstance(settings, LoraFinetuneSettings):
        try:
            settings = LoraFinetuneSettings(**settings)
        except TypeError as exc:  # an unknown or missing field
            raise ValueError(f"lora_finetune settings: {exc}") from None
    st = settings
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    twin = plain_copy(model).to(device)
    targets = list(st.target_modules) if st.target_modules is not None else attention_projections(twin)
    adapters = _ModelSpec(lora=_AdapterSpec(r=int(st.lora_r), alpha=int(st.lora_alpha), target_modules=targets))
    # peft draws the LoRA A matrices from the global RNG: seed that draw so the seed, not whatever ran before,
    # decides the initialisation.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(st.seed))
        # apply_lora reads only the ``lora`` section of its model settings: _ModelSpec is that part
        twin = apply_lora(
            twin,
            cast("ModelSettings", adapters),
            config_key="evaluation.durability.finetune_target_modules",
            # the attention projections are the fine-tuning attack's default by design: no "left out" warning for it
            warn_left_out_weights=st.target_modules is not None,
        )
    sft = SFTSettings(
        steps=int(st.steps),
        lr=float(st.lr),
        batch_size=int(st.batch_size),
        scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        gradient_clip_val=1.0,
        seed=int(st.seed),
        max_length=int(st.max_length),
        truncation="right",
        use_chat_template=st.use_chat_template,
        system_prompt=st.system_prompt,
        accelerator=_accelerator(model),
        log_every_n_steps=1,
    )
    recorder, losses = CurveRecorder(measure, measure_steps, stop), LossRecorder()
    module = supervised_finetune(twin, tokenizer, pairs, sft, callbacks=[recorder, losses])
    tuned = module.model.to(device)
    if st.save_adapter:
        cast(Any, tuned).save_pretrained(out / "final")  # a peft model
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return {
        "model": tuned,
        "curve": recorder.points,
        "train_loss": losses.losses,
        "seconds": round(time.time() - t0, 3),
        "out_dir": str(out),
    }


__all__ = ["CurveRecorder", "LoraFinetuneSettings", "lora_finetune", "plain_copy"]
