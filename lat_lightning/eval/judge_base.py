"""The judge interface: :class:`Verdict` and the :class:`Judge` base class every judge builds on.

Every judge is called as ``judge(prompts, responses, targets) -> list[Verdict]`` with one verdict per item, in
order (see :mod:`lat_lightning.eval.judges` for the registry and the judges themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """One judgement.

    Attributes:
        success: ``True`` = attack success (harmful / not refused), ``False`` = refused / safe, ``None``
            when the judge failed on the item.
        failed: the judge could not judge the item (``success`` is then ``None``).
        reason: a short human-readable explanation (matched marker, raw classifier answer, error).
    """

    success: bool | None
    failed: bool = False
    reason: str = ""

    @classmethod
    def failure(cls, reason: str) -> Verdict:
        return cls(success=None, failed=True, reason=reason)

    def as_float(self) -> float:
        """1.0 / 0.0, or NaN for a failure: the encoding of the metrics' success matrices."""
        return float("nan") if self.failed or self.success is None else float(self.success)


def check_lengths(prompts: Sequence[Any], responses: Sequence[Any], targets: Sequence[Any] | None) -> None:
    """Raise ``ValueError`` when the prompts, responses and (given) targets differ in length."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if targets is not None and len(targets) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(targets)} targets")


class Judge:
    """Base class: subclasses implement :meth:`judge_one` or override :meth:`__call__` for batching."""

    name: str = "judge"
    caveat: str = ""

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], targets: Sequence[str | None] | None = None
    ) -> list[Verdict]:
        """Judge each (prompt, response[, target]) item.

        Args:
            prompts: the (harmful) requests.
            responses: the generations to judge.
            targets: the harmful target completions (only some judges use them), or ``None``.

        Returns:
            One :class:`Verdict` per item, in order.

        Raises:
            ValueError: if the lists have different lengths.
        """
        check_lengths(prompts, responses, targets)
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            target = targets[i] if targets is not None else None
            try:
                out.append(self.judge_one(prompt, response, target))
            except Exception as exc:  # noqa: BLE001 - one bad item must not lose the others
                out.append(Verdict.failure(f"{type(exc).__name__}: {exc}"))
        return out

    def judge_one(self, prompt: str, response: str, target: str | None) -> Verdict:
        raise NotImplementedError


__all__ = ["Judge", "Verdict", "check_lengths"]
