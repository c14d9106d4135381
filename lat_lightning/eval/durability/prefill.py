"""The pre-fill attack: the first ``k`` target tokens forced after the generation prompt, no perturbation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lat_lightning.eval.durability.inputs import HarmfulPrompts
from lat_lightning.eval.durability.settings import DurabilitySettings
from lat_lightning.eval.generation import RowKeys, generate_under_attack
from lat_lightning.eval.judging import judge_rates, nanmean


def prefill_attack(
    model: nn.Module,
    tokenizer,
    harmful: HarmfulPrompts,
    ks: Sequence[int],
    s: DurabilitySettings,
    judge_map: Mapping[str, Any],
    scorer,
) -> dict[str, Any]:
    """The pre-fill attack: the first ``k`` tokens of each harmful target forced after the generation prompt, then
    greedy decoding without perturbation; the judges (and the coherence check) see pre-fill + continuation.

    Args:
        model / tokenizer: the model under attack and its tokenizer.
        harmful: harmful prompts, their harmful targets and stable ids, encoded
            (:meth:`HarmfulPrompts.encode <lat_lightning.eval.durability.inputs.HarmfulPrompts.encode>`).
        ks: how many target tokens to pre-fill (one point per k, in this order).
        s: the suite's settings (decoding, batch size, primary judge).
        judge_map: ``name -> judge`` (:func:`~lat_lightning.eval.durability.settings.resolve_judges`).
        scorer: the coherence check (:func:`lat_lightning.eval.judging.coherence_scorer`; ``None`` when off).

    Returns:
        ``{"ks", "rate" (primary judge, per k), "judges" ({name: [rate per k]}), "samples" ({str(k): first
        answer}), "per_prompt" (the primary judge's 1 / 0 / None per prompt, per k), "positions_check" ({"rows",
        "violations"}: rows that were perturbed, or whose generation prompt is not prompt + pre-fill)}``.
    """
    prompt_ids, target_ids = harmful.prompt_ids, harmful.target_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: dict[str, Any] = {"ks": [int(k) for k in ks], "rate": [], "judges": {}, "samples": {}}
    check = {"rows": 0, "violations": 0}
    for k in out["ks"]:
        prefixes = [list(t[:k]) for t in target_ids]
        ids = [list(p) + pre for p, pre in zip(prompt_ids, prefixes)]
        res = generate_under_attack(
            model,
            tokenizer,
            ids,
            None,
            None,
            rows=RowKeys(prompt_keys=list(harmful.keys)),
            settings=s.generation,
            pad_token_id=pad_id,
        )
        answers = [pre + list(tok) for pre, tok in zip(prefixes, res.token_ids)]
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        for j in range(len(harmful.prompts)):
            check["rows"] += 1
            if int(res.perturbed_positions[j]) != 0 or res.prompt_ids[j][len(prompt_ids[j]) :] != prefixes[j]:
                check["violations"] += 1
        coh = scorer(prompt_ids, answers, texts) if scorer else None
        verdicts = judge_rates(judge_map, list(harmful.prompts), texts, list(harmful.targets), coh)
        for jn, v in verdicts.items():
            out["judges"].setdefault(jn, []).append(nanmean(v))
        out["rate"].append(nanmean(verdicts[s.primary_judge]))
        out.setdefault("per_prompt", []).append([None if v != v else float(v) for v in verdicts[s.primary_judge]])
        out["samples"][str(k)] = texts[0] if texts else ""
    out["positions_check"] = check
    return out


__all__ = ["prefill_attack"]
