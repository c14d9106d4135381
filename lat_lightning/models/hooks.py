"""Edit the residual stream at the output of decoder layers.

A perturbation "at layer l" is applied to ``h[l]``, the output of block ``l`` (REFERENCE.md, notation), so
it flows into block ``l + 1`` onward. At :data:`~lat_lightning.models.layers.EMBED` it is applied to the output
of the token-embedding module (``inputs_embeds``), so it flows into block 0 onward. The hooks are plain forward
hooks: they add no parameters or buffers to the module tree and are removed when the context exits, also when
its body raises.

They act on every call of the layer, so during ``generate`` they see the prefill (the whole prompt) and
then each decode step (one new token per row, with the KV cache). Callers that need to know which
absolute positions a call covers keep that state in their ``edit`` callable.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from lat_lightning.models.layers import EMBED, check_layer_indices, get_decoder_layers, get_input_embeddings

EditFn = Callable[[int, Tensor], Tensor]


def split_layer_output(output):
    """Return ``(hidden, rebuild)`` for a decoder layer's output, tensor or tuple.

    ``rebuild(new_hidden)`` returns an object of the same structure with the hidden state replaced.
    """
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0], lambda new: (new,) + tuple(output[1:])
    if hasattr(output, "last_hidden_state"):  # some custom blocks return ModelOutput

        def rebuild(new):
            output.last_hidden_state = new
            return output

        return output.last_hidden_state, rebuild
    raise TypeError(f"unsupported decoder-layer output type {type(output).__name__}")


@contextmanager
def residual_edit(model: nn.Module, layers: Iterable[int], edit: EditFn) -> Iterator[None]:
    """Replace ``h[l]`` by ``edit(l, h[l])`` for every listed layer while the context is open.

    Args:
        model: causal LM (wrappers allowed).
        layers: 0-based layer indices (and :data:`~lat_lightning.models.layers.EMBED`); several at once are fine.
        edit: called as ``edit(layer_index, hidden)`` with ``hidden`` of shape ``[batch, seq, d]``;
            returns the new hidden state (same shape).

    Raises:
        IndexError: if a layer index is out of range.
    """
    idx = check_layer_indices(model, list(layers))
    modules = get_decoder_layers(model)
    handles = []
    try:
        for layer in sorted(set(idx)):

            def hook(_module, _args, output, _layer=layer):
                hidden, rebuild = split_layer_output(output)
                return rebuild(edit(_layer, hidden))

            module = get_input_embeddings(model) if layer == EMBED else modules[layer]
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _broadcast_delta(delta: Tensor, hidden: Tensor) -> Tensor:
    if delta.dim() == 1:
        return delta.view(1, 1, -1)
    if delta.dim() == 2:  # [batch, d]: same vector at every selected position
        return delta.unsqueeze(1)
    if delta.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"perturbation covers {delta.shape[1]} positions but the layer saw {hidden.shape[1]}; "
            "use residual_edit with a position-aware edit for generation"
        )
    return delta


@contextmanager
def add_to_residual(
    model: nn.Module,
    deltas: Mapping[int, Tensor],
    mask: Optional[Tensor] = None,
) -> Iterator[None]:
    """Add fixed tensors to the residual stream: ``h[l] <- h[l] + mask * delta[l]``.

    Args:
        model: causal LM.
        deltas: layer index -> tensor of shape ``[batch, seq, d]``, ``[batch, d]`` or ``[d]``.
        mask: optional ``[batch, seq]`` selector of perturbed positions (bool or float).
    """

    def edit(layer: int, hidden: Tensor) -> Tensor:
        delta = _broadcast_delta(deltas[layer], hidden).to(hidden.dtype)
        if mask is not None:
            delta = delta * mask[..., None].to(hidden.dtype)
        return hidden + delta

    with residual_edit(model, deltas.keys(), edit):
        yield


class _Captured(Exception):
    """Raised by :func:`capture_residual`'s hook to end the forward once the highest wanted layer has run."""


@torch.no_grad()
def capture_residual(model: nn.Module, layers: Iterable[int], **forward_kwargs) -> dict[int, Tensor]:
    """``{l: h[l]}`` (detached) for the given layers from one forward pass that stops after the highest of
    them: the blocks above it, the final norm and the LM head never run (what an attack's cache of the lower
    blocks needs, at the cost of those blocks only)."""
    wanted = sorted(set(check_layer_indices(model, list(layers))))
    captured: dict[int, Tensor] = {}

    def edit(layer: int, hidden: Tensor) -> Tensor:
        captured[layer] = hidden.detach()
        if len(captured) == len(wanted):
            raise _Captured
        return hidden

    with residual_edit(model, wanted, edit):
        try:
            model(**forward_kwargs)
        except _Captured:
            pass
    return captured
