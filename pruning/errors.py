"""User-facing errors: one clear line, raised before heavy compute, caught by run.py."""

# torch-free root (and one_line), so the config checks run before torch is imported
from experiments.errors import ConfigError, PruningError, one_line

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConfigKeyMoved",
    "DataError",
    "InfeasibleCalibrationError",
    "InfeasibleRatioError",
    "PruningError",
    "RecordNotSaved",
    "UnsupportedModelError",
    "one_line",
]


class DataError(PruningError):
    """A data file is missing or unreadable; the message names it and says how to supply it."""


class UnsupportedModelError(PruningError):
    """No adapter handles this architecture."""


class CheckpointError(PruningError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class InfeasibleRatioError(PruningError):
    """The requested ratio cannot be met without emptying a layer (or is outside [0, 1))."""


class ConfigKeyMoved(ConfigError):
    """A config key or group of an older schema (experiments/migrate.py names the new one)."""


class InfeasibleCalibrationError(PruningError):
    """The calibration data cannot fill n_samples x seq_len (too few long documents); a search scores it as +inf."""


class RecordNotSaved(PruningError):
    """A finished cell whose record the results store refused at the last write; ``record`` holds the numbers and
    the message names the fallback file they were saved to."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record
