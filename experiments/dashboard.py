"""An interactive dashboard of a results store: one self-contained HTML file (plotly.js and the data inline, no
network), or ``--serve`` to serve it on localhost and rebuild it while a sweep writes records.

Why beside the static report (experiments/report.py, the printable view from the same records): a sweep of 20
methods needs filtering, sorting, a click into one record, tooltips and one colour + marker per method that every
view shares. Numbers come from the same layers as the tables: ``observations`` for values, the tables layer's
``cell_interval`` for sampling intervals (so a point's interval is the one its table cell prints), anchors.csv for
published numbers.

Views (tabs): results explorer (filters, sortable columns, a row opens its record: resolved config, plan summary,
timings, versions, the command that reproduces it); PPL / zero-shot vs achieved ratio (or MACs, latency,
parameters) with seed spread bands, sampling intervals as error bars and published anchors as open markers; per-layer
kept widths as two heatmaps side by side; the paper tables (ours beside published); benchmark ratios, AdaPruner
study history and sweep progress where the store has them.

The page sets ``document.body.dataset.ready`` once every view is drawn (browser tests wait for it). Served, it polls
``version.json`` every second and reloads (keeping the filters) when the store changed.

Usage: ``pruning-lab dashboard --store DIR --out dashboard.html [--serve [--port N]]``.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments import anchors as anchors_mod
from experiments import render as render_table
from experiments import tables as T
from experiments.observations import calibration_label, method_name, newest_per_seed, observations, paper_ratio
from experiments.report import MARKERS, PALETTE, _layer_widths
from experiments.reproduce import reproduce_command
from experiments.store import ResultsStore
from experiments.store import _name as store_name

# The static report's markers ("osD^vP*Xh<>") in plotly's names: the same method gets the same colour and marker in
# both views (report._Colors and method_styles index the sorted method names the same way).
PLOTLY_SYMBOLS = dict(
    zip(
        MARKERS,
        (
            "circle",
            "square",
            "diamond",
            "triangle-up",
            "triangle-down",
            "cross",
            "star",
            "x",
            "hexagon",
            "triangle-left",
            "triangle-right",
        ),
    )
)
WIDTH_KEYS = (("num_heads", "query heads"), ("num_kv_heads", "KV groups"), ("intermediate_size", "MLP channels"))
HIDDEN_KEYS = ("hidden_size", "hidden")  # a slicing method's kept hidden width, when the record holds one


def method_styles(methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """One colour and marker per method label, the same in every view (dense: black star)."""
    names = sorted(dict.fromkeys(m for m in methods if m and m != "dense"))
    out = {
        m: {"color": PALETTE[i % len(PALETTE)], "symbol": PLOTLY_SYMBOLS[MARKERS[i % len(MARKERS)]]}
        for i, m in enumerate(names)
    }
    out["dense"] = {"color": "#000000", "symbol": "star"}
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _recovery(record: Mapping) -> str:
    rec = (record.get("config") or {}).get("recovery") or {}
    name = rec.get("name") if isinstance(rec, Mapping) else rec
    return str(name or "none")


def _plan_summary(plan: Mapping) -> dict:
    """What a plan removes, short: per structure the removed count per layer (the full index lists stay in the
    record), the removed blocks and the plan's meta (allocation, ratios)."""
    out: dict[str, Any] = {}
    for structure, layers in ((plan or {}).get("remove") or {}).items():
        if isinstance(layers, Mapping):
            out[f"removed {structure} per layer"] = {
                str(k): len(v) if isinstance(v, list) else v
                for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
            }
    out["removed blocks"] = (plan or {}).get("blocks") or []
    out["meta"] = (plan or {}).get("meta") or {}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data


