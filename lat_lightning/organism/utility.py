"""Benign accuracy of the organism: greedy answers to held-out benign tasks, checked by answer content.

The scoring itself is the generic utility kind ``contains`` (:func:`lat_lightning.eval.utility.evaluate_utility`);
this module only supplies the organism's rows (the same rows as its ``utility_em`` data file).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn


def organism_rows(seed: int = 0, n: int = 100) -> list[dict]:
    """Held-out benign task rows (``prompt``, ``answer``, ``task``)."""
    from lat_lightning.organism.data import exact_match_rows

    return exact_match_rows("eval", n, seed)


def organism_accuracy(
    model: nn.Module,
    tokenizer,
    rows: Optional[Sequence[dict]] = None,
    seed: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    use_chat_template: bool = True,
) -> float:
    """Fraction of benign eval prompts whose greedy answer contains the checkable answer.

    Args:
        model: the model under test (evaluated in eval mode, mode restored after).
        tokenizer: its tokenizer.
        rows: task rows (default: :func:`organism_rows`).
        seed: the organism's seed (selects the default rows).
        max_new_tokens: answers are short ("3 plus 5 is 8."), so a small budget suffices.
        batch_size: prompts per generation batch.
        use_chat_template: format the prompts with the tokenizer's chat template.

    Returns:
        The accuracy (utility kind ``contains``).
    """
    from lat_lightning.eval.utility import evaluate_utility

    rows = list(rows) if rows is not None else organism_rows(seed)
    return evaluate_utility(
        model,
        tokenizer,
        rows,
        "contains",
        batch_size=batch_size,
        use_chat_template=use_chat_template,
        max_new_tokens=max_new_tokens,
    )["accuracy"]
