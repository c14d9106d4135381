"""Token-level measurements of the probes: per-sequence NLL and the per-position KL between two forwards
(``docs/metrics.md``, the NLL probe and position KL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of positions that do not count (the prompt, padding)


def nll_sequence(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, chunk_size: int = 256) -> Tensor:
    """Summed negative log-likelihood of the labelled tokens of each row (the NLL probe, Eq. 2).

    ``NLL = -sum_t log p(y_t | x, y_<t)``. ``labels`` are aligned with the inputs (Hugging Face convention,
    as produced by :func:`lat_lightning.data.templating.build_sequences`): position ``t`` of ``logits``
    predicts ``labels[t + 1]``. Computed in float32, a chunk of positions at a time, so a 128k vocabulary
    does not need a full float32 copy of the logits.

    Args:
        logits: ``[B, T, V]`` (any float dtype).
        labels: ``[B, T]`` with ``ignore_index`` on unlabelled (prompt / padding) positions.
        ignore_index: label value to skip.
        chunk_size: positions per chunk.

    Returns:
        ``[B]`` float32 tensor; a row without labelled tokens gets 0.

    Raises:
        ValueError: on mismatched shapes.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits [B, T, V] and labels [B, T] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    bsz, seq, _ = logits.shape
    total = torch.zeros(bsz, dtype=torch.float32, device=logits.device)
    shifted = labels[:, 1:].to(logits.device)
    for start in range(0, max(seq - 1, 0), chunk_size):
        stop = min(start + chunk_size, seq - 1)
        lg = logits[:, start:stop].float()
        tgt = shifted[:, start:stop]
        ce = F.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=ignore_index, reduction="none"
        ).view(bsz, -1)
        total += ce.sum(dim=1)
    return total


def position_kl(
    logits_clean: Tensor, logits_perturbed: Tensor, mask: Tensor | None = None, chunk_size: int = 256
) -> Tensor:
    """Per-position ``KL(p_clean,t || p_perturbed,t)`` (float32, chunked over positions).

    Args:
        logits_clean: ``[B, T, V]`` logits without the perturbation.
        logits_perturbed: ``[B, T, V]`` logits with it (same positions).
        mask: optional ``[B, T]`` (bool / 0-1); masked-out positions get 0.
        chunk_size: positions processed at once (bounds the float32 working memory to
            ``2 * B * chunk_size * V`` floats).

    Returns:
        ``[B, T]`` float32 KL values (>= 0; exactly 0 for identical logits).

    Raises:
        ValueError: on mismatched shapes.
    """
    if logits_clean.shape != logits_perturbed.shape or logits_clean.dim() != 3:
        raise ValueError(
            f"logits must both be [B, T, V]; got {tuple(logits_clean.shape)} and {tuple(logits_perturbed.shape)}"
        )
    bsz, seq, _ = logits_clean.shape
    out = torch.zeros(bsz, seq, dtype=torch.float32, device=logits_clean.device)
    for start in range(0, seq, chunk_size):
        stop = min(start + chunk_size, seq)
        logp = F.log_softmax(logits_clean[:, start:stop].float(), dim=-1)
        logq = F.log_softmax(logits_perturbed[:, start:stop].to(logits_clean.device).float(), dim=-1)
        # Rounding can make a near-zero KL slightly negative; KL is non-negative by definition.
        out[:, start:stop] = (logp.exp() * (logp - logq)).sum(dim=-1).clamp_min(0.0)
    if mask is not None:
        out = out * mask.to(out.device, torch.float32)
    return out


def kl_by_position(kl: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of a ``[B, T]`` KL matrix over rows at each position (only rows where ``mask`` is set).

    Returns:
        ``[T]`` float32; NaN at positions no row covers.
    """
    m = torch.ones_like(kl) if mask is None else mask.to(kl.device, kl.dtype)
    count = m.sum(dim=0)
    return torch.where(count > 0, (kl * m).sum(dim=0) / count.clamp_min(1), torch.full_like(count, float("nan")))


__all__ = ["IGNORE_INDEX", "kl_by_position", "nll_sequence", "position_kl"]
