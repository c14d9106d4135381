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

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lat_lightning.attacks.base import cell_seed
from lat_lightning.attacks.plan import ATTACK_KINDS, CLEAN, AttackPlan, RowPerturber
from lat_lightning.attacks.positions import POLICIES, policy_mask
from lat_lightning.data.templating import encode_prompt, pad_sequences
from lat_lightning.models.eval_mode import eval_mode
from lat_lightning.models.layers import check_layer_indices, hidden_size, input_device

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
    """

    token_ids: list[list[int]]
    texts: list[str]
    new_tokens: Tensor
    lengths: Tensor
    perturbed_positions: Tensor
    prompt_ids: list[list[int]] = field(default_factory=list)


def _device(model: nn.Module) -> torch.device:
    try:
        return input_device(model)
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _supports_logits_to_keep(model: nn.Module) -> bool:
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
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        _CACHE_ARGUMENT[cls] = "past_key_values" if "past_key_values" in params and "cache" not in params \
            else "cache"
    return _CACHE_ARGUMENT[cls]


def returned_cache(output):
    """The KV cache a forward returned (``output.cache``; ``past_key_values`` in outputs of older model code).

    Read as a mapping: the output's ``past_key_values`` attribute is a deprecated alias that warns."""
    cache = output.get("cache") if hasattr(output, "get") else None
    if cache is None and hasattr(output, "get"):
        cache = output.get("past_key_values")
    return cache


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


def _pick_next(logits: Tensor, do_sample: bool, temperature: float, top_p: float, row_keys: list[tuple]) -> Tensor:
    if not do_sample:
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
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        _BUFFERED_LAYER.append(None)
        return None

    class BufferedLayer(DynamicLayer):
        def __init__(self, keys: Tensor, values: Tensor, capacity: int):
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self._length = keys.shape[-2]
            self._keys = self._room(keys, max(int(capacity), self._length))
            self._values = self._room(values, max(int(capacity), self._length))
            self._views()

        def _room(self, filled: Tensor, capacity: int) -> Tensor:
            shape = list(filled.shape)
            shape[-2] = capacity
            buf = filled.new_empty(shape)
            buf[..., : filled.shape[-2], :].copy_(filled)
            return buf

        def _views(self) -> None:
            self.keys = self._keys[..., : self._length, :]
            self.values = self._values[..., : self._length, :]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            n = key_states.shape[-2]
            if self._length + n > self._keys.shape[-2]:  # more than planned: grow once, geometrically
                self._keys = self._room(self.keys, 2 * (self._length + n))
                self._values = self._room(self.values, 2 * (self._length + n))
            self._keys[..., self._length: self._length + n, :].copy_(key_states)
            self._values[..., self._length: self._length + n, :].copy_(value_states)
            self._length += n
            self._views()
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

    _BUFFERED_LAYER.append(BufferedLayer)
    return BufferedLayer


def _buffer_cache(cache, rows: Tensor | None, capacity: int) -> None:
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


def _prefix_cache(model, prompt_ids: list[list[int]], pad_id: int, device, kwargs: dict, capacity: int):
    """The KV cache of every row's prompt minus its last token, computed ONCE per distinct prompt.

    The distinct prefixes run as one left-padded forward (no hooks: nothing in them is perturbed), then the
    cache is indexed onto the rows (row ``r`` gets its prompt's entries) with room for ``capacity`` positions.
    The left padding is the one the full prompts would get (``P_max - P_r`` columns), so the layout from here on
    is exactly the unshared prefill's.

    Returns:
        ``(cache, attention)`` with ``attention`` the rows' ``[B, P_max - 1]`` mask, or ``None`` when the model
        returns no cache that can be indexed (the caller then runs the unshared prefill).
    """
    index: dict[tuple[int, ...], int] = {}
    row_prompt = [index.setdefault(tuple(p), len(index)) for p in prompt_ids]
    prefixes = [list(p[:-1]) for p in index]
    ids = pad_sequences(prefixes, pad_id, side="left").to(device)
    attention = pad_sequences([[1] * len(p) for p in prefixes], 0, side="left").to(device)
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids, use_cache=True, **kwargs)
    cache = returned_cache(out)
    del out
    if cache is None or not hasattr(cache, "reorder_cache"):
        return None
    rows = torch.tensor(row_prompt, dtype=torch.long, device=device)
    _buffer_cache(cache, rows if row_prompt != list(range(len(index))) else None, capacity)
    return cache, attention[rows]


