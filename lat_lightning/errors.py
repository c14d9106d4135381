"""User-facing error types. The CLI prints them as one line and exits non-zero (no traceback)."""


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
