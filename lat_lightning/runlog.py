"""The run's log file (``<run>/run.log``) and a console without known third-party noise.

:func:`run_logging` (the pipeline wraps a run in it) sends every log record at INFO and above, Python warnings
included, to ``run.log`` in the run directory. Records from before the run directory exists (the checks, the
organism build) are kept in memory and written when :meth:`RunLog.attach` names the directory; a run that fails
before it has one writes no file. The console shows what it showed before (warnings and errors; Lightning's own
INFO lines) minus the messages in :data:`KNOWN_NOISE`: third-party warnings that say nothing about the run and
would otherwise bury the one-line error. ``--debug`` shows them too.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

LOG_FILE = "run.log"
BUFFER_LIMIT = 10_000  # records kept before the run directory exists

# (logger name prefix, message pattern, why it is noise). Matched against the record's logger and its message
# (a Python warning's message is the formatted warning text, logged by ``py.warnings``).
KNOWN_NOISE: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional kernel package is not installed; bitsandbytes uses its own CPU kernels (peft imports it)",
    ),
    (
        "transformers",
        r"`past_key_values`/`cache_params` are deprecated",
        "the KV-cache argument's rename in transformers 5.x; lat-lightning passes `cache`, library code may not",
    ),
    (
        "py.warnings",
        r"`is_gradient_checkpointing` is deprecated",
        "transformers' rename of a property that peft still reads",
    ),
    ("lightning", r"Tip: For seamless cloud", "Lightning's advertisement for its litlogger / litmodels packages"),
    (
        "lightning",
        r"^Initializing distributed: GLOBAL_RANK|All distributed processes registered",
        "Lightning's process-group banner, once per process of a trainer.devices=N launch; the pipeline's own "
        "[launch] line says how many processes run",
    ),
    (
        "lightning",
        r"^(GPU|TPU|HPU) available: ",
        "Lightning's accelerator banner at every fit; the run's device is trainer.accelerator (and run.log keeps it)",
    ),
    (
        "kernels",
        r"Skipping publisher trust check",
        "the optional kernels package (imported by bitsandbytes) notes it is offline; nothing to act on",
    ),
    (
        "py.warnings",
        r"Total length of `\w+` across ranks is zero",
        "a fit without held-out data has no validation batches, by design",
    ),
    (
        "py.warnings",
        r"isinstance\(treespec, LeafSpec\)` is deprecated",
        "a torch deprecation inside Lightning's own code",
    ),
)
_NOISE = tuple((prefix, re.compile(pattern)) for prefix, pattern, _ in KNOWN_NOISE)
# Libraries that print through handlers of their own instead of propagating to the root logger.
OWN_HANDLER_LOGGERS = ("transformers", "lightning.pytorch", "lightning.fabric")


def is_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of :data:`KNOWN_NOISE`."""
    name = record.name
    message = None
    for prefix, pattern in _NOISE:
        if name == prefix or name.startswith(prefix + "."):
            if message is None:
                try:
                    message = record.getMessage()
                except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
                    return False
            if pattern.search(message):
                return True
    return False


class _QuietConsole(logging.Filter):
    """Drops :data:`KNOWN_NOISE`, and records below ``min_level`` (raised on ranks > 0 of a multi-process run,
    whose warnings repeat rank 0's)."""

    min_level = logging.NOTSET

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.min_level and not is_noise(record)


class _KeepNoise(_QuietConsole):
    """``--debug``: the noise stays on the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.min_level


class RunLog(logging.Handler):
    """Writes records to ``<run>/run.log`` once :meth:`attach` names the run directory; buffers them until then."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.path: Optional[Path] = None
        self._buffer: list[logging.LogRecord] = []
        self._stream = None
        self._consoles: list[_QuietConsole] = []

    def attach(self, run_dir: Path) -> Path:
        """Start writing to ``run_dir/run.log`` (appending: a resumed run continues the file), buffered records
        first."""
        self.acquire()
        try:
            self.path = Path(run_dir) / LOG_FILE
            self._stream = open(self.path, "a", encoding="utf-8")
            for record in self._buffer:
                self._write(record)
            self._buffer.clear()
        finally:
            self.release()
        return self.path

    def _write(self, record: logging.LogRecord) -> None:
        try:
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:  # noqa: BLE001 - logging must never fail the run
            self.handleError(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self._stream is not None:
            self._write(record)
        elif len(self._buffer) < BUFFER_LIMIT:
            self._buffer.append(record)

    def console_errors_only(self) -> None:
        """Show only errors on the console from now on (a rank > 0: rank 0 shows the run's warnings once)."""
        for console in self._consoles:
            console.min_level = logging.ERROR

    def write_exception(self, exc: BaseException) -> None:
        """Record ``exc`` with its traceback (the console shows one line; the file keeps the rest)."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        self.emit(
            logging.LogRecord("lat_lightning.pipeline", logging.ERROR, __file__, 0, "run stopped: %s", (text,), None)
        )

    def close(self) -> None:
        self.acquire()
        try:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            self._buffer.clear()
        finally:
            self.release()
        super().close()


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


@contextmanager
def run_logging(debug: bool = False) -> Iterator[RunLog]:
    """Log the run to ``run.log`` and keep :data:`KNOWN_NOISE` off the console (``debug``: keep it on).

    Yields:
        The :class:`RunLog`; call ``attach(run_dir)`` once the run directory exists.
    """
    # Imported first so that they set up their own console handlers exactly as without this function (Lightning
    # adds one only when the root logger has none).
    import lightning.pytorch  # noqa: F401
    from transformers.utils import logging as hf_logging  # noqa: F401

    root = logging.getLogger()
    runlog = RunLog()
    quiet = _KeepNoise() if debug else _QuietConsole()
    undo: list = []

    runlog._consoles.append(quiet)

    def add_filter(handler: logging.Handler) -> None:
        handler.addFilter(quiet)
        undo.append(lambda: handler.removeFilter(quiet))

    if not root.handlers:  # what Python's last-resort handler did: WARNING and above, the bare message, on stderr
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        root.addHandler(console)
        undo.append(lambda: root.removeHandler(console))
        old_level = root.level
        root.setLevel(logging.INFO)
        undo.append(lambda: root.setLevel(old_level))
    for handler in _console_handlers(root):
        add_filter(handler)
    root.addHandler(runlog)
    undo.append(lambda: root.removeHandler(runlog))
    for name in OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        for handler in _console_handlers(logger):
            add_filter(handler)
        if not logger.propagate:
            logger.addHandler(runlog)
            undo.append(lambda lg=logger: lg.removeHandler(runlog))
    logging.captureWarnings(True)
    undo.append(lambda: logging.captureWarnings(False))
    try:
        yield runlog
    finally:
        for step in reversed(undo):
            step()
        runlog.close()


__all__ = ["KNOWN_NOISE", "LOG_FILE", "RunLog", "is_noise", "run_logging"]
