"""Evaluation of a model's safety and utility: the validation loop during fit, and the ``evaluate`` stage
(:mod:`lat_lightning.stages.evaluate`).

Four numbers, each a torchmetrics aggregate so they reduce correctly across processes:

- ``attack_success``: fraction of held-out harmful prompts broken at any evaluated layer (MASR over those layers,
  primary judge) by the first of ``evaluation.validation_attacks`` (default ASA random noise); each validation
  attack also gets ``attack_success_<attack>`` and, with the coherence check on, ``attack_success_<attack>_coherent``
  (the primary judge's ``+coherent`` twin: gibberish is not a success); ``init``: the unperturbed success rate;
  the refusal-direction attacks take their harmless prompts from ``data.eval_benign``;
- ``nll_probe``: mean rise of the NLL of the model's own clean answer under ASA noise (Eq. 2);
- ``over_refusal``: fraction of benign prompts whose clean answer the over-refusal judge
  (``evaluation.over_refusal_judge``: ``keyword`` by default, ``refusal`` on real text) reads as a refusal (no
  attack success);
- ``utility_accuracy``: multiple-choice, exact-match or answer-contained (``contains``) accuracy on
  ``evaluation.utility_data``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, cast

import torch
import torchmetrics
from torch import nn

from lat_lightning.attacks.settings import Layer
from lat_lightning.data.schema import SafetyExample
from lat_lightning.eval.scan.settings import ScanSettings

log = logging.getLogger(__name__)


OVER_REFUSAL_JUDGES = ("keyword", "keyword_long", "refusal")  # judges that read a refusal off the text alone


@dataclass
class EvaluationData:
    """Held-out inputs of an evaluation.

    Attributes:
        harmful / benign_prompts / utility_rows / utility_kind: the held-out sets and how utility is scored.
        over_refusal_judge: the judge (:data:`OVER_REFUSAL_JUDGES`) that reads the benign answers: an answer it does
            not count as a success is a refusal (``evaluation.over_refusal_judge``).
    """

    harmful: list[SafetyExample] = field(default_factory=list)
    benign_prompts: list[str] = field(default_factory=list)
    utility_rows: list[dict] = field(default_factory=list)
    utility_kind: str = "multiple_choice"
    over_refusal_judge: str = "keyword"


def _broken(matrix) -> torch.Tensor:
    """``[N]``: 1 when a prompt is broken at any layer, 0 when judged and never broken, NaN when never judged."""
    m = torch.as_tensor(matrix, dtype=torch.float32)
    broken = torch.where(torch.isnan(m), torch.zeros_like(m), m).amax(dim=1)
    broken[torch.isnan(m).all(dim=1)] = float("nan")
    return broken


class SafetyEvaluator:
    """Computes the evaluation metrics for a model; used by the validation loop and the evaluate stage.

    Args:
        settings: the validation scan (:func:`lat_lightning.stages.settings.validation_settings`): its attacks,
            first seed, judges, positions policy, decoding, batching and prompt formatting are used for every
            metric.
        data: held-out data.
        layers: layers to attack, as indices or the names ``embed`` / ``all`` that the scan expands (``None``:
            ``settings.layers``, else every layer of the model).
        utility_fn: optional ``model, tokenizer -> accuracy`` overriding ``data.utility_rows``.
    """

    def __init__(
        self, settings: ScanSettings, data: EvaluationData, layers: Optional[Sequence[Layer]] = None, utility_fn=None
    ):
        self.settings = settings
        self.data = data
        self.layers: list[Layer] | None = list(layers) if layers else list(settings.layers) if settings.layers else None
        self.utility_fn = utility_fn
        self.attacks = settings.attack_names()
        names = ["attack_success", "init", "nll_probe", "over_refusal", "utility_accuracy"]
        names += [f"attack_success_{a}" for a in self.attacks]
        names += [f"attack_success_{a}_coherent" for a in self.attacks]
        self.metrics = nn.ModuleDict({name: torchmetrics.MeanMetric(nan_strategy="ignore") for name in names})
        self.samples: list[dict] = []

    def metric(self, name: str) -> torchmetrics.MeanMetric:
        """The aggregate ``name`` (:attr:`metrics` is a ``ModuleDict``, so it follows the model's device)."""
        return cast(torchmetrics.MeanMetric, self.metrics[name])

    def reset(self) -> None:
        for name in self.metrics:
            self.metric(name).reset()
        self.samples = []

    def _layers(self, model) -> list[Layer]:
        from lat_lightning.models.layers import num_layers

        return self.layers or list(range(num_layers(model)))

    def attack_batch(
        self,
        model,
        tokenizer,
        examples: Sequence[SafetyExample],
        layers: Optional[Sequence[Layer]] = None,
        sample_limit: int = 0,
    ) -> dict:
        """The validation attacks + NLL probe on a batch of held-out harmful examples; updates the metrics."""
        from lat_lightning.eval.probes import ProbeSettings, nll_probe_layers
        from lat_lightning.eval.scan import ScanOptions, ScanPrompts, run_scan
        from lat_lightning.models.layers import check_layer_indices

        layers = check_layer_indices(model, list(layers)) if layers else self._layers(model)
        prompts = [ex.prompt for ex in examples]
        keys = [ex.index for ex in examples]
        data = ScanPrompts(
            prompts,
            [ex.harmful_response for ex in examples],
            prompt_keys=keys,
            harmless_prompts=self.data.benign_prompts or None,
        )
        # A batch of the validation loop: in memory, quiet (the loop scans batch by batch, so no warnings either).
        options = ScanOptions(resume=False, progress=False, figures=False, tensorboard=False, log_warnings=False)
        result = run_scan(
            model, tokenizer, data, dataclasses.replace(self.settings, layers=tuple(layers)), None, options
        )
        coherent_judge = f"{result.primary_judge}+coherent"
        per_attack = {}
        for a in self.attacks:
            per_attack[a] = _broken(result.matrix(a))
            self.metric(f"attack_success_{a}").update(per_attack[a])
            if coherent_judge in result.judges:
                self.metric(f"attack_success_{a}_coherent").update(_broken(result.matrix(a, coherent_judge)))
        first = self.attacks[0]
        matrix = torch.as_tensor(result.matrix(first), dtype=torch.float32)  # [N, L]
        broken = per_attack[first]
        clean = torch.as_tensor(result.clean_success[result.primary_judge], dtype=torch.float32)
        gen = self.settings.generation
        nll = nll_probe_layers(
            model,
            tokenizer,
            prompts,
            layers,
            list(self.settings.seeds)[:1],
            generation=dataclasses.replace(gen, max_new_tokens=min(32, gen.max_new_tokens)),
            probe=ProbeSettings(batch_size=gen.batch_size or 16),
            prompt_keys=keys,
        )
        nll_mean = sum(nll.values()) / max(1, len(nll))
        self.metric("attack_success").update(broken)
        self.metric("init").update(clean)
        self.metric("nll_probe").update(torch.tensor([nll_mean] * len(examples), dtype=torch.float32))
        for i in range(min(sample_limit, len(prompts))):
            peak = int(torch.nan_to_num(matrix[i], nan=-1).argmax())
            rec = result.records.get((first, result.seeds_run[first][0], i, result.layers[peak])) or {}
            self.samples.append(
                {
                    "prompt": prompts[i],
                    "clean": result.clean_responses[i],
                    "layer": result.layers[peak],
                    "attack": first,
                    "attacked": rec.get("response", ""),
                    "coherence": (rec.get("coherence") or {}).get("reason"),
                }
            )
        return {"broken": broken, "clean": clean, "nll_probe": nll_mean}

    def benign_and_utility(self, model, tokenizer) -> None:
        """Over-refusal on benign prompts and utility accuracy; updates the metrics."""
        from lat_lightning.eval.generation import GenerationSettings, generate_under_attack
        from lat_lightning.eval.judges import build_judge

        gen_settings = self.settings.generation
        if self.data.benign_prompts:
            # Over-refusal is read off the greedy answer, whatever the scan's decoding.
            greedy = GenerationSettings(
                max_new_tokens=gen_settings.max_new_tokens,
                batch_size=gen_settings.batch_size,
                use_chat_template=gen_settings.use_chat_template,
                system_prompt=gen_settings.system_prompt,
            )
            gen = generate_under_attack(model, tokenizer, self.data.benign_prompts, settings=greedy)
            verdicts = build_judge(self.data.over_refusal_judge)(self.data.benign_prompts, gen.texts)
            refused = [float("nan") if v.failed else float(not v.success) for v in verdicts]
            self.metric("over_refusal").update(torch.tensor(refused))
        if self.utility_fn is not None:
            self.metric("utility_accuracy").update(torch.tensor([float(self.utility_fn(model, tokenizer))]))
        elif self.data.utility_rows:
            from lat_lightning.eval.utility import evaluate_utility

            # batch_size None (every row at once) is not a utility batch size: evaluate_utility's default then
            out = evaluate_utility(
                model,
                tokenizer,
                self.data.utility_rows,
                self.data.utility_kind,
                batch_size=gen_settings.batch_size or 8,
                use_chat_template=gen_settings.use_chat_template,
                system_prompt=gen_settings.system_prompt,
            )
            self.metric("utility_accuracy").update(torch.tensor([out["accuracy"]]))

    def compute(self) -> dict[str, float]:
        """Aggregated metrics (``nan`` for metrics that got no data)."""
        out = {}
        for name in self.metrics:
            metric = self.metric(name)
            if metric.update_count == 0:
                out[name] = float("nan")
            else:
                out[name] = float(metric.compute())
        return out

    def run(self, model, tokenizer, layers: Optional[Sequence[Layer]] = None, sample_limit: int = 4) -> dict:
        """Everything at once (the ``evaluate`` stage)."""
        self.reset()
        bs = max(1, int(self.settings.generation.batch_size or len(self.data.harmful) or 1))
        for start in range(0, len(self.data.harmful), bs):
            self.attack_batch(
                model,
                tokenizer,
                self.data.harmful[start : start + bs],
                layers,
                sample_limit=max(0, sample_limit - len(self.samples)),
            )
        self.benign_and_utility(model, tokenizer)
        return self.compute()


def write_evaluation(out_dir: Path, metrics: dict, samples: list[dict], name: str = "evaluation") -> None:
    """``<name>.json`` and ``<name>.md`` in ``out_dir`` (NaN written as null / "n/a"; layer ids stay ids in the
    JSON, the markdown shows the input embeddings as ``embed``)."""
    from lat_lightning.models.layers import layer_name

    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    (out_dir / f"{name}.json").write_text(json.dumps({"metrics": clean, "samples": samples}, indent=2))
    lines = [f"# {name.capitalize()}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {'n/a' if v is None else f'{v:.3f}'} |" for k, v in clean.items()]
    lines += [
        "",
        "Keyword judges count gibberish and empty answers as success (no refusal marker); the `_coherent` "
        "metrics count a success only for a coherent answer (docs/metrics.md).",
        "",
    ]
    for s in samples:
        coherence = f" ({s['coherence']})" if s.get("coherence") else ""
        lines += [
            f"- **{s['prompt']}** ({s.get('attack', 'attack')}, layer {layer_name(s['layer'])})",
            f"  - clean: {s['clean']!r}",
            f"  - attacked: {s['attacked']!r}{coherence}",
        ]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