def _explorer(records: Sequence[Mapping], obs: pd.DataFrame) -> tuple[list[dict], dict[str, dict]]:
    labels = obs.drop_duplicates("config_hash").set_index("config_hash")["method"].to_dict() if len(obs) else {}
    rows: list[dict] = []
    details: dict[Any, dict] = {}  # config hash -> the record's details
    for r in records:
        h = r.get("config_hash")
        cfg = r.get("config") or {}
        metrics = r.get("metrics") or {}
        ppl = metrics.get("ppl") or {}
        zs = metrics.get("zeroshot") or {}
        first: tuple[Any, Any] = next(iter(ppl.items()), (None, {}))
        avg = zs.get("average") if isinstance(zs, Mapping) else None
        params = r.get("params") or {}
        rows.append(
            {
                "hash": h,
                "model": store_name(cfg.get("model")),
                "method": labels.get(h, method_name(r)),
                "ratio": paper_ratio(r),
                "achieved": _num(params.get("achieved_ratio")),
                "protocol": first[0] or "",
                "ppl": _num((first[1] or {}).get("ppl")),
                "zs": _num(avg.get("score") if isinstance(avg, Mapping) else avg),
                "calibration": calibration_label(r) or "none",
                "seed": str(cfg.get("seed"))
                + (
                    f"/{cfg['calibration']['seed']}"
                    if isinstance(cfg.get("calibration"), Mapping) and "seed" in cfg["calibration"]
                    else ""
                ),
                "recovery": _recovery(r),
                "created": str(r.get("created") or ""),
                "wall_s": _num((r.get("timings") or {}).get("total")),
            }
        )
        details[h] = {
            "config": cfg,
            "plan": _plan_summary(r.get("plan") or {}),
            "timings": r.get("timings") or {},
            "versions": {**(r.get("versions") or {}), "git": r.get("git"), "host": r.get("host")},
            "params": params,
            "reproduce": reproduce_command(r),
        }
    return rows, details


COST_METRICS = {  # x axes from the efficiency block (pruning/eval/efficiency.py): the headline number first
    "macs": ("macs_per_token", "macs_forward"),
    "latency": ("prefill_latency_s/median", "decode_latency_s_per_token/median"),
}


def _costs(eff: pd.DataFrame) -> dict[tuple, dict]:
    """(config hash, phase, axis) -> {value, metric} for the MACs and measured-latency axes."""
    out: dict[tuple, dict] = {}
    for (h, phase), g in eff.groupby(["config_hash", "phase"], sort=False):
        values = dict(zip(g["metric"].astype(str), g["value"].astype(float)))
        for axis, names in COST_METRICS.items():
            name = next((n for n in names if n in values), None)
            if name is not None:
                out[(h, phase, axis)] = {"value": values[name], "metric": name}
    return out


def _points(obs: pd.DataFrame, by_hash: Mapping[str, Mapping]) -> list[dict]:
    """Per (model, metric key, method, ratio): the seeds' values, their mean, min and max, and the sampling
    interval of the mean (the tables layer's, over the windows / documents the seeds share)."""
    ok = obs[obs["protocol_ok"].astype(bool)]
    ppl = ok[ok["kind"] == "ppl"]
    zs = ok[(ok["kind"] == "zeroshot") & (ok["task"] == "average")]
    costs = _costs(obs[obs["kind"] == "efficiency"])
    out = []
    for kind, df in (("ppl", ppl), ("zeroshot", zs)):
        for (model, key, method, ratio, phase), g in df.groupby(
            ["model", "key", "method", "ratio", "phase"], dropna=False, sort=True
        ):
            g = newest_per_seed(g, ["key"])  # a rerun replaces, as in the tables
            hashes = [str(h) for h in g["config_hash"]]
            units = list(g["unit"])
            iv = None
            if units and all(isinstance(u, (str, tuple)) and u == units[0] for u in units):
                try:
                    iv = T.cell_interval(hashes, units[0], by_hash)
                except ValueError:
                    iv = None
            values = [float(v) for v in g["value"]]
            seeds = [str(s) for s in g["seed"]]
            point = {
                "kind": kind,
                "model": str(model),
                "key": str(key),
                "method": str(method),
                "phase": str(phase),
                "ratio": _num(ratio),
                "achieved": _num(g["achieved"].mean()),
                "params": _num(g["params_after"].mean()),
                "values": values,
                "seeds": seeds,
                "hashes": hashes,
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
                "ci": None if iv is None or not math.isfinite(iv.low) else [iv.low, iv.high],
                "ci_n": None if iv is None else list(iv.n),
                "_unit": units[0] if iv is not None else None,
            }
            for axis in ("macs", "latency"):
                c = [x for h in hashes if (x := costs.get((h, phase, axis)))]
                if len(c) == len(hashes):
                    point[axis] = sum(x["value"] for x in c) / len(c)
                    point[f"{axis}_metric"] = c[0]["metric"]
            out.append(point)
    return out


