"""One result record per experiment cell: the full config plus everything needed to trust or redo the number.

A record is plain JSON so that it outlives the code that wrote it: it can be read by pandas, by `jq`, or by a
later version of this project without importing torch. It carries the resolved config (so the cell can be rerun),
a hash of that config (so sweeps can skip cells that are already done), package versions and the git sha (so a
changed number can be traced to a changed library or commit), the seed, and the metrics with their protocol fields.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

# 1: the first records; 2: allocation settings moved from the global `allocation` group into the method configs
# that read them (experiments/migrate.py upgrades schema-1 records and their config hashes).
SCHEMA_VERSION = 2

# Top-level config keys that never change a number, so they must not change the hash either:
#   store    – where the record is written (a scratch store and the shared store hold the same cell),
#   logger   – how the run is reported (W&B on or off does not alter the model or the metrics),
#   hydra    – Hydra's own run/sweep dirs, launcher and job bookkeeping,
#   force    – whether to recompute a cell that already has a record,
#   progress – progress-bar verbosity,
#   threads, save_model – CPU threads used and whether the pruned model is also written to disk.
# Anything else (model, method, ratio, calibration, recovery, eval, seed, ...) is semantic.
NON_SEMANTIC = ("store", "logger", "hydra", "force", "progress", "threads", "save_model")

# Calibration fields added after records existed (pruning.data.CALIB_FIELDS). At these values they reproduce what
# every earlier record did (LLM-Pruner's sampler, random draws, no join), so they are left out of the hash and an
# earlier record keeps its identity; `paper_dataset` only names the dataset a substitute stands in for.
LEGACY_CALIBRATION = {"sampler": "llm_pruner", "order": "random", "join": None}
CALIBRATION_LABELS = ("paper_dataset",)

# The keys make_record owns; `extra` may add keys but not replace these.
CORE_KEYS = (
    "schema",
    "config",
    "config_hash",
    "created",
    "host",
    "seed",
    "versions",
    "git",
    "params",
    "metrics",
    "timings",
)

# Distribution names queried by package_versions(); a tuple means "first one that is installed".
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "pruning-lab": ("pruning-lab",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "lm_eval": ("lm_eval", "lm-eval"),
    "datasets": ("datasets",),
    "hydra-core": ("hydra-core",),
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "wandb": ("wandb",),
}

_REPO_DIR = Path(__file__).resolve().parents[1]


def _json_default(obj: Any) -> Any:
    """`json.dump(default=...)` hook: numpy/torch values become Python values; anything else is an error.

    Duck-typed so that writing a record never imports torch or numpy. Unknown objects raise instead of being
    str()-ed, because a silently stringified metric is worse than a failed write.
    """
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    shape = getattr(obj, "shape", None)
    if shape is not None and hasattr(obj, "tolist"):
        # numpy scalar/array, torch tensor: 0-d gives a Python scalar, n-d a nested list.
        if hasattr(obj, "detach"):
            obj = obj.detach().cpu()
        return obj.tolist()
    if type(obj).__module__.split(".")[0] == "omegaconf":
        return _omegaconf_to_container(obj)
    raise TypeError(f"object of type {type(obj).__module__}.{type(obj).__qualname__} is not JSON serialisable")


def _omegaconf_to_container(obj: Any) -> Any:
    from omegaconf import OmegaConf  # only reached when a DictConfig was passed in, so omegaconf is loaded

    return OmegaConf.to_container(obj, resolve=True)


def to_jsonable(obj: Any) -> Any:
    """Return a deep copy made only of dict/list/str/int/float/bool/None, so a record round-trips through JSON.

    Dict keys become strings and tuples become lists, which is what JSON would do anyway; doing it here makes
    the in-memory record equal to the record read back from disk.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return to_jsonable(_json_default(obj))


def _plain_config(cfg: Any) -> dict:
    if not isinstance(cfg, Mapping) and type(cfg).__module__.split(".")[0] != "omegaconf":
        raise TypeError(f"config must be a mapping, got {type(cfg).__name__}")
    plain = to_jsonable(cfg)
    if not isinstance(plain, dict):
        raise TypeError(f"config must be a mapping, got {type(cfg).__name__}")
    return plain


