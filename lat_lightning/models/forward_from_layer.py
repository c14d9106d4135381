"""Run a causal LM from a cached residual-stream state to the logits.

Attacks at layer ``l`` only need blocks ``l+1 ..`` to be re-run for every attack step: the blocks below
are run once and their output ``h[l]`` is cached (the reference code re-ran the whole model from the
embeddings each step). Here the blocks ``0..l`` are temporarily replaced by a stand-in that returns
the cached state; everything else (embedding-side masks, rotary tables, per-layer attention types, final
norm, LM head) runs through the model's own forward, which is why the result equals the full forward
bitwise on CPU in float32.

The stand-in returns what the block itself returns: a bare tensor in most transformers 5 families, a tuple
``(hidden, attention weights)`` in Falcon, BLOOM and MPT, whose model loops read ``outputs[0]`` (a bare tensor
there would be indexed to its first batch row). The structure of a block class is learnt once per process by
running one real block on the call's own inputs, without gradients (:func:`block_output_structure`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from lat_lightning.models.layers import EMBED, check_layer_indices, get_decoder_layers

# block class -> how to wrap a hidden state like that class's output; filled on first use (see below).
_STRUCTURES: dict[tuple[type, bool], Callable[[Tensor], Any]] = {}


def _wrapper_for(output: Any) -> Callable[[Tensor], Any]:
    """A function that puts a new hidden state into an output of the same structure as ``output``.

    A tuple keeps its length; its other entries (attention weights, cache entries of the skipped block) are
    ``None``, since the stand-in computed nothing.
    """
    if isinstance(output, Tensor):
        return lambda hidden: hidden
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        tail = (None,) * (len(output) - 1)
        return lambda hidden: (hidden,) + tail
    if hasattr(output, "last_hidden_state"):
        cls = type(output)
        return lambda hidden: cls(last_hidden_state=hidden)
    raise TypeError(f"unsupported decoder-layer output type {type(output).__name__}")


def block_output_structure(block: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Callable[[Tensor], Any]:
    """How ``block`` structures its output, as a ``hidden -> output`` function.

    Learnt once per block class (and ``output_attentions`` flag, which changes some tuples): the block's own
    ``forward`` runs once, without gradients, on the arguments the model passed it. Callers keep ``use_cache``
    off (:func:`forward_from_layer` does), so that run writes no cache.
    """
    key = (type(block), bool(kwargs.get("output_attentions")))
    wrap = _STRUCTURES.get(key)
    if wrap is None:
        with torch.no_grad():
            output = forward(*args, **kwargs)
        wrap = _STRUCTURES[key] = _wrapper_for(output)
    return wrap


@contextmanager
def skip_layers_below(model: nn.Module, cached: Tensor, last_cached_layer: int) -> Iterator[None]:
    """Within the context, blocks ``0..last_cached_layer`` return ``cached`` without computing.

    Each returns it in the structure the block itself returns (a tensor, or a tuple led by the hidden
    state), so model loops that take ``outputs[0]`` work too.

    Args:
        model: causal LM.
        cached: ``h[last_cached_layer]``, shape ``[batch, seq, d]``.
        last_cached_layer: index of the block whose output ``cached`` is; ``-1`` skips nothing.

    Raises:
        IndexError: for an index outside ``-1 .. num_layers - 1``.
    """
    if last_cached_layer == -1:
        yield
        return
    if last_cached_layer == EMBED:
        raise ValueError(
            "skip_layers_below cannot stand in for the input embeddings; use forward_from_layer, which "
            "passes them as inputs_embeds"
        )
    check_layer_indices(model, [last_cached_layer])
    layers = get_decoder_layers(model)
    patched: list[tuple[nn.Module, Any]] = []  # (block, its own instance-level forward or None)

    def stand_in_for(block: nn.Module, forward: Callable):
        def stand_in(*args, **kwargs):
            return block_output_structure(block, forward, args, kwargs)(cached)

        return stand_in

    try:
        for i in range(last_cached_layer + 1):
            block = layers[i]
            # An instance attribute shadows the class's forward for this module only; removing it (or putting
            # back one a wrapper such as accelerate had set) restores the original. Module hooks and FSDP2
            # pre-forward hooks still run as usual.
            own = vars(block).get("forward")
            block.forward = stand_in_for(block, own if own is not None else type(block).forward.__get__(block))
            patched.append((block, own))
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


def forward_from_layer(
    model: nn.Module,
    hidden: Tensor,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Logits of the model whose residual stream after block ``layer`` is ``hidden``.

    Args:
        model: causal LM.
        hidden: ``h[layer]`` (e.g. captured by :func:`capture_residual`, possibly perturbed).
        layer: block index whose output ``hidden`` replaces; ``-1`` means a plain full forward;
            :data:`~lat_lightning.models.layers.EMBED` passes ``hidden`` as ``inputs_embeds`` (a hook on the
            embedding module then does not run: the embeddings are given).
        input_ids: the token ids the cache was computed from (they set masks and positions).
        attention_mask: the same padding mask as the cached run.
        **kwargs: passed to the model's forward (``use_cache`` defaults to ``False``).

    Returns:
        Logits ``[batch, seq, vocab]``.
    """
    kwargs.setdefault("use_cache", False)
    if layer == EMBED:
        return model(inputs_embeds=hidden, attention_mask=attention_mask, **kwargs).logits
    with skip_layers_below(model, hidden, layer):
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.logits
