"""Schema upgrades: records written by older code, and command lines written for older configs.

Schema 2 (issue 24): the global ``allocation`` config group is gone. Its settings live in the method configs that use
them, so a cell's config names only what its method reads:

=========================================  =========================================================================
schema 1                                   schema 2
=========================================  =========================================================================
``allocation.layer_start_frac`` / ``_end_frac`` / ``layer_start`` / ``layer_end``
                                           ``method.layers.start_frac`` / ``end_frac`` / ``start`` / ``end``
                                           (llm_pruner, adapruner, random, magnitude, wanda_sp, flap, numerical,
                                           shortgpt, llm_bip; nirvana, slicegpt and search_llm never read a range)
``allocation.count_rule``                  ``method.count_rule`` (llm_pruner, adapruner, random, magnitude, llm_bip;
                                           wanda_sp and flap always had their own)
``allocation.group_ratio``                 ``method.group_ratio`` (llm_pruner, adapruner, random, magnitude)
``allocation=layer_range``                 ``method.layers.start_frac=0.125 method.layers.end_frac=0.9375``
                                           (the default of method=llm_pruner)
=========================================  =========================================================================

That changes the resolved config of every pruning cell and so its config hash. ``upgrade_record`` rewrites an old
record to the new schema with the hash the new code composes for the same command (``ResultsStore`` applies it on
read); ``python -m experiments.migrate --store DIR`` rewrites a store in place, once, so that a sweep finds its
finished cells under their new names. Nothing is deleted: a record whose new hash is already taken by another one
(e.g. two NIRVANA cells that differed only in the allocation it ignored) goes to ``DIR/superseded/``.
``moved_override`` turns a schema-1 command-line override into one line that names the new key.

Torch-free, like the rest of record reading.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.record import SCHEMA_VERSION, config_hash

UNIFORM = "pruning.allocation.Uniform"
_M = "pruning.methods."
# Methods that read a layer range (schema 1: the allocation's; schema 2: method.layers).
LAYER_RANGE = {
    _M + t
    for t in (
        "llm_pruner.llm_pruner",
        "adapruner.adapruner",
        "baselines.random",
        "baselines.magnitude",
        "wanda_sp.wanda_sp",
        "flap.flap",
        "numerical.numerical",
        "shortgpt.shortgpt",
        "llm_bip.llm_bip",
    )
}
# Methods whose unit counts followed allocation.count_rule (wanda_sp and flap replaced it by their own key;
# numerical ranks single units; shortgpt's block counts are the same under both rules).
COUNT_RULE = {
    _M + t
    for t in (
        "llm_pruner.llm_pruner",
        "adapruner.adapruner",
        "baselines.random",
        "baselines.magnitude",
        "llm_bip.llm_bip",
    )
}
# Methods whose native knob method.group_ratio is what allocation.group_ratio also set.
GROUP_RATIO = {
    _M + t for t in ("llm_pruner.llm_pruner", "adapruner.adapruner", "baselines.random", "baselines.magnitude")
}
# Methods that took the allocation config and ignored it (their own allocators) or used only its layer range.
IGNORED_GROUP_RATIO = {
    _M + t
    for t in ("nirvana.nirvana", "slicegpt.slicegpt", "search_llm.search_llm", "baselines.dense", "numerical.numerical")
}
KNOWN = LAYER_RANGE | IGNORED_GROUP_RATIO
LAYER_FIELDS = {
    "layer_start_frac": "start_frac",
    "layer_end_frac": "end_frac",
    "layer_start": "start",
    "layer_end": "end",
}


class MigrationError(ValueError):
    """A record that cannot be rewritten without changing what it claims (it is left as it is)."""


def config_schema1_to_2(config: Mapping) -> dict:
    """A schema-1 resolved cell config as schema 2: ``allocation`` moved into the method that reads it."""
    out = copy.deepcopy(dict(config))
    alloc = out.pop("allocation", None)
    method = out.get("method")
    if alloc is None or not isinstance(method, dict):
        return out
    target = method.get("_target_")
    if not isinstance(alloc, Mapping) or alloc.get("_target_", UNIFORM) != UNIFORM:
        raise MigrationError(f"allocation {alloc!r} is not the uniform allocator; schema 2 has no place for it")
    if target not in KNOWN:
        raise MigrationError(f"method {target!r} took the allocation config; schema 2 does not know where it goes")
    if target in LAYER_RANGE:
        method["layers"] = {new: alloc[old] for old, new in LAYER_FIELDS.items() if old in alloc}
    if target in COUNT_RULE and "count_rule" in alloc:
        method["count_rule"] = alloc["count_rule"]
    group_ratio = alloc.get("group_ratio")
    if group_ratio is not None:
        if target in GROUP_RATIO:
            if method.get("group_ratio") is None:  # the method's own knob won when both were set
                method["group_ratio"] = group_ratio
        elif target not in IGNORED_GROUP_RATIO:
            raise MigrationError(
                f"allocation.group_ratio={group_ratio} fixed the per-layer fraction of {target}, "
                f"which has no such key in schema 2"
            )
    return out


def upgrade_record(record: Mapping) -> dict:
    """The record in the current schema (the same object when it already is): new config and config hash, and
    ``migrations`` naming the schema and hash it had before."""
    schema = record.get("schema")
    if schema == SCHEMA_VERSION:
        return record  # type: ignore[return-value]
    if schema != 1:
        raise MigrationError(
            f"record {record.get('config_hash')}: unknown schema {schema!r} (this code reads 1 and {SCHEMA_VERSION})"
        )
    new = dict(record)
    new["config"] = config_schema1_to_2(record.get("config") or {})
    new["config_hash"] = config_hash(new["config"])
    new["schema"] = SCHEMA_VERSION
    new["migrations"] = [*record.get("migrations", []), {"from_schema": schema, "config_hash": record["config_hash"]}]
    return new


def _origin(record: Mapping) -> str:
    """The hash a record was first written under (its file name before any migration)."""
    migrations = record.get("migrations") or []
    return str(migrations[0]["config_hash"] if migrations else record["config_hash"])


def migrate_store(root: str | Path, dry_run: bool = False, log=print) -> tuple[dict[str, str], dict[str, str]]:
    """Rewrite every old record of a store in the current schema under its new hash; returns ({old: new hash},
    {file: why it was left as it is}).

    The new record is written (atomically) before the old file is removed, so an interrupted run loses nothing and
    a second run finishes it. When the new hash is taken by another record, the newer one stays and the older goes
    to ``<root>/superseded/``. A record that cannot be rewritten faithfully (MigrationError) is left untouched.
    """
    from experiments.store import ResultsStore

    store = ResultsStore(root)
    moved: dict[str, str] = {}
    left: dict[str, str] = {}
    superseded = store.root / "superseded"
    for path in sorted(store.records_dir.glob("*.json")) if store.records_dir.is_dir() else []:
        if path.name.startswith("."):
            continue
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("schema") == SCHEMA_VERSION:
            continue
        try:
            new = upgrade_record(raw)
        except MigrationError as exc:
            left[path.name] = str(exc)
            log(f"{path.stem} left as it is: {exc}")
            continue
        target = store.path(new["config_hash"])
        moved[path.stem] = new["config_hash"]
        log(f"{path.stem} -> {new['config_hash']}")
        if dry_run:
            continue
        if target != path and target.is_file():
            other = upgrade_record(json.loads(target.read_text(encoding="utf-8")))
            keep, drop = (new, other) if str(new.get("created")) > str(other.get("created")) else (other, new)
            superseded.mkdir(parents=True, exist_ok=True)
            (superseded / f"{_origin(drop)}.json").write_text(json.dumps(drop, indent=2) + "\n", encoding="utf-8")
            log(
                f"  {target.name} was taken: kept the record created {keep.get('created')}, moved the other to "
                f"{superseded}"
            )
            new = keep
        store.write(new)
        if target != path:
            path.unlink()
    return moved, left


# Schema-1 command-line overrides -> the schema-2 keys (for one clear line instead of Hydra's composition error).
_MOVED_KEYS = {
    "layer_start_frac": "method.layers.start_frac",
    "layer_end_frac": "method.layers.end_frac",
    "layer_start": "method.layers.start",
    "layer_end": "method.layers.end",
    "count_rule": "method.count_rule",
    "group_ratio": "method.group_ratio",
}
_MOVED_GROUPS = {
    "layer_range": (
        "use method.layers.start_frac=0.125 method.layers.end_frac=0.9375 (LLM-Pruner's range, the "
        "default of method=llm_pruner)"
    ),
    "uniform": (
        "all layers is the default of every method with a layer range (method.layers.start_frac=0.0 "
        "method.layers.end_frac=1.0); drop the override"
    ),
}
_ALL_KEYS = (
    "method.layers.{start_frac,end_frac,start,end}, method.count_rule, method.group_ratio, for the "
    "methods that read them"
)


def moved_override(arg: str) -> str | None:
    """One line for a command-line override of the removed ``allocation`` group, naming the new key; else None."""
    key, sep, value = arg.lstrip("+~").partition("=")
    if key != "allocation" and not key.startswith("allocation."):
        return None
    if key == "allocation":
        names = [v.strip() for v in value.split(",") if v.strip()] if sep else []
        hints = [f"allocation={n}: {_MOVED_GROUPS[n]}" for n in names if n in _MOVED_GROUPS]
        return f"the allocation config group was removed (allocation settings are method keys now: {_ALL_KEYS})" + (
            f"; {'; '.join(hints)}" if hints else ""
        )
    field = key.removeprefix("allocation.")
    new = _MOVED_KEYS.get(field)
    if new is None:
        return (
            f"{key} was removed with the allocation config group; allocation settings are method keys now: {_ALL_KEYS}"
        )
    return f"{key} was removed with the allocation config group: use {new}{'=' + value if sep else ''}"


def check_overrides(argv: Sequence[str]) -> None:
    """Raise ``ConfigKeyMoved`` (one line) for the first override of a removed key; for run.py and the CLI, before
    Hydra composes anything."""
    from pruning.errors import ConfigKeyMoved  # imported here: this module stays torch-free

    for arg in argv:
        msg = moved_override(arg)
        if msg is not None:
            raise ConfigKeyMoved(msg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.migrate",
        description=f"Rewrite a results store's records in schema {SCHEMA_VERSION}.",
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="store directory (default: $PRUNING_STORE or <repo>/runs/store)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print old -> new hashes, write nothing")
    args = parser.parse_args(argv)
    from experiments.store import ResultsStore

    root = ResultsStore(args.store).root
    moved, left = migrate_store(root, dry_run=args.dry_run)
    print(
        f"{'would rewrite' if args.dry_run else 'rewrote'} {len(moved)} records of {root} in schema "
        f"{SCHEMA_VERSION}" + (f"; {len(left)} left as they are (see above)" if left else ""),
        file=sys.stderr,
    )
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
