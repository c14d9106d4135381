"""Utility scores: what the interpolation lambda search and the validation loop measure.

Three kinds (``evaluation.utility_kind``):
  - ``multiple_choice``: answer log-likelihood accuracy (CommonsenseQA, ARC, MMLU-style rows). Each choice
    is scored by the summed log-probability of its tokens after the prompt; the prediction is the
    argmax, compared with the answer key.
  - ``exact_match``: greedy generation, then the final number of the output is compared with the gold
    number (GSM8K-style ``answer`` ending in ``#### 42``).
  - ``contains``: greedy generation of a short answer (16 new tokens by default) for rows with ``prompt``
    and ``answer``; correct when the ``answer`` string appears in the output (case-sensitive). The model
    organism's benign accuracy is this kind on its ``utility_em`` rows.

Failure rule (as for judges): a row that cannot be scored (malformed row, a choice with no tokens, a
non-finite score, a prompt longer than ``max_length``) is counted in ``failures`` and left out of the
accuracy's denominator. A generation that contains no number is *not* a failure: it is a wrong answer.
See ``docs/utility.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lat_lightning.data.templating import build_sequences, encode_prompt, encode_response, pad_sequences
from lat_lightning.errors import ConfigError, DataError
from lat_lightning.eval.token_metrics import nll_sequence
from lat_lightning.eval.utility_rows import (
    UTILITY_KINDS,
    extract_number,
    load_utility_rows,
    normalise_utility_row,
)
from lat_lightning.models.layers import input_device

log = logging.getLogger(__name__)

# Generation budget per kind when the caller gives none: GSM8K answers need room for the working; a
# ``contains`` answer is short ("3 plus 5 is 8.").
_DEFAULT_MAX_NEW_TOKENS = {"exact_match": 256, "contains": 16}


class _ModesRestored:
    """Put a model in eval mode and restore every submodule's own train/eval flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for module, mode in self.modes:
            module.training = mode
        return False


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _mc_prompt(row: Mapping[str, Any], show_choices: bool) -> str:
    if not show_choices:
        return row["question"]
    lines = [f"{lab}. {text}" for lab, text in zip(row["labels"], row["choices"])]
    return row["question"] + "\n\n" + "\n".join(lines) + "\nAnswer:"


def score_continuations(
    model: nn.Module, tokenizer, prompts: Sequence[list[int]], continuations: Sequence[list[int]], batch_size: int = 8
) -> list[float]:
    """Summed log-probability of each continuation's tokens given its prompt (teacher forced, batched).

    Args:
        model: causal LM (any; called as ``model(input_ids=..., attention_mask=...)``).
        tokenizer: its tokenizer (for the pad id).
        prompts: prompt token ids per item.
        continuations: continuation token ids per item (non-empty).
        batch_size: sequences per forward pass.

    Returns:
        ``log p(continuation | prompt)`` per item, in order.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
    scores = [0.0] * len(prompts)
    device, pad = input_device(model), _pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # Right padding: real tokens keep positions 0..n-1, so no position ids are needed.
        batch = build_sequences([prompts[i] for i in idx], [continuations[i] for i in idx], pad, side="right")
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        nll = nll_sequence(logits, batch["labels"].to(device))
        for i, v in zip(idx, nll.tolist()):
            scores[i] = -v
    return scores


def generate_greedy(
    model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 256, batch_size: int = 8
) -> list[str]:
    """Greedy generation for token-id prompts: left padded, batched, with the KV cache.

    Args:
        model: causal LM with ``generate``.
        tokenizer: its tokenizer (pad / eos ids, decoding).
        prompts: prompt token ids per item.
        max_new_tokens: generation budget per item.
        batch_size: prompts per ``generate`` call.

    Returns:
        The decoded new text of each prompt (special tokens skipped), in order.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    device, pad = input_device(model), _pad_id(tokenizer)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    # a causal LM's generate (mypy reads an nn.Module attribute as Tensor | Module)
    generate = cast("Callable[..., torch.Tensor]", model.generate)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [prompts[i] for i in idx]
        ids = pad_sequences(seqs, pad, side="left").to(device)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0, side="left").to(device)
        out = generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for i, text in zip(idx, tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)):
            texts[i] = text
    return texts


