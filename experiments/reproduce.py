"""The command that reproduces a record: ``pruning-lab run`` with the config groups closest to its resolved config
and overrides for every leaf that differs.

Why: a record stores the resolved config, not the command line that made it; a reader of the dashboard wants to
re-run a cell. Group files are read as plain YAML (no Hydra, no torch): per group the file with the fewest
differing leaves is chosen (a method file only when its ``_target_`` matches), then ``++key=value`` sets each
differing or missing leaf and ``~key`` drops a leaf the file has and the record does not. Keys outside the cell's
identity (experiments/record.py NON_SEMANTIC) and the ones the cell adds itself (the model fingerprint, the eval
version) are left out, so composing the command gives the record's config hash (tests/test_dashboard.py).
A record written before a config field existed gets today's default for it (Hydra cannot drop a null field),
so its command composes a neighbouring cell, not the same hash.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from experiments.record import LEGACY_CALIBRATION, NON_SEMANTIC

GROUPS = ("model", "method", "eval", "calibration", "recovery")
ADDED_BY_CELL = {("model", "fingerprint"), ("eval", "version"), ("model", "fetch")}
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./]*$")


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar: strings quoted unless plainly a name, lists and dicts recursively."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else ("nan" if math.isnan(value) else repr(value))
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in ("null", "true", "false", "inf", "nan"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as a Hydra override")


def _leaves(value: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested mappings -> {path: value}; lists are leaves (Hydra overrides them whole)."""
    if isinstance(value, Mapping) and value:
        out: dict[tuple, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, (*prefix, str(k))))
        return out
    return {prefix: value}


@cache
def _group_files(conf: str, group: str) -> dict[str, dict]:
    """name -> the group's own mapping (a ``@package _global_`` file's ``<group>:`` block), defaults removed."""
    out = {}
    for path in sorted(Path(conf, group).glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            continue
        if "_global_" in path.read_text(encoding="utf-8").split("\n", 1)[0]:
            data = data.get(group) or {}
        out[path.stem] = {k: v for k, v in data.items() if k != "defaults"}
    return out


def _group_overrides(group: str, want: Mapping, conf: Path) -> list[str]:
    files = _group_files(str(conf), group)
    if group == "method":
        files = {n: f for n, f in files.items() if f.get("_target_") == want.get("_target_")}
    if group == "calibration":  # a field absent from an older record meant its legacy value (record.py)
        want = {**LEGACY_CALIBRATION, **want}
    have = {p: v for p, v in _leaves(want).items() if (group, *p[:1]) not in ADDED_BY_CELL and "progress" not in p}
    best: str | None = None
    best_ops: list[str] | None = None
    for name, content in files.items():
        base = {p: v for p, v in _leaves(content).items() if "progress" not in p}
        ops = [f"++{'.'.join((group, *p))}={hydra_value(v)}" for p, v in have.items() if p not in base or base[p] != v]
        # a leaf the record lacks (a field added since it was written): dropped; Hydra cannot drop one that is
        # (or resolves to) null, so that one stays at today's default and the hash differs (an older record)
        ops += [
            f"~{'.'.join((group, *p))}"
            for p, v in base.items()
            if p not in have and v is not None and not str(v).startswith("${") and (group, *p[:1]) not in ADDED_BY_CELL
        ]
        if best_ops is None or len(ops) < len(best_ops):
            best, best_ops = name, ops
    if best is None or best_ops is None:  # no file of this group fits: set every leaf on top of the default
        return [f"++{'.'.join((group, *p))}={hydra_value(v)}" for p, v in have.items()]
    return [f"{group}={best}", *best_ops]


def reproduce_command(record: Mapping, conf: Path | None = None) -> str:
    """``pruning-lab run ...`` that composes this record's config (its config hash), as one shell line."""
    if conf is None:
        from pruning_lab.run import conf_dir  # the install's conf/ (source checkout or wheel)

        conf = conf_dir()
    cfg = record.get("config") or {}
    parts: list[str] = []
    for group in GROUPS:
        if isinstance(cfg.get(group), Mapping):
            parts += _group_overrides(group, cfg[group], conf)
    for path, value in _leaves({k: v for k, v in cfg.items() if k not in GROUPS and k not in NON_SEMANTIC}).items():
        if path:
            parts.append(f"++{'.'.join(path)}={hydra_value(value)}")
    return "pruning-lab run " + " ".join(shlex.quote(p) for p in parts)
