"""The layer scan: where does a model's safety break? prompts x layers (x seeds) -> success matrix s[i, l].

For every attack (``asa_random``, ``asagrad``, ``pgd``), seed, prompt ``i`` and layer ``l`` the model
generates under the attack at ``l`` and every judge rules on the answer. Cells are batched so that a
prompt's whole layer sweep (and several seeds) run as ONE batched generation, each row at its own layer
(:func:`lat_lightning.eval.generation.generate_under_attack`); the clean answer of each prompt is
generated once and reused (INIT, the NLL probe, ASABench's ``original_response``).

Every answer also gets a coherence record (:mod:`lat_lightning.eval.coherence`: empty, repetition, the clean
model's per-token NLL) stored next to its verdicts, and every judge ``j`` gets a coherence-aware twin
``j+coherent`` (success only for a coherent answer). The summary adds the judges' pairwise agreement, the
peak layer with its ties (:data:`lat_lightning.eval.metrics.TIE_RULE`), warnings for a saturated headline, and
(``best_of_n > 1``) best-of-N numbers beside the greedy ones. Layer ``-2`` is the input embeddings (``embed``).

Outputs (in ``out_dir``, the run directory for the ``scan`` stage):
  - ``scan.jsonl``: one line per (attack, seed, prompt, layer) cell, streamed as cells finish
    (``attack='clean'``, ``layer=-1`` for the clean answers): prompt, response, token ids, every
    judge's verdict (failures included), the coherence record and (best-of-N) the sampled answers. An interrupted
    scan resumes from it and skips finished cells; ``scan_settings.json`` guards against resuming with different
    generation settings.
  - ``scan_heatmap_<attack>.png`` (prompts x layers, success rate over seeds) and
    ``scan_lasr_<attack>.png`` (LASR by layer with a bootstrap CI band), also in TensorBoard
    (``tensorboard/``);
  - ``scan_summary.json`` (INIT / LASR / PASR / MASR with CIs per attack and judge, failure counts,
    probes, ASABench export) and ``scan_report.md``;
  - ``asabench_train.jsonl`` / ``asabench_test.jsonl`` (:mod:`lat_lightning.eval.asabench`).

Modules: :mod:`~lat_lightning.eval.scan.settings` (what a scan computes, its data, how it runs),
:mod:`~lat_lightning.eval.scan.runner` (:func:`run_scan`), :mod:`~lat_lightning.eval.scan.records` (storage, resume,
reuse, the distributed file exchange), :mod:`~lat_lightning.eval.scan.summary` (result, metrics, headline,
warnings), :mod:`~lat_lightning.eval.scan.figures` and :mod:`~lat_lightning.eval.scan.report`.
"""

from __future__ import annotations

from lat_lightning.eval.scan.figures import write_figures
from lat_lightning.eval.scan.records import (
    CLEAN_ATTACK,
    SCAN_FILE,
    SETTINGS_FILE,
    read_records,
    reusable_records,
)
from lat_lightning.eval.scan.report import REPORT_FILE, render_report
from lat_lightning.eval.scan.runner import run_scan
from lat_lightning.eval.scan.settings import (
    AttackSettings,
    CoherenceSettings,
    GenerationSettings,
    JudgeSettings,
    ScanOptions,
    ScanPrompts,
    ScanSettings,
    generation_positions,
)
from lat_lightning.eval.scan.summary import SUMMARY_FILE, ScanResult, fmt

__all__ = [
    "CLEAN_ATTACK",
    "REPORT_FILE",
    "SCAN_FILE",
    "SETTINGS_FILE",
    "SUMMARY_FILE",
    "AttackSettings",
    "CoherenceSettings",
    "GenerationSettings",
    "JudgeSettings",
    "ScanOptions",
    "ScanPrompts",
    "ScanResult",
    "ScanSettings",
    "fmt",
    "generation_positions",
    "read_records",
    "render_report",
    "reusable_records",
    "run_scan",
    "write_figures",
]