@torch.no_grad()
def _generate_chunk(model, prompt_ids: list[list[int]], row_layers: Tensor, plan: AttackPlan, prompt_keys: Tensor,
                    row_seeds: Tensor, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                    stop_ids: list[int], pad_id: int, sample_ids: Tensor | None = None,
                    share_prefix: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    device = _device(model)
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
    kwargs = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    cache_kw = cache_argument(model)
    layer_key = [int(l) for l in row_layers.tolist()]
    capacity = width + max_new_tokens
    prefix = (_prefix_cache(model, prompt_ids, pad_id, device, kwargs, capacity)
              if share_prefix and can_share_prefix(perturber, lengths) else None)
    with perturber.hooked(model):
        if prefix is None:  # the whole left-padded prompt in one prefill
            input_ids = pad_sequences(prompt_ids, pad_id, side="left").to(device)
            attention = pad_sequences([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
            position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
            perturber.positions = torch.arange(width)[None, :] - (width - lengths)[:, None]  # negative on padding
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True,
                        **kwargs)
            if share_prefix and returned_cache(out) is not None and hasattr(returned_cache(out), "reorder_cache"):
                _buffer_cache(returned_cache(out), None, capacity)  # nothing to share, still no copy per step
        else:  # the shared prefix is cached: step 0 feeds each row's last prompt token (position P - 1)
            cache, attention = prefix
            attention = torch.cat([attention, torch.ones(bsz, 1, dtype=attention.dtype, device=device)], dim=1)
            position_ids = (lengths - 1)[:, None].to(device)
            perturber.positions = (lengths - 1)[:, None]
            last = torch.tensor([[p[-1]] for p in prompt_ids], dtype=torch.long, device=device)
            out = model(input_ids=last, attention_mask=attention, position_ids=position_ids, use_cache=True,
                        **kwargs, **{cache_kw: cache})
        past = returned_cache(out)
        for t in range(max_new_tokens):
            keys = ([(int(row_seeds[r]), int(prompt_keys[r]), layer_key[r], t, SAMPLING_TAG) for r in range(bsz)]
                    if do_sample else [])
            if sample_ids is not None and keys:  # best-of-N: the n-th sample of a cell draws its own tokens
                keys = [k + (int(sample_ids[r]),) for r, k in enumerate(keys)]
            nxt = _pick_next(out.logits[:, -1], do_sample, temperature, top_p, keys).cpu()
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
            out = model(input_ids=nxt[:, None].to(device), attention_mask=attention, position_ids=position_ids,
                        use_cache=True, **{cache_kw: past})
            past = returned_cache(out)
    return new[:, : int(n_new.max()) if bsz else 0], n_new, perturber.applied


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]], use_chat_template: bool = True,
                   system_prompt: str | None = None) -> list[list[int]]:
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
    prompt_keys: Tensor | Sequence[int] | None = None,
    row_seeds: Tensor | Sequence[int] | None = None,
    max_new_tokens: int = 50,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    sample_ids: Tensor | Sequence[int] | None = None,
    share_prefix: bool = True,
) -> GenerationResult:
    """Generate for a batch of rows, each attacked at its own layer (or clean).

    Args:
        model: causal LM (put in eval mode for the call).
        tokenizer: its tokenizer (for prompt encoding, pad / EOS ids and decoding).
        prompts: one prompt per row: raw text (chat template applied) or token ids.
        row_layers: ``[B]`` attacked layer per row; ``-1`` = clean row; ``None`` = all clean.
        attack: the attack (``None`` = clean generation).
        prompt_keys: ``[B]`` integer id of each row's prompt for keying the noise (default: the row index;
            pass the prompt's dataset index so that different batchings draw identical noise).
        row_seeds: ``[B]`` perturbation (and sampling) seed per row (default ``attack.seed``).
        max_new_tokens: generation budget (50 in the reference).
        do_sample: sample instead of greedy decoding (draws keyed per row, step and seed).
        temperature: sampling temperature.
        top_p: nucleus sampling threshold (1.0 = off).
        batch_size: rows per forward (``None`` = all at once); results do not depend on it.
        eos_token_id: stop id(s) (default: tokenizer and generation-config EOS).
        pad_token_id: id fed to finished rows and used for padding (default: the tokenizer's pad, else EOS).
        use_chat_template: format string prompts with the chat template.
        system_prompt: optional system message for string prompts.
        sample_ids: ``[B]`` sample index per row, added to the sampling key (best-of-N: rows with the same prompt,
            layer and seed but different sample ids draw different answers under the same perturbation).
        share_prefix: compute each distinct prompt's KV cache up to its first perturbed position once per
            chunk and index it onto all of that prompt's rows (layers, seeds), instead of running the whole
            prompt for every row. Only when the attack leaves everything before the last prompt token alone
            (``prompt_last_and_generated``, ``first_k``, PGD masks from the last prompt token); ``all`` and
            ``prompt`` run the unshared prefill. The tokens are the same either way (tested); ``False`` is
            the escape hatch and the reference for that comparison.

    Returns:
        A :class:`GenerationResult` with the new tokens only.
    """
    ids = encode_prompts(tokenizer, prompts, use_chat_template, system_prompt)
    bsz = len(ids)
    attack = attack or AttackPlan()
    layers_t = (torch.full((bsz,), CLEAN, dtype=torch.long) if row_layers is None
                else torch.as_tensor(row_layers, dtype=torch.long).cpu())
    if len(layers_t) != bsz:
        raise ValueError(f"row_layers has {len(layers_t)} entries for {bsz} prompts")
    used = sorted({int(l) for l in layers_t.tolist() if l != CLEAN})
    check_layer_indices(model, used)
    if attack.kind != "none" and used:
        d = hidden_size(model)
        for v in attack.vectors or []:
            if v is not None and v.shape[-1] != d:
                raise ValueError(f"attack vectors have width {v.shape[-1]}, the model's hidden size is {d}")
    keys_t = torch.arange(bsz) if prompt_keys is None else torch.as_tensor(prompt_keys, dtype=torch.long).cpu()
    seeds_t = (torch.full((bsz,), int(attack.seed), dtype=torch.long) if row_seeds is None
               else torch.as_tensor(row_seeds, dtype=torch.long).cpu())
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad_token_id if pad_token_id is not None else 0)
    stop_ids = eos_ids(model, tokenizer, eos_token_id)
    samples_t = None if sample_ids is None else torch.as_tensor(sample_ids, dtype=torch.long).cpu()
    if samples_t is not None and len(samples_t) != bsz:
        raise ValueError(f"sample_ids has {len(samples_t)} entries for {bsz} prompts")
    step = bsz if not batch_size else max(1, int(batch_size))
    token_ids: list[list[int]] = [[] for _ in range(bsz)]
    applied = torch.zeros(bsz, dtype=torch.long)
    with eval_mode(model):
        for start in range(0, bsz, step):
            rows = list(range(start, min(start + step, bsz)))
            new, n_new, app = _generate_chunk(
                model, [ids[r] for r in rows], layers_t[rows], attack.select(rows), keys_t[rows], seeds_t[rows],
                max_new_tokens, do_sample, temperature, top_p, stop_ids, pad_id,
                None if samples_t is None else samples_t[rows], share_prefix)
            for j, r in enumerate(rows):
                token_ids[r] = new[j, : int(n_new[j])].tolist()
            applied[rows] = app
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    width = int(lengths.max()) if bsz else 0
    padded = torch.full((bsz, width), pad_id, dtype=torch.long)
    for r, t in enumerate(token_ids):
        if t:
            padded[r, : len(t)] = torch.tensor(t)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    return GenerationResult(token_ids, texts, padded, lengths, applied, ids)


