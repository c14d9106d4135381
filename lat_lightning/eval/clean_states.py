"""The clean model's log-probabilities of an attacked answer, computed from the attacked layer up.

The coherence check scores every attacked answer by the UNATTACKED model's NLL of its tokens
(:mod:`lat_lightning.eval.coherence`): a teacher-forced clean forward of ``prompt + answer``. An attack at layer
``l`` edits the residual stream after block ``l`` (``h[l]``) and nothing below it, so blocks ``0..l`` of the
attacked generation saw exactly the tokens and computed exactly the states a clean forward of the same tokens
computes. The generation therefore records ``h[l]`` before the edit at the last column of every call
(:class:`StateCapture`: the last prompt token, then each fed-back answer token), and the clean pass runs only
blocks ``l + 1 ..`` on those states (:func:`~lat_lightning.models.forward_from_layer.skip_layers_below`), on top of
the clean KV cache of the prompt minus its last token (:class:`PromptPrefixes`, computed once per distinct prompt and
shared by every layer's rows). The last block's outputs of every layer's rows then go through the model's final
norm and LM head together (:func:`logprobs_from_last_block`). For a 30-layer model scanned over every layer that
skips about half of the blocks of the check's forward; the LM head and the softmax still run for every answer
token.

**Not bit for bit.** The captured states come from decode calls of one token against a KV cache; the full pass
computes the same states for all answer tokens in one call: the same arithmetic in a different order, so the NLLs
agree to float rounding (``tests/eval/test_clean_states.py`` checks ≤ 1e-4 nats per token in float32 on several
families; the coherence threshold is 3.0 nats per token). Where no state is captured the full pass runs:
clean rows, the ``ablation`` attack (it edits every layer, so nothing below the row's layer is clean), the input
embeddings (nothing below them to skip), answers longer than the calls captured.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lat_lightning.attacks.plan import RowPerturber
from lat_lightning.data.templating import pad_sequences
from lat_lightning.eval.kv_cache import (
    buffer_cache,
    cache_argument,
    distinct_prefixes,
    model_device,
    supports_logits_to_keep,
)
from lat_lightning.eval.teacher_forcing import gather_logprobs
from lat_lightning.models.eval_mode import eval_mode
from lat_lightning.models.forward_from_layer import forward_from_layer, skip_layers_below
from lat_lightning.models.hooks import split_layer_output
from lat_lightning.models.layers import get_decoder_layers

# Plan kinds that edit a row at its own layer only (``ablation`` edits every layer, the input embeddings included).
CLEAN_BELOW_KINDS = ("noise", "direction", "additive", "vector")


class StateCapture:
    """Records each attacked row's ``h[l]`` at its own layer ``l`` BEFORE the perturbation, at the last column of
    every forward call of a generation under ``perturber`` (call ``t`` feeds the input of new token ``t``).

    Args:
        perturber: the generation's perturber (its ``positions`` say which step each call is).
        steps: the most calls to record (``max_new_tokens``).
    """

    def __init__(self, perturber: RowPerturber, steps: int):
        self.perturber = perturber
        self.steps = int(steps)
        self.states: Tensor | None = None  # [B, steps, d], allocated at the first call
        self.layers = sorted(l for l in perturber.rows_at if l >= 0)

    @staticmethod
    def applies(perturber: RowPerturber) -> bool:
        """Whether the plan leaves every block below a row's layer clean and some row is attacked at a block."""
        return perturber.plan.kind in CLEAN_BELOW_KINDS and any(l >= 0 for l in perturber.rows_at)

    def _record(self, layer: int, hidden: Tensor) -> None:
        p = self.perturber
        if p.positions is None:
            return
        rows = p.rows_at[layer]
        step = p.positions[rows, -1] - (p.prompt_lengths[rows] - 1)  # call t holds absolute position P - 1 + t
        ok = (step >= 0) & (step < self.steps)
        if not bool(ok.any()):
            return
        if self.states is None:
            shape = (len(p.row_layers), self.steps, hidden.shape[-1])
            self.states = torch.zeros(shape, dtype=hidden.dtype, device=hidden.device)
        rows, step = rows[ok].to(hidden.device), step[ok].to(hidden.device)
        self.states[rows, step] = hidden[rows, -1].detach()

    @contextmanager
    def hooked(self, model: nn.Module) -> Iterator[StateCapture]:
        """Forward hooks on the rows' layers, put first so they see the output before the perturber edits it."""
        blocks = get_decoder_layers(model)
        handles = []
        try:
            for layer in self.layers:

                def hook(_module, _args, output, _layer=layer):
                    self._record(_layer, split_layer_output(output)[0])

                handles.append(blocks[layer].register_forward_hook(hook, prepend=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def row_states(self, n_new: Sequence[int]) -> list[Tensor | None]:
        """Per row, ``[n_new, d]`` states at its layer (``None``: a clean row, or one at the input embeddings)."""
        layers = self.perturber.row_layers.tolist()
        if self.states is None:
            return [None] * len(layers)
        return [self.states[r, : int(n)] if layers[r] >= 0 and int(n) else None for r, n in enumerate(n_new)]


class PromptPrefixes:
    """The clean KV cache of each distinct prompt minus its last token, computed once (one left-padded forward,
    :func:`~lat_lightning.eval.kv_cache.distinct_prefixes`: within a scan, the one its generation ran) and indexed
    onto any rows (:meth:`for_rows`), so every layer's rows of a call share one prefix forward.

    Args:
        model: causal LM (eval mode).
        prompts: the distinct prompts (at least two tokens each).
        pad_id: padding id.
    """

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int):
        self.device = model_device(model)
        kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
        distinct = [tuple(int(t) for t in p) for p in prompts]
        self.index, self.cache, self.attention = distinct_prefixes(model, distinct, pad_id, self.device, kwargs)

    def for_rows(self, prompts: Sequence[Sequence[int]], capacity: int):
        """``(cache, attention)`` for rows with these prompts: a copy of the cache indexed onto the rows, with
        room for ``capacity`` positions, and the rows' ``[B, P_max - 1]`` mask."""
        rows = torch.tensor([self.index[tuple(int(t) for t in p)] for p in prompts], dtype=torch.long)
        cache = copy.deepcopy(self.cache)
        buffer_cache(cache, rows.to(self.device), capacity)
        return cache, self.attention[rows.to(self.device)]


@torch.no_grad()
def last_block_from_layer(
    model: nn.Module,
    prefixes: PromptPrefixes,
    prompt_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    states: Sequence[Tensor],
    layer: int,
    pad_id: int = 0,
) -> Tensor:
    """The clean output of the last block, ``[B, width, d]`` (right-padded), for each row's
    ``[last prompt token] + continuation[:-1]``, with blocks ``0..layer`` taken from ``states`` (row ``j``: ``h[layer]``
    at positions ``P - 1 .. P - 2 + len(continuation)``) instead of computed.

    The LM head is left to :func:`logprobs_from_last_block`, once for the rows of every layer: a forward per layer
    holds few rows, and an LM head over few rows reads the whole vocabulary matrix for little work (on a CPU such
    small products of SmolLM2's 49k x 576 head ran at ~0.6x the rate of one large one).
    """
    device = prefixes.device
    blocks = get_decoder_layers(model)
    prompts = [[int(t) for t in p] for p in prompt_ids]
    conts = [[int(t) for t in c] for c in continuations]
    width = max(len(c) for c in conts)
    hidden = states[0].new_zeros((len(conts), width, states[0].shape[-1]))
    for j, (c, s) in enumerate(zip(conts, states)):
        hidden[j, : len(c)] = s[: len(c)].to(hidden.device)
    if layer == len(blocks) - 1:
        return hidden
    cache, attention = prefixes.for_rows(prompts, int(prefixes.attention.shape[1]) + width)
    suffix = [[p[-1]] + c[:-1] for p, c in zip(prompts, conts)]
    ids = pad_sequences(suffix, pad_id, side="right").to(device)
    mask = pad_sequences([[1] * len(s) for s in suffix], 0, side="right").to(device)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    position_ids = (lengths - 1)[:, None] + torch.arange(width, device=device)[None, :]
    last: list[Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(split_layer_output(out)[0]))
    kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    try:
        with eval_mode(model), skip_layers_below(model, hidden.to(device), layer):
            model(
                input_ids=ids,
                attention_mask=torch.cat([attention, mask.to(attention.dtype)], 1),
                position_ids=position_ids,
                use_cache=True,
                **kwargs,
                **{cache_argument(model): cache},
            )
    finally:
        handle.remove()
    return last[-1]


@torch.no_grad()
def logprobs_from_last_block(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    hidden: Sequence[Tensor],
    pad_id: int = 0,
) -> list[Tensor]:
    """Log-probabilities of each row's (non-empty) continuation from the last block's output (row ``j``:
    ``[len(continuation), d]``): the model's own final norm, LM head and any logit post-processing (Gemma-2's
    soft-capping) run on them, every block stood in for
    (:func:`~lat_lightning.models.forward_from_layer.forward_from_layer`).

    Returns:
        Per row, a float32 ``[len(continuation)]`` tensor of ``log p(token | prompt, earlier tokens)`` on the CPU.
    """
    device = model_device(model)
    prompts = [[int(t) for t in p] for p in prompt_ids]
    conts = [[int(t) for t in c] for c in continuations]
    width = max(len(c) for c in conts)
    states = hidden[0].new_zeros((len(conts), width, hidden[0].shape[-1]))
    for j, (c, h) in enumerate(zip(conts, hidden)):
        states[j, : len(c)] = h[: len(c)].to(states.device)
    suffix = [[p[-1]] + c[:-1] for p, c in zip(prompts, conts)]
    ids = pad_sequences(suffix, pad_id, side="right").to(device)
    mask = pad_sequences([[1] * len(s) for s in suffix], 0, side="right").to(device)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    position_ids = (lengths - 1)[:, None] + torch.arange(width, device=device)[None, :]
    with eval_mode(model):
        logits = forward_from_layer(
            model, states.to(device), len(get_decoder_layers(model)) - 1, ids, mask, position_ids=position_ids
        )
    return gather_logprobs(logits, conts)


__all__ = [
    "CLEAN_BELOW_KINDS",
    "PromptPrefixes",
    "StateCapture",
    "last_block_from_layer",
    "logprobs_from_last_block",
]
