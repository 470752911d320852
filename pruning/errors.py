"""User-facing errors: one clear line, raised before heavy compute, caught by run.py."""


class PruningError(Exception):
    """Bad input the user can fix: unknown name, impossible ratio, missing data, unsupported model."""


class DataError(PruningError):
    """A data file is missing or unreadable; the message names it and says how to supply it."""


class UnsupportedModelError(PruningError):
    """No adapter handles this architecture."""


class CheckpointError(PruningError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class InfeasibleRatioError(PruningError):
    """The requested ratio cannot be met without emptying a layer (or is outside [0, 1))."""


class InfeasibleCalibrationError(PruningError):
    """The calibration data cannot fill n_samples x seq_len (too few long documents); a search scores it as +inf."""