def _paired(points: list[dict], by_hash: Mapping[str, Mapping]) -> list[dict]:
    """Neighbours in rank (better first) among the pruned points of one model, metric and ratio, a minus b on the
    windows / documents both were scored on (the tables layer's ``cell_paired``): PPL as a ratio, accuracy in
    points. Pops the points' internal unit addresses."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        unit = p.pop("_unit", None)
        if p["phase"] == "pruned" and unit is not None:
            groups.setdefault((p["kind"], p["model"], p["key"], p["ratio"]), []).append({**p, "_unit": unit})
    out = []
    for (kind, model, key, ratio), ps in groups.items():
        ps.sort(key=lambda p: p["mean"] if kind == "ppl" else -p["mean"])
        for a, b in itertools.pairwise(ps):
            pr = T.cell_paired(a["hashes"], b["hashes"], a["_unit"], by_hash) if a["_unit"] == b["_unit"] else None
            if pr is None:
                continue
            d = pr.ratio if pr.ratio is not None else pr.diff
            out.append(
                {
                    "kind": kind,
                    "model": model,
                    "key": key,
                    "ratio": ratio,
                    "a": a["method"],
                    "b": b["method"],
                    "what": "PPL a / b" if pr.ratio is not None else "points a - b",
                    "estimate": d.estimate,
                    "low": d.low,
                    "high": d.high,
                    "resolved": pr.resolved,
                }
            )
    return out


def _anchor_points(obs: pd.DataFrame) -> list[dict]:
    """Published numbers as points: PPL per dataset and the zero-shot average, with their source and model."""
    a = anchors_mod.load_anchors()
    ours = (
        obs.dropna(subset=["anchor_method"])
        .drop_duplicates("anchor_method")
        .set_index("anchor_method")["method"]
        .to_dict()
        if len(obs)
        else {}
    )
    out = []
    for r in a.itertuples():
        value, ratio = _num(r.value_num), _num(r.ratio_value)
        if value is None or ratio is None:
            continue
        task = str(r.task)
        if task in ("wikitext2", "ptb", "c4"):
            kind = "ppl"
        elif task in ("avg7", "commonsense avg") or task.startswith("avg"):
            kind = "zeroshot"
        else:
            continue
        out.append(
            {
                "kind": kind,
                "dataset": task,
                "model": str(r.model),
                "method": str(r.method),
                "ours": ours.get(str(r.method)),
                "ratio": ratio / 100.0 if ratio > 1 else ratio,
                "value": value,
                "protocol": str(r.protocol),
                "block": str(r.block),
                "source": str(r.source),
                "printed": str(r.value),
            }
        )
    return out


def _widths(records: Sequence[Mapping], obs: pd.DataFrame) -> dict[str, dict]:
    """Per model: the dense widths per layer and, per record with widths, its kept widths (None = removed block)."""
    labels = obs.drop_duplicates("config_hash").set_index("config_hash")["method"].to_dict() if len(obs) else {}
    out: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: str(r.get("created"))):
        if not r.get("widths"):
            continue
        model = store_name((r.get("config") or {}).get("model"))
        m = out.setdefault(model, {"dense": None, "cells": []})
        layers: list[dict | None] = []
        for w in _layer_widths(r):
            if w is None:
                layers.append(None)
                continue
            entry = {k: w.get(k) for k, _ in WIDTH_KEYS}
            hidden = next((w[k] for k in HIDDEN_KEYS if k in w), None) or r.get("hidden_size")
            entry["hidden"] = hidden
            layers.append(entry)
        if method_name(r) == "dense":
            m["dense"] = layers
            continue
        ratio = paper_ratio(r)
        cfg = r.get("config") or {}
        at = render_table.fmt_ratio(ratio) if ratio is not None else "?"
        name = labels.get(r.get("config_hash"), method_name(r))
        label = f"{name} @ {at}, seed {cfg.get('seed')} ({r.get('config_hash')})"
        m["cells"].append({"hash": r.get("config_hash"), "label": label, "layers": layers})
    for m in out.values():  # no dense record: the widest seen per layer and key stands in for dense
        if m["dense"] is None and m["cells"]:
            n = max(len(c["layers"]) for c in m["cells"])
            ref: list[dict] = [{} for _ in range(n)]
            for c in m["cells"]:
                for i, w in enumerate(c["layers"]):
                    for k, v in (w or {}).items():
                        if isinstance(v, (int, float)):
                            ref[i][k] = max(v, ref[i].get(k) or 0)
            m["dense"] = ref
            m["dense_note"] = "no dense record: the widest width seen per layer stands in for dense"
        m["cells"].sort(key=lambda c: c["label"])
    return out


def _tables(records: Sequence[Mapping]) -> list[dict]:
    built = T.build_tables(records)
    return [{"name": n, "title": t.spec.title, "html": render_table.html(t)} for n, t in built.items() if t.n_ours]


def _benchmarks(results_dir: Path | None) -> list[dict]:
    path = None if results_dir is None else results_dir / "benchmarks.json"
    if path is None or not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("rows") or []
    except (OSError, ValueError):
        return []
    keep = ("benchmark", "compared", "ratio", "target", "pass", "detail", "date")
    return [{k: r.get(k) for k in keep} for r in rows if isinstance(r, Mapping)]


def _studies(records: Sequence[Mapping]) -> list[dict]:
    from experiments.adapruner import history_table

    studies: dict[str, list] = {}
    for r in records:
        if r.get("study"):
            studies.setdefault(r["study"]["name"], []).append(r)
    out = []
    for name, finals in studies.items():
        finals.sort(key=lambda r: (len(r["study"]["trials"]), r["study"].get("summarised") or ""))
        summary = finals[-1]["study"]
        df = history_table(summary)
        out.append(
            {
                "name": name,
                "objective": summary.get("objective"),
                "trials": json.loads(df.to_json(orient="records")),
                "best": summary.get("best"),
            }
        )
    return out


def _identity(config: Mapping) -> str:
    """A config's hash without what only the cell adds (model fingerprint, eval version) or drops (model.fetch)."""
    from experiments.record import config_hash

    cfg = json.loads(json.dumps(config, default=str))
    for group, key in (("model", "fingerprint"), ("model", "fetch"), ("eval", "version")):
        if isinstance(cfg.get(group), dict):
            cfg[group].pop(key, None)
    return config_hash(cfg)