@torch.no_grad()
def teacher_forced_logits(model: nn.Module, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                          row_layers: Tensor | Sequence[int], attack: AttackPlan, *,
                          prompt_keys: Tensor | Sequence[int] | None = None,
                          row_seeds: Tensor | Sequence[int] | None = None, pad_id: int = 0) -> Tensor:
    """Logits of right-padded ``sequences`` (prompt + response ids) with each row attacked at its layer.

    Absolute positions are column indices, so the same keyed noise as in generation lands on the same
    tokens (e.g. ``prompt_last_and_generated`` perturbs the last prompt token and every response token).

    Returns:
        ``[B, T, V]`` logits.
    """
    bsz = len(sequences)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    device = _device(model)
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
        self.device = _device(model)
        kwargs = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
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
def teacher_forced_suffix_logits(model: nn.Module, prefix: SharedPrefix, continuations: Sequence[Sequence[int]],
                                 row_layers: Tensor | Sequence[int], attack: AttackPlan, *,
                                 prompt_keys: Tensor | Sequence[int] | None = None,
                                 row_seeds: Tensor | Sequence[int] | None = None) -> Tensor:
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
        raise ValueError(f"the attack perturbs the prompt before its last token ({attack.positions}); "
                         "use teacher_forced_logits")
    suffix = torch.tensor([[prefix.prompt_ids[-1]] + [int(t) for t in c] for c in continuations], dtype=torch.long)
    width = suffix.shape[1]
    perturber.positions = (p_len - 1 + torch.arange(width))[None, :].expand(bsz, width)
    device = prefix.device
    attention = torch.ones(bsz, p_len - 1 + width, dtype=torch.long, device=device)
    position_ids = (p_len - 1 + torch.arange(width, device=device))[None, :].expand(bsz, width)
    with eval_mode(model), perturber.hooked(model):
        out = model(input_ids=suffix.to(device), attention_mask=attention, position_ids=position_ids,
                    use_cache=True, **{cache_argument(model): prefix.for_rows(bsz)})
    return out.logits


