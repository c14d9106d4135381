"""Batched, left-padded, KV-cached generation with a residual-stream attack that may differ per row.

One call generates for a batch of rows; every row names its own attacked layer (``row_layers``, ``-1`` for
a clean row), so a whole layer sweep of a prompt (and the clean answer) runs as ONE batched generation.
The attack arrives as an :class:`~lat_lightning.attacks.plan.AttackPlan` (an attack's generation face,
:meth:`lat_lightning.attacks.base.Attack.plan`) and is applied by a
:class:`~lat_lightning.attacks.plan.RowPerturber` hooked on the attacked layers. This module owns the
positions bookkeeping of the decode loop: the prefill call sees the whole left-padded prompt,
``[B, P_max, d]`` (column ``c`` of row ``r`` holds absolute position ``c - (P_max - P_r)``, negative =
padding); decode call ``t = 1, 2, ...`` sees the token generated at step ``t - 1``, at absolute position
``P_r - 1 + t``. Positions policies: :mod:`lat_lightning.attacks.positions`.

Rows stop at EOS; finished rows are fed padding and their outputs are discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import cell_seed
from lat_lightning.attacks.plan import ATTACK_KINDS, CLEAN, AttackPlan, RowPerturber
from lat_lightning.attacks.positions import POLICIES, policy_mask
from lat_lightning.data.templating import encode_prompt, pad_sequences
from lat_lightning.eval.clean_states import StateCapture
from lat_lightning.eval.kv_cache import (
    buffer_cache,
    cache_argument,
    can_share_prefix,
    model_device,
    prefix_cache,
    returned_cache,
    supports_logits_to_keep,
)
from lat_lightning.eval.teacher_forcing import (
    SharedPrefix,
    continuation_logprobs,
    teacher_forced_logits,
    teacher_forced_suffix_logits,
)
from lat_lightning.models.eval_mode import eval_mode
from lat_lightning.models.layers import check_layer_indices, hidden_size

SAMPLING_TAG = 7_919  # extra key component separating sampling draws from perturbation draws
GENERATION_POSITIONS = POLICIES


@dataclass
class GenerationResult:
    """Output of :func:`generate_under_attack` (rows in input order).

    Attributes:
        token_ids: new token ids per row (EOS included when generated; no padding).
        texts: decoded new tokens (special tokens skipped).
        new_tokens: ``[B, G]`` the same ids, padded with the pad id.
        lengths: ``[B]`` number of new tokens per row.
        perturbed_positions: ``[B]`` how many positions of each row were perturbed (at its layer).
        prompt_ids: the prompt token ids of each row.
        clean_states: with ``capture_states``, per row ``[len(token_ids), d]``: ``h[l]`` at the row's layer ``l``
            BEFORE the perturbation, at the input of each new token (:class:`~lat_lightning.eval.clean_states.
            StateCapture`); ``None`` for rows without (clean rows, an attack that edits other layers too).
    """

    token_ids: list[list[int]]
    texts: list[str]
    new_tokens: Tensor
    lengths: Tensor
    perturbed_positions: Tensor
    prompt_ids: list[list[int]] = field(default_factory=list)
    clean_states: list[Optional[Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated and how prompts are formatted (the run config's ``evaluation`` decoding keys and
    ``model.use_chat_template`` / ``model.system_prompt``).

    Raises:
        ValueError: a value out of range (the message names the field).
    """

    max_new_tokens: int = 50  # generation budget per answer (50: the reference)
    do_sample: bool = False  # sample instead of greedy decoding (draws keyed per row, step and seed)
    temperature: float = 1.0  # sampling temperature (sampling and best-of-N only)
    top_p: float = 1.0  # nucleus threshold when sampling (1.0 = off)
    best_of_n: int = 1  # > 1: the scan also samples N answers per cell under the same perturbation
    batch_size: Optional[int] = 256  # rows per batched generation (None: every row in one forward)
    share_prefix: bool = True  # compute a prompt's unperturbed prefix cache once and share it across rows
    use_chat_template: bool = True  # format text prompts with the tokenizer's chat template
    system_prompt: Optional[str] = None  # system message of text prompts (chat template only)

    def __post_init__(self):
        if int(self.best_of_n) < 1:
            raise ValueError(f"best_of_n must be >= 1, got {self.best_of_n}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 (or None: every row at once), got {self.batch_size}")


