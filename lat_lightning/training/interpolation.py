"""Weight interpolation between the original and the hardened model (Gu et al. 2025, Eq. 13).

    θ(λ) = λ · θ_trained + (1 − λ) · θ_original,        λ ∈ [0, 1]  (the paper searches [0, 0.5])

The search scores the utility of θ(λ) on a grid of λ and keeps the **largest** λ whose score is at least
``baseline − tolerance``, where ``baseline`` is the original model's score (θ(0)). A larger λ keeps more
of the safety training; the tolerance bounds the utility it may cost.

Two ways to form θ(λ), both exact at the end points (λ = 0 gives the original tensors, λ = 1 the trained
ones, bit for bit):

* **full fine-tuning**: interpolate every trainable parameter from a copy of its original value
  (:func:`interpolate_state`, :func:`interpolated_params`);
* **LoRA**: the trained weight is ``W + s·B·A`` and the original is ``W``, so θ(λ) = ``W + λ·s·B·A``:
  interpolating the merged weights equals scaling the adapter delta by λ (:func:`scale_lora`), with no
  copy of the model at all.

The ``interpolate`` pipeline stage (:mod:`lat_lightning.stages.interpolate`) uses these: it loads the
original model (``cfg.model``) and the trained one (``run_dir/final``: a LoRA adapter or a full model),
runs the search and writes ``run_dir/interpolated/`` (a merged full model, loadable with
``AutoModelForCausalLM.from_pretrained``, plus the tokenizer) and ``run_dir/interpolation.json``. See
``docs/interpolation.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeGuard, Union, cast

import torch
from torch import Tensor, nn

from lat_lightning.eval.generation import eval_mode as _eval_mode

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

Curve = Union[Mapping[float, float], Iterable[tuple[float, float]]]
ScoreFn = Callable[[nn.Module], float]


# ------------------------------------------------------------------------------------------------ maths
def _check_lambda(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise ValueError(f"interpolation weight lambda must lie in [0, 1], got {lam}")
    return lam


def lerp_tensor(original: Tensor, trained: Tensor, lam: float) -> Tensor:
    """``λ·trained + (1 − λ)·original`` as a new tensor (dtype and device of ``original``).

    Exact at the end points: λ = 0 returns a copy of ``original``, λ = 1 a copy of ``trained``. In
    between it computes in float32 at least (bf16 weights are not blended in bf16). Non-floating tensors
    (integer buffers) must be equal in both states and are returned as they are.
    """
    lam = _check_lambda(lam)
    if original.shape != trained.shape:
        raise ValueError(f"shape mismatch: original {tuple(original.shape)} vs trained {tuple(trained.shape)}")
    trained = trained.to(original.device)
    if not original.is_floating_point():
        if not torch.equal(original, trained.to(original.dtype)):
            raise ValueError("a non-floating tensor differs between the original and the trained state")
        return original.clone()
    if lam == 0.0:
        return original.clone()
    if lam == 1.0:
        return trained.to(original.dtype, copy=True)
    work = torch.promote_types(original.dtype, torch.float32)
    return torch.lerp(original.to(work), trained.to(work), lam).to(original.dtype)


def interpolate_state(original: Mapping[str, Tensor], trained: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
    """θ(λ) for two state dicts with the same keys.

    Args:
        original: name -> tensor of the original model.
        trained: name -> tensor of the trained model (same names and shapes).
        lam: weight of the trained state, in [0, 1].

    Returns:
        A new dict of new tensors; ``lam=0`` gives tensors equal to ``original``, ``lam=1`` equal to
        ``trained`` (``torch.equal``).

    Raises:
        KeyError: the key sets differ (the message names a few).
        ValueError: λ outside [0, 1], or a shape mismatch.
    """
    lam = _check_lambda(lam)
    only_o, only_t = set(original) - set(trained), set(trained) - set(original)
    if only_o or only_t:
        raise KeyError(
            f"state dicts differ: only in original {sorted(only_o)[:5]}, only in trained {sorted(only_t)[:5]}"
        )
    return {k: lerp_tensor(original[k], trained[k], lam) for k in original}


def choose_lambda(curve: Curve, baseline: float, tolerance: float = 0.05) -> float:
    """The largest λ whose score is at least ``baseline − tolerance``.

    A score above the baseline always qualifies (the tolerance bounds a *loss* of utility). NaN scores
    never qualify. When no λ qualifies the answer is 0.0, the original model.

    Args:
        curve: ``{λ: score}`` or ``(λ, score)`` pairs.
        baseline: the original model's score (θ(0)).
        tolerance: the utility loss allowed, ``>= 0``.

    Raises:
        ValueError: NaN baseline or negative tolerance.
    """
    if baseline is None or math.isnan(float(baseline)):
        raise ValueError("the baseline utility score is NaN: no utility row could be scored")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pairs = curve.items() if isinstance(curve, Mapping) else curve
    floor = float(baseline) - tolerance
    ok = [
        float(lam)
        for lam, score in pairs
        if score is not None and not math.isnan(float(score)) and float(score) >= floor
    ]
    return max(ok) if ok else 0.0


# ------------------------------------------------------------------------------------------------ models
def is_peft_model(model: nn.Module) -> TypeGuard[PeftModel]:
    """Whether ``model`` is a peft ``PeftModel`` (checked by duck typing; peft is not imported)."""
    return all(hasattr(model, a) for a in ("peft_config", "disable_adapter", "get_base_model"))


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def scale_lora(model: nn.Module, lam: float) -> Iterator[nn.Module]:
    """Within the context every active LoRA adapter's delta is scaled by ``lam``.

    peft computes ``base(x) + s · B(A(x))``; multiplying the per-layer scaling ``s`` by λ gives the model
    whose merged weights are ``W + λ·s·B·A = λ·(W + s·B·A) + (1 − λ)·W``, i.e. θ(λ). The original
    scalings are restored exactly on exit (also when the body raises); no weight is touched.

    Raises:
        ValueError: the model has no LoRA layers, an adapter is merged into the base weights, or λ is
            outside [0, 1].
        NotImplementedError: DoRA adapters (their weight is not linear in the scale) and
            ``modules_to_save`` (fully trained module copies, not deltas).
    """
    lam = _check_lambda(lam)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("scale_lora: the model has no LoRA layers")
    if any(hasattr(m, "original_module") and hasattr(m, "modules_to_save") for m in model.modules()):
        raise NotImplementedError(
            "scale_lora: peft modules_to_save are fully trained copies, not "
            "adapter deltas; their interpolation is not supported"
        )
    saved = [(m, dict(m.scaling)) for m in layers]
    try:
        for m in layers:
            if getattr(m, "merged_adapters", None):
                raise ValueError("scale_lora: an adapter is merged into the base weights; unmerge it first")
            for name in m.active_adapters:
                if name not in m.scaling:
                    continue
                if getattr(m, "use_dora", {}).get(name, False):
                    raise NotImplementedError("weight interpolation of DoRA adapters is not supported")
                m.scaling[name] = m.scaling[name] * lam
        yield model
    finally:
        for m, scaling in saved:
            m.scaling.clear()
            m.scaling.update(scaling)


@contextlib.contextmanager
def interpolated_params(model: nn.Module, original: Mapping[str, Tensor], lam: float) -> Iterator[nn.Module]:
    """Within the context the parameters named in ``original`` hold θ(λ); the trained values come back
    exactly on exit.

    Args:
        model: the trained model (its current parameters are θ_trained).
        original: parameter name (as in ``model.named_parameters()``) -> original value (any device).
            Parameters not listed are taken to be unchanged by training (frozen).
        lam: weight of the trained parameters.

    Raises:
        KeyError: a name in ``original`` is not a parameter of ``model``.
    """
    lam = _check_lambda(lam)
    params = dict(model.named_parameters())
    missing = [n for n in original if n not in params]
    if missing:
        raise KeyError(f"original weights name parameters the model lacks: {missing[:5]}")
    backup = {n: params[n].detach().to("cpu", copy=True) for n in original}
    try:
        with torch.no_grad():
            for n, orig in original.items():
                p = params[n]
                p.copy_(lerp_tensor(orig.to(p.device), p.detach(), lam))
        yield model
    finally:
        with torch.no_grad():
            for n, value in backup.items():
                params[n].copy_(value.to(params[n].device))


def interpolated(model: nn.Module, lam: float, original: Optional[Mapping[str, Tensor]] = None):
    """θ(λ) as a context: :func:`scale_lora` for a peft model without ``original``, otherwise
    :func:`interpolated_params`."""
    if original is None:
        if not is_peft_model(model):
            raise ValueError("full fine-tuning interpolation needs the original weights (original=...)")
        return scale_lora(model, lam)
    return interpolated_params(model, original, lam)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the trainable parameters (the 'original' of a full fine-tuning run)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain state dict of a peft LoRA model with its adapters merged at their *current* scaling.

    Nothing is merged in place: each LoRA-wrapped weight is returned as a new tensor
    ``W + get_delta_weight()`` and the peft key names are mapped back to the base model's
    (``q_proj.base_layer.weight`` -> ``q_proj.weight``; adapter tensors dropped). Adapted parameters
    (peft ``target_parameters``, e.g. fused expert weights ``experts.gate_up_proj``, whose wrappers nest one
    ``base_layer`` per adapted parameter) are merged the same way. For a non-peft model it is
    ``model.state_dict()``.
    """
    if not is_peft_model(model):
        return dict(model.state_dict())
    base = model.get_base_model()
    merged: dict[str, Tensor] = {}
    lora_ids = {id(m) for m in _lora_layers(model)}
    for name, module in base.named_modules():
        if id(module) not in lora_ids or not hasattr(module, "get_delta_weight"):
            continue
        if getattr(module, "parameter_name", None):  # a wrapped parameter (peft ParamWrapper)
            weight = module.get_param().detach()
            key = f"{_without_base_layers(name)}.{module.parameter_name}"
        else:
            weight = module.get_base_layer().weight.detach()
            key = f"{_without_base_layers(name)}.weight"
        delta = torch.zeros_like(weight)
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
                delta = delta + module.get_delta_weight(adapter).to(weight.dtype)
        merged[key] = weight + delta
    out: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        clean = _without_base_layers(key)
        for adapter in getattr(model, "peft_config", {}):
            clean = clean.replace(f".modules_to_save.{adapter}.", ".")
        out[clean] = merged.get(clean, value)
    return out


