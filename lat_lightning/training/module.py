"""``LatentAdversarialModule``: the attack is an inner loop, the defence the outer update.

One training step, top to bottom (manual optimisation):

1. **Attack.** The configured attack (:mod:`lat_lightning.attacks`) builds a perturbation of the residual
   stream at the attacked layers for this batch. Gradient-based attacks take gradients with
   ``torch.autograd.grad`` on the perturbation only (weights frozen, no ``.grad`` written, no DDP
   all-reduce) and run the model only from the earliest attacked layer on.
2. **Defence.** With the perturbation applied: ``toward_safe`` · CE on the safe response (prompt tokens
   included when ``mask_prompt`` is false, as in the reference code) and ``away_from_harmful`` ·
   ``−log(1 − p)`` on the harmful response. Without it: ``utility`` · CE on benign data, plus any extra
   loss terms registered by callbacks (the KL teacher).
3. **Update.** Backward scaled by ``1/accumulate``; gradients are synchronised across processes only on
   the last micro-batch of an accumulation window; clip, optimiser step, LR-scheduler step.
   ``trainer.global_step`` therefore counts defence optimiser steps, and the LR schedule is defined over
   optimiser steps, not micro-batches (a bug in the reference code).

A defence that is not "a training attack + loss weights" (circuit breakers, RepNoise, Vaccine, Booster) is a
``loss.objective`` (:mod:`lat_lightning.training.objectives`): its terms replace step 2's ``toward_safe`` /
``away_from_harmful`` (the attack is ``none``); the utility CE, callback terms and step 3 stay the module's.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import Attack, Perturbation
from lat_lightning.data.templating import IGNORE_INDEX
from lat_lightning.errors import TrainingDivergedError
from lat_lightning.losses import causal_lm_loss, log_one_minus_p_loss
from lat_lightning.models.layers import layer_name
from lat_lightning.training import resume
from lat_lightning.training.objectives import build_objective
from lat_lightning.training.settings import LossSettings, TrainerSettings

if TYPE_CHECKING:
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from torch.optim.lr_scheduler import LRScheduler

    from lat_lightning.eval.evaluate import SafetyEvaluator

# An extra loss term: (module, batch) -> {name: weighted loss}. Callbacks register these.
LossTerm = Callable[["LatentAdversarialModule", dict], dict[str, Tensor]]


def cosine_with_warmup(max_steps: int, warmup_ratio: float, kind: str = "cosine") -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up, then cosine (or linear, or constant) decay to 0."""
    warmup = int(math.ceil(warmup_ratio * max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class OptimSettings:
    """The defence optimiser and its schedule (AdamW; LR multiplier per optimiser step)."""

    max_steps: int = 100  # optimiser steps; the LR schedule spans them
    lr: float = 1e-4
    weight_decay: float = 0.0  # on weight matrices only (biases, norms: none)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "cosine"  # cosine, linear or constant after the warm-up
    warmup_ratio: float = 0.1
    accumulate_grad_batches: int = 1  # micro-batches per optimiser step
    gradient_clip_val: Optional[float] = 1.0

    @classmethod
    def from_trainer(cls, t: TrainerSettings) -> "OptimSettings":
        """The optimiser part of a ``trainer`` config section."""
        return cls(
            max_steps=int(t.max_steps),
            lr=float(t.lr),
            weight_decay=float(t.weight_decay),
            betas=cast("tuple[float, float]", tuple(float(b) for b in t.betas)),
            scheduler=str(t.scheduler),
            warmup_ratio=float(t.warmup_ratio),
            accumulate_grad_batches=int(t.accumulate_grad_batches),
            gradient_clip_val=t.gradient_clip_val,
        )


class LatentAdversarialModule(pl.LightningModule):
    """Wraps a causal LM for latent adversarial training.

    Args:
        model: the causal LM (LoRA-wrapped or not).
        attack: the training attack (:func:`lat_lightning.attacks.build_attack`); ``none`` makes the step SFT.
        attack_layers: layers it attacks (the fragile-layer callback may set them at fit start).
        loss: defence-step loss weights.
        optim: optimiser and schedule.
        tokenizer: its tokenizer (kept for callbacks and evaluation).
        evaluator: a :class:`lat_lightning.eval.evaluate.SafetyEvaluator` for the validation loop
            (``None``: validation does nothing).
        sample_generations: attacked answers logged as text per validation run.
    """

    evaluator: Optional[SafetyEvaluator]  # a plain attribute (set through __dict__), not a submodule
    trainer_ref: pl.Trainer  # the Trainer that fitted it, kept after the fit (lat_lightning.training.fit, sft)

    def __init__(
        self,
        model: nn.Module,
        attack: Attack,
        attack_layers: Sequence[int] = (),
        loss: Optional[LossSettings] = None,
        optim: Optional[OptimSettings] = None,
        tokenizer=None,
        evaluator=None,
        sample_generations: int = 4,
    ):
        super().__init__()
        self.automatic_optimization = False
        # Checkpoints hold trainable weights only, so loading must tolerate the frozen ones' absence.
        self.strict_loading = False
        self.model = model
        self.tokenizer = tokenizer
        self.attack = attack
        self.attack_layers: list[int] = [int(l) for l in attack_layers]
        self.loss_weights = loss if loss is not None else LossSettings()
        # None: the attack + loss weights (step 2 above); else a defence objective replaces the safety terms
        self.objective = build_objective(self.loss_weights)
        self.optim = optim if optim is not None else OptimSettings()
        self.sample_generations = int(sample_generations)
        self.loss_terms: list[LossTerm] = []
        self._micro_step = 0
        self._step_logs: dict[str, list] = {}  # name -> [sum, count] over the micro-batches of this optimiser step
        # A plain attribute, not a submodule: its torchmetrics state must not enter checkpoints.
        self.__dict__["evaluator"] = evaluator

    # -- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        t = self.optim
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check model.lora settings")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(t.max_steps, t.warmup_ratio, t.scheduler))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _no_sync(self, last_micro_batch: bool):
        strategy = self.trainer.strategy
        if last_micro_batch or not hasattr(strategy, "block_backward_sync"):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    # -- the step ------------------------------------------------------------------------------------
    def run_attack(self, batch: dict) -> Perturbation:
        """Inner loop: the perturbation for this batch (weights untouched). An attack that measures its loss at the
        final δ (PGD) reads it off the defence's own perturbed passes instead of running one more forward."""
        if hasattr(self.attack, "final_logits_from"):
            w = self.loss_weights
            self.attack.final_logits_from = frozenset(
                g for g, on in (("safe", w.toward_safe), ("harmful", w.away_from_harmful)) if on
            )
        step = self.global_step * self.optim.accumulate_grad_batches + self._micro_step
        if not self.attack_layers and self.attack.name != "none" and not _has_row_layers(batch):
            raise ValueError("perturbation.layers is empty: set it or enable callbacks.fragile_layers")
        return self.attack.make(self.model, batch, self.attack_layers, step=step)

    def defence_losses(self, batch: dict, perturbation: Perturbation) -> dict[str, Tensor]:
        """Outer objective terms, each already weighted; their sum is the loss to minimise."""
        w = self.loss_weights
        if self.objective is not None:
            terms = self.objective.losses(self.model, batch, int(self.global_step), int(self.optim.max_steps))
        else:
            terms = self._adversarial_losses(batch, perturbation)
        if w.utility and "benign_input_ids" in batch:
            logits = self.model(
                input_ids=batch["benign_input_ids"], attention_mask=batch["benign_attention_mask"], use_cache=False
            ).logits
            terms["utility"] = w.utility * causal_lm_loss(logits, batch["benign_labels"])
        for term in self.loss_terms:
            terms.update(term(self, batch))
        return terms

    def _adversarial_losses(self, batch: dict, perturbation: Perturbation) -> dict[str, Tensor]:
        """``toward_safe`` and ``away_from_harmful`` under the attack's perturbation."""
        w = self.loss_weights
        terms: dict[str, Tensor] = {}
        seen: dict[str, Tensor] = {}  # logits under the perturbation, by sequence group
        with perturbation.applied(self.model):
            if w.toward_safe:
                logits = self.model(
                    input_ids=batch["safe_input_ids"], attention_mask=batch["safe_attention_mask"], use_cache=False
                ).logits
                labels = batch["safe_labels"] if w.mask_prompt else with_prompt_labels(batch, "safe")
                terms["toward_safe"] = w.toward_safe * causal_lm_loss(logits, labels)
                seen["safe"] = logits
            if w.away_from_harmful:
                logits = self.model(
                    input_ids=batch["harmful_input_ids"],
                    attention_mask=batch["harmful_attention_mask"],
                    use_cache=False,
                ).logits
                terms["away_from_harmful"] = w.away_from_harmful * log_one_minus_p_loss(
                    logits, batch["harmful_labels"], w.away_logp_floor
                )
                seen["harmful"] = logits
        if perturbation.final_loss is not None:  # the attack's loss at its final δ, from these logits: no extra pass
            with torch.no_grad():
                perturbation.stats["attack_loss_after"] = float(
                    perturbation.final_loss({k: v.detach() for k, v in seen.items()})
                )
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt = cast("LightningOptimizer", self.optimizers())  # configure_optimizers: one optimiser, one scheduler
        sched = cast("LRScheduler", self.lr_schedulers())
        accumulate = int(self.optim.accumulate_grad_batches)
        last = (self._micro_step + 1) % accumulate == 0

        perturbation = self.run_attack(batch)
        with self._no_sync(last):
            terms = self.defence_losses(batch, perturbation)
            total = torch.stack(list(terms.values())).sum() if terms else None
            if total is None:
                raise ValueError(
                    "all loss weights are zero: set loss.toward_safe, loss.away_from_harmful or loss.utility"
                )
            # every rank takes the same decision, so all of them save and stop together (no hang under DDP)
            if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(total)), all=True):
                self._diverged(terms)
            self.manual_backward(total / accumulate)

        self._collect_logs(terms, total, perturbation, opt)
        self._micro_step += 1
        if last:
            clip = self.optim.gradient_clip_val
            if clip:
                # a LightningOptimizer is an instance of its optimiser's class at run time; Lightning types it apart
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")  # type: ignore[arg-type]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            self._micro_step = 0
            self._log_step(batch_size=int(batch["safe_input_ids"].shape[0]))
        return total.detach()

    def _diverged(self, terms: dict[str, Tensor]) -> None:
        bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        path = None
        if self.trainer is not None and getattr(self.trainer, "default_root_dir", None):
            path = os.path.join(self.trainer.default_root_dir, "checkpoints", "diverged.ckpt")
            self.trainer.save_checkpoint(path)
        raise TrainingDivergedError(
            f"loss is not finite at step {self.global_step} ({bad}); checkpoint saved to {path}; "
            "lower trainer.lr or perturbation.eps/alpha"
        )

    def _collect_logs(self, terms, total, perturbation: Perturbation, opt) -> None:
        """Add this micro-batch's numbers to the running sums of the current optimiser step."""
        logs = {f"train/loss_{k}": v.detach() for k, v in terms.items()}
        logs["train/loss"] = total.detach()
        for k, v in perturbation.stats.items():
            logs[f"attack/{k}"] = float(v)
        for k, v in perturbation.norm_stats().items():
            logs[f"attack/norm_{k}"] = v
        for k, v in (self.objective.stats if self.objective is not None else {}).items():
            logs[f"defence/{k}"] = v
        logs["train/lr"] = opt.param_groups[0]["lr"]  # the rate this step's update uses
        for k, v in logs.items():
            acc = self._step_logs.setdefault(k, [0.0, 0])
            acc[0] = acc[0] + v
            acc[1] += 1

    def _log_step(self, batch_size: int) -> None:
        """Once per optimiser step: the mean over its micro-batches, at x = optimiser steps done
        (``trainer.global_step``), every ``trainer.log_every_n_steps`` steps and at the last one.

        Written to the loggers directly: Lightning's own step counter for manual optimisation counts
        micro-batches, which is not the axis a run is configured in (``max_steps`` are optimiser steps)."""
        logs = {k: s / max(c, 1) for k, (s, c) in self._step_logs.items()}
        self._step_logs = {}
        # trainer.callback_metrics and the progress bar (the loss); not the loggers
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=batch_size, logger=False)
        self.log("loss", logs["train/loss"], on_step=True, prog_bar=True, batch_size=batch_size, logger=False)
        step = int(self.global_step)
        every = int(getattr(self.trainer, "log_every_n_steps", 1) or 0)
        max_steps = int(getattr(self.trainer, "max_steps", -1) or -1)
        if self.loggers and every and (step % every == 0 or step == max_steps):
            scalars = {k: float(v) for k, v in logs.items()}
            for logger in self.loggers:
                logger.log_metrics(scalars, step=step)

    # -- validation: attack success, over-refusal, utility, NLL probe ---------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.metrics.to(self.device)
            self.evaluator.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        """``batch`` is a list of held-out :class:`SafetyExample` (see ``SafetyDataModule.val_dataloader``)."""
        if self.evaluator is None or not batch:
            return
        limit = self.sample_generations if batch_idx == 0 else 0
        self.evaluator.attack_batch(self.model, self.tokenizer, batch, self.attack_layers or None, sample_limit=limit)

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None:
            return
        self.evaluator.benign_and_utility(self.model, self.tokenizer)
        metrics = self.evaluator.compute()
        vals = {f"val/{k}": v for k, v in metrics.items() if v == v}
        self.log_dict(vals, sync_dist=False, logger=False)
        for logger in self.loggers if vals else ():  # at x = optimiser steps done, like the training scalars
            logger.log_metrics({k: float(v) for k, v in vals.items()}, step=int(self.global_step))
        writer = getattr(self.logger, "experiment", None) if self.logger else None
        if writer is not None and hasattr(writer, "add_text") and self.evaluator.samples:
            text = "\n\n".join(
                f"**{s['prompt']}** (layer {layer_name(s['layer'])})  \nclean: `{s['clean']}`  \n"
                f"attacked: `{s['attacked']}`"
                for s in self.evaluator.samples
            )
            writer.add_text("val/samples", text, global_step=self.global_step)
        self.model.train()

    # -- checkpoints: trainable weights only ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lat_lightning"] = {
            "attack_layers": list(self.attack_layers),
            "micro_step": self._micro_step,
            "attack_state": self.attack.state_dict(),  # e.g. a cached refusal direction
            **resume.training_state(self),
        }  # RNG, noise key, partial gradients

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("lat_lightning", {})
        if "attack_layers" in info:
            self.attack_layers = list(info["attack_layers"])
        self._micro_step = int(info.get("micro_step", 0))
        self.attack.load_state_dict(info.get("attack_state") or {})
        self._resumed_state = info  # applied in on_train_start, once the strategy has placed the weights

    def setup(self, stage: str) -> None:
        # before a checkpoint is restored: the objective's frozen reference is the starting model
        if stage == "fit" and self.objective is not None:
            self.objective.setup(self.model)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.objective is not None:
            self.objective.teardown()

    def on_train_start(self) -> None:
        if getattr(self, "_resumed_state", None):
            resume.restore_training_state(self, self._resumed_state)
        self._resumed_state = None

    # -- FSDP2 (trainer.strategy=fsdp2: ModelParallelStrategy calls this with a device mesh) ------------
    def configure_model(self) -> None:
        if self.device_mesh is not None:
            from lat_lightning.training.distributed_fsdp import shard_fsdp2

            shard_fsdp2(self.model, self.device_mesh["data_parallel"])


def _has_row_layers(batch: dict) -> bool:
    layer = batch.get("layer")
    return layer is not None and bool((layer != -1).any())  # -1: the example has no layer of its own


def with_prompt_labels(batch: dict, prefix: str) -> Tensor:
    """Labels of ``<prefix>_*`` sequences that also cover the prompt tokens (every real token but the first,
    which nothing predicts): the reference code's CE when ``loss.mask_prompt`` is false."""
    labels = batch[f"{prefix}_input_ids"].clone()
    labels[batch[f"{prefix}_attention_mask"] == 0] = IGNORE_INDEX
    return labels