@dataclass(frozen=True)
class RowKeys:
    """What keys each row's random draws, so that a row's noise and samples do not depend on the batch layout.

    Attributes:
        prompt_keys: ``[B]`` integer id of each row's prompt (default: the row index; pass the prompt's dataset
            index so that different batchings draw identical noise).
        row_seeds: ``[B]`` perturbation (and sampling) seed per row (default: the attack's seed).
        sample_ids: ``[B]`` sample index per row, added to the sampling key (best-of-N: rows with the same prompt,
            layer and seed but different sample ids draw different answers under the same perturbation).
    """

    prompt_keys: Optional[Sequence[int]] = None  # noise key of each row's prompt (None: the row index)
    row_seeds: Optional[Sequence[int]] = None  # perturbation / sampling seed per row (None: the attack's seed)
    sample_ids: Optional[Sequence[int]] = None  # best-of-N sample index per row (None: no sample component)

    def select(self, rows: Sequence[int]) -> "RowKeys":
        """The keys of ``rows`` (in that order)."""

        def pick(values):
            return None if values is None else [values[r] for r in rows]

        return RowKeys(pick(self.prompt_keys), pick(self.row_seeds), pick(self.sample_ids))


@dataclass
class _ChunkKeys:
    """A forward batch's keys as CPU tensors (``sample_ids`` may be ``None``)."""

    prompt_keys: Tensor
    row_seeds: Tensor
    sample_ids: Optional[Tensor] = None


