"""``FragileLayerSelector``: choose the attacked layers before training builds its optimiser.

Runs in the ``setup`` hook (Lightning calls it before ``configure_optimizers`` and before a checkpoint
is restored; on resume the checkpoint's ``attack_layers`` win, see ``module.on_load_checkpoint``) and sets
``pl_module.attack_layers``, which the attack reads every step. Methods (``callbacks.fragile_layers``):

* ``explicit``: the ``layers`` list as given.
* ``nll_probe``: top-``top_k`` layers by the rise of the NLL of the clean safe response under ASA noise
  (Eq. 1) at that layer: ``ΔNLL(l) = mean_i [NLL_l,perturbed(y_i | x_i) − NLL_clean(y_i | x_i)]`` over
  ``num_prompts`` training prompts and the ``evaluation.seeds``. Uses
  ``lat_lightning.eval.probes.nll_probe_layers`` when that module exists (it probes the model's own
  clean response); otherwise the compact probe here, which teacher-forces the data's ``safe_response``
  with the noise on the last prompt token and every response position.
* ``grad_norm`` (T-Vaccine style): top-``top_k`` layers by the mean L2 norm of
  ``∇_{h[l]} CE(y* | x)``, the gradient of the harmful-target cross-entropy with respect to the layer's
  output, over a few training batches. Only ``torch.autograd.grad`` on zero-valued probes added to the
  residual stream: no weight ``.grad`` is written.
* ``scan``: LASR per layer of an in-memory ASA-random scan (``lat_lightning.eval.scan.run_scan``: greedy
  generation under noise, judged by ``evaluation.primary_judge``; judge failures are left out of the
  rate) over ``num_prompts`` prompt texts. Falls back to ``nll_probe`` with a logged warning when the
  scan module is missing or no prompt texts are available (a plain dataloader instead of the data
  module).

Ties follow the scan's documented rule (:data:`lat_lightning.eval.metrics.TIE_RULE`): layers with equal
scores are ranked by a tie-break score — for ``scan``, the LASR of the coherence-aware primary judge
(``<judge>+coherent``), so a layer whose "successes" are gibberish loses the tie — then by the lower layer.
A tie at the top-k boundary is logged as a warning and recorded (``ties`` in ``fragile_layers.json``). The chosen
layers are stored in ascending order. Under DDP every rank scores the same prompts and rank 0's choice is
broadcast. Outputs (rank zero): ``fragile_layers.json`` in the run directory (method, method actually used,
chosen layers, per-layer scores, tie-break scores, ties, ranking), a ``log.info`` line, and on a TensorBoard
logger the text ``fragile_layers/choice`` and the scalar ``fragile_layers/score`` plotted against the layer index.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lat_lightning.callbacks.layer_scores import (
    boundary_ties,
    grad_norm_scores,
    nll_probe_scores,
    top_k_layers,
)
from lat_lightning.eval.generation import GenerationSettings
from lat_lightning.eval.generation import eval_mode as _eval_mode
from lat_lightning.eval.metrics import TIE_RULE, rank_layers
from lat_lightning.eval.scan.settings import ScanSettings
from lat_lightning.models.layers import check_layer_indices, layer_name, num_layers, parse_layers

log = logging.getLogger(__name__)

METHODS = ("explicit", "nll_probe", "grad_norm", "scan")
PROBE_BATCH = 8


class FragileLayerSelector(Callback):
    """Pick ``pl_module.attack_layers`` in ``setup`` (see the module docstring).

    Args:
        method: ``explicit``, ``nll_probe``, ``grad_norm`` or ``scan``.
        layers: the explicit list (``method='explicit'``).
        top_k: how many layers the other methods keep.
        num_prompts: training rows to probe.
        candidate_layers: layers to score (all layers when ``None``).
        run_dir: where ``fragile_layers.json`` goes (``trainer.default_root_dir`` when ``None``).
        batches: probe on these safety batches instead of the training data.
        prompts: prompt strings for ``lat_lightning.eval.probes`` / ``scan`` (default: the datamodule's
            safety examples).
        scan: the run's scan settings (:func:`lat_lightning.stages.settings.scan_settings`): the probes' seeds
            (``seeds``) and noise magnitude (``perturbation.alpha``), the decoding, batching and prompt formatting
            of the evaluation-side probe, and the judges, positions policy and coherence check of the ``scan``
            method. ``None``: the library defaults (seed 0, alpha 1, :class:`~lat_lightning.eval.scan.ScanSettings`).
    """

    def __init__(
        self,
        method: str = "explicit",
        layers: Sequence[int] = (),
        top_k: int = 1,
        num_prompts: int = 8,
        candidate_layers: Optional[Sequence[int]] = None,
        run_dir: Optional[str | Path] = None,
        batches: Optional[Sequence[dict]] = None,
        prompts: Optional[Sequence[str]] = None,
        scan: Optional[ScanSettings] = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown fragile-layer method '{method}'; choose from {', '.join(METHODS)}")
        if method == "explicit" and not layers:
            raise ValueError("callbacks.fragile_layers.method=explicit needs callbacks.fragile_layers.layers")
        if top_k < 1:
            raise ValueError(f"callbacks.fragile_layers.top_k must be >= 1, got {top_k}")
        if num_prompts < 1:
            raise ValueError(f"callbacks.fragile_layers.num_prompts must be >= 1, got {num_prompts}")
        self.method = method
        self.layers = parse_layers(layers, "callbacks.fragile_layers.layers")
        self.top_k = int(top_k)
        self.num_prompts = int(num_prompts)
        self.candidate_layers = (
            None
            if candidate_layers is None
            else parse_layers(candidate_layers, "callbacks.fragile_layers.candidate_layers")
        )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.scan = scan
        self.seeds = [int(s) for s in scan.seeds] or [0] if scan is not None else [0]
        self.alpha = float(scan.perturbation.alpha) if scan is not None else 1.0
        self.batches = list(batches) if batches is not None else None
        self.prompts = list(prompts) if prompts is not None else None
        self.result: Optional[dict[str, Any]] = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        result = self.select(pl_module.model, getattr(pl_module, "tokenizer", None), trainer)
        chosen = list(result["layers"])
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(trainer, "world_size", 1) > 1:
            chosen = list(strategy.broadcast(chosen, src=0))
            result["layers"] = chosen
        pl_module.attack_layers = chosen
        self.result = result
        if getattr(trainer, "is_global_zero", True):
            self._report(trainer, result)

    # -- selection -----------------------------------------------------------------------------------
    def select(self, model: nn.Module, tokenizer=None, trainer=None) -> dict[str, Any]:
        """Score the candidate layers and choose; returns the dict written to ``fragile_layers.json``."""
        n_layers = num_layers(model)
        if self.method == "explicit":
            layers = check_layer_indices(model, self.layers, what="callbacks.fragile_layers.layers")
            return {
                "method": "explicit",
                "method_used": "explicit",
                "layers": sorted(set(layers)),
                "scores": {},
                "ranking": [],
                "num_layers": n_layers,
            }
        candidates = self.candidate_layers if self.candidate_layers is not None else list(range(n_layers))
        candidates = check_layer_indices(model, candidates, what="callbacks.fragile_layers.candidate_layers")
        candidates = sorted(set(candidates))
        if not candidates:
            raise ValueError("callbacks.fragile_layers.candidate_layers is empty")
        method_used = self.method
        tiebreak: Optional[dict[int, float]] = None
        if self.method == "scan":
            found = self._scan_scores(model, tokenizer, trainer, candidates)
            if found is None:
                method_used = "nll_probe"
            else:
                scores, tiebreak = found
        if method_used == "nll_probe":
            scores = self._nll_scores(model, tokenizer, trainer, candidates)
        elif method_used == "grad_norm":
            scores = grad_norm_scores(model, self._probe_batches(trainer), candidates)
        scores = {int(k): float(v) for k, v in scores.items()}
        ranking = rank_layers(scores, tiebreak)
        chosen = top_k_layers(scores, self.top_k, tiebreak)
        ties = boundary_ties(scores, chosen)
        if ties:
            log.warning(
                "fragile layers: layer(s) %s tie the chosen %s at score %.4g; chose %s by the tie rule (%s)",
                ties,
                chosen,
                min(scores[l] for l in chosen),
                chosen,
                TIE_RULE,
            )
        return {
            "method": self.method,
            "method_used": method_used,
            "layers": chosen,
            "scores": scores,
            "tiebreak_scores": tiebreak,
            "ties": ties,
            "tie_rule": TIE_RULE,
            "ranking": ranking,
            "num_layers": n_layers,
            "top_k": self.top_k,
            "num_prompts": self.num_prompts,
            "seeds": self.seeds,
        }

    def _nll_scores(self, model, tokenizer, trainer, candidates) -> dict[int, float]:
        prompts, keys = self._prompt_texts(trainer)
        if prompts and tokenizer is not None:
            probe_layers: Optional[Callable[..., Any]]
            try:
                from lat_lightning.eval.probes import ProbeSettings
                from lat_lightning.eval.probes import nll_probe_layers as probe_layers
            except ImportError:
                probe_layers = None
            if probe_layers is not None:
                kwargs: dict[str, Any] = {}
                if self.scan is not None:  # the run's decoding length, batching and prompt formatting
                    gen = self.scan.generation
                    kwargs["generation"] = GenerationSettings(
                        max_new_tokens=gen.max_new_tokens,
                        batch_size=gen.batch_size,
                        use_chat_template=gen.use_chat_template,
                        system_prompt=gen.system_prompt,
                    )
                    kwargs["probe"] = ProbeSettings(alpha=self.alpha, batch_size=gen.batch_size or 16)
                else:
                    kwargs["probe"] = ProbeSettings(alpha=self.alpha)
                with _eval_mode(model):
                    return dict(
                        probe_layers(
                            model, tokenizer, prompts, layers=candidates, seeds=self.seeds, prompt_keys=keys, **kwargs
                        )
                    )
        return nll_probe_scores(model, self._probe_batches(trainer), candidates, self.seeds, self.alpha)

    def _summary_scores(self, candidates) -> Optional[tuple[dict[int, float], Optional[dict[int, float]]]]:
        """LASR per layer of ``asa_random`` (and of the coherence-aware primary judge, the tie-break) from a scan
        stage run earlier in this run directory."""
        import json

        path = Path(self.run_dir) / "scan_summary.json" if self.run_dir else None
        if path is None or not path.exists():
            return None
        summary = json.loads(path.read_text())
        attack = summary.get("attacks", {}).get("asa_random")
        if attack is None:
            return None
        keep = set(candidates)
        lasr = attack["headline"]["lasr_mean"]
        scores = {int(l): float(v) for l, v in zip(summary["layers"], lasr) if v is not None and int(l) in keep}
        tb_judge = summary.get("tiebreak_judge")
        tb_lasr = (attack["judges"].get(tb_judge) or {}).get("lasr_mean") if tb_judge else None
        tiebreak = (
            None
            if tb_lasr is None
            else {int(l): float(v) for l, v in zip(summary["layers"], tb_lasr) if v is not None and int(l) in keep}
        )
        log.info("fragile_layers.method=scan: using the LASR of %s", path)
        return (scores, tiebreak) if scores else None

    def _scan_scores(
        self, model, tokenizer, trainer, candidates
    ) -> Optional[tuple[dict[int, float], Optional[dict[int, float]]]]:
        """LASR per layer and the tie-break scores: from this run's earlier scan stage (``scan_summary.json``)
        when there is one, else from an in-memory ASA-random scan; ``None`` makes the caller fall back to
        nll_probe."""
        import math

        earlier = self._summary_scores(candidates)
        if earlier is not None:
            return earlier

        try:
            from lat_lightning.eval.scan import ScanOptions, ScanPrompts, run_scan
        except ImportError:
            log.warning("fragile_layers.method=scan: lat_lightning.eval.scan is not available; using nll_probe")
            return None
        prompts, keys = self._prompt_texts(trainer)
        if not prompts or tokenizer is None:
            log.warning("fragile_layers.method=scan: no prompt texts to scan; using nll_probe")
            return None
        # The run's scan, narrowed to what ranks layers: ASA random over the candidates, greedy answers only, no
        # intervals or exports.
        base = self.scan if self.scan is not None else ScanSettings(seeds=tuple(self.seeds))
        settings = dataclasses.replace(
            base,
            attacks=("asa_random",),
            layers=tuple(candidates),
            bootstrap_samples=0,
            probes=False,
            asabench_test_fraction=None,
            generation=dataclasses.replace(base.generation, best_of_n=1),
        )
        options = ScanOptions(resume=False, progress=False, figures=False, tensorboard=False)
        with _eval_mode(model):
            result = run_scan(model, tokenizer, ScanPrompts(prompts, prompt_keys=keys), settings, None, options)

        def lasr(success) -> dict[int, float]:  # [N, L, S]: 1 / 0 / NaN -> mean over judged cells per layer
            out = {}
            for j, layer in enumerate(result.layers):
                cells = [float(v) for v in success[:, j].reshape(-1) if not math.isnan(float(v))]
                out[int(layer)] = sum(cells) / len(cells) if cells else 0.0
            return out

        tb_judge = result.summary.get("tiebreak_judge")
        return (
            lasr(result.success["asa_random"][result.primary_judge]),
            lasr(result.success["asa_random"][tb_judge]) if tb_judge else None,
        )

    # -- data ----------------------------------------------------------------------------------------
    def _prompt_texts(self, trainer) -> tuple[list[str], Optional[list[int]]]:
        """Prompt texts (and their stable example ids) for the evaluation-side probe and scan."""
        if self.prompts is not None:
            return self.prompts[: self.num_prompts], None
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        examples = getattr(dm, "safety_examples", None) if dm is not None else None
        if not examples:
            return [], None
        examples = examples[: self.num_prompts]
        return [ex.prompt for ex in examples], [int(ex.index) for ex in examples]

    def _probe_batches(self, trainer) -> list[dict]:
        """Up to ``num_prompts`` training rows, as batches of at most 8."""
        if self.batches is not None:
            return _truncate(self.batches, self.num_prompts)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        dataset = getattr(dm, "train_dataset", None) if dm is not None else None
        if dm is not None and dataset is not None and hasattr(dm, "pad_id"):
            from lat_lightning.data.collate import collate_safety

            n = min(self.num_prompts, len(dataset))
            items = [dataset[i] for i in range(n)]
            return [collate_safety(items[i : i + PROBE_BATCH], dm.pad_id) for i in range(0, n, PROBE_BATCH)]
        loader = None
        if dm is not None:
            loader = dm.train_dataloader()
        elif trainer is not None:
            source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
            loader = source.dataloader() if source is not None else None
        if loader is None:
            raise ValueError("FragileLayerSelector found no training data to probe; pass batches=...")
        batches, rows = [], 0
        for batch in loader:
            batches.append(batch)
            rows += int(batch["safe_input_ids"].shape[0])
            if rows >= self.num_prompts:
                break
        return _truncate(batches, self.num_prompts)

    # -- output --------------------------------------------------------------------------------------
    def _report(self, trainer, result: dict[str, Any]) -> None:
        scores = result["scores"]
        detail = ", ".join(f"{layer_name(layer)}: {scores[layer]:.4g}" for layer in result["ranking"][:10])
        chosen = "[" + ", ".join(layer_name(layer) for layer in result["layers"]) + "]"
        ties = f"; tied with {result['ties']} (tie rule)" if result.get("ties") else ""
        log.info(
            "fragile layers (%s): %s%s%s",
            result["method_used"],
            chosen,
            f" (scores {detail})" if detail else "",
            ties,
        )
        root = getattr(trainer, "default_root_dir", None)
        run_dir = self.run_dir or (Path(root) if root else None)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            serial = dict(
                result,
                scores={str(k): v for k, v in scores.items()},
                tiebreak_scores=None
                if result.get("tiebreak_scores") is None
                else {str(k): v for k, v in result["tiebreak_scores"].items()},
            )
            (run_dir / "fragile_layers.json").write_text(json.dumps(serial, indent=2))
        for logger in getattr(trainer, "loggers", []) or []:
            exp = getattr(logger, "experiment", None)
            if exp is None or not hasattr(exp, "add_text"):
                continue
            table = "\n".join(f"| {layer_name(layer)} | {scores[layer]:.4g} |" for layer in sorted(scores))
            exp.add_text(
                "fragile_layers/choice",
                f"method `{result['method_used']}`: layers {chosen}"
                + (f"\n\n| layer | score |\n|---|---|\n{table}" if table else ""),
                global_step=0,
            )
            for layer in sorted(scores):
                exp.add_scalar("fragile_layers/score", scores[layer], global_step=layer)


def _truncate(batches: Sequence[dict], n: int) -> list[dict]:
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        size = int(batch["safe_input_ids"].shape[0])
        if size > left:
            batch = {
                k: (v[:left] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == size else v)
                for k, v in batch.items()
            }
            size = left
        out.append(batch)
        left -= size
    return out


__all__ = ["FragileLayerSelector", "boundary_ties", "grad_norm_scores", "nll_probe_scores", "top_k_layers"]
