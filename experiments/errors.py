"""The root of the user-facing errors, importable without torch.

``pruning.errors`` is where the library's errors are defined and imported from; it re-exports these two, which live
here (with ``one_line``) because importing anything under ``pruning`` imports torch (``pruning/__init__``), and the
config checks (``experiments.schema``, ``pruning_lab.run``) must report a typo before torch is loaded.
"""


class PruningError(Exception):
    """Bad input the user can fix: unknown name, impossible ratio, missing data, unsupported model."""


class ConfigError(PruningError):
    """A config value, key or combination the schema refuses (experiments/schema.py); the message names the key."""


def one_line(e: BaseException) -> str:
    """An exception's message as one line for a ``PruningError``: its first line, plus the next one when the first
    ends in a colon (torch's "Error(s) in loading state_dict for X:" and pip put the reason there)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
