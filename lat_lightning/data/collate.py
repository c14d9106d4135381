"""Tokenised examples and THE BATCH CONTRACT every training step, attack and callback codes against.

A safety batch (from :func:`collate_safety`) is a ``dict[str, Tensor]``; all sequences are RIGHT-padded
and every ``[B, T]`` tensor of one prefix shares its ``T``:

==========================  =========  ==========================================================
key                         shape      meaning
==========================  =========  ==========================================================
``safe_input_ids``          [B, Ts]    prompt + safe response (refusal ``y``) + EOS, then padding
``safe_attention_mask``     [B, Ts]    1 on real tokens, 0 on padding
``safe_labels``             [B, Ts]    token ids on response positions (EOS kept), -100 elsewhere
``harmful_input_ids``       [B, Th]    prompt + harmful target ``y*`` + EOS, then padding (absent for plain pairs)
``harmful_attention_mask``  [B, Th]
``harmful_labels``          [B, Th]
``prompt_lengths``          [B]        prompt token count ``P``; positions ``t < P`` hold the same
                                       prompt tokens in both sequences
``layer``                   [B]        the example's own attack layer, -1 when it has none
``index``                   [B]        the example's stable id (keys per-example random noise)
``benign_input_ids``        [B, Tb]    optional: a benign pair riding along (utility / KL loss)
``benign_attention_mask``   [B, Tb]    optional
``benign_labels``           [B, Tb]    optional
``benign_prompt_lengths``   [B]        optional
==========================  =========  ==========================================================

Label ``t`` is the token at position ``t`` itself (Hugging Face models shift internally), so the first
label position is ``P`` and the response starts right after the prompt. For generation,
:func:`prompt_batch` LEFT-pads bare prompts instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lat_lightning.data.schema import BenignExample, SafetyExample
from lat_lightning.data.templating import (
    TruncationStats,
    build_sequences,
    encode_prompt,
    encode_response,
    fit_length,
    pad_sequences,
)
from lat_lightning.errors import DataError

log = logging.getLogger(__name__)

SEQUENCE_PREFIXES = ("safe", "harmful", "benign")
NO_LAYER = -1


def resolve_pad_id(tokenizer) -> int:
    """The padding id: ``pad_token_id``, else ``eos_token_id`` (padding is masked, so any id works), else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


# --------------------------------------------------------------------------------------------- encoding
def encode_safety_example(
    tokenizer,
    ex: SafetyExample,
    max_length: int,
    truncation: str = "error",
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    stats: TruncationStats | None = None,
) -> dict[str, Any] | None:
    """Tokenise one safety example under the length policy.

    Both sequences share one prompt encoding, so the prompt positions are identical in the safe and the
    harmful sequence. Under ``left`` truncation the prompt is cut once, to fit the longer response.

    Args:
        tokenizer: a Hugging Face tokenizer.
        ex: the example.
        max_length: the longest allowed prompt + response (EOS included), per sequence.
        truncation: ``error``, ``right``, ``left`` or ``drop`` (see :func:`templating.fit_length`).
        use_chat_template: format the prompt with the tokenizer's chat template when it has one.
        system_prompt: optional system message.
        stats: counts of truncated / dropped examples, updated once per example (not per sequence).

    Returns:
        ``{"prompt_ids", "safe_ids", "harmful_ids", "layer", "index"}`` (id lists, ``layer`` -1 when the
        example has none), or ``None`` when the ``drop`` policy skipped it.

    Raises:
        DataError: under ``error`` when a sequence is too long, or when the prompt alone cannot fit.
    """
    prompt = encode_prompt(tokenizer, ex.prompt, use_chat_template, system_prompt)
    safe = encode_response(tokenizer, ex.safe_response)
    # Plain (prompt, response) pairs (supervised fine-tuning) have no harmful target: only the safe sequence.
    harmful = encode_response(tokenizer, ex.harmful_response) if ex.harmful_response is not None else None
    local = TruncationStats()  # per-sequence counts; folded into ``stats`` once per example below
    longer, shorter = (safe, harmful) if harmful is None or len(safe) >= len(harmful) else (harmful, safe)
    pair = fit_length(prompt, longer, max_length, truncation, local, ex.index)
    fitted: tuple[list[int], list[int], list[int] | None] | None = None  # prompt, longer, shorter
    if pair is not None and shorter is None:
        fitted = (pair[0], pair[1], None)
    elif pair is not None and shorter is not None:
        prompt, longer_fit = pair
        other = fit_length(prompt, shorter, max_length, truncation, local, ex.index)
        fitted = None if other is None else (prompt, longer_fit, other[1])
    if stats is not None and local.examples:
        stats.examples.append(ex.index)
        if fitted is None:
            stats.dropped += 1
        else:
            stats.truncated += 1
    if fitted is None:
        return None
    prompt, longer_fit, shorter_fit = fitted
    safe_fit, harmful_fit = (longer_fit, shorter_fit) if longer is safe else (shorter_fit, longer_fit)
    return {
        "prompt_ids": prompt,
        "safe_ids": safe_fit,
        "harmful_ids": harmful_fit,
        "layer": NO_LAYER if ex.layer is None else int(ex.layer),
        "index": int(ex.index),
    }


