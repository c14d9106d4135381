"""The durability suite's ``rewrites`` section: deterministic prompt rewrites (:mod:`lat_lightning.eval.rewrites`),
no perturbation, on both models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lat_lightning.eval.durability.clean import clean_success
from lat_lightning.eval.durability.settings import DurabilitySettings
from lat_lightning.eval.rewrites import apply_rewrite


def rewrites_section(
    models: Mapping[str, nn.Module],
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    keys: Sequence[int],
    judge_map: Mapping[str, Any],
    s: DurabilitySettings,
) -> dict[str, Any]:
    """Per rewrite of ``s.dur.rewrites``: an example rewritten prompt and each model's success without perturbation
    on the rewritten prompts (judged against the original ones)."""
    out: dict[str, Any] = {}
    for rw in s.dur.rewrites:
        rewritten = apply_rewrite(rw, prompts)
        out[rw] = {"example": rewritten[0] if rewritten else ""}
        for name, model in models.items():
            out[rw][name] = clean_success(model, tokenizer, prompts, targets, keys, judge_map, s, gen_prompts=rewritten)
    return out


__all__ = ["rewrites_section"]