def _drop_progress(value):
    """Progress bars change no number: a method's `progress: ${progress}` copy is not identity either."""
    if isinstance(value, Mapping):
        return {k: _drop_progress(v) for k, v in value.items() if k != "progress"}
    if isinstance(value, list):
        return [_drop_progress(v) for v in value]
    return value


def semantic_config(cfg: Any) -> dict:
    """The resolved config minus bookkeeping (NON_SEMANTIC keys, progress flags): what can move a number."""
    plain = _plain_config(cfg)
    return _drop_progress({k: v for k, v in plain.items() if k not in NON_SEMANTIC})


def config_hash(cfg: Mapping) -> str:
    """Identity of a cell: same semantic config, same hash, whichever store, logger or machine ran it.

    The hash is over canonical JSON (sorted keys, no whitespace) of the resolved config minus NON_SEMANTIC, with
    the calibration sampler fields left out at their legacy values (LEGACY_CALIBRATION).
    Note that JSON keeps 1 and 1.0 apart, so `ratio=1` and `ratio=1.0` are different cells; Hydra gives the same
    type for the same override text, so this only matters for hand-built configs.
    """
    semantic = semantic_config(cfg)
    if isinstance(semantic.get("calibration"), Mapping):
        semantic["calibration"] = {
            k: v
            for k, v in semantic["calibration"].items()
            if k not in CALIBRATION_LABELS and not (k in LEGACY_CALIBRATION and v == LEGACY_CALIBRATION[k])
        }
    text = json.dumps(semantic, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def package_versions() -> dict[str, str | None]:
    """Versions of the libraries that can move a number, read from metadata so nothing heavy gets imported."""
    versions: dict[str, str | None] = {}
    for key, dists in _DISTRIBUTIONS.items():
        versions[key] = None
        for dist in dists:
            try:
                versions[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    versions["python"] = platform.python_version()
    return versions


def git_info(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit a number came from, and whether the tree had edits on top of it; None when unknown.

    Untracked (but not ignored) files count as dirty: a new, uncommitted module can change a result.
    `--no-optional-locks` keeps many concurrent jobs from taking `.git/index.lock`, which would make a commit
    running at the same moment fail. An installed package (no run.py beside it) has no commit of its own: the
    repository around its site-packages, if any, is someone else's.
    """
    if repo_dir is None and not (_REPO_DIR / "run.py").is_file():
        return {"sha": None, "dirty": None}
    repo = Path(repo_dir) if repo_dir is not None else _REPO_DIR
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(repo), *args],
                capture_output=True,
                text=True,
                timeout=20,
                env=env,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = git("rev-parse", "--verify", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"sha": sha.strip(), "dirty": None if status is None else bool(status.strip())}


def make_record(
    cfg: Mapping,
    *,
    metrics: Mapping,
    params: Mapping,
    timings: Mapping,
    extra: Mapping | None = None,
) -> dict:
    """Assemble the one record a cell writes; see ResultsStore.table for the shapes the table understands.

    Expected shapes (others are kept verbatim, and numeric leaves still reach the table):
      params  = {"before": int, "after": int, "achieved_ratio": float}   # achieved = 1 - after/before
      timings = {"total": seconds, <phase>: seconds, ...}
      metrics = {"ppl": {"<protocol label>": {"ppl": float, <protocol fields>}}, "dense_ppl": {...}, ...}
    """
    config = _plain_config(cfg)
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "config": config,
        "config_hash": config_hash(config),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "seed": config.get("seed"),
        "versions": package_versions(),
        "git": git_info(),
        "params": to_jsonable(params),
        "metrics": to_jsonable(metrics),
        "timings": to_jsonable(timings),
    }
    if extra:
        clash = sorted(set(extra) & set(CORE_KEYS))
        if clash:
            raise ValueError(f"extra must not replace core record keys: {clash}")
        record.update(to_jsonable(extra))
    return record


def is_number(value: Any) -> TypeGuard[int | float]:
    """A metric value for tables: int/float but not bool (a protocol flag such as `bos: true` is not a metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