def _without_base_layers(name: str) -> str:
    """``a.base_layer.base_layer.b`` -> ``a.b``: the name in the model without peft's wrappers."""
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", name)


def save_merged(model: nn.Module, tokenizer, out_dir: Union[str, Path]) -> Path:
    """Save ``model`` as a plain full model (LoRA merged at its current scaling) plus the tokenizer.

    The directory loads with ``AutoModelForCausalLM.from_pretrained``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        base = cast("PreTrainedModel", model.get_base_model())
        base.save_pretrained(out, state_dict=merged_state_dict(model))
    else:
        cast("PreTrainedModel", model).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def lambda_search(
    model: nn.Module,
    lambdas: Iterable[float],
    score_fn: ScoreFn,
    tolerance: float = 0.05,
    original: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, Any]:
    """Score θ(λ) for every λ of the grid and choose one (the model is left at θ_trained).

    Args:
        model: the trained model (peft LoRA, or full with ``original``).
        lambdas: the grid; λ = 0 is always scored (it is the baseline).
        score_fn: ``model -> float`` (higher is better), run in eval mode under ``torch.no_grad``.
        tolerance: see :func:`choose_lambda`.
        original: the original trainable parameters for full fine-tuning; ``None`` for LoRA.

    Returns:
        ``{"baseline", "curve": [{"lambda", "score"}...], "chosen_lambda", "chosen_score", "tolerance",
        "mode": "lora" | "full"}``.
    """
    grid = sorted({_check_lambda(lam) for lam in lambdas} | {0.0})

    def score(lam: float) -> float:
        with interpolated(model, lam, original), _eval_mode(model), torch.no_grad():
            return float(score_fn(model))

    scores = {lam: score(lam) for lam in grid}
    baseline = scores[0.0]
    chosen = choose_lambda(scores, baseline, tolerance)
    for lam in grid:
        log.info("interpolation lambda=%.3f utility=%.4f", lam, scores[lam])
    log.info("interpolation: chose lambda=%.3f (baseline %.4f, tolerance %.3f)", chosen, baseline, tolerance)
    return {
        "baseline": baseline,
        "curve": [{"lambda": lam, "score": scores[lam]} for lam in grid],
        "chosen_lambda": chosen,
        "chosen_score": scores[chosen],
        "tolerance": float(tolerance),
        "mode": "full" if original is not None else "lora",
    }


def write_result(result: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Write the λ curve as JSON (NaN written as ``null``)."""

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(dict(result)), indent=2))
    return path


