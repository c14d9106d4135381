"""How a run stops on SIGTERM (pre-emption, ``scancel``, ``kill``) and SIGINT (Ctrl+C).

Inside :func:`stop_on_signals` (the pipeline wraps a whole run in it) either signal raises :class:`StopRequested`
in the main thread, wherever it is: building the organism, loading a model, generating a scan. The pipeline turns
it into one line saying what was saved and how to resume, and exit status 128 + the signal (143, 130).

:class:`StopRequested` is a ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` in a library
(a model loader converting errors, a judge retrying a batch) can swallow it or report it as bad input.

Code that stops gracefully by itself keeps doing so. Lightning's trainer installs its own SIGTERM handler while
it runs (it finishes the batch and raises ``SIGTERMException``, a ``SystemExit``) and calls the handler it
replaced afterwards; that handler is then ours, but no longer the installed one, so it only records the signal
and lets the trainer stop at its next batch boundary. The fit stage also routes SIGINT that way
(:class:`lat_lightning.training.resume.InterruptCheckpoint`). A signal that arrives when a trainer is past its
last check (exporting, say) is still recorded: :func:`received` lets the pipeline stop after the stage.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived inside :func:`stop_on_signals`.

    Attributes:
        signum: the signal number.
        exit_code: 128 + ``signum`` (143 for SIGTERM, 130 for SIGINT), as a shell reports a process it stopped.
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {signal_name(self.signum)}")


def signal_name(signum: int) -> str:
    """``15`` -> ``SIGTERM``."""
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover - not a signal number
        return f"signal {signum}"


def received() -> Optional[int]:
    """The first signal received inside the current :func:`stop_on_signals` scope, else ``None``."""
    return _received[0] if _received else None


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`StopRequested` (once; later signals are only recorded,
    so that the clean-up of the first is not cut short). The previous handlers are restored on exit.

    Outside the main thread (where Python cannot install signal handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()

    def handler(signum, frame):
        first = not _received
        _received.append(int(signum))
        # Installed by us and the first signal: stop here. Otherwise a handler installed since (Lightning's) is
        # running us as the handler it replaced; it stops the run at its next safe point.
        if first and signal.getsignal(signum) is handler:
            raise StopRequested(signum)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


__all__ = ["SIGNALS", "StopRequested", "received", "signal_name", "stop_on_signals"]