def _multiple_choice(
    model, tokenizer, rows, batch_size, use_chat_template, system_prompt, length_normalize, show_choices, max_length
) -> tuple[int, int]:
    correct, failures = 0, 0
    items: list[tuple[int, int]] = []  # (row index, choice index) per scored sequence
    prompts: list[list[int]] = []
    conts: list[list[int]] = []
    valid: dict[int, dict[str, Any]] = {}
    for r, raw in enumerate(rows):
        try:
            row = normalise_utility_row(raw, "multiple_choice")
            prompt = encode_prompt(tokenizer, _mc_prompt(row, show_choices), use_chat_template, system_prompt)
            choice_ids = [encode_response(tokenizer, c, add_eos=False) for c in row["choices"]]
            if any(not c for c in choice_ids):
                raise DataError("a choice encodes to no tokens")
            if max_length is not None and len(prompt) + max(len(c) for c in choice_ids) > max_length:
                raise DataError(f"prompt + choice exceed max_length={max_length}")
        except DataError as exc:
            log.debug("utility row %d not scored: %s", r, exc)
            failures += 1
            continue
        valid[r] = row
        for c, ids in enumerate(choice_ids):
            items.append((r, c))
            prompts.append(prompt)
            conts.append(ids)
    scores = score_continuations(model, tokenizer, prompts, conts, batch_size) if items else []
    per_row: dict[int, list[float]] = {r: [] for r in valid}
    for (r, _), score, ids in zip(items, scores, conts):
        per_row[r].append(score / len(ids) if length_normalize else score)
    for r, row_scores in per_row.items():
        if not all(math.isfinite(s) for s in row_scores):
            failures += 1
            continue
        pred = max(range(len(row_scores)), key=row_scores.__getitem__)
        correct += int(pred == valid[r]["answer_index"])
    return correct, failures


def _exact_match(
    model, tokenizer, rows, batch_size, use_chat_template, system_prompt, max_new_tokens, prompt_template, max_length
) -> tuple[int, int]:
    failures = 0
    golds: list[str] = []
    prompts: list[list[int]] = []
    for r, raw in enumerate(rows):
        try:
            row = normalise_utility_row(raw, "exact_match")
            ids = encode_prompt(
                tokenizer, prompt_template.format(question=row["question"]), use_chat_template, system_prompt
            )
            if max_length is not None and len(ids) + max_new_tokens > max_length:
                raise DataError(f"prompt + max_new_tokens exceed max_length={max_length}")
        except DataError as exc:
            log.debug("utility row %d not scored: %s", r, exc)
            failures += 1
            continue
        golds.append(row["gold"])
        prompts.append(ids)
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size) if prompts else []
    correct = sum(int(extract_number(text) == gold) for text, gold in zip(outputs, golds))
    return correct, failures


def _contains(
    model, tokenizer, rows, batch_size, use_chat_template, system_prompt, max_new_tokens, max_length
) -> tuple[int, int]:
    """Greedy answers (:func:`~lat_lightning.eval.generation.generate_under_attack`, no attack) that contain
    the row's ``answer``."""
    from lat_lightning.eval.generation import GenerationSettings, generate_under_attack

    failures = 0
    valid: list[dict[str, Any]] = []
    for r, raw in enumerate(rows):
        try:
            row = normalise_utility_row(raw, "contains")
            if max_length is not None:
                ids = encode_prompt(tokenizer, row["prompt"], use_chat_template, system_prompt)
                if len(ids) + max_new_tokens > max_length:
                    raise DataError(f"prompt + max_new_tokens exceed max_length={max_length}")
        except DataError as exc:
            log.debug("utility row %d not scored: %s", r, exc)
            failures += 1
            continue
        valid.append(row)
    if not valid:
        return 0, failures
    greedy = GenerationSettings(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )
    out = generate_under_attack(model, tokenizer, [row["prompt"] for row in valid], settings=greedy)
    return sum(int(row["answer"] in text) for row, text in zip(valid, out.texts)), failures