def eos_ids(model: nn.Module, tokenizer=None, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """The stop ids: ``eos_token_id`` if given, else the tokenizer's and the generation config's EOS."""
    if eos_token_id is not None:
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    ids: list[int] = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if extra is not None:
        ids.extend([int(extra)] if isinstance(extra, int) else [int(e) for e in extra])
    return sorted(set(ids))


def _pick_next(logits: Tensor, settings: GenerationSettings, row_keys: list[tuple]) -> Tensor:
    """The next token of every row: the argmax, or a draw keyed per row (``row_keys``) when sampling."""
    temperature, top_p = float(settings.temperature), float(settings.top_p)
    if not settings.do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    out = torch.empty(len(row_keys), dtype=torch.long)
    cpu_probs = probs.cpu()
    for r, key in enumerate(row_keys):  # keyed per row: the sample does not depend on the batch layout
        gen = torch.Generator().manual_seed(cell_seed(*key))
        out[r] = torch.multinomial(cpu_probs[r], 1, generator=gen)[0]
    return out.to(logits.device)


@torch.no_grad()
def _generate_chunk(
    model,
    prompt_ids: list[list[int]],
    row_layers: Tensor,
    plan: AttackPlan,
    chunk_keys: _ChunkKeys,
    settings: GenerationSettings,
    stop_ids: list[int],
    pad_id: int,
    capture_states: bool = False,
) -> tuple[Tensor, Tensor, Tensor, list[Optional[Tensor]]]:
    """One forward batch of :func:`generate_under_attack`: ``(new tokens [B, G], lengths [B], perturbed positions
    [B], clean states per row)``."""
    prompt_keys, row_seeds, sample_ids = chunk_keys.prompt_keys, chunk_keys.row_seeds, chunk_keys.sample_ids
    max_new_tokens, share_prefix = int(settings.max_new_tokens), settings.share_prefix
    device = model_device(model)
    bsz = len(prompt_ids)
    lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lengths.max())
    perturber = RowPerturber(plan, row_layers, lengths, prompt_keys, row_seeds)
    new = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long)
    n_new = torch.zeros(bsz, dtype=torch.long)
    finished = torch.zeros(bsz, dtype=torch.bool)
    stop = torch.tensor(stop_ids, dtype=torch.long) if stop_ids else None
    kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    cache_kw = cache_argument(model)
    layer_key = [int(l) for l in row_layers.tolist()]
    capacity = width + max_new_tokens
    prefix = (
        prefix_cache(model, prompt_ids, pad_id, device, kwargs, capacity)
        if share_prefix and can_share_prefix(perturber, lengths)
        else None
    )
    capture = StateCapture(perturber, max_new_tokens) if capture_states and StateCapture.applies(perturber) else None
    with capture.hooked(model) if capture is not None else nullcontext(), perturber.hooked(model):
        if prefix is None:  # the whole left-padded prompt in one prefill
            input_ids = pad_sequences(prompt_ids, pad_id, side="left").to(device)
            attention = pad_sequences([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
            position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
            perturber.positions = torch.arange(width)[None, :] - (width - lengths)[:, None]  # negative on padding
            out = model(
                input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True, **kwargs
            )
            if share_prefix and returned_cache(out) is not None and hasattr(returned_cache(out), "reorder_cache"):
                buffer_cache(returned_cache(out), None, capacity)  # nothing to share, still no copy per step
        else:  # the shared prefix is cached: step 0 feeds each row's last prompt token (position P - 1)
            cache, attention = prefix
            attention = torch.cat([attention, torch.ones(bsz, 1, dtype=attention.dtype, device=device)], dim=1)
            position_ids = (lengths - 1)[:, None].to(device)
            perturber.positions = (lengths - 1)[:, None]
            last = torch.tensor([[p[-1]] for p in prompt_ids], dtype=torch.long, device=device)
            out = model(
                input_ids=last,
                attention_mask=attention,
                position_ids=position_ids,
                use_cache=True,
                **kwargs,
                **{cache_kw: cache},
            )
        past = returned_cache(out)
        for t in range(max_new_tokens):
            keys: list[tuple[int, ...]] = (
                [(int(row_seeds[r]), int(prompt_keys[r]), layer_key[r], t, SAMPLING_TAG) for r in range(bsz)]
                if settings.do_sample
                else []
            )
            if sample_ids is not None and keys:  # best-of-N: the n-th sample of a cell draws its own tokens
                keys = [k + (int(sample_ids[r]),) for r, k in enumerate(keys)]
            nxt = _pick_next(out.logits[:, -1], settings, keys).cpu()
            del out
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            active = ~finished
            new[active, t] = nxt[active]
            n_new += active.long()
            if stop is not None:
                finished |= active & torch.isin(nxt, stop)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            # Decode step t+1 sees the token generated at step t, at absolute position P - 1 + (t + 1).
            perturber.positions = (lengths - 1 + t + 1)[:, None]
            attention = torch.cat([attention, torch.ones(bsz, 1, dtype=attention.dtype, device=device)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None].to(device),
                attention_mask=attention,
                position_ids=position_ids,
                use_cache=True,
                **{cache_kw: past},
            )
            past = returned_cache(out)
    states: list[Optional[Tensor]] = capture.row_states(n_new.tolist()) if capture is not None else [None] * bsz
    return new[:, : int(n_new.max()) if bsz else 0], n_new, perturber.applied, states


def encode_prompts(
    tokenizer, prompts: Sequence[str | Sequence[int]], use_chat_template: bool = True, system_prompt: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt: strings go through the chat template (or plain text), id lists pass."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode_prompt(tokenizer, p, use_chat_template, system_prompt))
        else:
            out.append([int(t) for t in p])
    return out


def generate_under_attack(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    row_layers: Tensor | Sequence[int] | None = None,
    attack: AttackPlan | None = None,
    *,
    rows: RowKeys | None = None,
    settings: GenerationSettings | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    capture_states: bool = False,
) -> GenerationResult:
    """Generate for a batch of rows, each attacked at its own layer (or clean).

    With ``settings.share_prefix`` each distinct prompt's KV cache up to its first perturbed position is computed
    once per forward batch and indexed onto all of that prompt's rows (layers, seeds), instead of running the whole
    prompt for every row. Only when the attack leaves everything before the last prompt token alone
    (``prompt_last_and_generated``, ``first_k``, PGD masks from the last prompt token); ``all`` and ``prompt`` run
    the unshared prefill. The tokens are the same either way (tested); ``False`` is the escape hatch and the
    reference for that comparison.

    Args:
        model: causal LM (put in eval mode for the call).
        tokenizer: its tokenizer (for prompt encoding, pad / EOS ids and decoding).
        prompts: one prompt per row: raw text (chat template applied) or token ids.
        row_layers: ``[B]`` attacked layer per row; ``-1`` = clean row; ``None`` = all clean.
        attack: the attack (``None`` = clean generation).
        rows: what keys each row's draws (:class:`RowKeys`; default: the row index, the attack's seed).
        settings: decoding, rows per forward (``batch_size``; results do not depend on it), prompt formatting and
            prefix sharing (default: :class:`GenerationSettings`'s defaults).
        eos_token_id: stop id(s) (default: tokenizer and generation-config EOS).
        pad_token_id: id fed to finished rows and used for padding (default: the tokenizer's pad, else EOS).
        capture_states: also return each attacked row's clean ``h[l]`` per new token (``clean_states``), from which
            the coherence check's clean pass starts (:mod:`lat_lightning.eval.clean_states`).

    Returns:
        A :class:`GenerationResult` with the new tokens only.
    """
    rows = rows if rows is not None else RowKeys()
    settings = settings if settings is not None else GenerationSettings()
    ids = encode_prompts(tokenizer, prompts, settings.use_chat_template, settings.system_prompt)
    bsz = len(ids)
    attack = attack or AttackPlan()
    layers_t = (
        torch.full((bsz,), CLEAN, dtype=torch.long)
        if row_layers is None
        else torch.as_tensor(row_layers, dtype=torch.long).cpu()
    )
    if len(layers_t) != bsz:
        raise ValueError(f"row_layers has {len(layers_t)} entries for {bsz} prompts")
    used = sorted({int(l) for l in layers_t.tolist() if l != CLEAN})
    check_layer_indices(model, used)
    if attack.kind != "none" and used:
        d = hidden_size(model)
        for v in attack.vectors or []:
            if v is not None and v.shape[-1] != d:
                raise ValueError(f"attack vectors have width {v.shape[-1]}, the model's hidden size is {d}")
    keys = _ChunkKeys(
        torch.arange(bsz) if rows.prompt_keys is None else torch.as_tensor(rows.prompt_keys, dtype=torch.long).cpu(),
        (
            torch.full((bsz,), int(attack.seed), dtype=torch.long)
            if rows.row_seeds is None
            else torch.as_tensor(rows.row_seeds, dtype=torch.long).cpu()
        ),
        None if rows.sample_ids is None else torch.as_tensor(rows.sample_ids, dtype=torch.long).cpu(),
    )
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad_token_id if pad_token_id is not None else 0)
    stop_ids = eos_ids(model, tokenizer, eos_token_id)
    if keys.sample_ids is not None and len(keys.sample_ids) != bsz:
        raise ValueError(f"sample_ids has {len(keys.sample_ids)} entries for {bsz} prompts")
    step = bsz if not settings.batch_size else max(1, int(settings.batch_size))
    token_ids: list[list[int]] = [[] for _ in range(bsz)]
    applied = torch.zeros(bsz, dtype=torch.long)
    clean_states: list[Optional[Tensor]] = [None] * bsz
    with eval_mode(model):
        for start in range(0, bsz, step):
            part = list(range(start, min(start + step, bsz)))
            part_keys = _ChunkKeys(
                keys.prompt_keys[part], keys.row_seeds[part], None if keys.sample_ids is None else keys.sample_ids[part]
            )
            new, n_new, app, states = _generate_chunk(
                model,
                [ids[r] for r in part],
                layers_t[part],
                attack.select(part),
                part_keys,
                settings,
                stop_ids,
                pad_id,
                capture_states,
            )
            for j, r in enumerate(part):
                token_ids[r] = new[j, : int(n_new[j])].tolist()
                clean_states[r] = states[j]
            applied[part] = app
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    width = int(lengths.max()) if bsz else 0
    padded = torch.full((bsz, width), pad_id, dtype=torch.long)
    for r, t in enumerate(token_ids):
        if t:
            padded[r, : len(t)] = torch.tensor(t)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    return GenerationResult(token_ids, texts, padded, lengths, applied, ids, clean_states)


__all__ = [
    "ATTACK_KINDS",
    "CLEAN",
    "GENERATION_POSITIONS",
    "AttackPlan",
    "GenerationResult",
    "GenerationSettings",
    "RowKeys",
    "RowPerturber",
    "SharedPrefix",
    "can_share_prefix",
    "cache_argument",
    "continuation_logprobs",
    "encode_prompts",
    "eos_ids",
    "eval_mode",
    "generate_under_attack",
    "policy_mask",
    "returned_cache",
    "teacher_forced_logits",
    "teacher_forced_suffix_logits",
]
