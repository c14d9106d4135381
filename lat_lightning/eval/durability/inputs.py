"""What the durability suite runs on: the prompts and pairs (:class:`DurabilityData`), how one run is carried out
(:class:`DurabilityOptions`) and the harmful prompts as text and token ids (:class:`HarmfulPrompts`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lat_lightning.attacks.settings import Layer
from lat_lightning.data.templating import encode_response
from lat_lightning.eval.durability.settings import DurabilityChecks, DurabilitySettings
from lat_lightning.eval.generation import encode_prompts


@dataclass(frozen=True)
class DurabilityData:
    """The data of a durability run.

    Attributes:
        prompts / targets: harmful prompts and their harmful target completions (AdvBench style).
        prompt_keys: stable integer ids of the prompts (key the ASA noise; ``None``: ``0..N-1``).
        benign: benign ``(prompt, response)`` pairs, dicts with those keys or ``BenignExample``s, for the
            trainability fine-tune (bare prompt strings are ignored there; no pairs: the section is skipped).
            Their prompts (and bare strings) are the harmless side of the refusal direction unless
            ``harmless_prompts`` is given.
        finetune_pairs: ``(prompt, harmful response)`` pairs of the fine-tuning attack (``None``: the evaluation
            prompts with their targets; the report says when they overlap).
        utility_rows / utility_kind: utility rows (multiple choice or exact match) scored after every
            trainability step.
        harmless_prompts: harmless prompts of the refusal-direction attacks (``None``: the prompts of ``benign``).
        contrast_prompts: their harmful side (``None``: ``prompts``). Each model's direction is its own
            (adaptive); the ``_transfer`` rows use the original model's.
        fragile_layers: the layers the adaptive and depth attacks target (``None``: the settings'
            ``fragile_layers``, else the peak layers of both models' ASA re-scans).
        fragile_source: where ``fragile_layers`` came from (shown in the report).
    """

    prompts: Sequence[str]
    targets: Sequence[str | None]
    prompt_keys: Sequence[int] | None = None
    benign: Sequence[Any] | None = None
    finetune_pairs: Sequence[tuple[str, str]] | None = None
    utility_rows: Sequence[Mapping[str, Any]] | None = None
    utility_kind: str = "multiple_choice"
    harmless_prompts: Sequence[str] | None = None
    contrast_prompts: Sequence[str] | None = None
    fragile_layers: Sequence[Layer] | None = None
    fragile_source: str | None = None


@dataclass(frozen=True)
class DurabilityOptions:
    """How one run of the suite is carried out (none of these change what it measures).

    Attributes:
        model_labels: ``{"original": ..., "hardened": ...}`` descriptions for the report.
        resume: let the scans resume from ``out_dir/{original,hardened}/scan.jsonl``.
        progress: progress bars.
        shard: ``(rank, world_size)`` in a multi-process launch: the two re-scans are distributed
            (:func:`~lat_lightning.eval.scan.run_scan`'s ``shard``; needs ``out_dir``); every other section runs
            on rank 0 only, and the other ranks return ``{"rank": r, "rows": []}`` once the scans are done.
        reuse_scans: ``{"original" | "hardened": (scan directory, its prompt keys)}``: earlier scans of these
            very models (the run's ``scan`` and ``rescan`` stages); the re-scans take over the cells those would
            generate identically (:func:`lat_lightning.eval.scan.reusable_records`) instead of generating them.
    """

    model_labels: Mapping[str, str] | None = None
    resume: bool = False
    progress: bool = False
    shard: tuple[int, int] | None = None
    reuse_scans: Mapping[str, tuple[str | Path, Sequence[int]]] | None = None


def evaluation_prompts(
    data: DurabilityData, checks: DurabilityChecks, empty_message: str
) -> tuple[list[str], list[str], list[int]]:
    """Prompts, targets and stable ids as strings / ints, capped at ``checks.num_prompts``.

    Raises:
        ValueError: unequal lengths, or no prompt (``empty_message``).
    """
    prompts, targets = [str(p) for p in data.prompts], [str(t) for t in data.targets]
    if len(prompts) != len(targets):
        raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts")
    keys = list(range(len(prompts))) if data.prompt_keys is None else [int(k) for k in data.prompt_keys]
    n = checks.num_prompts
    if n is not None:
        prompts, targets, keys = prompts[:n], targets[:n], keys[:n]
    if not prompts:
        raise ValueError(empty_message)
    return prompts, targets, keys


def benign_pairs(benign: Sequence[Any] | None) -> list[tuple[str, str]]:
    """The ``(prompt, response)`` pairs of ``benign`` (bare prompt strings left out)."""
    pairs = []
    for b in benign or []:
        if isinstance(b, str):
            continue
        if isinstance(b, Mapping):
            pairs.append((str(b["prompt"]), str(b["response"])))
        elif hasattr(b, "prompt") and hasattr(b, "response"):
            pairs.append((str(b.prompt), str(b.response)))
        else:
            p, r = b
            pairs.append((str(p), str(r)))
    return pairs


def harmless_prompts(data: DurabilityData, limit: int) -> list[str]:
    """The harmless side of the refusal direction: ``data.harmless_prompts``, else the benign prompts (bare strings
    first), at most ``limit``."""
    prompts = data.harmless_prompts
    if prompts is None:
        prompts = [b for b in data.benign or [] if isinstance(b, str)] + [p for p, _ in benign_pairs(data.benign)]
    return [str(p) for p in prompts][: int(limit)]


@dataclass(frozen=True)
class HarmfulPrompts:
    """The harmful evaluation prompts, their targets and stable ids, as text and as token ids."""

    prompts: list[str]
    targets: list[str]
    keys: list[int]
    prompt_ids: list[list[int]]
    target_ids: list[list[int]]

    @classmethod
    def encode(
        cls,
        tokenizer,
        prompts: Sequence[str],
        targets: Sequence[str],
        keys: Sequence[int],
        settings: DurabilitySettings,
    ) -> HarmfulPrompts:
        """Encode the prompts as generation prompts (the settings' chat template and system prompt) and the
        targets as responses without EOS."""
        prompts, targets = [str(p) for p in prompts], [str(t) for t in targets]
        return cls(
            prompts,
            targets,
            [int(k) for k in keys],
            encode_prompts(tokenizer, prompts, settings.use_chat_template, settings.system_prompt),
            [encode_response(tokenizer, t, add_eos=False) for t in targets],
        )


__all__ = [
    "DurabilityData",
    "DurabilityOptions",
    "HarmfulPrompts",
    "benign_pairs",
    "evaluation_prompts",
    "harmless_prompts",
]
