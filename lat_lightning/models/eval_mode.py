"""A context that puts a model in eval mode and restores every submodule's own mode afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode (no dropout), restoring every submodule's own mode after
    (a model may mix modes, e.g. a frozen teacher inside a training module)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


__all__ = ["eval_mode"]
