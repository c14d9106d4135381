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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import torch
from torch import nn

from lat_lightning.data.templating import build_sequences, encode_prompt, encode_response, pad_sequences
from lat_lightning.errors import ConfigError, DataError
from lat_lightning.eval.metrics import nll_sequence
from lat_lightning.models.layers import input_device

log = logging.getLogger(__name__)

UTILITY_KINDS = ("multiple_choice", "exact_match", "contains")
_DEFAULT_SPLIT = {"multiple_choice": "validation", "exact_match": "test", "contains": "test"}
# Generation budget per kind when the caller gives none: GSM8K answers need room for the working; a
# ``contains`` answer is short ("3 plus 5 is 8.").
_DEFAULT_MAX_NEW_TOKENS = {"exact_match": 256, "contains": 16}
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Thousands separators only between groups of three digits, so "1,234" is one number and "3,4" two.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


# ------------------------------------------------------------------------------------------- numbers
def _canonical(number: str) -> str | None:
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        value = Decimal(0)  # "-0", "0.00" and "0" are the same answer
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The answer number of a text, canonicalised (``"1,000.0"`` -> ``"1000"``).

    If the text contains the GSM8K answer marker ``####``, the first number after the last marker is
    used (a model trained on GSM8K often keeps generating after its answer); otherwise the last number in
    the text.

    Args:
        text: model output or gold answer.

    Returns:
        The canonical decimal string, or ``None`` when there is no number.
    """
    if not isinstance(text, str):
        return None
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return _canonical(found.group(0))
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------- rows
def _answer_index(key: Any, labels: Sequence[str], n_choices: int) -> int | None:
    """Resolve an answer key: a label of the row, a letter (A = 0), or a 0-based integer index."""
    if isinstance(key, bool) or key is None:
        return None
    if isinstance(key, int):
        index = key
    else:
        text = str(key).strip()
        if text in labels:  # e.g. ARC's numeric labels "1".."4" or CommonsenseQA's "A".."E"
            return list(labels).index(text)
        if len(text) == 1 and text.upper() in _LETTERS:
            index = _LETTERS.index(text.upper())
        elif text.lstrip("-").isdigit():
            index = int(text)
        else:
            return None
    return index if 0 <= index < n_choices else None


def _choices_of(row: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Choice texts and labels from a list of strings, a ``{"label", "text"}`` dict or a list of dicts."""
    raw = row.get("choices")
    question = row.get("question")
    if raw is None and isinstance(question, Mapping):  # original CommonsenseQA: question.stem / question.choices
        raw = question.get("choices")
    if isinstance(raw, Mapping):
        texts = list(raw.get("text") or [])
        labels = [str(v) for v in (raw.get("label") or _LETTERS[: len(texts)])]
    elif isinstance(raw, Sequence) and not isinstance(raw, str) and raw and isinstance(raw[0], Mapping):
        texts = [c.get("text") for c in raw]
        labels = [str(c.get("label", _LETTERS[i])) for i, c in enumerate(raw)]
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        texts = list(raw)
        labels = list(row.get("labels") or _LETTERS[: len(texts)])
    else:
        raise DataError("no 'choices' list (or {'label': [...], 'text': [...]}) in the row")
    if len(texts) < 2 or len(labels) != len(texts):
        raise DataError(f"need >= 2 choices with one label each, got {len(texts)} choices / {len(labels)} labels")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError("every choice must be non-empty text")
    return texts, [str(v) for v in labels]