@dataclass(frozen=True)
class UtilityScoring:
    """How rows of one kind are put to the model and scored (the defaults suit every caller so far).

    Attributes:
        length_normalize: multiple choice: score by mean instead of summed log-probability per token.
        show_choices: multiple choice: list the lettered choices in the prompt (the scored text is still
            the choice text).
        prompt_template: exact match: prompt with a ``{question}`` placeholder (e.g. an instruction to end
            with ``#### <number>``).
    """

    length_normalize: bool = False
    show_choices: bool = False
    prompt_template: str = "{question}"

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {question}")


def evaluate_utility(
    model: nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    kind: str = "multiple_choice",
    batch_size: int = 8,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    scoring: UtilityScoring | None = None,
) -> dict[str, Any]:
    """Utility accuracy of a causal LM on multiple-choice, exact-match or answer-contained rows.

    Runs under ``torch.no_grad`` in eval mode and restores every submodule's train/eval flag afterwards;
    adds no parameters and changes no weights.

    Args:
        model: any causal LM (plain, peft-wrapped, on any device).
        tokenizer: its tokenizer.
        rows: raw or normalised rows (see :func:`normalise_utility_row`).
        kind: ``multiple_choice``, ``exact_match`` or ``contains``.
        batch_size: sequences per forward (multiple choice: one sequence per choice) or per ``generate``.
        use_chat_template: format the question with the tokenizer's chat template (plain text otherwise).
        system_prompt: optional system message.
        max_new_tokens: exact match and contains: generation budget (default 256 for exact match, 16 for
            contains).
        max_length: rows whose prompt (plus longest choice, or plus ``max_new_tokens``) exceed this many
            tokens are counted as failures instead of being run.
        scoring: length normalisation, shown choices and the exact-match prompt template (defaults when
            ``None``; :class:`UtilityScoring`).

    Returns:
        ``{"accuracy": correct / (n - failures) (NaN if nothing was scored), "n": len(rows),
        "failures": rows not scored, "correct": int}``.

    Raises:
        ConfigError: unknown ``kind`` or a bad ``batch_size``.
    """
    if kind not in UTILITY_KINDS:
        raise ConfigError(f"utility kind '{kind}' is not supported here; choose from {', '.join(UTILITY_KINDS)}")
    if batch_size < 1:
        raise ConfigError(f"utility batch_size must be >= 1, got {batch_size}")
    scoring = scoring or UtilityScoring()
    rows = list(rows)
    if max_new_tokens is None:
        max_new_tokens = _DEFAULT_MAX_NEW_TOKENS.get(kind, 256)
    with torch.no_grad(), _ModesRestored(model):
        if kind == "multiple_choice":
            correct, failures = _multiple_choice(
                model,
                tokenizer,
                rows,
                batch_size,
                use_chat_template,
                system_prompt,
                scoring.length_normalize,
                scoring.show_choices,
                max_length,
            )
        elif kind == "contains":
            correct, failures = _contains(
                model, tokenizer, rows, batch_size, use_chat_template, system_prompt, max_new_tokens, max_length
            )
        else:
            correct, failures = _exact_match(
                model,
                tokenizer,
                rows,
                batch_size,
                use_chat_template,
                system_prompt,
                max_new_tokens,
                scoring.prompt_template,
                max_length,
            )
    scored = len(rows) - failures
    if failures:
        log.warning("utility (%s): %d of %d rows could not be scored and are excluded", kind, failures, len(rows))
    return {
        "accuracy": correct / scored if scored else float("nan"),
        "n": len(rows),
        "failures": failures,
        "correct": correct,
    }


__all__ = [
    "UTILITY_KINDS",
    "UtilityScoring",
    "evaluate_utility",
    "extract_number",
    "generate_greedy",
    "load_utility_rows",
    "normalise_utility_row",
    "score_continuations",
]
