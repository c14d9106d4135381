"""Token-level losses shared by attacks and the defence step.

All losses take logits ``[batch, T, V]`` and labels ``[batch, T]`` aligned with the inputs (``-100`` =
ignored); the shift for next-token prediction happens here. They compute in float32 so bf16 runs
still get exact masked means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of positions no loss counts (prompt, padding); the Hugging Face convention


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token and the mask of labelled positions (both ``[batch, T-1]``)."""
    logits, labels = _shift(logits, labels)
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels[..., None]).squeeze(-1)
    return logp * mask, mask


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labelled tokens (prompt and padding excluded by ``-100``)."""
    logits, labels = _shift(logits, labels)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def log_one_minus_p_loss(logits: Tensor, labels: Tensor, logp_floor: float = -5.0) -> Tensor:
    """Push a completion's tokens away: mean over labelled tokens of ``−log(1 − p(token))``.

    Tokens the model already finds unlikely (``log p < logp_floor``, −5 in the LAT reference) contribute
    zero, so the loss stops spending effort on them; they stay in the denominator, which keeps the loss
    comparable across batches. ``log1p(−p)`` is evaluated as ``log(−expm1(log p))`` for stability near
    ``p → 1``.
    """
    logp, mask = token_logprobs(logits, labels)
    logp = logp.clamp(max=-1e-6)  # p == 1 would give log(0)
    per_token = -torch.log(-torch.expm1(logp))
    active = mask & (logp >= logp_floor)
    denom = mask.sum().clamp(min=1)
    return (per_token * active).sum() / denom
