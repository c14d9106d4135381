"""A training progress bar that counts what the run is configured in: optimiser steps toward ``max_steps``.

Lightning's default bar counts micro-batches per epoch (``Epoch 0/-2 ... 20/10`` under gradient accumulation
with ``max_steps``). This one is a single bar over the whole fit: ``n`` is ``trainer.global_step`` (optimiser
steps done, also after a resume), the total is ``max_steps``, and the ETA is tqdm's over the average rate of
the steps run so far (no smoothing towards the last one).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lat_lightning.progress_lines import LineProgressMixin


class _StepTqdm(LineProgressMixin, Tqdm):
    """Lightning's bar, written as plain lines (a tenth of the steps, or 30 s, apart) when not on a terminal."""


def _as_line_bars(make: Callable[[], Tqdm]) -> Tqdm:
    """``make()`` (one of Lightning's ``init_*_tqdm``) with the bar class it names swapped for :class:`_StepTqdm`
    for the call (it refers to the module's ``Tqdm`` by name; the swap is undone at once)."""
    import lightning.pytorch.callbacks.progress.tqdm_progress as lightning_tqdm

    original = lightning_tqdm.Tqdm
    lightning_tqdm.Tqdm = _StepTqdm  # type: ignore[misc]
    try:
        return make()
    finally:
        lightning_tqdm.Tqdm = original  # type: ignore[misc]


class StepProgressBar(TQDMProgressBar):
    """One bar per fit: optimiser steps done / ``max_steps``, elapsed < remaining, loss in the postfix.

    Args:
        description: the bar's label (e.g. ``fit``, ``organism (a) capability``).
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def __init__(self, description: str = "fit", refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.description = description
        self._bar_made = False

    # Lightning builds its other bars (sanity check, validation) with the module's ``Tqdm``: built as ``_StepTqdm``
    # instead, they too are plain lines in a log.
    def init_sanity_tqdm(self) -> Tqdm:
        return _as_line_bars(super().init_sanity_tqdm)

    def init_validation_tqdm(self) -> Tqdm:
        return _as_line_bars(super().init_validation_tqdm)

    def init_train_tqdm(self, total: int | None = None, initial: int = 0) -> Tqdm:
        return _StepTqdm(
            desc=self.description,
            total=total,
            initial=initial,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer, pl_module) -> None:
        # Drawn at the first finished micro-batch, not now: lines other callbacks print while the fit starts (and,
        # in a multi-process launch, while the other ranks are still setting up) stay on lines of their own.
        self._bar_made = False

    def _ensure_bar(self, trainer) -> None:
        if not self._bar_made:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            # the rate (hence the ETA) counts the steps after this one: the first carries start-up costs
            self.train_progress_bar = self.init_train_tqdm(total, int(trainer.global_step))
            self._bar_made = True

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar across epochs: an epoch means nothing to a run measured in steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_enabled:
            return
        self._ensure_bar(trainer)
        bar = self.train_progress_bar
        n = int(trainer.global_step)
        if bar is None or bar.disable or n == bar.n:  # a micro-batch inside an accumulation: no step yet
            return
        if self._should_update(n, bar.total or 0):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, *_) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


__all__ = ["StepProgressBar"]
