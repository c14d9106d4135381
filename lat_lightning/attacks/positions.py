"""Which token positions an attack perturbs: the one home of the positions policies.

A policy is a rule on the absolute position ``p`` of a token (0 = first prompt token) given the prompt
length ``P``. The same rule serves a teacher-forced training forward (right-padded ``[batch, T]``
sequences, :func:`position_mask`) and batched generation (left-padded prefill and one-token decode
steps, :func:`policy_mask` on the absolute positions the generation engine tracks).

==============================  =============================================  ==========================
policy                          perturbed positions                            generation steps
==============================  =============================================  ==========================
``prompt_last_and_generated``   ``p >= P - 1`` (the paper's attack)            every step
``first_k``                     ``P - 1 <= p < P - 1 + k``                     steps ``0 .. k-1``
``all``                         every prompt and response token                prefill (all) + every step
``response``                    ``p >= P`` (response tokens; LAPT training)    steps ``>= 1``
``prompt``                      ``p < P`` (targeted-LAT style)                 prefill only
==============================  =============================================  ==========================

"Generation step ``t``" is the forward whose output is new token ``t`` (0-based): step 0 is the last prompt
token (in the prefill), so ``first_k`` perturbs exactly the positions whose outputs are the first ``k``
response tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

POLICIES = ("prompt_last_and_generated", "first_k", "all", "response", "prompt")
# The policies a generation-time attack (the scan) accepts: they perturb the last prompt token, whose output is
# the first answer token. ``response`` and ``prompt`` are training policies (LAPT, targeted LAT).
GENERATION_POLICIES = ("prompt_last_and_generated", "first_k", "all")


def policy_mask(policy: str, pos: Tensor, prompt_len: Tensor, first_k: int = 1) -> Tensor:
    """Which absolute positions ``pos`` a policy perturbs (``pos < 0`` marks padding: never perturbed).

    Args:
        policy: one of :data:`POLICIES`.
        pos: absolute positions, any shape.
        prompt_len: prompt lengths broadcastable to ``pos``.
        first_k: ``k`` of ``first_k`` (the last prompt token counts as the first).

    Returns:
        A bool tensor shaped like ``pos``.

    Raises:
        ValueError: for an unknown policy.
    """
    if policy == "prompt_last_and_generated":
        m = pos >= prompt_len - 1
    elif policy == "first_k":
        m = (pos >= prompt_len - 1) & (pos < prompt_len - 1 + first_k)
    elif policy == "all":
        m = torch.ones_like(pos, dtype=torch.bool)
    elif policy == "response":
        m = pos >= prompt_len
    elif policy == "prompt":
        m = pos < prompt_len
    else:
        raise ValueError(f"unknown positions policy '{policy}'; choose from {', '.join(POLICIES)}")
    return m & (pos >= 0)


def first_position(policy: str, prompt_len: int, first_k: int = 1) -> int:
    """The earliest absolute position a policy perturbs for a prompt of ``prompt_len`` tokens.

    Everything before it is identical for every row of that prompt, whatever the layer, seed or attack, which is
    what lets generation compute that prefix once (:func:`lat_lightning.eval.generation.generate_under_attack`).

    Raises:
        ValueError: for an unknown policy.
    """
    if policy in ("prompt_last_and_generated", "first_k"):
        return int(prompt_len) - 1
    if policy == "response":
        return int(prompt_len)
    if policy in ("all", "prompt"):
        return 0
    raise ValueError(f"unknown positions policy '{policy}'; choose from {', '.join(POLICIES)}")


def position_mask(
    policy: str, prompt_lengths: Tensor, seq_len: int, first_k: int = 1, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """Boolean ``[batch, seq_len]`` mask of perturbed positions for right-padded sequences.

    Column ``t`` is absolute position ``t``; padding columns are excluded only when ``attention_mask`` is
    given (a perturbation on a padding column changes nothing the loss sees).

    Args:
        policy: one of :data:`POLICIES`.
        prompt_lengths: ``[batch]`` prompt token counts.
        seq_len: number of columns.
        first_k: ``k`` of ``first_k``.
        attention_mask: optional ``[batch, >= seq_len]`` mask of real tokens.
    """
    pos = torch.arange(seq_len, device=prompt_lengths.device)[None, :].expand(len(prompt_lengths), seq_len)
    mask = policy_mask(policy, pos, prompt_lengths[:, None], first_k)
    if attention_mask is not None:
        mask = mask & attention_mask[:, :seq_len].bool()
    return mask


def policy_names() -> tuple[str, ...]:
    """The positions policies (what ``perturbation.positions`` / ``evaluation.positions`` may name)."""
    return POLICIES


__all__ = ["GENERATION_POLICIES", "POLICIES", "first_position", "policy_mask", "policy_names", "position_mask"]