def _job_identities(job: Path) -> set[str]:
    """The identities a Hydra job's composed config (``.hydra/config.yaml``) can have in the store: with and
    without calibration (a method that reads none has none in its record)."""
    from omegaconf import OmegaConf

    import experiments.paper_ratios  # noqa: F401  (registers ${paper_knob:...})

    cfg = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"), resolve=True)
    assert isinstance(cfg, dict)  # Hydra writes the composed config as a mapping
    cfg.pop("hydra", None)
    out = {_identity(cfg)}
    if "calibration" in cfg:
        out.add(_identity({k: v for k, v in cfg.items() if k != "calibration"}))
    return out


def _planned_jobs(root: Path) -> list[list[str]]:
    """The jobs a sweep will run, in Hydra's order (job i = directory i), from its ``multirun.yaml``."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("hydra") or {}).get("overrides") or {}
    parsed = OverridesParser.create().parse_overrides(list(task.get("task") or []))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


ERROR_WORDS = ("error:", "Error:", "Traceback", "Killed", "CANCELLED", "OOM")


def _sweep(sweep_dirs: Sequence[Path], records: Sequence[Mapping]) -> list[dict]:
    """Sweep progress from Hydra multirun directories, per job: done (its composed config is a record of the
    store), failed (the cell's outcome file says so, or a log or submitit .err/.out file of the job holds an error
    line; shown as the reason), running (a file of the job changed in the last 2 minutes: a running cell touches
    its heartbeat file every 30 s), pending (nothing written yet) or stopped (none of these: its process is gone)."""
    from experiments.sweeps import OUTCOMES_DIR, read_outcomes

    known = {}
    for r in records:
        if isinstance(r.get("config"), Mapping):
            known[_identity(r["config"])] = r.get("config_hash")
    out: list[dict] = []
    now = time.time()
    for root in sweep_dirs:
        first = len(out)
        root = Path(root)
        jobs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        planned = _planned_jobs(root)
        jobs += [root / str(i) for i in range(len(planned)) if not (root / str(i)).is_dir()]  # not started yet
        submitit = list(root.glob(".submitit/**/*_log.*"))
        failed = {o["num"]: o["detail"] for o in read_outcomes(root / OUTCOMES_DIR) if o.get("status") == "failed"}
        for job in jobs:
            over = job / ".hydra" / "overrides.yaml"
            overrides = over.read_text(encoding="utf-8").splitlines() if over.is_file() else []
            overrides = [ln[2:].strip() for ln in overrides if ln.startswith("- ")]
            if not overrides and int(job.name) < len(planned):
                overrides = planned[int(job.name)]
            if not job.is_dir():
                out.append(
                    {
                        "sweep": str(root),
                        "job": int(job.name),
                        "overrides": " ".join(overrides),
                        "state": "pending",
                        "reason": "",
                    }
                )
                continue
            files = [p for p in job.rglob("*") if p.is_file()]
            files += [p for p in submitit if p.name.split("_")[1:2] == [job.name]]  # <id>_<task>_log.err
            try:
                hit = next((known[i] for i in _job_identities(job) if i in known), None)
            except (OSError, ValueError, KeyError) as exc:  # an unreadable config.yaml: say so, keep the rest
                hit, overrides = None, [*overrides, f"(config unreadable: {exc})"]
            errors = []
            for p in files:
                if p.suffix in (".log", ".err", ".out"):
                    text = p.read_text(encoding="utf-8", errors="replace")
                    errors += [ln.strip() for ln in text.splitlines() if any(w in ln for w in ERROR_WORDS)]
            if hit:
                state, reason = "done", f"record {hit}"
            elif int(job.name) in failed:
                state, reason = "failed", str(failed[int(job.name)])[-300:]
            elif errors:
                state, reason = "failed", errors[-1][-300:]
            elif files and now - max(p.stat().st_mtime for p in files) < 120:
                state, reason = "running", ""
            elif not (job / ".hydra").is_dir():
                state, reason = "pending", ""
            else:
                state, reason = "stopped", "no record, no error and no heartbeat for 2 minutes: its process is gone"
            out.append(
                {
                    "sweep": str(root),
                    "job": int(job.name),
                    "overrides": " ".join(overrides),
                    "state": state,
                    "reason": reason,
                }
            )
        _shared_overrides(out[first:])
    return out


def _shared_overrides(jobs: list[dict]) -> None:
    """Each job's row names only the overrides that differ between the sweep's jobs (what identifies it); the ones
    every job sets go to ``shared``, shown once above the table."""
    tokens = [j["overrides"].split() for j in jobs]
    shared = set.intersection(*map(set, tokens)) if len(tokens) > 1 else set()
    for j, t in zip(jobs, tokens):
        j["overrides"] = " ".join(x for x in t if x not in shared)
        j["shared"] = " ".join(x for x in tokens[0] if x in shared)


def build_data(
    records: Sequence[Mapping], store_label: str = "", results_dir: Path | None = None, sweep_dirs: Sequence[Path] = ()
) -> dict:
    """Everything the page shows, as JSON-able data."""
    records = [r for r in records if isinstance(r, Mapping)]
    obs = observations(records)
    by_hash = T.records_by_hash(records)
    rows, details = _explorer(records, obs)
    methods = sorted({r["method"] for r in rows})
    warnings = []
    sections: dict[str, Any] = {}
    for name, fn in (
        ("points", lambda: _points(obs, by_hash)),
        ("paired", lambda: _paired(sections["points"], by_hash)),
        ("anchors", lambda: _anchor_points(obs)),
        ("widths", lambda: _widths(records, obs)),
        ("tables", lambda: _tables(records)),
        ("benchmarks", lambda: _benchmarks(results_dir)),
        ("studies", lambda: _studies(records)),
        ("sweep", lambda: _sweep(sweep_dirs, records)),
    ):
        try:
            sections[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one broken view must not cost the others
            warnings.append(f"{name}: {type(exc).__name__}: {exc}")
            sections[name] = [] if name != "widths" else {}
    styles = method_styles(methods + [p["method"] for p in sections["points"]])
    return {
        "store": store_label,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "n_records": len(records),
        "records": rows,
        "details": details,
        "styles": styles,
        "level": T.U.LEVEL,
        "warnings": warnings,
        **sections,
    }


# ---------------------------------------------------------------------------------------------------------------
# Page

ASSETS = Path(__file__).with_name("dashboard_assets")


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]  # plotly ships no types

    return get_plotlyjs()


def render_html(data: Mapping) -> str:
    """The page: CSS, plotly.js, the data and the dashboard script, all inline."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str).replace("</", "<\\/")
    css = ASSETS.joinpath("dashboard.css").read_text(encoding="utf-8")
    script = ASSETS.joinpath("dashboard.js").read_text(encoding="utf-8")
    title = f"Pruning dashboard: {html.escape(str(data.get('store') or ''))}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{css}</style>\n<script>{_plotly_js()}</script>\n</head>\n<body>\n"
        f'<script id="dashboard-data" type="application/json">{payload}</script>\n'
        f"<script>{script}</script>\n</body></html>\n"
    )


