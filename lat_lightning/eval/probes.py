"""NLL probe and position KL: how far an ASA perturbation pushes the model off its own clean answer.

Both are teacher-forced on the model's own clean (greedy) response ``y`` to a harmful prompt ``x``:

* **NLL probe** (REFERENCE.md, Metrics): ``NLL = −Σ_t log p(y_t | x, y_<t)`` with the perturbation at layer
  ``l`` vs without; ``ΔNLL = NLL_perturbed − NLL_clean`` per prompt, layer and seed. A rise means the
  perturbation pushes away from the safe answer. :func:`nll_probe_layers` ranks layers by mean ΔNLL (the
  fragile-layer selector uses it: no generation under attack needed).
* **Position KL**: ``KL(p_clean,t ‖ p_perturbed,t)`` at every response position ``t`` (the distribution
  that predicts ``y_t``), with the perturbation at every position from the last prompt token on. The paper
  reports that it grows with ``t``.

The noise is the scan's keyed noise (:func:`lat_lightning.attacks.base.keyed_normal`, keyed by
``(seed, prompt, layer, position)``, Eq. 1-normalised), applied through the same per-row-layer edit as
generation, so a probe row sees exactly the noise its generation-time counterpart saw on the same tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lat_lightning.attacks.positions import first_position
from lat_lightning.attacks.settings import Layer
from lat_lightning.data.templating import IGNORE_INDEX, build_sequences, encode_prompt, encode_response
from lat_lightning.eval.generation import CLEAN, AttackPlan, GenerationSettings, encode_prompts, generate_under_attack
from lat_lightning.eval.teacher_forcing import SharedPrefix, teacher_forced_logits, teacher_forced_suffix_logits
from lat_lightning.eval.token_metrics import nll_sequence, position_kl
from lat_lightning.losses import causal_lm_loss
from lat_lightning.models.layers import check_layer_indices, input_device, num_layers


@dataclass(frozen=True)
class ProbeSettings:
    """The ASA noise of a probe and how its teacher-forced rows are batched.

    Raises:
        ValueError: a value out of range (the message names the field).
    """

    alpha: float = 1.0  # noise magnitude after Eq. 1 (AttackSettings.alpha)
    positions: str = "prompt_last_and_generated"  # positions policy of the noise (lat_lightning.attacks.positions)
    first_k: int = 1  # k of the first_k policy
    refresh: str = "step"  # a new draw per step/position, or one fixed draw
    batch_size: int = 16  # teacher-forced rows per forward
    with_kl: bool = True  # also the position KL (needs the clean logits of the prompt)
    share_prefix: bool = True  # share a prompt's prefix cache across its rows (same values)

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ProbeResult:
    """Per-prompt probe values.

    Attributes:
        layers / seeds: the probed layers and noise seeds.
        nll_clean: ``[N]`` NLL of the clean response without perturbation (NaN for an empty response).
        nll_perturbed: ``[N, L, S]``.
        kl: ``[N, L, S, G]`` position KL (NaN past a response's length); ``G`` = longest response.
        response_lengths: ``[N]``.
        positions: the perturbation positions policy used.
    """

    layers: list[int]
    seeds: list[int]
    nll_clean: np.ndarray
    nll_perturbed: np.ndarray
    kl: np.ndarray
    response_lengths: np.ndarray
    positions: str

    @property
    def delta_nll(self) -> np.ndarray:
        """``[N, L, S]`` ``NLL_perturbed − NLL_clean``."""
        return self.nll_perturbed - self.nll_clean[:, None, None]

    def delta_by_layer(self) -> dict[int, float | None]:
        """Mean ΔNLL over prompts and seeds, per layer (``None`` where no value is finite)."""
        d = self.delta_nll
        return {l: _nanmean(d[:, j, :]) for j, l in enumerate(self.layers)}

    def kl_curves(self) -> dict[int, list[float | None]]:
        """Mean position KL over prompts and seeds per layer: ``{layer: [KL_t for t in 0..G-1]}``."""
        out = {}
        for j, l in enumerate(self.layers):
            sl = self.kl[:, j, :, :].reshape(-1, self.kl.shape[-1]) if self.kl.size else np.zeros((0, 0))
            out[l] = [_nanmean(sl[:, t]) for t in range(sl.shape[1])]
        return out

    def summary(self) -> dict:
        """JSON-ready summary: per-layer ΔNLL (mean, std over prompt x seed), clean NLL, KL curves."""
        d = self.delta_nll
        per_layer = {}
        for j, l in enumerate(self.layers):
            vals = d[:, j, :].ravel()
            vals = vals[np.isfinite(vals)]
            per_layer[str(l)] = {
                "delta_nll_mean": float(vals.mean()) if vals.size else None,
                "delta_nll_std": float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else None),
                "nll_perturbed_mean": _nanmean(self.nll_perturbed[:, j, :]),
                "frac_prompts_raised": float((np.nanmean(d[:, j, :], axis=1) > 0).mean()) if len(d) else None,
            }

        def mean_delta(layer: str) -> float:
            mean = per_layer[layer]["delta_nll_mean"]
            return mean if mean is not None else -math.inf

        peak = max(per_layer, key=mean_delta) if per_layer else None
        return {
            "positions": self.positions,
            "layers": self.layers,
            "seeds": self.seeds,
            "n_prompts": len(self.nll_clean),
            "nll_clean_mean": _nanmean(self.nll_clean),
            "mean_response_tokens": float(self.response_lengths.mean()) if len(self.response_lengths) else None,
            "nll": per_layer,
            "peak_delta_nll_layer": int(peak) if peak is not None else None,
            "position_kl": {str(l): curve for l, curve in self.kl_curves().items()},
        }


def _nanmean(x) -> float | None:
    arr = np.asarray(x, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else None


def response_probe(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    layers: Sequence[Layer],
    seeds: Sequence[int] = (0,),
    *,
    settings: ProbeSettings = ProbeSettings(),
    prompt_keys: Sequence[int] | None = None,
    pad_id: int = 0,
) -> ProbeResult:
    """NLL and position KL of each prompt's response under keyed ASA noise at each layer and seed.

    Rows of one prompt (its clean row first, then every (layer, seed)) share one sequence, so a chunk of
    ``batch_size`` of them needs no padding. Only the logits of response positions are kept. With
    ``share_prefix`` (and a positions policy that leaves the prompt before its last token alone) the prompt
    minus its last token runs once per prompt and every row starts from its cache
    (:func:`~lat_lightning.eval.generation.teacher_forced_suffix_logits`): the rows compute only the response
    positions, and only their logits exist.

    Args:
        model: causal LM.
        prompt_ids: prompt token ids (chat template applied) per prompt.
        response_ids: the response to teacher-force per prompt (typically the clean greedy generation,
            EOS included when it was generated).
        layers / seeds: where (block indices, ``embed`` or ``all``) and with which noise seeds to perturb.
        settings: the ASA noise (``alpha``, ``positions``, ``first_k``, ``refresh``; see :class:`AttackPlan`), rows
            per forward, whether to compute the position KL and whether to share each prompt's prefix cache across
            its rows (same values up to float rounding; ``False`` runs every row's whole sequence).
        prompt_keys: the prompts' ids for keying the noise (default ``0..N-1``).
        pad_id: padding id (unused positions only).
    """
    positions, first_k, with_kl = settings.positions, settings.first_k, settings.with_kl
    layer_ids = check_layer_indices(model, list(layers))
    seeds = [int(s) for s in seeds]
    n, n_l, n_s = len(prompt_ids), len(layer_ids), len(seeds)
    keys = list(range(n)) if prompt_keys is None else [int(k) for k in prompt_keys]
    g_max = max((len(r) for r in response_ids), default=0)
    nll_clean = np.full(n, np.nan)
    nll_pert = np.full((n, n_l, n_s), np.nan)
    kl = np.full((n, n_l, n_s, g_max), np.nan) if with_kl else np.zeros((n, n_l, n_s, 0))
    plan = AttackPlan(
        kind="noise", positions=positions, first_k=first_k, refresh=settings.refresh, alpha=settings.alpha
    )
    cells = [(j, k) for j in range(n_l) for k in range(n_s)]
    step = max(1, int(settings.batch_size))
    for i in range(n):
        prompt, resp = list(prompt_ids[i]), list(response_ids[i])
        g = len(resp)
        if g == 0:
            continue
        seq = prompt + resp
        p_len = len(prompt)
        labels = torch.full((1, len(seq)), IGNORE_INDEX, dtype=torch.long)
        labels[0, p_len:] = torch.tensor(resp)
        sl = slice(p_len - 1, p_len - 1 + g)  # logits predicting response tokens 0..g-1
        rows: list[tuple[int, int] | None] = [None] + cells
        clean_logits = None
        shared = (
            SharedPrefix(model, prompt)
            if settings.share_prefix and p_len >= 2 and first_position(positions, p_len, first_k) >= p_len - 1
            else None
        )
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            row_layers = [CLEAN if c is None else layer_ids[c[0]] for c in chunk]
            row_seeds = [0 if c is None else seeds[c[1]] for c in chunk]
            if shared is not None:  # columns P-1 .. P+g-2 only: exactly the ones predicting the response
                resp_logits = teacher_forced_suffix_logits(
                    model,
                    shared,
                    [resp[:-1]] * len(chunk),
                    row_layers,
                    plan,
                    prompt_keys=[keys[i]] * len(chunk),
                    row_seeds=row_seeds,
                ).float()
                logits = resp_logits
                nll = (
                    torch.nn.functional.cross_entropy(
                        resp_logits.reshape(-1, resp_logits.shape[-1]),
                        torch.tensor(resp, device=resp_logits.device).repeat(len(chunk)),
                        reduction="none",
                    )
                    .view(len(chunk), g)
                    .sum(1)
                    .cpu()
                    .numpy()
                )
            else:
                logits = teacher_forced_logits(
                    model,
                    [seq] * len(chunk),
                    [p_len] * len(chunk),
                    row_layers,
                    plan,
                    prompt_keys=[keys[i]] * len(chunk),
                    row_seeds=row_seeds,
                    pad_id=pad_id,
                )
                nll = nll_sequence(logits, labels.to(logits.device).expand(len(chunk), -1)).cpu().numpy()
                resp_logits = logits[:, sl].float()
            for r, c in enumerate(chunk):
                if c is None:
                    nll_clean[i] = nll[r]
                    clean_logits = resp_logits[r : r + 1]
                else:
                    nll_pert[i, c[0], c[1]] = nll[r]
            if with_kl:
                pert_cells = [(r, c) for r, c in enumerate(chunk) if c is not None]
                if pert_cells:
                    assert clean_logits is not None  # the clean row is the first of the first chunk
                    pert_rows = [r for r, _ in pert_cells]
                    pl = resp_logits[pert_rows]
                    kl_rows = position_kl(clean_logits.expand(len(pert_rows), -1, -1), pl).cpu().numpy()
                    for kr, (_, (j, k)) in enumerate(pert_cells):
                        kl[i, j, k, :g] = kl_rows[kr]
            del logits, resp_logits
    lengths = np.array([len(r) for r in response_ids], dtype=np.int64)
    return ProbeResult(layer_ids, seeds, nll_clean, nll_pert, kl, lengths, positions)


def nll_probe_layers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    layers: Sequence[Layer] | None = None,
    seeds: Sequence[int] = (0,),
    *,
    generation: GenerationSettings = GenerationSettings(max_new_tokens=32, batch_size=16),
    probe: ProbeSettings = ProbeSettings(),
    prompt_keys: Sequence[int] | None = None,
    return_result: bool = False,
):
    """Rank layers by how much ASA noise raises the NLL of the model's own clean answer.

    Generates each prompt's clean greedy answer once (``generation.max_new_tokens``, ``generation.batch_size`` rows
    per forward; always greedy), then runs :func:`response_probe` without the KL part.

    Args:
        model / tokenizer: the model under test.
        prompts: harmful prompts (text, or token ids).
        layers: layers to probe (block indices, ``embed`` or ``all``; default: every block).
        seeds: noise seeds (results are averaged over them).
        generation: the clean answers' length (``max_new_tokens``), rows per forward (``batch_size``) and prompt
            formatting of text prompts (``use_chat_template``, ``system_prompt``); its decoding keys are not used.
        probe: the ASA noise and rows per teacher-forced forward (its ``with_kl`` is not used).
        prompt_keys: ids keying the noise (default ``0..N-1``).
        return_result: also return the :class:`ProbeResult`.

    Returns:
        ``{layer: mean ΔNLL}`` (higher = more fragile), or ``(that, ProbeResult)``.
    """
    layers = list(range(num_layers(model))) if layers is None else list(layers)
    ids = encode_prompts(tokenizer, prompts, generation.use_chat_template, generation.system_prompt)
    greedy = GenerationSettings(max_new_tokens=generation.max_new_tokens, batch_size=generation.batch_size)
    clean = generate_under_attack(model, tokenizer, ids, settings=greedy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = response_probe(
        model,
        ids,
        clean.token_ids,
        layers,
        seeds,
        settings=dataclasses.replace(probe, with_kl=False),
        prompt_keys=prompt_keys,
        pad_id=pad,
    )
    ranking = result.delta_by_layer()
    return (ranking, result) if return_result else ranking


@torch.no_grad()
@torch.no_grad()  # a measurement, also taken inside fine-tunes (whose adapters require grad): no graph
def response_loss(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    batch_size: int = 16,
) -> float:
    """Mean token CE of each pair's response given its prompt (teacher-forced; prompt tokens masked)."""
    if not pairs:
        return float("nan")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = input_device(model)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [encode_prompt(tokenizer, p, use_chat_template, system_prompt) for p, _ in chunk]
            responses = [encode_response(tokenizer, r) for _, r in chunk]
            b = build_sequences(prompts, responses, int(pad))
            logits = model(
                input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
            ).logits
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(causal_lm_loss(logits, b["labels"].to(device))) * n
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


__all__ = ["ProbeResult", "ProbeSettings", "nll_probe_layers", "response_loss", "response_probe"]
