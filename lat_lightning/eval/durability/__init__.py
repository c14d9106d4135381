"""The durability suite: does a hardened model's robustness survive attacks it was not trained against?

Two models side by side, the ``original`` and the ``hardened`` one (e.g. after LAPT), on the same harmful
prompts. Sections (``DurabilityChecks.sections``; see ``docs/durability.md``), one module each:

1. ``rescan`` / ``adaptive`` (:mod:`.rescan`) — one :func:`~lat_lightning.eval.scan.run_scan` per model over every
   layer into ``original/`` and ``hardened/``: ASA random over ``random_seeds`` (≥ 5: mean ± std over seeds),
   and the adaptive attacks (``adaptive_attacks``, default ASAgrad and PGD: any registered attack), each
   optimised on the gradients of the model it attacks. With ``transfer`` the hardened model is also attacked
   with vectors computed on the original model (:class:`~lat_lightning.attacks.transfer.Transfer`; what a
   defence trained against a fixed attack sees). Rows: success at the fragile
   layers and at any layer; the LASR curves of both models; whether the most fragile layer moved.
2. ``finetune`` (:mod:`.finetune`) — the fine-tuning attack as a curve (:func:`finetune_attack_curve`, public:
   other stages call it once per model): LoRA fine-tunes of a copy of each model on harmful pairs (prompt ->
   harmful target) over several seeds up to a step budget, with the success without any latent perturbation and
   the harmful-target CE every few steps, and **steps-to-break** (the first step whose success reaches
   ``finetune_break_rate``). The fine-tune function is passed in:
   :func:`lat_lightning.training.finetune.lora_finetune`.
3. ``trainability`` (:mod:`.finetune`) — a short benign LoRA fine-tune of each: benign loss (and utility accuracy
   when utility rows are given) after every step.
4. ``depth`` (:mod:`.depth`, :mod:`.prefill`) — refusal depth by position: the ``depth_attacks`` (default ASA
   random / ASAgrad) at the fragile layers on the first ``k`` generated positions only (``first_k``; the last
   prompt token is position 1), ``k = 1..max_k``; and pre-filling the first ``k`` target tokens after the
   generation prompt, no perturbation, judging prefill + continuation.
5. ``rewrites`` (:mod:`.rewrites`) — deterministic prompt rewrites (:mod:`lat_lightning.eval.rewrites`), no
   perturbation.

Outputs in ``out_dir``: ``durability_report.md`` (ONE table, :mod:`.table`: rows = attacks, columns = original,
hardened, change), ``durability_summary.json``, ``durability_*.png`` (:mod:`.figures`) and TensorBoard
(``tensorboard/``: scalars, figures, the report as text), plus each model's scan directory and the fine-tune
adapters.

:func:`run_durability` (:mod:`.suite`) takes in-memory models, a :class:`DurabilityData` and frozen
:class:`DurabilitySettings` (:mod:`.settings`); the ``durability`` stage (:mod:`lat_lightning.stages.durability`)
builds the settings from the run config (:func:`lat_lightning.stages.durability_settings.durability_settings`),
loads two saved models (``evaluation.model_path`` or ``model.name_or_path``, and ``evaluation.compare_path`` or
this run's ``final/``; LoRA adapter directories are merged into their base) and calls it.
"""

from lat_lightning.eval.durability.depth import depth_curves
from lat_lightning.eval.durability.figures import figures, write_outputs
from lat_lightning.eval.durability.finetune import (
    SHORT_RESPONSE_TOKENS,
    eval_schedule,
    finetune_attack_curve,
    finetune_settings,
    last_measured,
    median_steps_to_break,
    prefix_only_caveat,
    steps_to_break,
)
from lat_lightning.eval.durability.inputs import DurabilityData, DurabilityOptions, HarmfulPrompts
from lat_lightning.eval.durability.prefill import prefill_attack
from lat_lightning.eval.durability.settings import (
    MODELS,
    SECTIONS,
    DurabilityChecks,
    DurabilitySettings,
    resolve_judges,
)
from lat_lightning.eval.durability.suite import FRAGILE_FILE, SUMMARY_FILE, run_durability
from lat_lightning.eval.durability.table import ATTACK_LABELS, REPORT_FILE, build_rows, render_report
from lat_lightning.eval.judging import build_judge_map, coherence_scorer, finite, judge_rates, nanmean

__all__ = [
    "ATTACK_LABELS",
    "FRAGILE_FILE",
    "MODELS",
    "REPORT_FILE",
    "SECTIONS",
    "SHORT_RESPONSE_TOKENS",
    "SUMMARY_FILE",
    "DurabilityChecks",
    "DurabilityData",
    "DurabilityOptions",
    "DurabilitySettings",
    "HarmfulPrompts",
    "build_judge_map",
    "build_rows",
    "coherence_scorer",
    "depth_curves",
    "eval_schedule",
    "figures",
    "finetune_attack_curve",
    "finetune_settings",
    "finite",
    "judge_rates",
    "last_measured",
    "median_steps_to_break",
    "nanmean",
    "prefill_attack",
    "prefix_only_caveat",
    "render_report",
    "resolve_judges",
    "run_durability",
    "steps_to_break",
    "write_outputs",
]
