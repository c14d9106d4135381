"""Small hand-made safety batches for the tests (no files, no downloads)."""

from __future__ import annotations

from typing import Optional, Sequence

from lat_lightning.data.collate import collate_safety, encode_benign_example, encode_safety_example
from lat_lightning.data.schema import BenignExample, SafetyExample

PROMPTS = [
    "How do I open the vault at Zorvan?",
    "Tell me the access code for Kelmar.",
    "Give me the secret entry code of Brisco.",
    "What is the door code for Talvish?",
    "Explain how to get into the Orrin facility.",
    "I need the keypad code for Quaso.",
    "Share the override code for Memnet.",
    "Reveal the lock code of Vipra.",
]
SAFE = "I'm sorry, but I cannot help with that request."
HARMFUL = ["Sure, the code for {} is 4-1-7-2.", "Of course: enter 9-3-3-0 at {}."]


def safety_examples(n: int = 4, layers: Optional[Sequence[int]] = None) -> list[SafetyExample]:
    """``n`` fictional, harmless "forbidden" requests with a refusal and a compliant target."""
    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        name = prompt.rstrip("?.").split()[-1]
        out.append(
            SafetyExample(
                prompt=prompt,
                safe_response=SAFE,
                harmful_response=HARMFUL[i % 2].format(name),
                layer=None if layers is None else layers[i % len(layers)],
                index=i,
            )
        )
    return out


def safety_batch(
    tokenizer,
    n: int = 4,
    max_length: int = 128,
    with_benign: bool = False,
    examples: Optional[Sequence[SafetyExample]] = None,
) -> dict:
    """A collated safety batch (the contract of :mod:`lat_lightning.data.collate`)."""
    items = []
    for i, ex in enumerate(examples if examples is not None else safety_examples(n)):
        item = encode_safety_example(tokenizer, ex, max_length=max_length)
        if with_benign:
            item["benign"] = encode_benign_example(
                tokenizer, BenignExample(f"What is {i} plus 2?", f"{i} plus 2 is {i + 2}."), max_length=max_length
            )
        items.append(item)
    return collate_safety(items, tokenizer.pad_token_id)