def log_curve(writer, result: Mapping[str, Any], step: int = 0) -> None:
    """Log the λ curve to a TensorBoard ``SummaryWriter``.

    ``interpolation/utility`` is plotted against ``round(1000·λ)`` (TensorBoard steps are integers), so
    the x axis reads in thousandths of λ; the chosen λ and the baseline are scalars at ``step``, and a
    markdown table goes to the text tab.
    """
    if writer is None:
        return
    for point in result["curve"]:
        if point["score"] is not None and not math.isnan(point["score"]):
            writer.add_scalar("interpolation/utility", point["score"], global_step=round(1000 * point["lambda"]))
    writer.add_scalar("interpolation/chosen_lambda", result["chosen_lambda"], global_step=step)
    writer.add_scalar("interpolation/baseline_utility", result["baseline"], global_step=step)
    rows = "\n".join(f"| {p['lambda']:.3f} | {p['score']:.4f} |" for p in result["curve"])
    writer.add_text(
        "interpolation/curve",
        f"chosen λ = {result['chosen_lambda']:.3f} (tolerance {result['tolerance']})\n\n"
        f"| λ | utility |\n|---|---|\n{rows}",
        global_step=step,
    )


# ------------------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class UtilityScoreSettings:
    """How the interpolation scores utility (built from the run config by ``stages.fit_setup``).

    Attributes:
        kind: :data:`lat_lightning.eval.utility.UTILITY_KINDS` (``callbacks.weight_interpolation.utility``).
        source: the utility rows' file (``evaluation.utility_data``); ``None`` when rows are given instead.
        use_chat_template / system_prompt: prompt formatting (the ``model`` section's).
        batch_size: rows per forward (``evaluation.batch_size``).
    """

    kind: str = "multiple_choice"
    source: Optional[str] = None
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    batch_size: int = 256


