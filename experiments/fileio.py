"""Torch-free file helpers shared by the results store, the caches and the model converter: write a file so that a
crash leaves the old file or the new one, never a torn one, and hash a file without reading it into memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    fsync: bool = False,
    perms: int | None = None,
) -> Iterator[IO]:
    """Open a unique temp file beside ``path`` (a name starting with "." so no glob of real files sees it), yield
    it, and ``os.replace`` it over ``path`` when the block ends without an error; on any error the temp file is
    removed and ``path`` is left as it was.

    ``fsync``: flush the data to disk before the rename (records: a power cut must not leave an empty file under the
    final name). ``perms``: the file's mode (``mkstemp`` makes 0600, which would outlive the rename).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if perms is not None:
            os.chmod(tmp, perms)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unwritable(directory: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``directory``, or None. A probe file is created and removed in it, or, while
    it does not exist yet, in the nearest existing parent (where it would be made, so the check leaves nothing
    behind): the only test that sees read-only mounts, full disks, ACLs and a file in a directory's place alike
    (root ignores permission bits, so ``os.access`` would say yes)."""
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"NotADirectoryError: {existing} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def atomic_write(path: str | os.PathLike, data: bytes | str, **kwargs) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; keywords as ``atomic_file``."""
    text = isinstance(data, str)
    with atomic_file(path, "w" if text else "wb", encoding="utf-8" if text else None, **kwargs) as f:
        f.write(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