def encode_benign_example(
    tokenizer,
    ex: BenignExample,
    max_length: int,
    truncation: str = "error",
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    stats: TruncationStats | None = None,
    index: int = 0,
) -> dict[str, Any] | None:
    """Tokenise one benign pair under the length policy.

    Args:
        tokenizer: a Hugging Face tokenizer.
        ex: the example.
        max_length: the longest allowed prompt + response (EOS included).
        truncation: ``error``, ``right``, ``left`` or ``drop``.
        use_chat_template: format the prompt with the chat template when the tokenizer has one.
        system_prompt: optional system message.
        stats: truncation / drop counts to update.
        index: the example's position, for messages and ``stats.examples``.

    Returns:
        ``{"prompt_ids", "response_ids", "index"}``, or ``None`` when dropped.

    Raises:
        DataError: under ``error`` when the pair is too long, or when the prompt alone cannot fit.
    """
    prompt = encode_prompt(tokenizer, ex.prompt, use_chat_template, system_prompt)
    response = encode_response(tokenizer, ex.response)
    fitted = fit_length(prompt, response, max_length, truncation, stats, index)
    if fitted is None:
        return None
    return {"prompt_ids": fitted[0], "response_ids": fitted[1], "index": int(index)}


# --------------------------------------------------------------------------------------------- collation
def collate_benign(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad encoded benign pairs.

    Args:
        items: outputs of :func:`encode_benign_example`.
        pad_id: padding token id.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``[B, T]``, labels -100 on prompt and padding) and
        ``prompt_lengths`` (``[B]``).
    """
    return build_sequences([it["prompt_ids"] for it in items], [it["response_ids"] for it in items], pad_id)


def collate_safety(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad encoded safety examples into one batch (see the module docstring for the keys).

    Args:
        items: outputs of :func:`encode_safety_example`. When every item carries a ``"benign"`` entry (an
            output of :func:`encode_benign_example`), the ``benign_*`` keys are added.
        pad_id: padding token id.

    Returns:
        The batch dict.

    Raises:
        ValueError: ``items`` is empty, or only some items carry a benign pair.
    """
    if not items:
        raise ValueError("collate_safety needs at least one item")
    prompts = [it["prompt_ids"] for it in items]
    batch: dict[str, Tensor] = {}
    has_harmful = [it.get("harmful_ids") is not None for it in items]
    if any(has_harmful) and not all(has_harmful):
        raise ValueError("either every item or none carries a harmful target")
    for prefix in ("safe", "harmful") if all(has_harmful) else ("safe",):
        seqs = build_sequences(prompts, [it[f"{prefix}_ids"] for it in items], pad_id)
        for key in ("input_ids", "attention_mask", "labels"):
            batch[f"{prefix}_{key}"] = seqs[key]
    batch["prompt_lengths"] = seqs["prompt_lengths"]
    batch["layer"] = torch.tensor([it.get("layer", NO_LAYER) for it in items], dtype=torch.long)
    batch["index"] = torch.tensor([it.get("index", 0) for it in items], dtype=torch.long)
    with_benign = sum("benign" in it for it in items)
    if with_benign and with_benign != len(items):
        raise ValueError("either every item or none carries a benign pair")
    if with_benign:
        benign = collate_benign([it["benign"] for it in items], pad_id)
        for key, value in benign.items():
            batch[f"benign_{key}"] = value
    return batch


def sub_batch(batch: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The model inputs of one sequence family of a batch.

    Args:
        batch: a batch from :func:`collate_safety`.
        prefix: ``safe``, ``harmful`` or ``benign``.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` (the same tensors, not copies).

    Raises:
        ValueError: unknown prefix.
        KeyError: the batch has no sequences with that prefix (e.g. no benign data configured).
    """
    if prefix not in SEQUENCE_PREFIXES:
        raise ValueError(f"unknown batch prefix '{prefix}'; choose from {', '.join(SEQUENCE_PREFIXES)}")
    keys = ("input_ids", "attention_mask", "labels")
    if f"{prefix}_input_ids" not in batch:
        present = [p for p in SEQUENCE_PREFIXES if f"{p}_input_ids" in batch]
        raise KeyError(
            f"batch has no '{prefix}' sequences (has: {', '.join(present) or 'none'})"
            + ("; set data.benign to train with benign data" if prefix == "benign" else "")
        )
    return {key: batch[f"{prefix}_{key}"] for key in keys}


def prompt_batch(
    tokenizer, prompts: Sequence[str], use_chat_template: bool = True, system_prompt: str | None = None
) -> dict[str, Tensor]:
    """LEFT-padded prompts, ready for ``model.generate`` (new tokens start at the same column for all).

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: raw prompt texts.
        use_chat_template: format with the chat template (generation prompt included) when available.
        system_prompt: optional system message.

    Returns:
        ``input_ids`` and ``attention_mask`` (``[B, T]``, padding on the left) and ``prompt_lengths``
        (``[B]``, the number of real prompt tokens, not offsets).

    Raises:
        DataError: ``prompts`` is empty.
    """
    if len(prompts) == 0:
        raise DataError("prompt_batch needs at least one prompt")
    ids = [encode_prompt(tokenizer, p, use_chat_template, system_prompt) for p in prompts]
    pad_id = resolve_pad_id(tokenizer)
    return {
        "input_ids": pad_sequences(ids, pad_id, side="left"),
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, side="left"),
        "prompt_lengths": torch.tensor([len(s) for s in ids], dtype=torch.long),
    }


__all__ = [
    "NO_LAYER",
    "SEQUENCE_PREFIXES",
    "collate_benign",
    "collate_safety",
    "encode_benign_example",
    "encode_safety_example",
    "prompt_batch",
    "resolve_pad_id",
    "sub_batch",
]
