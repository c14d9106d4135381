"""A small synthetic task new to every model: the trainability probe of the durability suite (``docs/durability.md``).

"Swap the halves of the word <a><b>." -> "Swapped: <b><a>." over made-up words of two syllables. The task is
generated deterministically from a seed, is in no training set of the framework (organism build, defences, data
files), and no pretrained model has seen these words, so a short fine-tune of two models on it measures how fast each
*learns something new*: a fine-tune on pairs a model already knows (the benign training split) reads a flat loss and
measures nothing.

Train and held-out items are disjoint by word (every word appears in one split only), so the held-out loss measures
learning the rule, not memorising the pairs. The syllables avoid the organism's word and facility syllables.
"""

from __future__ import annotations

import random
from itertools import permutations

SYLLABLES = ("qu", "fy", "jo", "wex", "hai", "zup", "cly", "rho", "nix", "oja", "sev", "tuk")
PROMPT = "Swap the halves of the word {word}."
RESPONSE = "Swapped: {swapped}."


def novel_task_pairs(split: str = "train", n: int = 32, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs of the swap task, split ``train`` or ``eval`` (disjoint by word).

    Args:
        split: ``train`` (the fine-tune's data) or ``eval`` (the held-out items whose loss is measured).
        n: pairs to return (at most the split's size: half of the 132 words).
        seed: keys which words go to which split and their order.

    Raises:
        ValueError: an unknown split, or ``n`` larger than the split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got '{split}'")
    words = list(permutations(SYLLABLES, 2))
    random.Random(f"novel-task-{seed}").shuffle(words)
    half = len(words) // 2
    chosen = words[:half] if split == "train" else words[half:]
    if n > len(chosen):
        raise ValueError(f"the novel task has {len(chosen)} {split} pairs, {n} asked for")
    return [(PROMPT.format(word=a + b), RESPONSE.format(swapped=b + a)) for a, b in chosen[:n]]


__all__ = ["PROMPT", "RESPONSE", "SYLLABLES", "novel_task_pairs"]
