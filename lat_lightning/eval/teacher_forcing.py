"""Teacher-forced passes under a per-row attack, and the unattacked log-probabilities of continuations.

The probes (:mod:`lat_lightning.eval.probes`) and the coherence check (:mod:`lat_lightning.eval.coherence`) score
known tokens instead of generating them; these passes put the same keyed perturbation on the same absolute
positions as generation does (:mod:`lat_lightning.eval.generation`), and share a prompt's prefix cache across its
rows where the attack leaves that prefix alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lat_lightning.attacks.plan import AttackPlan, RowPerturber
from lat_lightning.data.templating import pad_sequences
from lat_lightning.eval.kv_cache import (
    cache_argument,
    can_share_prefix,
    model_device,
    prefix_cache,
    returned_cache,
    supports_logits_to_keep,
)
from lat_lightning.models.eval_mode import eval_mode


@torch.no_grad()
def teacher_forced_logits(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    row_layers: Tensor | Sequence[int],
    attack: AttackPlan,
    *,
    prompt_keys: Tensor | Sequence[int] | None = None,
    row_seeds: Tensor | Sequence[int] | None = None,
    pad_id: int = 0,
) -> Tensor:
    """Logits of right-padded ``sequences`` (prompt + response ids) with each row attacked at its layer.

    Absolute positions are column indices, so the same keyed noise as in generation lands on the same
    tokens (e.g. ``prompt_last_and_generated`` perturbs the last prompt token and every response token).

    Returns:
        ``[B, T, V]`` logits.
    """
    bsz = len(sequences)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    device = model_device(model)
    input_ids = pad_sequences(sequences, pad_id, side="right").to(device)
    attention = pad_sequences([[1] * len(s) for s in sequences], 0, side="right").to(device)
    width = input_ids.shape[1]
    layers_t = torch.as_tensor(row_layers, dtype=torch.long).cpu()
    keys_t = torch.arange(bsz) if prompt_keys is None else torch.as_tensor(prompt_keys, dtype=torch.long).cpu()
    seeds_t = None if row_seeds is None else torch.as_tensor(row_seeds, dtype=torch.long).cpu()
    perturber = RowPerturber(attack, layers_t, torch.as_tensor(list(prompt_lengths), dtype=torch.long), keys_t, seeds_t)
    cols = torch.arange(width)[None, :].expand(bsz, width)
    perturber.positions = torch.where(cols < lengths[:, None], cols, torch.full_like(cols, -1))
    with eval_mode(model), perturber.hooked(model):
        return model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits


class SharedPrefix:
    """One prompt's KV cache up to (not including) its last token, computed once and copied onto any number of
    rows (:meth:`for_rows`): the teacher-forced counterpart of the prefix sharing in generation.

    Args:
        model: causal LM (eval mode).
        prompt_ids: the prompt's token ids (at least two).

    Raises:
        ValueError: for a prompt of fewer than two tokens (nothing to share).
    """

    def __init__(self, model: nn.Module, prompt_ids: Sequence[int]):
        if len(prompt_ids) < 2:
            raise ValueError("a shared prefix needs a prompt of at least two tokens")
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.device = model_device(model)
        kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
        ids = torch.tensor([self.prompt_ids[:-1]], dtype=torch.long, device=self.device)
        with torch.no_grad(), eval_mode(model):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
        self.cache = returned_cache(out)
        if self.cache is None or not hasattr(self.cache, "reorder_cache"):
            raise ValueError(f"{type(model).__name__} returns no KV cache that can be indexed")

    def for_rows(self, n: int):
        """A copy of the cache for ``n`` rows (the prompt's entries repeated)."""
        import copy

        cache = copy.deepcopy(self.cache)
        cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=self.device))
        return cache


