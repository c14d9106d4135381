"""How the fragile-layer selection scores layers: the NLL probe and the gradient norm per layer, top-k with a
tie-break, and the ties at the top-k boundary (:class:`lat_lightning.callbacks.fragile_layers.FragileLayerSelector`
uses them; docs/callbacks.md)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lat_lightning.eval.generation import eval_mode as _eval_mode
from lat_lightning.eval.metrics import TIE_TOLERANCE, rank_layers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def top_k_layers(scores: dict[int, float], k: int, tiebreak: Optional[dict[int, float]] = None) -> list[int]:
    """The ``k`` highest-scoring layers under :data:`~lat_lightning.eval.metrics.TIE_RULE` (ties: higher
    ``tiebreak`` score first, then the lower layer), in ascending order."""
    return sorted(rank_layers(scores, tiebreak)[:k])


def boundary_ties(scores: dict[int, float], chosen: Sequence[int], tol: float = TIE_TOLERANCE) -> list[int]:
    """Layers NOT chosen whose score ties the lowest chosen score: the choice among them was the tie rule's."""
    if not chosen:
        return []
    floor = min(float(scores[l]) for l in chosen)
    return sorted(l for l in scores if l not in set(chosen) and abs(float(scores[l]) - floor) <= tol)


# --------------------------------------------------------------------------------------------- probes
@torch.no_grad()
def nll_probe_scores(
    model: nn.Module,
    batches: Sequence[dict],
    layers: Sequence[int],
    seeds: Sequence[int] = (0,),
    alpha: float = 1.0,
    positions: str = "prompt_last_and_generated",
) -> dict[int, float]:
    """Compact NLL probe: mean rise of the safe response's summed NLL under Eq. 1 noise at each layer.

    The noise for a row is keyed by ``(seed, example index, layer)``, so it does not depend on the batch
    layout. The model runs in eval mode (modes restored afterwards).

    Args:
        model: causal LM.
        batches: safety batches (``safe_*``, ``prompt_lengths``, optionally ``index``).
        layers: candidate layers.
        seeds: noise seeds; scores are averaged over them.
        alpha: noise magnitude multiplier (1 = the paper).
        positions: perturbed positions (default: the last prompt token and every response position).

    Returns:
        ``{layer: mean ΔNLL}`` (nats per prompt; higher = more fragile).
    """
    from lat_lightning.attacks.base import Perturbation, cell_seed
    from lat_lightning.attacks.positions import position_mask
    from lat_lightning.losses import token_logprobs
    from lat_lightning.models.layers import hidden_size

    d = hidden_size(model)
    device = _device(model)
    totals = {int(layer): 0.0 for layer in layers}
    rows = 0
    with _eval_mode(model):
        for batch in batches:
            batch = _to(batch, device)
            ids, attn, labels = batch["safe_input_ids"], batch["safe_attention_mask"], batch["safe_labels"]
            bsz, seq = ids.shape
            index = batch.get("index", torch.arange(bsz, device=device))
            mask = position_mask(positions, batch["prompt_lengths"], seq, attention_mask=attn)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            clean = -token_logprobs(logits, labels)[0].sum(1)
            for layer in totals:
                for seed in seeds:
                    keys = [cell_seed(seed, int(i), layer) for i in index.tolist()]
                    gens = [torch.Generator().manual_seed(k) for k in keys]
                    noise = torch.stack([torch.randn(seq, d, generator=g) for g in gens]).to(device)
                    pert = Perturbation(vectors={layer: noise}, mask=mask, normalise=True, alpha=alpha)
                    with pert.applied(model):
                        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                    nll = -token_logprobs(logits, labels)[0].sum(1)
                    totals[layer] += float((nll - clean).sum()) / len(seeds)
            rows += bsz
    return {layer: total / max(rows, 1) for layer, total in totals.items()}


def grad_norm_scores(model: nn.Module, batches: Sequence[dict], layers: Sequence[int]) -> dict[int, float]:
    """Mean L2 norm (over batches) of ``∇_{h[l]} CE(y* | x)`` per layer (T-Vaccine style).

    A zero tensor that requires grad is added to each layer's output and the gradient is taken with
    ``torch.autograd.grad`` with respect to those zeros only, so no parameter's ``.grad`` changes.
    """
    from lat_lightning.losses import causal_lm_loss
    from lat_lightning.models.hooks import residual_edit

    device = _device(model)
    layers = [int(layer) for layer in layers]
    totals = {layer: 0.0 for layer in layers}
    n = 0
    with _eval_mode(model), torch.enable_grad():
        for batch in batches:
            batch = _to(batch, device)
            probes: dict[int, Tensor] = {}

            def edit(layer: int, hidden: Tensor, probes=probes) -> Tensor:
                probes[layer] = torch.zeros_like(hidden, requires_grad=True)
                return hidden + probes[layer]

            with residual_edit(model, layers, edit):
                logits = model(
                    input_ids=batch["harmful_input_ids"],
                    attention_mask=batch["harmful_attention_mask"],
                    use_cache=False,
                ).logits
            loss = causal_lm_loss(logits, batch["harmful_labels"])
            grads = torch.autograd.grad(loss, [probes[layer] for layer in layers], allow_unused=True)
            for layer, g in zip(layers, grads):
                totals[layer] += float(g.float().norm()) if g is not None else 0.0
            n += 1
    return {layer: total / max(n, 1) for layer, total in totals.items()}


# --------------------------------------------------------------------------------------------- callback


__all__ = ["boundary_ties", "grad_norm_scores", "nll_probe_scores", "top_k_layers"]
