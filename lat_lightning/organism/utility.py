"""Benign accuracy of the organism: greedy answers to held-out benign tasks, checked by answer content."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn


def organism_rows(seed: int = 0, n: int = 100) -> list[dict]:
    """Held-out benign task rows (``prompt``, ``answer``, ``task``)."""
    from lat_lightning.organism.data import exact_match_rows

    return exact_match_rows("eval", n, seed)


def organism_accuracy(model: nn.Module, tokenizer, rows: Optional[Sequence[dict]] = None, seed: int = 0,
                      max_new_tokens: int = 16, batch_size: int = 64, use_chat_template: bool = True) -> float:
    """Fraction of benign eval prompts whose greedy answer contains the checkable answer.

    Args:
        model / tokenizer: the model under test (evaluated in eval mode, mode restored after).
        rows: task rows (default: :func:`organism_rows`).
        max_new_tokens: answers are short ("3 plus 5 is 8."), so a small budget suffices.
    """
    from lat_lightning.eval.generation import generate_under_attack
    from lat_lightning.organism.data import check_answer

    rows = list(rows) if rows is not None else organism_rows(seed)
    out = generate_under_attack(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, use_chat_template=use_chat_template)
    return sum(check_answer(r, text) for r, text in zip(rows, out.texts)) / max(1, len(rows))
