"""The results store: one JSON file per experiment cell, safe for many concurrent writers, read into pandas.

Why files and not a database: SLURM array jobs on a shared filesystem can all write at once with no server and no
lock, a half-written file can be made impossible (write to a temp file, then rename), and records can be copied,
diffed and merged between machines with ordinary tools. A cell's file is named by its config hash, so rerunning a
cell replaces its record instead of adding a duplicate row.

Usage: `pruning-lab results [--store DIR] [--columns PATTERN ...] [--format table|csv|markdown|json]`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.fileio import atomic_file, atomic_write, unwritable
from experiments.migrate import upgrade_record
from experiments.record import SCHEMA_VERSION, _json_default, is_number

# Identity and bookkeeping columns; metric columns go between HEAD and TAIL in first-seen order.
HEAD_COLUMNS = ("model", "method", "ratio", "achieved_ratio", "params_before", "params_after")
TAIL_COLUMNS = ("wall_s", "config_hash", "created")

# Where the table looks for the target ratio when params has no `target_ratio`, first hit wins.
_RATIO_PATHS = (("pruning", "ratio"), ("ratio",), ("method", "ratio"))
_NAME_KEYS = ("name", "id", "path")

# A record file name is its config hash; temp files start with "." so they never look like records.
_HASH_RE = re.compile(r"^[0-9A-Za-z_-]+$")
_REPO_ROOT = Path(__file__).resolve().parents[1]


def default_store_dir() -> Path:
    """`$PRUNING_STORE`, else `<repo>/runs/store` (runs/ is git-ignored); cwd-relative when not in a checkout.

    The checkout test (is run.py there?) keeps a non-editable install from writing into site-packages.
    """
    env = os.environ.get("PRUNING_STORE")
    if env:
        return Path(env).expanduser()
    root = _REPO_ROOT if (_REPO_ROOT / "run.py").is_file() else Path.cwd()
    return root / "runs" / "store"


def unsaved_dirs() -> list[Path]:
    """Where a record goes when its store refuses it, first writable wins: the user cache, then $TMPDIR."""
    import tempfile

    from pruning.models.convert import cache_root  # torch-free: the one home of the cache location

    return [cache_root() / "unsaved-records", Path(tempfile.gettempdir()) / "pruning-lab-unsaved-records"]


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some filesystems (and non-POSIX systems) refuse, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ResultsStore:
    """Records at `root/records/<config_hash>.json`; a record is complete iff it parses and has `schema`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self.records_dir = self.root / "records"
        self.last_error: str | None = None  # why the last write_or_fallback could not use the store

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    def check_writable(self) -> None:
        """One line if no record could be written here: called before a cell loads its model, so hours of work
        never end in a write that fails."""
        from pruning.errors import PruningError

        why = unwritable(self.records_dir)
        if why:
            raise PruningError(
                f"results store {self.records_dir} is not writable ({why}); give a writable store.dir=<dir> "
                f"(or $PRUNING_STORE)"
            )

    def write_or_fallback(self, record: Mapping) -> tuple[Path, str | None]:
        """(path written, None), or, when the store refuses the record (e.g. it became read-only during the
        run), (the fallback file in ``unsaved_dirs()``, the store's error): finished work is never dropped. A
        record no fallback would take either raises, naming every place tried."""
        try:
            return self.write(record), None
        except OSError as e:
            self.last_error = f"{type(e).__name__}: {e.strerror or e}"
        tried = [f"{self.records_dir} ({self.last_error})"]
        for directory in unsaved_dirs():
            path = directory / f"{record['config_hash']}.json"
            try:
                directory.mkdir(parents=True, exist_ok=True)
                atomic_write(path, json.dumps(record, default=_json_default, indent=2, allow_nan=True) + "\n")
                return path, self.last_error
            except OSError as e:
                tried.append(f"{directory} ({type(e).__name__}: {e.strerror or e})")
        raise OSError(f"no place would take the record {record['config_hash']}: tried {'; '.join(tried)}")

    def path(self, config_hash: str | None) -> Path:
        if not isinstance(config_hash, str) or not _HASH_RE.match(config_hash):
            raise ValueError(f"not a valid config hash for a file name: {config_hash!r}")
        return self.records_dir / f"{config_hash}.json"

    def write(self, record: Mapping) -> Path:
        """Atomically (re)write a cell's record; with concurrent writers of one hash, the last rename wins whole.

        The record is streamed into a unique temp file in the same directory, fsynced, then `os.replace`d over
        the final name. A crash or a serialisation error at any point leaves either the old complete record or
        none, never a torn one, and the temp file is removed on any Python-level failure.
        """
        if "schema" not in record:
            raise ValueError("record has no 'schema' key; build it with experiments.record.make_record")
        final = self.path(record.get("config_hash"))
        self.records_dir.mkdir(parents=True, exist_ok=True)
        # 0644: results are meant to be read by the whole group
        with atomic_file(final, "w", encoding="utf-8", fsync=True, perms=0o644) as f:
            json.dump(record, f, default=_json_default, indent=2, allow_nan=True)
            f.write("\n")
        _fsync_dir(self.records_dir)
        return final

    def _read(self, path: Path) -> dict:
        """The record in the current schema: an older one is upgraded on read (experiments/migrate.py), so tables
        and reports read every store; ``python -m experiments.migrate`` renames its files to the new hashes."""
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or "schema" not in record:
            raise ValueError("not a record (no 'schema' key)")
        return upgrade_record(record)

    def get(self, config_hash: str, default: Any = None) -> dict | Any:
        """The complete record for a hash, or `default` when there is none (missing or unreadable, or an old-schema
        file whose cell has another hash now)."""
        try:
            record = self._read(self.path(config_hash))
        except (OSError, ValueError):
            return default
        return record if record.get("config_hash") == config_hash else default

    def has(self, config_hash: str) -> bool:
        """True only for a complete record, so a sweep reruns a cell whose file is damaged."""
        return self.get(config_hash) is not None

    def records(self) -> list[dict]:
        """All complete records, oldest first; unreadable files are skipped with a warning naming them."""
        if not self.records_dir.is_dir():
            return []
        out, old = [], 0
        for path in sorted(self.records_dir.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                out.append(self._read(path))
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping unreadable result record {path}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            old += out[-1].get("config_hash") != path.stem  # upgraded on read: its file has the old name
        if old:
            warnings.warn(
                f"{old} records in {self.records_dir} are of an older schema (read as schema "
                f"{SCHEMA_VERSION}); rewrite them once with `python -m experiments.migrate --store "
                f"{self.root}` so that sweeps find them under their new hashes",
                RuntimeWarning,
                stacklevel=2,
            )
        out.sort(key=lambda r: (str(r.get("created", "")), str(r.get("config_hash", ""))))
        return out

    def __len__(self) -> int:
        return len(self.records())

    def table(self, columns: Sequence[str] | None = None):
        """One row per record (see flatten_record); `columns` are names or fnmatch patterns, in the given order."""
        return records_table(self.records(), columns)


def _dig(mapping: Any, path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _name(value: Any) -> Any:
    """A config group's display name: its `name` (or id/path) field, else the last part of `_target_`."""
    if isinstance(value, Mapping):
        for key in _NAME_KEYS:
            if isinstance(value.get(key), str):
                return value[key]
        target = value.get("_target_")
        return target.rsplit(".", 1)[-1] if isinstance(target, str) else None
    return value


def _number(value: Any) -> float | int | None:
    return value if is_number(value) else None


def _flatten_numbers(prefix: str, value: Any, out: dict) -> None:
    if is_number(value) or value is None:
        if value is not None or prefix not in out:
            out[prefix] = value
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten_numbers(f"{prefix}/{key}", sub, out)
    # strings, bools and lists are protocol descriptions, not metrics


def flatten_metrics(metrics: Mapping) -> dict[str, float | None]:
    """Turn nested metric blocks into table columns.

    Headline rule: a block named `[<prefix>_]<head>` whose entries are `{label: {<head>: value, ...}}` gives one
    column per label: `<label>`, or `<prefix> <label>` (underscores as spaces) when there is a prefix. So
    `metrics["ppl"]["ppl128-lp:wikitext2:test"]["ppl"]` -> `"ppl128-lp:wikitext2:test"` and
    `metrics["dense_ppl"]["ppl128-lp:wikitext2:test"]["ppl"]` -> `"dense ppl128-lp:wikitext2:test"`,
    and the protocol fields beside the headline value stay in the record only.
    Anything else flattens every numeric leaf with "/" joins: `metrics["zeroshot"]["arc_easy"]["acc"]` ->
    `"zeroshot/arc_easy/acc"`, `metrics["efficiency"]["macs"]` -> `"efficiency/macs"`. Strings and bools are skipped.
    """
    out: dict[str, float | None] = {}
    for block, entries in metrics.items():
        head = block.rsplit("_", 1)[-1]
        prefix = block[: -len(head)].rstrip("_").replace("_", " ")
        if isinstance(entries, Mapping):
            for label, entry in entries.items():
                if isinstance(entry, Mapping) and head in entry:
                    out[f"{prefix} {label}" if prefix else str(label)] = _number(entry[head])
                else:
                    _flatten_numbers(f"{block}/{label}", entry, out)
        else:
            _flatten_numbers(str(block), entries, out)
    return out


def flatten_record(record: Mapping) -> dict[str, Any]:
    """One table row: identity, size, metric columns, wall time, hash and creation time."""
    config = record.get("config") or {}
    params = record.get("params") or {}
    timings = record.get("timings") or {}
    before, after = _number(params.get("before")), _number(params.get("after"))
    achieved = _number(params.get("achieved_ratio"))
    if achieved is None and before and after is not None:
        achieved = 1.0 - after / before
    ratio = _number(params.get("target_ratio"))
    for path in _RATIO_PATHS if ratio is None else ():
        ratio = _number(_dig(config, path))
        if ratio is not None:
            break
    row: dict[str, Any] = {
        "model": _name(config.get("model")),
        "method": _name(config.get("method")),
        "ratio": ratio,
        "achieved_ratio": achieved,
        "params_before": before,
        "params_after": after,
    }
    row.update(flatten_metrics(record.get("metrics") or {}))
    row["wall_s"] = _number(timings.get("total")) if isinstance(timings, Mapping) else None
    row["config_hash"] = record.get("config_hash")
    row["created"] = record.get("created")
    return row


def _select(available: list[str], patterns: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for pattern in patterns:
        hits = [c for c in available if c == pattern] or fnmatch.filter(available, pattern)
        if not hits:
            raise KeyError(f"no column matches {pattern!r}; columns are: {', '.join(available)}")
        chosen.extend(c for c in hits if c not in chosen)
    return chosen


def records_table(records: Iterable[Mapping], columns: Sequence[str] | None = None):
    """pandas DataFrame of flattened records (a free function so reports can table a filtered list)."""
    import pandas as pd

    rows = [flatten_record(r) for r in records]
    metric_cols: list[str] = []
    for row in rows:
        metric_cols.extend(c for c in row if c not in HEAD_COLUMNS and c not in TAIL_COLUMNS and c not in metric_cols)
    available = [*HEAD_COLUMNS, *metric_cols, *TAIL_COLUMNS]
    order = _select(available, columns) if columns else available
    return pd.DataFrame(rows, columns=available)[order]


def main(argv: Sequence[str] | None = None) -> int:
    """Print every record in a store as one table."""
    parser = argparse.ArgumentParser(prog="pruning-lab results", description="Show the results store as a table.")
    parser.add_argument(
        "--store", type=Path, default=None, help="store directory (default: $PRUNING_STORE or <repo>/runs/store)"
    )
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="COL",
        help="columns to show: names or fnmatch patterns such as 'ppl*' (comma lists allowed)",
    )
    parser.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table")
    args = parser.parse_args(argv)

    store = ResultsStore(args.store)
    records = store.records()
    if not records:
        print(f"no records in {store.records_dir}")
        return 0
    columns = [c for arg in args.columns for c in arg.split(",") if c] if args.columns else None
    try:
        df = records_table(records, columns)
    except KeyError as exc:
        print(f"pruning-lab results: {exc.args[0]}", file=sys.stderr)
        return 2

    import pandas as pd

    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records", indent=2))
    elif args.format == "markdown":
        from experiments.render import markdown_frame

        print(markdown_frame(df))
    else:
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
            print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
