"""Turn (prompt, response) text into token ids with the prompt masked out of the labels.

The chat template is applied by default (the reference code used none); without a template the prompt
is formatted as plain text followed by a newline. The response always ends with EOS, which stays in the
labels so the model learns to stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from lat_lightning.errors import DataError
from lat_lightning.losses import IGNORE_INDEX  # re-exported: the label every loss skips

log = logging.getLogger(__name__)

_warned_no_template: set[int] = set()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(
    tokenizer, prompt: str, use_chat_template: bool = True, system_prompt: Optional[str] = None
) -> list[int]:
    """Token ids of a user prompt ready for the assistant's answer (generation prompt included)."""
    if use_chat_template and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # older/newer transformers disagree on the default
            ids = ids["input_ids"]
        return list(ids)
    if use_chat_template and id(tokenizer) not in _warned_no_template:
        _warned_no_template.add(id(tokenizer))
        log.warning("tokenizer has no chat template; falling back to plain-text prompts")
    text = (f"{system_prompt}\n" if system_prompt else "") + f"{prompt}\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    """Token ids of an assistant response, EOS appended."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class TruncationStats:
    """How many sequences the length policy touched (logged by the data module)."""

    truncated: int = 0
    dropped: int = 0
    examples: list[int] = field(default_factory=list)


def fit_length(
    prompt: list[int],
    response: list[int],
    max_length: int,
    policy: str,
    stats: Optional[TruncationStats] = None,
    index: int = -1,
) -> Optional[tuple[list[int], list[int]]]:
    """Apply the truncation policy to a (prompt, response) pair of id lists.

    Args:
        policy: ``error`` (raise), ``right`` (cut the end of the response), ``left`` (cut the start of the
            prompt), ``drop`` (skip the example: returns ``None``).

    Raises:
        DataError: under ``error``, or when the prompt alone cannot fit.
    """
    total = len(prompt) + len(response)
    if total <= max_length:
        return prompt, response
    if policy == "error":
        raise DataError(
            f"example {index} has {total} tokens > data.max_length={max_length}; raise max_length or "
            "set data.truncation to right, left or drop"
        )
    if stats is not None:
        stats.examples.append(index)
    if policy == "drop":
        if stats is not None:
            stats.dropped += 1
        return None
    if stats is not None:
        stats.truncated += 1
    if policy == "right":
        keep = max_length - len(prompt)
        if keep < 1:
            raise DataError(
                f"example {index}: prompt alone has {len(prompt)} tokens >= max_length={max_length}; "
                "use data.truncation=left or drop"
            )
        return prompt, response[:keep]
    if policy == "left":
        keep = max_length - len(response)
        if keep < 1:
            raise DataError(f"example {index}: response alone has {len(response)} tokens >= max_length={max_length}")
        return prompt[-keep:], response
    raise DataError(f"unknown truncation policy '{policy}'")


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> Tensor:
    """Pad id lists to a ``[batch, max_len]`` long tensor on the given side."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if side == "right":
            out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        else:
            out[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
    return out


def build_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
    mask_prompt: bool = True,
) -> dict[str, Tensor]:
    """Pad prompt+response sequences; labels are ``-100`` on prompt and padding positions.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``[batch, T]``) and ``prompt_lengths`` (``[batch]``).
        With ``side='left'`` the prompt lengths are still counts of prompt tokens (not offsets).
    """
    full = [list(p) + list(r) for p, r in zip(prompts, responses)]
    labels = [([IGNORE_INDEX] * len(p) if mask_prompt else list(p)) + list(r) for p, r in zip(prompts, responses)]
    input_ids = pad_sequences(full, pad_id, side)
    label_t = pad_sequences(labels, IGNORE_INDEX, side)
    attention = pad_sequences([[1] * len(s) for s in full], 0, side)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": label_t,
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
    }
