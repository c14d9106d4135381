"""User-facing error types. The CLI prints them as one line and exits non-zero (no traceback): 2 for bad input,
``exit_code`` for the errors that carry one (a run stopped by a signal: 128 + the signal). See docs/errors.md."""


class LatLightningError(Exception):
    """Base class for errors caused by the user's input (config, data, paths, environment)."""


class ConfigError(LatLightningError):
    """A recipe or override is invalid (unknown key, wrong type, value outside its choices)."""


class DataError(LatLightningError):
    """A dataset is empty, lacks required columns, or has sequences that violate the length policy."""


class ModelLoadError(LatLightningError):
    """A model or tokenizer cannot be loaded as configured."""


class TrainingDivergedError(LatLightningError):
    """A loss became NaN or infinite; a checkpoint was written before raising."""


class RunInterrupted(LatLightningError):
    """A run stopped by SIGTERM or SIGINT after saving what it could; the message says what and how to resume.

    Attributes:
        exit_code: 128 + the signal (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