def _clean(value: Any) -> Any:
    """NaN / inf -> None so the payload is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_dashboard(
    store_dir: str | Path | None,
    out: str | Path,
    results_dir: str | Path | None = None,
    sweep_dirs: Sequence[str | Path] = (),
    version: int | None = None,
) -> Path:
    """Build the page from the store; ``version`` (the server's build number) makes a served page reload itself
    when the server has a newer build."""
    store = ResultsStore(store_dir)
    results = Path(results_dir) if results_dir is not None else store.root.parent
    data = build_data(store.records(), str(store.root), results, [Path(s) for s in sweep_dirs])
    data["version"] = version
    page = render_html(_clean(data))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Serving


def store_signature(store_dir: Path) -> tuple:
    """Changes whenever a record is written, replaced or removed."""
    d = ResultsStore(store_dir).records_dir
    if not d.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in d.glob("*.json")))


class DashboardServer:
    """Serves ``out`` at / and its build number at /version.json on 127.0.0.1; a thread rebuilds the page when
    the store's records change (polled every ``interval`` seconds), whoever writes them (local, joblib, SLURM)."""

    def __init__(self, store_dir, out, port: int = 8765, interval: float = 1.0, results_dir=None, sweep_dirs=()):
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.store_dir, self.out, self.interval = store_dir, Path(out).resolve(), interval
        self.results_dir, self.sweep_dirs = results_dir, list(sweep_dirs)
        self.version, self._stop = 0, threading.Event()
        self.errors: list[str] = []
        self._signature: tuple | None = None
        self.rebuild()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/version.json":
                    body = json.dumps({"version": server.version}).encode()
                    ctype = "application/json"
                elif path in ("/", "/index.html", f"/{server.out.name}"):
                    body, ctype = server.out.read_bytes(), "text/html; charset=utf-8"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: the console is for the rebuild lines
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"

    def rebuild(self) -> bool:
        sig = store_signature(ResultsStore(self.store_dir).root)
        if sig == self._signature:
            return False
        write_dashboard(self.store_dir, self.out, self.results_dir, self.sweep_dirs, version=self.version + 1)
        self._signature = sig
        self.version += 1
        return True

    def _watch(self):
        while not self._stop.wait(self.interval):
            try:
                if self.rebuild():
                    print(f"rebuilt {self.out} (version {self.version})", flush=True)
            except Exception as exc:  # noqa: BLE001 - a half-written store must not stop the server
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> DashboardServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


VIEWS = ("explorer", "quality", "widths", "tables", "bench", "sweep")


def screenshots(html_path: str | Path, out_dir: str | Path, prefix: str = "dashboard") -> list[Path]:
    """A PNG of each view (headless Chromium via playwright, offline): the explorer with its first record open, the
    quality view with a tooltip showing. Needs playwright and a chromium executable (report.find_chromium)."""
    from playwright.sync_api import sync_playwright

    from experiments.report import find_chromium

    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium/chrome executable on PATH (Debian: apt-get install chromium)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1400, "height": 950}, offline=True).new_page()
        page.goto(Path(html_path).resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        for view in VIEWS:
            page.click(f"#tab-{view}")
            page.wait_for_timeout(500)
            if view == "explorer" and page.locator("#records tbody tr").count():
                page.locator("#records tbody tr").first.click()
            if view == "quality" and page.locator("#plot-ppl .scatterlayer .point").count():
                box = page.locator("#plot-ppl .scatterlayer .trace.scatter .point").first.bounding_box()
                if box:
                    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=4)
                    page.wait_for_timeout(300)
            path = out_dir / f"{prefix}_{view}.png"
            page.screenshot(path=str(path))
            paths.append(path)
            if view == "explorer" and page.locator("#detail.open").count():
                page.click("#detail-close")
        browser.close()
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pruning-lab dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", type=Path, default=None, help="store directory (default: $PRUNING_STORE or runs/store)"
    )
    parser.add_argument("--out", type=Path, default=Path("dashboard.html"), help="output HTML file")
    parser.add_argument(
        "--results", type=Path, default=None, help="folder with benchmarks.json (default: the store's parent)"
    )
    parser.add_argument(
        "--sweep",
        type=Path,
        action="append",
        default=[],
        help="a Hydra multirun directory to show the progress of (repeatable)",
    )
    parser.add_argument("--serve", action="store_true", help="serve on 127.0.0.1 and rebuild when records are written")
    parser.add_argument("--port", type=int, default=8765, help="port for --serve (0: any free port)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between store checks for --serve")
    parser.add_argument(
        "--screenshots", type=Path, default=None, metavar="DIR", help="also save a PNG of each view (playwright)"
    )
    args = parser.parse_args(argv)
    from importlib.util import find_spec

    if find_spec("plotly") is None:
        print("error: the dashboard needs plotly (pip install 'pruning-lab[dashboard]')", file=sys.stderr)
        return 2
    if args.store is not None and not args.store.is_dir():
        print(
            f"error: --store {args.store} is not a directory (a results store holds records/<hash>.json)",
            file=sys.stderr,
        )
        return 2
    for s in args.sweep:
        if not s.is_dir():
            print(
                f"error: --sweep {s} is not a directory (a Hydra multirun folder, e.g. runs/multirun/<date>/<time>)",
                file=sys.stderr,
            )
            return 2
    if not args.serve:
        path = write_dashboard(args.store, args.out, args.results, args.sweep)
        print(f"wrote {path}")
        for shot in screenshots(path, args.screenshots) if args.screenshots is not None else []:
            print(f"wrote {shot}")
        return 0
    server = DashboardServer(args.store, args.out, args.port, args.interval, args.results, args.sweep).start()
    print(f"serving {server.out} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
