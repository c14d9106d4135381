"""Stage ``interpolate``: the λ search of :mod:`lat_lightning.training.interpolation` between the original model
(``model``) and the one this run trained (``run_dir/final``).

``final/`` holding ``adapter_config.json`` is a LoRA adapter: it is attached to the original model and θ(λ) is
the adapter scaled by λ. Otherwise ``final/`` is a full model and θ(λ) interpolates its parameters with the
original's. Writes ``run_dir/interpolated/`` (merged full model + tokenizer), ``run_dir/interpolation.json``
and, when ``logging.tensorboard``, the curve under ``run_dir/tensorboard/interpolate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from lat_lightning.stages.common import load_stage_model

if TYPE_CHECKING:
    from torch import nn


def run(cfg, run_dir: Union[str, Path], score_fn=None) -> dict[str, Any]:
    """λ search between ``cfg.model`` and ``run_dir/final``; save θ(chosen λ).

    Args:
        cfg: the run config (``model``, ``callbacks.weight_interpolation``, ``evaluation`` utility data,
            ``trainer.accelerator``, ``logging.tensorboard``).
        run_dir: the run directory holding ``final/``.
        score_fn: ``model -> float`` instead of the configured utility
            (:func:`~lat_lightning.training.interpolation.utility_score_fn`).

    Returns:
        ``{"chosen_lambda", "baseline", "chosen_score", "interpolated", "curve"}``.

    Raises:
        ConfigError: no trained model in ``run_dir/final`` or no utility rows.
    """
    from lat_lightning.errors import ConfigError
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.models.settings import ModelSettings
    from lat_lightning.stages.fit_setup import utility_score_settings
    from lat_lightning.stages.settings import model_settings
    from lat_lightning.training.interpolation import (
        interpolated,
        lambda_search,
        log_curve,
        save_merged,
        utility_score_fn,
        write_result,
    )

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise ConfigError(f"no trained model in {final}; run the fit stage first (stages: [fit, interpolate])")
    tokenizer = load_tokenizer(model_settings(cfg))
    score_fn = score_fn or utility_score_fn(utility_score_settings(cfg), tokenizer)
    base = load_stage_model(cfg)
    if any(p.device.type == "meta" for p in base.parameters()):
        raise ConfigError(
            "interpolate needs every weight in memory, but model.device_map offloads some to disk; "
            "use a map over devices only (e.g. model.device_map=auto on GPUs)"
        )
    original: Optional[dict] = None
    model: nn.Module
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(final))  # adapters land on the base's device
    else:
        original = {n: p.detach().to("cpu", copy=True) for n, p in base.named_parameters()}
        del base
        # The trained model exactly as saved: only its dtype comes from the config.
        configured = model_settings(cfg)
        model = load_stage_model(
            cfg, ModelSettings(name_or_path=str(final), dtype=configured.dtype, device_map=configured.device_map)
        )
    model.eval()
    w = cfg.callbacks.weight_interpolation
    result = lambda_search(model, list(w.lambdas), score_fn, float(w.tolerance), original)
    out = run_dir / "interpolated"
    with interpolated(model, result["chosen_lambda"], original):
        save_merged(model, tokenizer, out)
    result["interpolated"] = str(out)
    write_result(result, run_dir / "interpolation.json")
    if cfg.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard" / "interpolate"))
        try:
            log_curve(writer, result)
        finally:
            writer.close()
    return {k: result[k] for k in ("chosen_lambda", "baseline", "chosen_score", "interpolated", "curve")}


__all__ = ["run"]
