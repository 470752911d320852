"""Weights & Biases logging of one finished cell: config, flattened metrics in the summary, the record itself, the
per-layer widths and the paper-style rows.

Why it runs after the record is on disk and swallows every error: the JSON record in the results store is the
source of truth; W&B is a view of it. A missing wandb package, a full disk, a bad directory or a network outage
must cost the W&B run, never the result, so `log_record` warns and returns None instead of raising.

Offline by default (`conf/logger/wandb.yaml`: mode `${oc.env:WANDB_MODE,offline}`, dir `${oc.env:WANDB_DIR,runs/wandb}`,
outside version control); `logger.mode=online` is the one override to upload, and `wandb sync <run dir>` uploads an
offline run later. An offline run keeps its summary in the run's transaction log (`run-<id>.wandb`), not in
`files/wandb-summary.json` (that file is written by the online sender); read it back with
`wandb leet inspect --summary --json <run dir>`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from experiments.record import _json_default, is_number

# `name` selects the logger (none | wandb); the W&B run's own name is `run_name` (default: model-method-ratio-hash).
DEFAULTS: dict[str, Any] = {
    "name": "wandb",
    "project": "pruning-lab",
    "entity": None,
    "mode": "offline",
    "dir": "runs/wandb",
    "group": None,
    "tags": [],
    "job_type": "cell",
    "run_name": None,
    "settings": {},
}


def _plain(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if type(cfg).__module__.split(".")[0] == "omegaconf":
        from omegaconf import OmegaConf

        return cast(dict, OmegaConf.to_container(cfg, resolve=True))  # a DictConfig's container is a dict
    return dict(cfg)


def summary_metrics(record: Mapping) -> dict[str, Any]:
    """The record's numbers as flat W&B summary keys.

    PPL-style blocks give `<block>/<label>` (e.g. `ppl/ppl128-lp:wikitext2:test`, `dense_ppl/...`) with the
    headline value; every other numeric leaf gives its path joined by "/" (`zeroshot/arc_easy/acc`,
    `efficiency/macs`); plus params/*, timings/* and the config hash. Protocol strings stay in the record.
    """
    out: dict[str, Any] = {}

    def leaves(prefix: str, value: Any) -> None:
        if is_number(value):
            out[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                leaves(f"{prefix}/{k}", v)

    for block, entries in (record.get("metrics") or {}).items():
        head = str(block).rsplit("_", 1)[-1]
        if (
            isinstance(entries, Mapping)
            and entries
            and all(isinstance(e, Mapping) and head in e for e in entries.values())
        ):
            for label, entry in entries.items():
                if is_number(entry[head]):
                    out[f"{block}/{label}"] = entry[head]
        else:
            leaves(str(block), entries)
    for group in ("params", "timings"):
        leaves(group, record.get(group) or {})
    out["config_hash"] = record.get("config_hash")
    return out


def _widths_table(wandb, record: Mapping):
    widths = record.get("widths") or []
    keys = list(dict.fromkeys(k for w in widths for k in w))
    return wandb.Table(columns=["layer", *keys], data=[[i, *[w.get(k) for k in keys]] for i, w in enumerate(widths)])


def _paper_rows(wandb, record: Mapping) -> dict[str, Any]:
    """The record's rows (dense and pruned) in each paper table whose protocol it has, as W&B tables."""
    from experiments import render
    from experiments.observations import observations
    from experiments.store import records_table
    from experiments.table_specs import TABLES
    from experiments.tables import build_table

    out = {"results": wandb.Table(dataframe=records_table([record]).astype(object).where(lambda d: d.notna(), None))}
    obs = observations([record])
    for name, spec in TABLES.items():
        table = build_table(obs, spec, published="none")
        if table.n_ours:
            out[f"paper/{name}"] = wandb.Table(dataframe=render.display(table).astype(str))
    return out


def _log(record: Mapping, cfg: dict) -> Path:
    import wandb

    from experiments.observations import method_name
    from experiments.store import _name

    run_dir = Path(cfg["dir"]).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    model = _name((record.get("config") or {}).get("model"))
    method = method_name(record)
    ratio = (record.get("params") or {}).get("target_ratio")
    settings = {
        "console": "off",
        "disable_git": True,
        "x_disable_stats": True,
        "silent": True,
        **(cfg.get("settings") or {}),
    }
    name = cfg.get("run_name") or f"{model}-{method}-{ratio}-{str(record.get('config_hash'))[:8]}"
    run = wandb.init(
        project=cfg["project"],
        entity=cfg.get("entity"),
        name=name,
        group=cfg.get("group") or str(model),
        job_type=cfg.get("job_type"),
        tags=[str(model), str(method), f"ratio={ratio}", *(cfg.get("tags") or [])],
        dir=str(run_dir),
        mode=cfg["mode"],
        config=dict(record.get("config") or {}),
        reinit="finish_previous",
        settings=wandb.Settings(**settings),
    )
    ok = False
    try:
        run.summary.update(summary_metrics(record))
        run.log({"widths": _widths_table(wandb, record), **_paper_rows(wandb, record)})
        clean = {k: v for k, v in record.items() if not str(k).startswith("_")}  # minus _store_path etc.
        files_dir = Path(run.dir)
        rec_path = files_dir / "record.json"
        rec_path.write_text(json.dumps(clean, default=_json_default, indent=2, allow_nan=True), encoding="utf-8")
        run.save(str(rec_path), base_path=str(files_dir), policy="now")
        artifact = wandb.Artifact(
            f"record-{record.get('config_hash')}",
            type="record",
            metadata={"config_hash": record.get("config_hash"), "model": model, "method": method, "ratio": ratio},
        )
        artifact.add_file(str(rec_path), name="record.json")
        run.log_artifact(artifact)
        ok = True
    finally:
        run.finish(exit_code=0 if ok else 1)
    return files_dir.parent


def log_record(record: Mapping, logger_cfg: Any = None) -> Path | None:
    """Log one record to W&B; the run directory, or None (with a RuntimeWarning) when anything went wrong."""
    cfg = {**DEFAULTS, **{k: v for k, v in _plain(logger_cfg).items() if v is not None}}
    try:
        return _log(record, cfg)
    except Exception as exc:  # noqa: BLE001 - nothing here may cost the record, which is already on disk
        where = record.get("_store_path") or f"the store (config hash {record.get('config_hash')})"
        warnings.warn(
            f"W&B logging failed ({type(exc).__name__}: {exc}); the local record is unaffected: {where}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