def utility_score_fn(
    settings: UtilityScoreSettings, tokenizer, rows: Optional[Sequence[Mapping[str, Any]]] = None
) -> ScoreFn:
    """``model -> accuracy`` on the utility rows (``rows``, else loaded from ``settings.source``).

    The model organism's benign accuracy is kind ``contains`` on its ``utility_em`` file, which the pipeline sets
    for a recipe that names the ``organism`` kind.

    Raises:
        ConfigError: no rows can be found for the kind, or an unknown kind.
    """
    from lat_lightning.errors import ConfigError
    from lat_lightning.eval.utility import evaluate_utility, load_utility_rows

    kind = settings.kind
    if rows is None:
        if not settings.source:
            raise ConfigError(
                "weight interpolation needs utility rows: set evaluation.utility_data "
                f"(a file of {kind} rows) or disable callbacks.weight_interpolation"
            )
        rows = load_utility_rows(str(settings.source), kind)
    rows = list(rows)

    def score(model: nn.Module) -> float:
        result = evaluate_utility(
            model,
            tokenizer,
            rows,
            kind=kind,
            batch_size=int(settings.batch_size),
            use_chat_template=bool(settings.use_chat_template),
            system_prompt=settings.system_prompt,
        )
        return float(result["accuracy"])

    return score


__all__ = [
    "choose_lambda",
    "interpolate_state",
    "interpolated",
    "interpolated_params",
    "is_peft_model",
    "lambda_search",
    "lerp_tensor",
    "log_curve",
    "merged_state_dict",
    "save_merged",
    "scale_lora",
    "trainable_state",
    "UtilityScoreSettings",
    "utility_score_fn",
    "write_result",
]
