"""Attack success without any perturbation: the baseline of the rewrites and the fine-tuning attack's measure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from lat_lightning.eval.durability.settings import DurabilitySettings
from lat_lightning.eval.generation import RowKeys, encode_prompts, generate_under_attack
from lat_lightning.eval.judging import coherence_scorer, judge_rates, nanmean


def clean_success(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    keys: Sequence[int],
    judge_map: Mapping[str, Any],
    s: DurabilitySettings,
    gen_prompts: Sequence[str] | None = None,
    score_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Success without perturbation (of ``gen_prompts`` when given, judged against ``prompts``); the coherence check
    scores the answers with ``score_model`` (default ``model``: e.g. the model before a fine-tuning attack).

    Returns:
        ``{"rate" (primary judge), "judges" ({name: rate}), "failures" (unjudged answers), "samples" (the first
        three answers), "incoherent" (when the coherence check is on)}``.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = encode_prompts(
        tokenizer, list(gen_prompts if gen_prompts is not None else prompts), s.use_chat_template, s.system_prompt
    )
    res = generate_under_attack(
        model, tokenizer, ids, None, None, rows=RowKeys(prompt_keys=keys), settings=s.generation, pad_token_id=pad_id
    )
    scorer = coherence_scorer(score_model if score_model is not None else model, tokenizer, s.coherence, s.batch_size)
    coh = scorer(ids, res.token_ids, res.texts) if scorer else None
    verdicts = judge_rates(judge_map, list(prompts), res.texts, list(targets), coh)
    out = {
        "rate": nanmean(verdicts[s.primary_judge]),
        "judges": {j: nanmean(v) for j, v in verdicts.items()},
        "failures": int(np.isnan(verdicts[s.primary_judge]).sum()),
        "samples": res.texts[:3],
    }
    if coh is not None:
        out["incoherent"] = sum(not c["coherent"] for c in coh)
    return out


__all__ = ["clean_success"]
