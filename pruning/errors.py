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


class ConfigKeyMoved(PruningError):
    """A config key or group of an older schema (experiments/migrate.py names the new one)."""


class InfeasibleCalibrationError(PruningError):
    """The calibration data cannot fill n_samples x seq_len (too few long documents); a search scores it as +inf."""


class RecordNotSaved(PruningError):
    """A finished cell whose record the results store refused at the last write; ``record`` holds the numbers and
    the message names the fallback file they were saved to."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def one_line(e: BaseException) -> str:
    """An exception's message as one line for a ``PruningError``: its first line, plus the next one when the first
    ends in a colon (torch's "Error(s) in loading state_dict for X:" and pip put the reason there)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
