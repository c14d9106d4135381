"""The KV-cache plumbing shared by generation and the teacher-forced passes: the cache keyword a model's forward
takes, buffered cache layers that grow in place, and the prefix cache (every row's prompt minus its last token,
computed once per distinct prompt) that prefix sharing starts from.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lat_lightning.attacks.plan import RowPerturber
from lat_lightning.data.templating import pad_sequences
from lat_lightning.models.layers import input_device


def model_device(model: nn.Module) -> torch.device:
    """The device the model's inputs go to (the CPU for a model without parameters)."""
    try:
        return input_device(model)
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


_LOGITS_TO_KEEP: dict[type, bool] = {}


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (then a prefill computes the last column's logits only)."""
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        try:
            _LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            _LOGITS_TO_KEEP[cls] = False
    return _LOGITS_TO_KEEP[cls]


_CACHE_ARGUMENT: dict[type, str] = {}


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes the KV cache: ``cache`` (transformers 5.x renamed
    ``past_key_values``, deprecated and removed in 5.40), or ``past_key_values`` for a model whose forward
    still names only that (remote code written for older releases)."""
    cls = type(model)
    if cls not in _CACHE_ARGUMENT:
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        _CACHE_ARGUMENT[cls] = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
    return _CACHE_ARGUMENT[cls]


def returned_cache(output):
    """The KV cache a forward returned (``output.cache``; ``past_key_values`` in outputs of older model code).

    Read as a mapping: the output's ``past_key_values`` attribute is a deprecated alias that warns."""
    cache = output.get("cache") if hasattr(output, "get") else None
    if cache is None and hasattr(output, "get"):
        cache = output.get("past_key_values")
    return cache


def can_share_prefix(perturber: RowPerturber, prompt_lengths: Tensor) -> bool:
    """Whether every row's prompt, up to (not including) its last token, is left alone by the attack.

    True under ``prompt_last_and_generated`` / ``first_k`` / ``response`` and for PGD masks that start at the
    last prompt token; False under ``all`` / ``prompt`` (they perturb earlier positions) and for one-token
    prompts (nothing to share)."""
    lengths = prompt_lengths.long().cpu()
    if len(lengths) == 0 or int(lengths.min()) < 2:
        return False
    return bool((perturber.first_perturbed() >= lengths - 1).all())


_BUFFERED_LAYER: list = []


def _buffered_layer_class():
    """:class:`transformers.cache_utils.DynamicLayer` with its keys and values in a buffer that has room for the
    whole generation (``None`` when this transformers has no ``DynamicLayer``).

    ``DynamicLayer.update`` concatenates: every decode step copies the whole cache of every layer into a fresh
    allocation, which for a batch of hundreds of rows costs more than the step's matrix products on a CPU. The
    buffered layer writes the new entries in place and hands attention views of exactly the filled part (the
    same shapes and values as the concatenation, so the same arithmetic)."""
    if _BUFFERED_LAYER:
        return _BUFFERED_LAYER[0]
    try:
        buffered = _define_buffered_layer()
    except ImportError:  # pragma: no cover - older transformers
        buffered = None
    _BUFFERED_LAYER.append(buffered)
    return buffered


def _with_room(filled: Tensor, capacity: int) -> Tensor:
    """A buffer of ``capacity`` positions (dim -2) that starts with ``filled``."""
    shape = list(filled.shape)
    shape[-2] = capacity
    buf = filled.new_empty(shape)
    buf[..., : filled.shape[-2], :].copy_(filled)
    return buf


def _define_buffered_layer() -> type:
    """Define the class :func:`_buffered_layer_class` returns (raises ``ImportError`` when this transformers has
    no ``DynamicLayer``)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        def __init__(self, keys: Tensor, values: Tensor, capacity: int):
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self._length = keys.shape[-2]
            self._keys = _with_room(keys, max(int(capacity), self._length))
            self._values = _with_room(values, max(int(capacity), self._length))
            self._views()

        def _views(self) -> None:
            self.keys = self._keys[..., : self._length, :]
            self.values = self._values[..., : self._length, :]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            n = key_states.shape[-2]
            if self._length + n > self._keys.shape[-2]:  # more than planned: grow once, geometrically
                assert self.keys is not None and self.values is not None  # set by _views
                self._keys = _with_room(self.keys, 2 * (self._length + n))
                self._values = _with_room(self.values, 2 * (self._length + n))
            self._keys[..., self._length : self._length + n, :].copy_(key_states)
            self._values[..., self._length : self._length + n, :].copy_(value_states)
            self._length += n
            self._views()
            assert self.keys is not None and self.values is not None  # set by _views
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._length

        def reorder_cache(self, beam_idx: Tensor) -> None:
            self._keys = self._keys.index_select(0, beam_idx.to(self._keys.device))
            self._values = self._values.index_select(0, beam_idx.to(self._values.device))
            self._views()

        def batch_select_indices(self, indices: Tensor) -> None:
            self._keys, self._values = self._keys[indices, ...], self._values[indices, ...]
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            self._length -= abs(int(tokens_to_remove))
            self._views()

        def reset(self) -> None:
            self._length = 0
            self._views()

    return BufferedLayer


def buffer_cache(cache, rows: Tensor | None, capacity: int) -> None:
    """Index ``cache`` onto ``rows`` (``None``: keep the batch) and give its growing full-attention layers room for
    ``capacity`` positions (:func:`_buffered_layer_class`), in place. Other layer kinds (sliding windows, ...) are
    only indexed."""
    buffered = _buffered_layer_class()
    layers = getattr(cache, "layers", None)
    if buffered is None or layers is None:
        if rows is not None:
            cache.reorder_cache(rows)
        return
    base = buffered.__mro__[1]  # DynamicLayer
    for i, layer in enumerate(layers):
        if type(layer) is base and layer.is_initialized and layer.keys is not None and layer.keys.numel():
            keys, values = layer.keys, layer.values
            if rows is not None:
                keys, values = keys.index_select(0, rows.to(keys.device)), values.index_select(0, rows.to(keys.device))
            layers[i] = buffered(keys, values, capacity)
        elif rows is not None:
            layer.reorder_cache(rows)


# Prefix caches kept for reuse while a `reused_prefixes()` context is open (see there): newest last.
_REUSE: list[list] = []
REUSE_ENTRIES = 4  # distinct prompt sets kept per context (a scan's chunk needs its own set back a few times)


@contextmanager
def reused_prefixes() -> Iterator[None]:
    """Within the context, the prompt-prefix forward of :func:`prefix_cache` (and of
    :class:`~lat_lightning.eval.clean_states.PromptPrefixes`) runs once per model and set of distinct prompts: a
    scan's chunk needs the same clean prefixes for its clean answers, their coherence check, the attacked
    generation and its coherence check. A later call gets a copy of the cache the first call computed, in the
    first call's row order, so it computes exactly what the first call did. The caller keeps the model's weights
    fixed inside the context (the scan does; training between scans is outside it). The last
    :data:`REUSE_ENTRIES` prompt sets are kept."""
    _REUSE.append([])
    try:
        yield
    finally:
        _REUSE.pop()


def distinct_prefixes(model, prompts: list[tuple[int, ...]], pad_id: int, device, kwargs: dict):
    """The clean KV cache of each distinct prompt minus its last token: one left-padded forward (reused within
    :func:`reused_prefixes`).

    Returns:
        ``(index, cache, attention)``: ``prompt -> row`` of the cache, the cache (``None`` when the model returns
        none that can be indexed) and the ``[N, P_max - 1]`` mask; a copy the caller may change.
    """
    key = (id(model), frozenset(prompts))
    memo = _REUSE[-1] if _REUSE else None
    for entry in memo or []:
        if entry[0] == key:
            index, cache, attention = entry[1]
            return index, copy.deepcopy(cache), attention
    index = {p: i for i, p in enumerate(prompts)}
    prefixes = [list(p[:-1]) for p in prompts]
    ids = pad_sequences(prefixes, pad_id, side="left").to(device)
    attention = pad_sequences([[1] * len(p) for p in prefixes], 0, side="left").to(device)
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids, use_cache=True, **kwargs)
    cache = returned_cache(out)
    del out
    if cache is None or not hasattr(cache, "reorder_cache"):
        cache = None
    if memo is not None:
        memo.append((key, (index, copy.deepcopy(cache), attention)))
        del memo[:-REUSE_ENTRIES]
    return index, cache, attention


def prefix_cache(model, prompt_ids: list[list[int]], pad_id: int, device, kwargs: dict, capacity: int):
    """The KV cache of every row's prompt minus its last token, computed ONCE per distinct prompt.

    The distinct prefixes run as one left-padded forward (no hooks: nothing in them is perturbed;
    :func:`distinct_prefixes`), then the cache is indexed onto the rows (row ``r`` gets its prompt's entries) with
    room for ``capacity`` positions. The left padding is the one the full prompts would get (``P_max - P_r``
    columns), so the layout from here on is exactly the unshared prefill's.

    Returns:
        ``(cache, attention)`` with ``attention`` the rows' ``[B, P_max - 1]`` mask, or ``None`` when the model
        returns no cache that can be indexed (the caller then runs the unshared prefill).
    """
    order: dict[tuple[int, ...], None] = {}
    for p in prompt_ids:
        order.setdefault(tuple(int(t) for t in p))
    index, cache, attention = distinct_prefixes(model, list(order), pad_id, device, kwargs)
    if cache is None:
        return None
    row_prompt = [index[tuple(int(t) for t in p)] for p in prompt_ids]
    rows = torch.tensor(row_prompt, dtype=torch.long, device=device)
    buffer_cache(cache, rows if row_prompt != list(range(len(index))) else None, capacity)
    return cache, attention[rows]


__all__ = [
    "buffer_cache",
    "cache_argument",
    "can_share_prefix",
    "distinct_prefixes",
    "model_device",
    "prefix_cache",
    "returned_cache",
    "reused_prefixes",
    "supports_logits_to_keep",
]
