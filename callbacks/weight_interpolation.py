"""``WeightInterpolation``: after training, back off towards the original model as far as utility needs.

At ``on_fit_end`` (rank zero) it scores θ(λ) = λ·θ_trained + (1 − λ)·θ_original on the λ grid
(``callbacks.weight_interpolation.lambdas``, default 0, 0.1, ..., 0.5; any λ in [0, 1] is allowed),
keeps the **largest** λ whose utility is at least the original's minus ``tolerance`` (default 0.05), and
writes:

* ``run_dir/interpolated/``: the chosen θ(λ) as a full model (LoRA merged), loadable with
  ``AutoModelForCausalLM.from_pretrained``, plus the tokenizer;
* ``run_dir/interpolation.json``: baseline, the λ curve, the chosen λ and its score;
* TensorBoard: ``interpolation/utility`` against ``round(1000·λ)``, ``interpolation/chosen_lambda``,
  ``interpolation/baseline_utility`` and a text table (see :func:`lat_lightning.training.interpolation.log_curve`).

With LoRA θ(λ) is the adapter delta scaled by λ (exactly the interpolation of the merged weights, no copy
of the model). With full fine-tuning the trainable parameters are interpolated from a CPU copy of their
original values taken in ``setup`` (before a resumed checkpoint is loaded, so it is the starting model,
not the resumed one). Either way the module's model holds the trained weights again afterwards, so the
``final/`` export of the fit stage is the trained model.

Utility: a ``score_fn(model) -> float`` given to the constructor, else
``lat_lightning.eval.utility.evaluate_utility`` accuracy on ``evaluation.utility_data`` of kind
``callbacks.weight_interpolation.utility``. Missing utility data fails in ``setup``, before training.

Sharded strategies (FSDP) are skipped with a warning: run the ``interpolate`` pipeline stage instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lat_lightning.training.interpolation import (
    UtilityScoreSettings,
    interpolated,
    is_peft_model,
    lambda_search,
    log_curve,
    save_merged,
    trainable_state,
    utility_score_fn,
    write_result,
)

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


class WeightInterpolation(Callback):
    """λ search after training (see the module docstring).

    Args:
        lambdas: the grid of λ values in [0, 1] (λ = 0 is always scored: it is the baseline).
        tolerance: allowed utility loss relative to the original model.
        utility: utility kind for ``evaluate_utility`` (``multiple_choice``, ``exact_match`` or
            ``contains``) when no ``score_fn`` is given.
        run_dir: output directory (``trainer.default_root_dir`` when ``None``).
        score_fn: ``model -> float`` (higher is better); overrides the configured utility.
        utility_rows: rows for ``evaluate_utility`` instead of loading ``utility_settings.source``.
        utility_settings: how the utility is scored (rows' file, chat template, batch size); with ``utility_rows``
            and no settings, the rows are scored with the defaults and kind ``utility``.
        save: write ``interpolated/`` (the JSON and TensorBoard curve are always written).
    """

    def __init__(
        self,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        tolerance: float = 0.05,
        utility: str = "multiple_choice",
        run_dir: Optional[str | Path] = None,
        score_fn: Optional[Callable[[nn.Module], float]] = None,
        utility_rows: Optional[Sequence[Mapping[str, Any]]] = None,
        utility_settings: Optional[UtilityScoreSettings] = None,
        save: bool = True,
    ):
        lambdas = [float(x) for x in lambdas]
        bad = [x for x in lambdas if not 0.0 <= x <= 1.0]
        if not lambdas or bad:
            raise ValueError(f"callbacks.weight_interpolation.lambdas must be non-empty values in [0, 1]; got {bad}")
        if tolerance < 0:
            raise ValueError(f"callbacks.weight_interpolation.tolerance must be >= 0, got {tolerance}")
        self.lambdas = lambdas
        self.tolerance = float(tolerance)
        self.utility = utility
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.score_fn = score_fn
        self.utility_rows = list(utility_rows) if utility_rows is not None else None
        self.utility_settings = utility_settings
        self.save = save
        self.result: Optional[dict[str, Any]] = None
        self._original: Optional[dict[str, Tensor]] = None
        self._score: Optional[Callable[[nn.Module], float]] = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._score = self._resolve_score_fn(pl_module.tokenizer)
        if not is_peft_model(pl_module.model):
            self._original = trainable_state(pl_module.model)

    def _resolve_score_fn(self, tokenizer) -> Callable[[nn.Module], float]:
        if self.score_fn is not None:
            return self.score_fn
        if self.utility_settings is None and self.utility_rows is None:
            raise ValueError("WeightInterpolation needs a score_fn, utility_rows or utility_settings")
        if self.utility_settings is None:
            from lat_lightning.eval.utility import evaluate_utility

            kind = self.utility
            rows = self.utility_rows
            assert rows is not None  # utility_settings is None: the check above leaves the rows

            def score(model: nn.Module) -> float:
                return float(evaluate_utility(model, tokenizer, rows, kind=kind)["accuracy"])

            return score
        return utility_score_fn(self.utility_settings, tokenizer, rows=self.utility_rows)

    def on_fit_end(self, trainer, pl_module) -> None:
        if "FSDP" in type(trainer.strategy).__name__:
            log.warning(
                "WeightInterpolation: skipped under %s (sharded weights); run the 'interpolate' stage",
                type(trainer.strategy).__name__,
            )
            return
        if trainer.is_global_zero:
            run_dir = self.run_dir or Path(trainer.default_root_dir)
            self.result = self.run(
                pl_module.model, pl_module.tokenizer, run_dir, loggers=trainer.loggers, step=int(trainer.global_step)
            )
        trainer.strategy.barrier("weight_interpolation")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._original = None

    # -- the search ----------------------------------------------------------------------------------
    def run(
        self, model: nn.Module, tokenizer, run_dir: str | Path, loggers: Sequence = (), step: int = 0
    ) -> dict[str, Any]:
        """Search λ for ``model`` (trained weights in place), save, log; the model ends as it started."""
        score = self._score or self._resolve_score_fn(tokenizer)
        original = None if is_peft_model(model) else self._original
        if original is None and not is_peft_model(model):
            raise RuntimeError("WeightInterpolation: no copy of the original weights (setup did not run)")
        run_dir = Path(run_dir)
        result = lambda_search(model, self.lambdas, score, self.tolerance, original)
        if self.save:
            out = run_dir / "interpolated"
            with interpolated(model, result["chosen_lambda"], original):
                save_merged(model, tokenizer, out)
            result["interpolated"] = str(out)
        write_result(result, run_dir / "interpolation.json")
        for logger in loggers or []:
            exp = getattr(logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_scalar"):
                log_curve(exp, result, step=step)
                if hasattr(exp, "flush"):
                    exp.flush()
        return result


__all__ = ["WeightInterpolation"]
