"""Example types every data source is normalised into.

Safety data pairs a harmful prompt ``x`` with a safe (refusal) response ``y`` and a harmful target
completion ``y*`` (see ``/work/shared/REFERENCE.md``, Notation). Benign data is plain instruction
following (``prompt`` / ``response``) used for the utility / KL losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SAFETY_FIELDS = ("prompt", "safe_response", "harmful_response", "layer")
BENIGN_FIELDS = ("prompt", "response")


@dataclass
class SafetyExample:
    """One harmful prompt with its refusal and its harmful target.

    Attributes:
        prompt: the harmful user request ``x`` (raw text, no chat template).
        safe_response: the refusal ``y`` the model should give.
        harmful_response: the harmful target completion ``y*`` an attack pushes towards; ``None`` for plain
            supervised (prompt, response) pairs, whose batches then carry no ``harmful_*`` sequences.
        layer: the example's own attack layer (ASABench instances are per layer); ``None`` when the
            example applies to every layer.
        index: a stable integer id of the example (its row in the source by default). Perturbations key
            their random draws on it, so it must not change between epochs or runs.
    """

    prompt: str
    safe_response: str
    harmful_response: Optional[str]
    layer: int | None = None
    index: int = 0


@dataclass
class BenignExample:
    """One benign instruction-following pair.

    Attributes:
        prompt: the user request.
        response: the reference answer.
    """

    prompt: str
    response: str