def normalise_utility_row(row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Bring one raw row into the form :func:`evaluate_utility` scores (idempotent).

    Args:
        row: ``multiple_choice``: ``question`` (or ``question_stem`` / ``question.stem``), ``choices`` and
            ``answerKey`` or ``answer`` (label, letter or 0-based index). ``exact_match``: ``question`` and
            ``answer`` (GSM8K style, the number after ``####``, or else the last number). ``contains``:
            ``prompt`` (or ``question``) and ``answer``, the text a correct output contains.
        kind: ``multiple_choice``, ``exact_match`` or ``contains``.

    Returns:
        ``multiple_choice``: ``{"question", "choices", "labels", "answer_index"}``;
        ``exact_match``: ``{"question", "answer", "gold"}``; ``contains``: ``{"prompt", "answer"}``.

    Raises:
        DataError: the row lacks a field or its answer cannot be resolved.
        ConfigError: unknown ``kind``.
    """
    if kind not in UTILITY_KINDS:
        raise ConfigError(f"utility kind '{kind}' is not supported here; choose from {', '.join(UTILITY_KINDS)}")
    if not isinstance(row, Mapping):
        raise DataError(f"a row must be a mapping, got a {type(row).__name__}")
    if kind == "contains":
        return _contains_row(row)
    question = _question_of(row)
    if kind == "exact_match":
        return _exact_match_row(row, question)
    return _multiple_choice_row(row, question)


def _answer_text(row: Mapping[str, Any]) -> Any:
    """The row's ``answer``, a number (not a bool) written as text."""
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    return answer


def _contains_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`normalise_utility_row` for ``contains``."""
    prompt = row.get("prompt", row.get("question"))
    answer = _answer_text(row)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("missing or empty 'prompt'")
    if not isinstance(answer, str) or not answer:
        raise DataError("missing or empty 'answer' (the text a correct output contains)")
    return {"prompt": prompt, "answer": answer}


def _question_of(row: Mapping[str, Any]) -> str:
    """The row's question: ``question``, ``question_stem`` or ``question.stem``."""
    question = row.get("question", row.get("question_stem"))
    if isinstance(question, Mapping):
        question = question.get("stem")
    if not isinstance(question, str) or not question.strip():
        raise DataError("missing or empty 'question'")
    return question


def _exact_match_row(row: Mapping[str, Any], question: str) -> dict[str, Any]:
    """:func:`normalise_utility_row` for ``exact_match``."""
    answer = _answer_text(row)
    gold = row.get("gold") if isinstance(row.get("gold"), str) else extract_number(answer or "")
    if not isinstance(answer, str) or gold is None:
        raise DataError(f"answer {answer!r} has no final number (expected GSM8K style '... #### 42')")
    return {"question": question, "answer": answer, "gold": gold}


def _multiple_choice_row(row: Mapping[str, Any], question: str) -> dict[str, Any]:
    """:func:`normalise_utility_row` for ``multiple_choice``."""
    texts, labels = _choices_of(row)
    if isinstance(row.get("answer_index"), int):
        key: Any = row["answer_index"]
    else:
        key = next((row[k] for k in ("answerKey", "answer") if row.get(k) not in (None, "")), None)
    index = _answer_index(key, labels, len(texts))
    if index is None:
        raise DataError(f"answer key {key!r} is not one of the labels {labels}, a letter or an index")
    return {"question": question, "choices": texts, "labels": labels, "answer_index": index}


def load_utility_rows(source: str, kind: str = "multiple_choice", split: str | None = None,
                      max_rows: int | None = None) -> list[dict[str, Any]]:
    """Load and normalise utility rows from a local JSONL / JSON / CSV file, a local dataset or a name.

    Reading is done by :func:`lat_lightning.data.loaders.load_records`. CSV cells are strings, so a CSV
    ``choices`` column may hold a JSON list.

    Args:
        source: path or ``datasets`` name (offline: only cached datasets load).
        kind: ``multiple_choice``, ``exact_match`` or ``contains``.
        split: dataset split (default ``validation`` for multiple choice, ``test`` otherwise).
        max_rows: keep the first N rows.

    Returns:
        Normalised rows (see :func:`normalise_utility_row`).

    Raises:
        DataError: unreadable source, no rows, or a malformed row (the message names the row).
        ConfigError: unknown ``kind``.
    """
    import json

    from lat_lightning.data.loaders import load_records

    if kind not in UTILITY_KINDS:
        raise ConfigError(f"utility kind '{kind}' is not supported here; choose from {', '.join(UTILITY_KINDS)}")
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be >= 1, got {max_rows}")
    split = split or _DEFAULT_SPLIT[kind]
    records = load_records(source, split)
    if max_rows is not None:
        records = records[:max_rows]
    if not records:
        raise DataError(f"no utility rows in {source} (split '{split}')")
    rows = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if isinstance(rec.get("choices"), str):  # CSV: a JSON-encoded list or dict
            try:
                rec["choices"] = json.loads(rec["choices"])
            except ValueError:
                raise DataError(f"row {i} of {source}: 'choices' is text that is not JSON") from None
        try:
            rows.append(normalise_utility_row(rec, kind))
        except DataError as exc:
            raise DataError(f"row {i} (0-based) of {source}: {exc}") from None
    return rows


# ------------------------------------------------------------------------------------------- scoring
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


def score_continuations(model: nn.Module, tokenizer, prompts: Sequence[list[int]], continuations: Sequence[list[int]],
                        batch_size: int = 8) -> list[float]:
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
        idx = order[start:start + batch_size]
        # Right padding: real tokens keep positions 0..n-1, so no position ids are needed.
        batch = build_sequences([prompts[i] for i in idx], [continuations[i] for i in idx], pad, side="right")
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        nll = nll_sequence(logits, batch["labels"].to(device))
        for i, v in zip(idx, nll.tolist()):
            scores[i] = -v
    return scores


def generate_greedy(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 256,
                    batch_size: int = 8) -> list[str]:
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
        idx = order[start:start + batch_size]
        seqs = [prompts[i] for i in idx]
        ids = pad_sequences(seqs, pad, side="left").to(device)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0, side="left").to(device)
        out = generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                       use_cache=True, pad_token_id=pad, eos_token_id=eos)
        for i, text in zip(idx, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)):
            texts[i] = text
    return texts


