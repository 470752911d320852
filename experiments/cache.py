"""Content-keyed caches shared by all cells of a sweep (and by later sweeps).

Keys are explicit dicts that name everything the cached value depends on, including content fingerprints of the
checkpoint and of the data files, so a changed file invalidates the entry by itself. Values are written
atomically; a corrupt entry is treated as missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiments.fileio import atomic_file, atomic_write, sha256_file, unwritable
from pruning.models.convert import cache_root  # one home for the user cache location


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so re-hashing a big checkpoint costs nothing."""
    path = Path(path).resolve()
    st = path.stat()
    memo_dir = cache_root() / "sha256"
    memo = memo_dir / (key_hash({"p": str(path), "s": st.st_size, "m": st.st_mtime_ns}) + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only cache costs a re-hash next time; check_cache_writable says so
        memo_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, digest.encode())
    return digest


def check_cache_writable() -> None:
    """One line if the cache (calibration ids, statistics) cannot be written: called before a cell loads its
    model, since a cell writes its cache entries on the way and would fail after the work."""
    from pruning.errors import PruningError

    root = cache_root()
    why = unwritable(root)
    if why:
        raise PruningError(f"cache directory {root} is not writable ({why}); set $PRUNING_CACHE to a writable one")


def dir_fingerprint(directory: Path) -> str:
    """Content fingerprint of a checkpoint directory: the sha256s of every file in it, by relative name."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return key_hash({str(p.relative_to(directory)): file_sha256(p) for p in files})


class TensorCache:
    """torch.save'd values under ``cache_root()/<kind>/<key hash>.pt``, with the key stored beside the value."""

    def __init__(self, kind: str, root: Path | None = None):
        self.dir = (root or cache_root()) / kind

    def get_or_compute(self, key: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """Return (value, hit)."""
        path = self.dir / f"{key_hash(key)}.pt"
        if path.is_file():
            try:
                entry = torch.load(path, weights_only=False)
                if entry.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str)):
                    return entry["value"], True
            except Exception:  # noqa: BLE001 - a torn or foreign file is a miss, and gets rewritten
                pass
        value = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            torch.save({"key": json.loads(json.dumps(key, sort_keys=True, default=str)), "value": value}, f)
        return value, False
