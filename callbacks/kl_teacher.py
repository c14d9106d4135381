"""``KLTeacher``: keep the student close to the frozen starting model on benign data.

Adds one loss term to :class:`~lat_lightning.training.module.LatentAdversarialModule` (``module.loss_terms``),
logged as ``train/loss_kl``::

    weight · mean over labelled positions of KL(p_teacher ‖ p_student)     (direction teacher_student)
    weight · mean over labelled positions of KL(p_student ‖ p_teacher)     (direction student_teacher)

* **Which tokens.** The benign sequences (``benign_*`` keys of the batch) at their response positions,
  i.e. the logits that predict a labelled token. A batch without benign data falls back to the safe
  sequences (``safe_*``, the refusal tokens), without any perturbation.
* **Which teacher.** With LoRA the teacher is the *same* model with its adapters disabled
  (``with model.disable_adapter():``), so no second copy exists. With full fine-tuning a frozen deep copy
  is made in ``setup`` (before the strategy wraps or moves anything, and before a checkpoint is
  restored, so it is the starting model). It lives in a plain list on the callback, not on the
  LightningModule: it is never wrapped by the strategy (under FSDP2 it is sharded like the student at fit start,
  so no rank holds all of it), never optimised and never in a state dict or
  checkpoint. The copy is in eval mode; a model with active dropout would see a (harmless) mismatch.
* **Maths.** :func:`kl_divergence_chunked` in float32, ``chunk_size`` positions at a time through
  ``log_softmax`` (a 128k vocabulary never needs a full float32 copy of the logits), with an analytic
  chunked backward, so the autograd graph holds no per-chunk float32 softmax either. Teacher logits are
  computed under ``torch.no_grad()``.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Optional, cast

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lat_lightning.training.interpolation import is_peft_model

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DIRECTIONS = ("teacher_student", "student_teacher")


# --------------------------------------------------------------------------------------------- the maths
def _chunk_terms(student: Tensor, teacher: Tensor, rows: Tensor, cols: Tensor, direction: str):
    work = torch.promote_types(student.dtype, torch.float32)  # float32 at least (float64 stays float64)
    s = torch.log_softmax(student[rows, cols].to(work), dim=-1)
    t = torch.log_softmax(teacher[rows, cols].to(student.device, work), dim=-1)
    if direction == "teacher_student":
        kl = (t.exp() * (t - s)).sum(-1)
    else:
        kl = (s.exp() * (s - t)).sum(-1)
    return s, t, kl


class _ChunkedKL(torch.autograd.Function):
    """Mean KL over selected positions; forward and backward both walk the positions chunk by chunk."""

    @staticmethod
    def forward(ctx, student, teacher, rows, cols, direction, chunk_size):
        work = torch.promote_types(student.dtype, torch.float32)
        total = torch.zeros((), dtype=work, device=student.device)
        n = rows.numel()
        for start in range(0, n, chunk_size):
            stop = start + chunk_size
            _, _, kl = _chunk_terms(student, teacher, rows[start:stop], cols[start:stop], direction)
            total = total + kl.sum()
        ctx.save_for_backward(student, teacher, rows, cols)
        ctx.direction, ctx.chunk_size, ctx.n = direction, chunk_size, n
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, rows, cols = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs = torch.zeros_like(student) if need_s else None
        gt = torch.zeros_like(teacher) if need_t else None
        scale = grad_out.to(torch.promote_types(student.dtype, torch.float32)) / ctx.n
        for start in range(0, ctx.n, ctx.chunk_size):
            r, c = rows[start : start + ctx.chunk_size], cols[start : start + ctx.chunk_size]
            s, t, kl = _chunk_terms(student, teacher, r, c, ctx.direction)
            ps, pt = s.exp(), t.exp()
            if ctx.direction == "teacher_student":  # KL(t‖s): d/ds = p_s − p_t; d/dt = p_t ⊙ (t − s − KL)
                ds = ps - pt if need_s else None
                dt = pt * (t - s - kl[:, None]) if need_t else None
            else:  # KL(s‖t): d/ds = p_s ⊙ (s − t − KL); d/dt = p_t − p_s
                ds = ps * (s - t - kl[:, None]) if need_s else None
                dt = pt - ps if need_t else None
            if need_s:
                gs[r, c] = (ds * scale).to(gs.dtype)
            if need_t:
                gt[r, c] = (dt * scale).to(gt.device, gt.dtype)
        return gs, gt, None, None, None, None


def kl_divergence_chunked(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    direction: str = "teacher_student",
    chunk_size: int = 128,
) -> Tensor:
    """Mean KL divergence between two models' next-token distributions over the masked positions.

    ``teacher_student`` is ``KL(p_teacher ‖ p_student) = Σ_v p_t (log p_t − log p_s)`` (the LAT
    reference's KL-to-the-frozen-model penalty); ``student_teacher`` swaps the two. Computed in float32,
    ``chunk_size`` selected positions at a time, so the working memory is ``O(chunk_size · V)`` floats
    in the forward *and* the backward (the gradient is analytic, not stored per chunk). Positions outside
    ``mask`` are never touched and get zero gradient. Exactly zero for identical logits.

    Args:
        student_logits: ``[B, T, V]`` (any float dtype; gradients flow to it).
        teacher_logits: ``[B, T, V]`` (usually computed under ``torch.no_grad``).
        mask: ``[B, T]`` bool / 0-1 selector of positions (aligned with the logits, i.e. the logits that
            predict a labelled token); ``None`` selects every position.
        direction: ``teacher_student`` or ``student_teacher``.
        chunk_size: positions per chunk, ``>= 1``.

    Returns:
        A float32 scalar (float64 for float64 logits): the mean KL per selected position (0 when no
        position is selected, still attached to ``student_logits``' graph).

    Raises:
        ValueError: mismatched shapes, unknown direction or ``chunk_size < 1``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown KL direction '{direction}'; choose from {', '.join(DIRECTIONS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be [B, T, V]; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
    rows, cols = mask.to(student_logits.device).bool().nonzero(as_tuple=True)
    if rows.numel() == 0:
        return student_logits.flatten()[:1].float().sum() * 0.0
    return _ChunkedKL.apply(student_logits, teacher_logits, rows, cols, direction, int(chunk_size))


def labelled_logit_mask(labels: Tensor) -> Tensor:
    """``[B, T]`` mask of the logit positions that predict a labelled token (``labels[:, t + 1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# --------------------------------------------------------------------------------------------- the callback
class KLTeacher(Callback):
    """Register a KL-to-the-frozen-model loss term on the module (see the module docstring).

    Args:
        weight: multiplier of the KL term (``callbacks.kl_teacher.weight``); 0 registers nothing.
        direction: ``teacher_student`` (KL(p_teacher ‖ p_student), default) or ``student_teacher``.
        chunk_size: positions per ``log_softmax`` chunk.
        name: loss-term name (logged as ``train/loss_<name>``).
    """

    def __init__(
        self, weight: float = 0.1, direction: str = "teacher_student", chunk_size: int = 128, name: str = "kl"
    ):
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown KL direction '{direction}'; choose from {', '.join(DIRECTIONS)}")
        if chunk_size < 1:
            raise ValueError(f"callbacks.kl_teacher.chunk_size must be >= 1, got {chunk_size}")
        self.weight = float(weight)
        self.direction = direction
        self.chunk_size = int(chunk_size)
        self.name = name
        self.uses_adapters = False
        # A plain list, so the copy is no attribute of any nn.Module (not wrapped, not in a state dict).
        self._teacher: list[nn.Module] = []
        self._modules: list = []

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.weight == 0.0:
            return
        self.attach(pl_module)

    def attach(self, pl_module) -> None:
        """Create the teacher for ``pl_module.model`` and register the loss term (idempotent)."""
        model = pl_module.model
        self.uses_adapters = is_peft_model(model)
        if not self.uses_adapters and not self._teacher:
            teacher = copy.deepcopy(model)
            teacher.requires_grad_(False)
            teacher.eval()
            self._teacher.append(teacher)
            log.info("KLTeacher: frozen copy of the model as teacher (full fine-tuning)")
        elif self.uses_adapters:
            log.info("KLTeacher: teacher = the model with LoRA adapters disabled (no copy)")
        if self.loss_term not in pl_module.loss_terms:
            pl_module.loss_terms.append(self.loss_term)
            self._modules.append(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._teacher:
            return
        teacher = self._teacher[0]
        teacher.to(next(pl_module.model.parameters()).device)
        # Under FSDP2 the student was sharded in configure_model (before this hook): shard the frozen copy the
        # same way, so no rank holds the whole teacher.
        from lat_lightning.training.distributed_fsdp import is_fsdp2, shard_fsdp2

        mesh = getattr(pl_module, "device_mesh", None)
        if mesh is not None and is_fsdp2(pl_module.model):
            shard_fsdp2(teacher, mesh["data_parallel"])
            local, total = _local_and_total_elements(teacher)
            print(
                f"[kl_teacher] rank {trainer.global_rank}/{trainer.world_size}: {local} of {total} teacher "
                "parameter elements on this rank (sharded like the student)",
                flush=True,
            )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        for module in self._modules:
            if self.loss_term in module.loss_terms:
                module.loss_terms.remove(self.loss_term)
        self._modules.clear()
        self._teacher.clear()

    # -- computation ---------------------------------------------------------------------------------
    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen copy (full fine-tuning) or ``None`` (LoRA: the model with adapters disabled)."""
        return self._teacher[0] if self._teacher else None

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """Logits of the teacher for these inputs (no graph)."""
        if self.uses_adapters:
            with cast("PeftModel", model).disable_adapter():  # uses_adapters: the student is a PeftModel
                return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("KLTeacher has no teacher: call attach(module) (Lightning calls setup) first")
        device = input_ids.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        return teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @staticmethod
    def sequences(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, labels)`` to regularise: benign if present, else safe."""
        prefix = "benign" if "benign_input_ids" in batch else "safe"
        ids = batch[f"{prefix}_input_ids"]
        mask = batch.get(f"{prefix}_attention_mask")
        return ids, mask if mask is not None else torch.ones_like(ids), batch[f"{prefix}_labels"]

    def kl(self, model: nn.Module, batch: dict) -> Tensor:
        """The unweighted KL of ``model`` (student) to the teacher on this batch."""
        ids, attn, labels = self.sequences(batch)
        teacher = self.teacher_logits(model, ids, attn)
        student = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        mask = labelled_logit_mask(labels)
        return kl_divergence_chunked(student, teacher, mask, self.direction, self.chunk_size)

    def loss_term(self, module, batch: dict) -> dict[str, Tensor]:
        """The ``module.loss_terms`` entry: ``{name: weight · KL}``."""
        if self.weight == 0.0:
            return {}
        return {self.name: self.weight * self.kl(module.model, batch)}


def _local_and_total_elements(model: nn.Module) -> tuple[int, int]:
    """Parameter elements held by this process and in the whole model (DTensor shards counted locally)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total


__all__ = ["KLTeacher", "kl_divergence_chunked", "labelled_logit_mask"]
