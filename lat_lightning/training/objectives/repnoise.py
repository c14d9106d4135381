"""RepNoise (Rosati et al. 2024, arXiv:2405.14577): make harmful representations look like Gaussian noise.

On the harmful prompt paired with its refusal (``safe``) and with its harmful completion (``harmful``)::

    L   = w_s · CE(refusal) + β · MMD − α · log(1 + H)
    MMD = mean over blocks l of MMD²(m_l(x_harm), N(0, I))
    H   = mean over blocks l of CE(unembed(norm(h_l(x_harm))), y_harm)       (the logit lens)

``m_l`` is block ``l``'s MLP output at the harmful completion's tokens (where the pair differs from the refusal);
the noise has the same shape, drawn afresh each step. MMD² uses the sum of five Gaussian kernels
``exp(−‖x − y‖² / (b · 2^k))``, ``k = −2..2``, with ``b`` the mean pairwise squared distance of the pooled samples
(held constant); the biased estimator ``mean K(X,X) + mean K(Y,Y) − 2 mean K(X,Y)``. ``H`` reads each block's
residual stream through the final norm and the unembedding (the last block: the model's own logits); the log damps
the ascent so it saturates instead of driving the harmful loss to infinity. ``w_s`` is ``loss.toward_safe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lat_lightning.checks import setting, validate
from lat_lightning.losses import causal_lm_loss
from lat_lightning.models.layers import get_decoder_layers
from lat_lightning.training.objectives.base import (
    Objective,
    final_norm,
    output_tensor,
    seq_inputs,
    token_mask,
)

KERNEL_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # b · 2^k, k = -2..2


@dataclass(frozen=True)
class RepNoiseSettings:
    """``loss.repnoise``: noise the harmful representations (docs/defences.md#repnoise)."""

    alpha: float = setting(0.1, check=">= 0")  # weight of the damped logit-lens ascent −log(1 + H)
    beta: float = setting(1.0, check=">= 0")  # weight of the MMD to Gaussian noise
    noise_seed: int = 0  # the noise samples: seed + step

    def __post_init__(self) -> None:
        validate(self)


def mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Biased MMD² between samples ``x`` and ``y`` (``[n, d]`` each), five-kernel Gaussian mixture."""
    pooled = torch.cat([x, y]).float()
    d2 = torch.cdist(pooled, pooled).pow(2)
    n = pooled.shape[0]
    b = (d2.sum() / max(1, n * (n - 1))).detach().clamp(min=1e-12)
    k = torch.stack([torch.exp(-d2 / (b * s)) for s in KERNEL_SCALES]).sum(0)
    m = x.shape[0]
    return k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean()


def mlp_outputs(model: nn.Module, inputs: dict) -> tuple[Tensor, list[Tensor]]:
    """The model's logits and hidden states, and every block's MLP output (hooks on ``<block>.mlp``).

    Raises:
        ValueError: a block without an ``mlp`` submodule.
    """
    blocks = list(get_decoder_layers(model))
    found = [getattr(b, "mlp", None) for b in blocks]
    mlps = [m for m in found if isinstance(m, nn.Module)]
    if len(mlps) != len(blocks):
        raise ValueError(f"RepNoise reads each block's MLP output: {type(blocks[0]).__name__} has no .mlp")
    captured: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(output_tensor(out))) for m in mlps]
    try:
        out = model(output_hidden_states=True, **inputs)
    finally:
        for h in handles:
            h.remove()
    return out, captured


def logit_lens_ce(model: nn.Module, out, labels: Tensor) -> Tensor:
    """H: mean over blocks of the CE of ``labels`` read off each block's residual stream (the last: the logits)."""
    norm = final_norm(model)
    unembed = cast(nn.Module, cast(Any, model).get_output_embeddings())  # a transformers causal LM
    ces = [causal_lm_loss(unembed(norm(h)), labels) for h in out.hidden_states[1:-1]]
    ces.append(causal_lm_loss(out.logits, labels))
    return torch.stack(ces).mean()


class RepNoise(Objective):
    name = "repnoise"

    def losses(self, model: nn.Module, batch: dict, step: int, max_steps: int) -> dict[str, Tensor]:
        s: RepNoiseSettings = self.settings
        safe = model(**seq_inputs(batch, "safe")).logits
        terms = {"toward_safe": self.toward_safe * causal_lm_loss(safe, batch["safe_labels"])}
        out, mlps = mlp_outputs(model, seq_inputs(batch, "harmful"))
        mask = token_mask(batch, "harmful", response_only=True)
        gen = torch.Generator().manual_seed(int(s.noise_seed) + int(step))
        mmds = []
        for m in mlps:
            x = m[mask]
            noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            mmds.append(mmd2(x, noise))
        mmd = torch.stack(mmds).mean()
        h = logit_lens_ce(model, out, batch["harmful_labels"])
        terms["noise_mmd"] = s.beta * mmd
        terms["harmful_ascent"] = -s.alpha * torch.log1p(h)
        self.stats = {"mmd": float(mmd.detach()), "logit_lens_ce": float(h.detach())}
        return terms