@torch.no_grad()
def teacher_forced_suffix_logits(
    model: nn.Module,
    prefix: SharedPrefix,
    continuations: Sequence[Sequence[int]],
    row_layers: Tensor | Sequence[int],
    attack: AttackPlan,
    *,
    prompt_keys: Tensor | Sequence[int] | None = None,
    row_seeds: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """:func:`teacher_forced_logits` of ``prompt + continuation`` for rows that share ``prefix``'s prompt, computed
    from the last prompt token on: the prompt minus its last token comes from the shared cache.

    Valid only when the attack leaves the prompt before its last token alone (:func:`can_share_prefix`).

    Args:
        model: causal LM.
        prefix: the shared prompt (:class:`SharedPrefix`).
        continuations: per row, the tokens after the prompt (all rows the same length).
        row_layers / attack / prompt_keys / row_seeds: as in :func:`teacher_forced_logits`.

    Returns:
        ``[B, 1 + C, V]`` logits of columns ``P - 1, ..., P - 1 + C`` (column 0 predicts the first continuation
        token).

    Raises:
        ValueError: for rows of different lengths, or an attack that perturbs the shared prompt.
    """
    bsz = len(continuations)
    widths = {len(c) for c in continuations}
    if len(widths) > 1:
        raise ValueError(f"continuations of different lengths {sorted(widths)}")
    p_len = len(prefix.prompt_ids)
    layers_t = torch.as_tensor(row_layers, dtype=torch.long).cpu()
    keys_t = torch.arange(bsz) if prompt_keys is None else torch.as_tensor(prompt_keys, dtype=torch.long).cpu()
    seeds_t = None if row_seeds is None else torch.as_tensor(row_seeds, dtype=torch.long).cpu()
    lengths = torch.full((bsz,), p_len, dtype=torch.long)
    perturber = RowPerturber(attack, layers_t, lengths, keys_t, seeds_t)
    if not can_share_prefix(perturber, lengths):
        raise ValueError(
            f"the attack perturbs the prompt before its last token ({attack.positions}); use teacher_forced_logits"
        )
    suffix = torch.tensor([[prefix.prompt_ids[-1]] + [int(t) for t in c] for c in continuations], dtype=torch.long)
    width = suffix.shape[1]
    perturber.positions = (p_len - 1 + torch.arange(width))[None, :].expand(bsz, width)
    device = prefix.device
    attention = torch.ones(bsz, p_len - 1 + width, dtype=torch.long, device=device)
    position_ids = (p_len - 1 + torch.arange(width, device=device))[None, :].expand(bsz, width)
    with eval_mode(model), perturber.hooked(model):
        out = model(
            input_ids=suffix.to(device),
            attention_mask=attention,
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument(model): prefix.for_rows(bsz)},
        )
    return out.logits


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    share_prefix: bool = True,
) -> list[Tensor]:
    """Log-probabilities under the UNATTACKED model of each row's continuation tokens given its prompt.

    With ``share_prefix`` each distinct prompt, minus its last token, runs once (one left-padded forward, the
    prompt-sharing cache of generation); the rows then run only ``[last prompt token] + continuation[:-1]``
    against their prompt's cache, and the vocabulary softmax is taken only at real continuation positions. A
    chat-templated prompt is most of a short answer's tokens, so this is several times cheaper than a forward of
    every ``prompt + continuation``, which is what ``share_prefix=False`` (and a model whose forward returns no
    indexable cache) runs. The two agree to float rounding.

    Args:
        model: causal LM (put in eval mode for the call).
        prompt_ids: per row, the prompt's token ids (at least one).
        continuations: per row, the tokens after the prompt (may be empty).
        pad_id: padding id.
        share_prefix: share the prompts' KV caches (see above).

    Returns:
        Per row, a float32 ``[len(continuation)]`` tensor of ``log p(token | prompt, earlier tokens)`` on the CPU.
    """
    rows = [i for i, c in enumerate(continuations) if len(c)]
    out = [torch.zeros(0) for _ in continuations]
    if not rows:
        return out
    prompts = [[int(t) for t in prompt_ids[i]] for i in rows]
    conts = [[int(t) for t in continuations[i]] for i in rows]
    device = model_device(model)
    width = max(len(c) for c in conts)
    logits = None
    with eval_mode(model):
        if share_prefix and min(len(p) for p in prompts) >= 2:
            kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
            p_max = max(len(p) for p in prompts)
            prefix = prefix_cache(model, prompts, pad_id, device, kwargs, p_max - 1 + width)
            if prefix is not None:
                cache, attention = prefix
                suffix = [[p[-1]] + c[:-1] for p, c in zip(prompts, conts)]
                ids = pad_sequences(suffix, pad_id, side="right").to(device)
                mask = pad_sequences([[1] * len(s) for s in suffix], 0, side="right").to(device)
                lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
                position_ids = (lengths - 1)[:, None] + torch.arange(width, device=device)[None, :]
                logits = model(
                    input_ids=ids,
                    attention_mask=torch.cat([attention, mask.to(attention.dtype)], 1),
                    position_ids=position_ids,
                    use_cache=True,
                    **{cache_argument(model): cache},
                ).logits  # column j predicts continuation token j
                del cache
        if logits is None:  # every prompt + continuation in full, right-padded
            seqs = [p + c for p, c in zip(prompts, conts)]
            ids = pad_sequences(seqs, pad_id, side="right").to(device)
            mask = pad_sequences([[1] * len(s) for s in seqs], 0, side="right").to(device)
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            starts = torch.tensor([len(p) - 1 for p in prompts], device=device)
            cols = starts[:, None] + torch.arange(width, device=device)[None, :]
            cols = cols.clamp(max=full.shape[1] - 1)
            logits = full.gather(1, cols[..., None].expand(-1, -1, full.shape[-1]))
            del full
    for i, logp in zip(rows, gather_logprobs(logits, conts)):
        out[i] = logp
    return out


def gather_logprobs(logits: Tensor, continuations: Sequence[Sequence[int]]) -> list[Tensor]:
    """Per row ``j``, the float32 log-probabilities (on the CPU) of ``continuations[j]`` under ``logits[j]``, whose
    column ``k`` predicts continuation token ``k``."""
    out = []
    for j, c in enumerate(continuations):
        target = torch.tensor(c, dtype=torch.long, device=logits.device)
        row = torch.log_softmax(logits[j, : len(c)].float(), dim=-1)
        out.append(row.gather(-1, target[:, None]).squeeze(-1).cpu())
    return out


__all__ = [
    "SharedPrefix",
    "continuation_logprobs",
    "gather_logprobs",
    "teacher_forced_logits",
    "teacher_forced_suffix_logits",
]
