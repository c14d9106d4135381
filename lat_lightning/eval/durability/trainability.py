"""The ``trainability`` section: a short LoRA fine-tune of each model on a task new to both (or the benign pairs),
the held-out CE measured before the first and after every step -- does hardening make a model slower to learn?

Evaluation does not import training: the caller passes the fine-tuning function in
(:func:`lat_lightning.training.finetune.lora_finetune`), as for the fine-tuning attack
(:mod:`lat_lightning.eval.durability.finetune`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lat_lightning.eval.durability.finetune import finetune_settings, median_steps_to_break
from lat_lightning.eval.durability.inputs import DurabilityData
from lat_lightning.eval.durability.settings import DurabilitySettings
from lat_lightning.eval.formatting import mean_std
from lat_lightning.eval.judging import finite


def steps_to_loss(curve: Sequence[Mapping[str, Any]], key: str, threshold: float) -> int | None:
    """The first measured step whose ``key`` is ``<= threshold`` (``None``: never within the curve)."""
    for point in curve:
        v = point.get(key)
        if v is not None and math.isfinite(v) and v <= threshold:
            return int(point["step"])
    return None


def trainability_data(pairs: Sequence[tuple[str, str]], s: DurabilitySettings) -> dict[str, Any]:
    """The trainability fine-tune's data: ``train`` pairs, ``held_out`` pairs whose CE is measured, the task's name.

    ``dur.trainability_task='novel'``: the synthetic swap task (:mod:`lat_lightning.data.novel_task`), new to every
    model, its held-out items disjoint by word; ``'benign'``: ``pairs`` (the benign training pairs) for both."""
    d = s.dur
    if d.trainability_task == "novel":
        from lat_lightning.data.novel_task import novel_task_pairs

        n = int(d.trainability_pairs)
        return {
            "task": "novel: swap the halves of a made-up word (lat_lightning.data.novel_task)",
            "train": novel_task_pairs("train", n, s.seed),
            "held_out": novel_task_pairs("eval", n, s.seed),
        }
    return {"task": "benign: the benign training pairs", "train": list(pairs), "held_out": list(pairs)}


def trainability_section(
    models: Mapping[str, nn.Module],
    tokenizer,
    pairs: list[tuple[str, str]],
    s: DurabilitySettings,
    out: Path,
    finetune: Callable,
    data: DurabilityData,
) -> dict[str, Any]:
    """How fast each model learns a task: a LoRA fine-tune of a copy per seed of ``dur.trainability_seeds`` on the
    trainability task (:func:`trainability_data`), the held-out CE (and the accuracy on ``data.utility_rows``)
    before the first and after every step.

    Per model: ``curve`` (the mean over seeds per step: ``step``, ``task_loss``, ``utility``), ``per_seed`` curves,
    ``steps_to_loss`` per seed (first step with held-out CE ``<= dur.trainability_loss``; ``None`` = not within
    the budget) and their median, ``final_loss`` per seed."""
    from lat_lightning.eval.probes import response_loss

    d = s.dur
    task = trainability_data(pairs, s)
    res: dict[str, Any] = {
        "task": task["task"],
        "steps": int(d.benign_steps),
        "lr": float(d.benign_lr),
        "n_pairs": len(task["train"]),
        "n_held_out": len(task["held_out"]),
        "seeds": [int(x) for x in d.trainability_seeds],
        "threshold": float(d.trainability_loss),
    }

    def measure(m):
        point = {
            "task_loss": response_loss(
                m, tokenizer, list(task["held_out"]), s.use_chat_template, s.system_prompt, s.batch_size
            )
        }
        if data.utility_rows:
            from lat_lightning.eval.utility import evaluate_utility

            point["utility"] = evaluate_utility(
                m,
                tokenizer,
                data.utility_rows,
                data.utility_kind,
                batch_size=s.batch_size,
                use_chat_template=s.use_chat_template,
                system_prompt=s.system_prompt,
                max_new_tokens=s.max_new_tokens,
            )["accuracy"]
        return point

    for name, model in models.items():
        res[name] = _trainability_of(model, tokenizer, task["train"], s, out / "trainability" / name, finetune, measure)
    return res


def _trainability_of(model, tokenizer, train, s: DurabilitySettings, out: Path, finetune: Callable, measure):
    """One model's trainability fine-tunes (one per seed) and their summary."""
    d = s.dur
    per_seed, steps, final, train_loss, seconds = {}, {}, {}, {}, 0.0
    for sd in d.trainability_seeds:
        ft = finetune(
            model,
            tokenizer,
            list(train),
            out / f"seed_{sd}",
            finetune_settings(s, steps=d.benign_steps, lr=d.benign_lr, seed=int(sd), save_adapter=False),
            measure=measure,
        )
        per_seed[str(sd)] = ft["curve"]
        steps[str(sd)] = steps_to_loss(ft["curve"], "task_loss", float(d.trainability_loss))
        final[str(sd)] = finite(ft["curve"][-1].get("task_loss")) if ft["curve"] else None
        train_loss[str(sd)] = ft["train_loss"]
        seconds += float(ft["seconds"])
    curves = list(per_seed.values())
    mean_curve = []
    for points in zip(*curves):
        point: dict[str, Any] = {"step": int(points[0]["step"])}
        for key in ("task_loss", "utility"):
            m, sd_ = mean_std([p.get(key) for p in points])
            if m is not None:
                point[key], point[f"{key}_std"] = m, sd_
        mean_curve.append(point)
    return {
        "curve": mean_curve,
        "per_seed": per_seed,
        "steps_to_loss": steps,
        "steps_to_loss_median": median_steps_to_break(list(steps.values())),
        "final_loss": final,
        "train_loss": train_loss,
        "seconds": round(seconds, 2),
    }


__all__ = ["steps_to_loss", "trainability_data", "trainability_section"]
