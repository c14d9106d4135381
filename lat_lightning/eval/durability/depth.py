"""The ``depth`` section: refusal depth by position. The depth attacks at the fragile layers on the first ``k``
generated positions only (the last prompt token is position 1), ``k = 1..max_k``, and the pre-fill attack."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from lat_lightning.attacks import build_attack
from lat_lightning.errors import ConfigError
from lat_lightning.eval.durability.inputs import HarmfulPrompts
from lat_lightning.eval.durability.prefill import prefill_attack
from lat_lightning.eval.durability.rescan import any_rate
from lat_lightning.eval.durability.settings import DurabilitySettings
from lat_lightning.eval.formatting import mean_std
from lat_lightning.eval.generation import RowKeys, generate_under_attack
from lat_lightning.eval.judging import coherence_scorer, judge_rates


def _count_positions(res, k: int, check: dict[str, int]) -> None:
    """Add one generation's rows to the positions self-check: each row perturbed exactly min(k, steps run) <= k
    positions (exactly k when at least k tokens came)."""
    for j, a_n in enumerate(res.perturbed_positions.tolist()):
        check["rows"] += 1
        check["max_perturbed"] = max(check["max_perturbed"], int(a_n))
        if a_n > k or (int(res.lengths[j]) >= k and a_n != k):
            check["violations"] += 1


@dataclass(frozen=True)
class _DepthRun:
    """What every depth attack of one model shares: the coherence check (``None``: off), the positions self-check
    to add to, the refusal-direction contrast prompts, the ks and the padding id."""

    scorer: Any
    check: dict[str, int]
    contrast: tuple[Sequence, Sequence] | None
    ks: list[int]
    pad_id: int


def _first_k_curve(
    model: nn.Module,
    tokenizer,
    harmful: HarmfulPrompts,
    attack: str,
    fragile: list[int],
    judge_map: Mapping[str, Any],
    s: DurabilitySettings,
    run: _DepthRun,
) -> dict[str, Any]:
    """One depth attack on the first k positions for every k of ``run.ks``."""
    n, scorer, check, contrast = len(harmful.prompts), run.scorer, run.check, run.contrast
    prompt_ids, target_ids, keys = harmful.prompt_ids, harmful.target_ids, harmful.keys
    # One attack object per attack for all k: ASAgrad's directions are computed once and reused.
    atk = build_attack(attack, s.perturbation, positions="first_k", refresh=s.refresh)
    if atk.needs_harmless:
        if not contrast or not contrast[1]:
            raise ConfigError(f"depth attack '{attack}' needs harmless prompts (data.eval_benign or data.benign)")
        atk.set_contrast_prompts(*contrast)
    seeds = list(s.dur.random_seeds) if atk.seed_dependent else list(s.dur.random_seeds)[:1]
    rows = [(i, l, sd) for i in range(n) for sd in seeds for l in fragile]
    row_prompts = [r[0] for r in rows]
    row_layers = [r[1] for r in rows]
    row_seeds = [r[2] for r in rows]
    per_k: dict[str, Any] = {"mean": [], "std": [], "per_seed": [], "judges": {}}
    for k in run.ks:
        atk.settings = dataclasses.replace(atk.settings, first_k=k)
        plan = atk.plan(model, prompt_ids, target_ids, row_prompts, row_layers, seed=seeds[0], pad_id=run.pad_id)
        res = generate_under_attack(
            model,
            tokenizer,
            [prompt_ids[i] for i in row_prompts],
            row_layers,
            plan,
            rows=RowKeys(prompt_keys=[keys[i] for i in row_prompts], row_seeds=row_seeds),
            settings=s.generation,
            pad_token_id=run.pad_id,
        )
        _count_positions(res, k, check)
        coh = scorer([prompt_ids[i] for i in row_prompts], res.token_ids, res.texts) if scorer else None
        verdicts = judge_rates(
            judge_map,
            [harmful.prompts[i] for i in row_prompts],
            res.texts,
            [harmful.targets[i] for i in row_prompts],
            coh,
        )
        for jn, v in verdicts.items():
            arr = np.full((n, len(fragile), len(seeds)), np.nan)
            for r, (i, l, sd) in enumerate(rows):
                arr[i, fragile.index(l), seeds.index(sd)] = v[r]
            rates = any_rate(arr)
            m, sdv = mean_std(rates)
            per_k["judges"].setdefault(jn, []).append(m)
            if jn == s.primary_judge:
                per_k["mean"].append(m)
                per_k["std"].append(sdv)
                per_k["per_seed"].append(rates)
    per_k["seeds"] = seeds
    per_k["seed_dependent"] = bool(atk.seed_dependent)  # a spread over seeds is reported only then
    return per_k


def depth_curves(
    model: nn.Module,
    tokenizer,
    harmful: HarmfulPrompts,
    fragile: list[int],
    judge_map: Mapping[str, Any],
    s: DurabilitySettings,
    contrast: tuple[Sequence, Sequence] | None = None,
) -> dict[str, Any]:
    """First-k curves (per depth attack) and prefill curves for one model, plus the positions self-check.

    Args:
        model / tokenizer: the model under attack and its tokenizer.
        harmful: the encoded harmful prompts and targets.
        fragile: the attacked layers.
        judge_map: ``name -> judge``.
        s: the suite's settings (``dur.depth_attacks``, ``dur.max_k``, ``dur.prefill_ks``, ``dur.random_seeds``).
        contrast: ``(harmful ids, harmless ids)`` for the refusal-direction attacks.

    Raises:
        ConfigError: a depth attack that needs harmless prompts without any.
    """
    d = s.dur
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    check = {"rows": 0, "violations": 0, "max_perturbed": 0}
    ks = list(range(1, int(d.max_k) + 1))
    scorer = coherence_scorer(model, tokenizer, s.coherence, s.batch_size)
    run = _DepthRun(scorer, check, contrast, ks, pad_id)
    first_k = {
        attack: _first_k_curve(model, tokenizer, harmful, attack, fragile, judge_map, s, run)
        for attack in d.depth_attacks
    }
    # Prefill: the first k target tokens after the generation prompt, no perturbation.
    pks = sorted({int(k) for k in (d.prefill_ks if d.prefill_ks is not None else range(0, int(d.max_k) + 1))})
    prefill = prefill_attack(model, tokenizer, harmful, pks, s, judge_map, scorer)
    pcheck = prefill.pop("positions_check")
    return {
        "ks": ks,
        "fragile_layers": list(fragile),
        "first_k": first_k,
        "prefill": prefill,
        "positions_check": {
            "first_k": check,
            "prefill": pcheck,
            "ok": check["violations"] == 0 and pcheck["violations"] == 0,
        },
    }


__all__ = ["depth_curves"]