@torch.no_grad()
def continuation_logprobs(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], *, pad_id: int = 0,
                          share_prefix: bool = True) -> list[Tensor]:
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
    device = _device(model)
    width = max(len(c) for c in conts)
    logits = None
    with eval_mode(model):
        if share_prefix and min(len(p) for p in prompts) >= 2:
            kwargs = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
            p_max = max(len(p) for p in prompts)
            prefix = _prefix_cache(model, prompts, pad_id, device, kwargs, p_max - 1 + width)
            if prefix is not None:
                cache, attention = prefix
                suffix = [[p[-1]] + c[:-1] for p, c in zip(prompts, conts)]
                ids = pad_sequences(suffix, pad_id, side="right").to(device)
                mask = pad_sequences([[1] * len(s) for s in suffix], 0, side="right").to(device)
                lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
                position_ids = (lengths - 1)[:, None] + torch.arange(width, device=device)[None, :]
                logits = model(input_ids=ids, attention_mask=torch.cat([attention, mask.to(attention.dtype)], 1),
                               position_ids=position_ids, use_cache=True,
                               **{cache_argument(model): cache}).logits  # column j predicts continuation token j
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
    for j, (i, c) in enumerate(zip(rows, conts)):
        target = torch.tensor(c, dtype=torch.long, device=logits.device)
        row = torch.log_softmax(logits[j, : len(c)].float(), dim=-1)
        out[i] = row.gather(-1, target[:, None]).squeeze(-1).cpu()
    return out


__all__ = [
    "ATTACK_KINDS",
    "CLEAN",
    "GENERATION_POSITIONS",
    "AttackPlan",
    "GenerationResult",
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