def _multiple_choice(model, tokenizer, rows, batch_size, use_chat_template, system_prompt, length_normalize,
                     show_choices, max_length) -> tuple[int, int]:
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


def _exact_match(model, tokenizer, rows, batch_size, use_chat_template, system_prompt, max_new_tokens,
                 prompt_template, max_length) -> tuple[int, int]:
    failures = 0
    golds: list[str] = []
    prompts: list[list[int]] = []
    for r, raw in enumerate(rows):
        try:
            row = normalise_utility_row(raw, "exact_match")
            ids = encode_prompt(tokenizer, prompt_template.format(question=row["question"]), use_chat_template,
                                system_prompt)
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


def _contains(model, tokenizer, rows, batch_size, use_chat_template, system_prompt, max_new_tokens,
              max_length) -> tuple[int, int]:
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
    greedy = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                use_chat_template=use_chat_template, system_prompt=system_prompt)
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


def evaluate_utility(model: nn.Module, tokenizer, rows: Sequence[Mapping[str, Any]], kind: str = "multiple_choice",
                     batch_size: int = 8, use_chat_template: bool = True, system_prompt: str | None = None,
                     max_new_tokens: int | None = None, max_length: int | None = None,
                     scoring: UtilityScoring | None = None) -> dict[str, Any]:
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
            correct, failures = _multiple_choice(model, tokenizer, rows, batch_size, use_chat_template, system_prompt,
                                                 scoring.length_normalize, scoring.show_choices, max_length)
        elif kind == "contains":
            correct, failures = _contains(model, tokenizer, rows, batch_size, use_chat_template, system_prompt,
                                          max_new_tokens, max_length)
        else:
            correct, failures = _exact_match(model, tokenizer, rows, batch_size, use_chat_template, system_prompt,
                                             max_new_tokens, scoring.prompt_template, max_length)
    scored = len(rows) - failures
    if failures:
        log.warning("utility (%s): %d of %d rows could not be scored and are excluded", kind, failures, len(rows))
    return {"accuracy": correct / scored if scored else float("nan"), "n": len(rows), "failures": failures,
            "correct": correct}


__all__ = ["UTILITY_KINDS", "UtilityScoring", "evaluate_utility", "extract_number", "generate_greedy",
           "load_utility_rows", "normalise_utility_row", "score_continuations"]
