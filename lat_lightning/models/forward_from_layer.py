"""Run a causal LM from a cached residual-stream state to the logits.

Attacks at layer ``l`` only need blocks ``l+1 ..`` to be re-run for every attack step: the blocks below
are run once and their output ``h[l]`` is cached (the reference code re-ran the whole model from the
embeddings each step). Here the blocks ``0..l`` are temporarily replaced by a pass-through that returns
the cached state; everything else (embedding-side masks, rotary tables, per-layer attention types, final
norm, LM head) runs through the model's own forward, which is why the result equals the full forward
bitwise on CPU in float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from lat_lightning.models.layers import EMBED, check_layer_indices, get_decoder_layers


@contextmanager
def skip_layers_below(model: nn.Module, cached: Tensor, last_cached_layer: int) -> Iterator[None]:
    """Within the context, blocks ``0..last_cached_layer`` return ``cached`` without computing.

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
        raise ValueError("skip_layers_below cannot stand in for the input embeddings; use forward_from_layer, which "
                         "passes them as inputs_embeds")
    check_layer_indices(model, [last_cached_layer])
    layers = get_decoder_layers(model)
    patched = []

    def passthrough(*args, **kwargs):
        return cached

    try:
        for i in range(last_cached_layer + 1):
            # An instance attribute shadows the class's forward for this module only; removing it
            # restores the original. Module hooks and FSDP2 pre-forward hooks still run as usual.
            layers[i].forward = passthrough
            patched.append(layers[i])
        yield
    finally:
        for module in patched:
            del module.forward


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
