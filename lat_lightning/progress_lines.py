"""Progress bars that suit a log file: redrawn in place on a terminal, plain lines anywhere else.

tqdm redraws a bar with carriage returns. In a log that is not a terminal (``nohup``, SLURM, CI, ``make demo >
log 2>&1``) every redraw stays in the file as another frame (issue 24). :class:`LineProgress` keeps tqdm's bar on
a terminal and, when its stream is not one, writes one complete line each time another tenth of the total is done
or :data:`PLAIN_EVERY_S` seconds have passed, and at the end.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

PLAIN_EVERY_S = 30.0  # at most this long between two plain lines while work goes on


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or unusual stream counts as not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineProgressMixin:
    """What makes a tqdm (or a subclass, such as Lightning's) write plain lines when not on a terminal."""

    def _plain(self) -> bool:
        return not is_terminal(getattr(self, "fp", None))

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        bar: Any = self
        if not self._plain():
            return bool(super().display(msg, pos))  # type: ignore[misc]
        total, n, now = bar.total, bar.n, time.monotonic()
        tenth = int(10 * n / total) if total else 0
        last = getattr(self, "_plain_last", None)  # (tenth, time, n) of the last line written
        done = bool(total) and n >= total
        if last is not None and (last[2] == n or (tenth <= last[0] and now - last[1] < PLAIN_EVERY_S and not done)):
            return True
        self._plain_last = (tenth, now, n)
        bar.fp.write(str(bar).strip() + "\n")
        bar.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        if not self._plain():  # a plain line is never erased (tqdm clears with a carriage return)
            super().clear(nolock)  # type: ignore[misc]


class LineProgress(LineProgressMixin, tqdm):
    """tqdm that writes plain lines (a tenth of the work, or 30 s, apart) when its stream is not a terminal."""


def quiet_third_party_bars(stream: Any) -> None:
    """Turn off the download and weight-loading bars of transformers and huggingface_hub when ``stream`` (where they
    draw) is not a terminal: they redraw in place and would fill a log with frames; they say nothing a run's own
    lines do not."""
    if is_terminal(stream):
        return
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


__all__ = ["PLAIN_EVERY_S", "LineProgress", "LineProgressMixin", "is_terminal", "quiet_third_party_bars"]
