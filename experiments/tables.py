"""Paper tables: tidy observations (experiments/observations.py) + a table spec (experiments/table_specs.py) ->
a ``PaperTable`` of ours beside the published numbers; ``experiments/render.py`` writes it (Markdown, LaTeX, CSV,
HTML, the README summary).

A record's entry lands in a column only when its protocol name *and* fields agree, and a window-limited entry (or a
``limit``-ed zero-shot run) gets its own column labelled "[first N windows]" / "[limit N]". Published values come
from experiments/anchors.csv for the same paper, method and ratio and sit in rows whose source says
"published (<block>)", with the full source in the footnotes; they are never averaged with ours. Seeds are
aggregated into mean ± std (n = number of seeds); the dense row of a model is its dense evaluation per column.

CLI: ``python -m experiments.tables --store DIR --table llm_pruner_t1 --out results/`` (or ``--all``) writes
``<name>.md``, ``<name>.tex`` and ``<name>.csv``.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from experiments import anchors as anchors_mod
from experiments import render
from experiments import uncertainty as U
from experiments.observations import (
    OBS_COLUMNS,
    limit_suffix,
    method_name,
    newest_per_seed,
    observations,
    protocols_present,
    setting_label,
    without_study_trials,
)
from experiments.store import ResultsStore
from experiments.table_specs import KNOB_MEANINGS, TABLES, TASK_HEADERS, TableSpec


def _assign_columns(obs: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Keep the observations that belong in this table, with the column header each one goes to."""
    parts = []
    good = obs[obs["protocol_ok"].astype(bool)]
    ppl = good[good["kind"] == "ppl"]
    for col in spec.ppl:
        hit = ppl[(ppl["protocol"] == col.protocol) & (ppl["dataset"] == col.dataset) & (ppl["split"] == col.split)]
        if len(hit):
            hit = hit.assign(
                column=[col.header + limit_suffix(lim, "ppl") for lim in hit["limit"]], base_column=col.header
            )
            parts.append(hit)
    if spec.zs:
        zs = good[(good["kind"] == "zeroshot") & good["task"].isin(list(spec.zs))]
        zs = zs[[spec.zs.get(t) == m for t, m in zip(zs["task"], zs["metric"])]]
        if len(zs):
            zs = zs.assign(
                column=[TASK_HEADERS.get(t, t) + limit_suffix(lim, "zs") for t, lim in zip(zs["task"], zs["limit"])],
                base_column=[TASK_HEADERS.get(t, t) for t in zs["task"]],
            )
            parts.append(zs)
            if spec.avg_header:  # the papers' plain mean, only when every task of the table is present
                key = ["config_hash", "phase", "method", "limit"]
                for _, g in zs.groupby(key, dropna=False, sort=False):
                    if set(g["task"]) == set(spec.zs):
                        first = g.iloc[[0]].copy()
                        first["task"], first["metric"], first["value"] = "average", "mean", g["value"].mean()
                        units = dict(zip(g["task"], g["unit"]))  # its interval: these tasks, the table's metrics
                        first["unit"] = [tuple(units[t] for t in spec.zs)]
                        first["column"] = spec.avg_header + limit_suffix(first["limit"].iloc[0], "zs")
                        first["base_column"] = spec.avg_header
                        parts.append(first)
    if not parts:
        return pd.DataFrame(columns=[*OBS_COLUMNS, "column", "base_column"])
    return pd.concat(parts, ignore_index=True)


def _column_order(spec: TableSpec, present: Iterable[str]) -> list[str]:
    bases = [c.header for c in spec.ppl] + [TASK_HEADERS.get(t, t) for t in spec.zs]
    bases += [spec.avg_header] if spec.avg_header else []
    present = list(dict.fromkeys(present))

    def key(col: str):
        base = next((i for i, b in enumerate(bases) if col == b or col.startswith(b + " [")), len(bases))
        n = re.search(r"\[(?:first|limit) (\d+)", col)
        return base, 0 if n is None else 1, int(n.group(1)) if n else 0

    return sorted(present, key=key)


@dataclass(frozen=True)
class PairedRow:
    """Row a minus row b in one column, on the windows / documents both were scored on (seeds held fixed)."""

    model: str
    group: str  # what the two rows share: "ratio 0.20", or the column of a ratio-pivot table
    column: str
    a: str
    b: str
    paired: U.Paired

    def measure(self) -> tuple[str, str]:
        """(what is compared, its value with the interval): the PPL ratio a / b, or a - b in accuracy points."""
        if (r := self.paired.ratio) is not None:
            return "PPL a / b", f"{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]"
        d = self.paired.diff
        return "points a - b", f"{d.estimate:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"

    def text(self) -> str:
        what, value = self.measure()
        verdict = "resolved" if self.paired.resolved else "not resolved"
        return f"{self.model}, {self.group}, {self.column}: {self.a} vs {self.b}: {what} {value}, {verdict}"


@dataclass
class PaperTable:
    """A built paper table, as data (experiments/render.py prints it): `frame` (means; identity columns first),
    `std` (same shape, NaN when n < 2), `printed` (published values as printed), the value columns, notes and the
    footnote sources."""

    spec: TableSpec
    frame: pd.DataFrame
    std: pd.DataFrame
    printed: pd.DataFrame
    value_columns: list[str]
    sources: dict[str, str]
    excluded: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)  # knob meanings and calibration, read from the records
    # Sampling uncertainty (experiments/uncertainty.py), only where the records hold per-window / per-document
    # values: `intervals` has the frame's shape over the value columns (an Interval or None per cell), `paired`
    # the paired differences of neighbouring rows, `uncertainty_notes` why a cell has no interval when it should.
    intervals: pd.DataFrame | None = None
    paired: list[PairedRow] = field(default_factory=list)
    uncertainty_notes: list[str] = field(default_factory=list)

    @property
    def has_intervals(self) -> bool:
        return self.first_interval is not None

    @property
    def first_interval(self) -> U.Interval | None:
        """Any one of the table's intervals (they share level and resamples), None when it has none."""
        if self.intervals is None:
            return None
        return next((iv for iv in self.intervals.to_numpy().ravel() if isinstance(iv, U.Interval)), None)

    @property
    def n_ours(self) -> int:
        return int((self.frame["source"] == "ours").sum()) if len(self.frame) else 0


def _aggregate(cells: pd.DataFrame, id_cols: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Mean and std over seeds per row identity and column; per seed the newest record wins (a rerun replaces).
    The third frame holds the observations behind each cell (the ones the mean is over)."""
    last = newest_per_seed(cells, [*id_cols, "column"])
    grouped = last.groupby([*id_cols, "column"], dropna=False, sort=False)["value"]
    mean = grouped.mean().unstack("column")
    std = grouped.std(ddof=1).unstack("column")
    return mean, std, last


def _cell_sources(last: pd.DataFrame, id_cols: list[str]) -> dict[tuple, tuple[tuple[str, ...], Any]]:
    """(row identity, column) -> (config hashes of the seeds behind the cell, the unit address of the value),
    when every seed's value has the same address (a PPL entry, a zero-shot task, or a table's task average)."""
    out: dict[tuple, tuple[tuple[str, ...], Any]] = {}
    for key, g in last.groupby([*id_cols, "column"], dropna=False, sort=False):
        units = list(g["unit"])
        if units and all(isinstance(u, (str, tuple)) and u == units[0] for u in units):
            out[key] = (tuple(g["config_hash"]), units[0])
    return out


def _published_rows(spec: TableSpec, anchors: pd.DataFrame) -> pd.DataFrame:
    """Published records of this table's blocks mapped onto the table's (full-protocol) columns."""
    a = anchors[anchors["block"].isin(spec.blocks) & anchors["paper"].isin(spec.paper)]
    rows = []
    r: Any  # itertuples' namedtuples: the columns are not typed
    for r in a.itertuples(index=False):
        col = None
        if r.metric == "ppl":
            col = next((c.header for c in spec.ppl if c.protocol == r.protocol and c.dataset == r.task), None)
        elif r.protocol == spec.zs_protocol and r.task in spec.zs and r.metric == spec.zs[r.task]:
            col = TASK_HEADERS.get(r.task, r.task)
        elif r.protocol == spec.zs_protocol and r.task == "avg7" and spec.avg_header and len(spec.zs) == 7:
            col = spec.avg_header
        if col is not None:
            rows.append(
                {
                    "block": r.block,
                    "model": r.model,
                    "method": r.method,
                    "ratio": r.ratio_value,
                    "ratio_text": r.ratio,
                    "column": col,
                    "value": r.value_num,
                    "printed": r.value,
                }
            )
    return pd.DataFrame(rows, columns=["block", "model", "method", "ratio", "ratio_text", "column", "value", "printed"])


def _paper_method(method: str, spec: TableSpec) -> bool:
    return not spec.methods or any(fnmatch.fnmatchcase(method, p) for p in spec.methods)


def _cell_protocols(spec: TableSpec) -> set[str]:
    return {c.protocol for c in ([spec.cell_protocol] if spec.cell_protocol else spec.ppl)}


def table_records(records: Iterable[Mapping], spec: TableSpec) -> list[Mapping]:
    """The records a table is built from: dense ones, and cells of the paper's methods, set the table's way (native
    knob or pruning.ratio) and evaluated under one of its PPL protocols. Selecting records before the observations
    keeps a method's row label free of config that only differs from cells of other tables (e.g. FLAP's calibration
    in Search-LLM's table). An AdaPruner study's trials are search steps, summarised by its final cell."""
    protocols = _cell_protocols(spec)
    out = []
    for r in without_study_trials(records):
        method = method_name(r)
        if method == "dense":
            out.append(r)
            continue
        native = setting_label(r) != ""
        ppl_protocols = {str(k).split(":", 1)[0] for k in ((r.get("metrics") or {}).get("ppl") or {})}
        if (
            native == (spec.cells == "native")
            and _paper_method(method, spec)
            and (not protocols or ppl_protocols & protocols)
        ):
            out.append(r)
    return out


def build_table(
    records: Iterable[Mapping] | pd.DataFrame,
    spec: TableSpec | str,
    published: str = "matched",
    anchors: pd.DataFrame | None = None,
    by_hash: Mapping[str, Mapping] | None = None,
) -> PaperTable:
    """One paper table from records (or from `observations(records)`, then with ``by_hash``, config hash ->
    record, for the intervals: without the records a table has none).

    published: "matched" (published rows for the (method, ratio) pairs we have, plus dense), "all" (every row of
    the paper's table) or "none".
    """
    spec = TABLES[spec] if isinstance(spec, str) else spec
    if not isinstance(records, pd.DataFrame):
        records = [r for r in records if isinstance(r, Mapping)]
    if published not in ("matched", "all", "none"):
        raise ValueError(f"published must be matched, all or none, got {published!r}")
    obs = records if isinstance(records, pd.DataFrame) else observations(table_records(records, spec))
    excluded = sorted(
        {
            f"{m} {k}: {n}"
            for m, k, n, ok in zip(obs["method"], obs["key"], obs["note"], obs["protocol_ok"])
            if not ok and n
        }
    )
    obs = obs.assign(setting=obs["setting"].fillna("").astype(str))
    native = obs["setting"] != ""
    keep = (obs["phase"] == "dense") | (native if spec.cells == "native" else ~native)
    if spec.methods:  # the paper's own rows only (plus dense)
        keep &= (obs["phase"] == "dense") | obs["base_method"].map(lambda m: _paper_method(str(m), spec))
    protocols = _cell_protocols(spec)
    if protocols:  # a cell belongs to the table only if it was evaluated under one of the table's PPL protocols
        hit = obs["protocol"].isin(protocols)
        keep &= (obs["phase"] == "dense") | obs["config_hash"].isin(set(obs.loc[hit, "config_hash"]))
    cells = _assign_columns(obs[keep], spec)
    id_cols = ["model", "method", "anchor_method", "ratio"] + (["setting"] if spec.cells == "native" else [])

    if spec.layout == "ratio_pivot":
        cells = cells.assign(
            protocol_label=[f"{p}" + limit_suffix(lim, "ppl") for p, lim in zip(cells["protocol"], cells["limit"])]
        )
        cells = cells.assign(column=[_ratio_header(r) for r in cells["ratio"]])
        id_cols = ["model", "method", "anchor_method", "protocol_label"]
    provenance = _provenance_notes(cells, spec)

    ours_rows: list[dict] = []
    ours_std: list[dict] = []
    ours_src: list[dict] = []
    if len(cells):
        mean, std, last = _aggregate(cells, id_cols)
        sources = _cell_sources(last, id_cols)
        counts = cells.groupby(id_cols, dropna=False, sort=False)["seed"].agg(lambda s: max(1, s.dropna().nunique()))
        ach = cells.groupby(id_cols, dropna=False, sort=False)["achieved"].mean()
        pratio = cells.groupby(id_cols, dropna=False, sort=False)["paper_ratio"].first()
        for idx in mean.index:
            ident = dict(zip(id_cols, idx))
            row = {
                **ident,
                "achieved": ach.get(idx),
                "n": counts.get(idx),
                "source": "ours",
                "block": "",
                "_paper_ratio": pratio.get(idx),
            }
            row.update(mean.loc[idx].to_dict())
            ours_rows.append(row)
            ours_std.append(std.loc[idx].to_dict())
            ours_src.append({c: sources[(*idx, c)] for c in mean.columns if (*idx, c) in sources})

    # Published rows for the same (method, ratio): the anchors' model matching ours if any, else the table's model.
    anchors = anchors_mod.load_anchors() if anchors is None else anchors
    pub = _published_rows(spec, anchors if published != "none" else anchors.iloc[:0])
    ours_models = {anchors_mod.model_key(r["model"]) for r in ours_rows}
    pub_models = {anchors_mod.model_key(m) for m in pub["model"]}
    wanted = (ours_models & pub_models) or {anchors_mod.model_key(spec.anchor_model)}
    pub = pub[pub["model"].map(anchors_mod.model_key).isin(wanted)]
    if published == "matched":
        if spec.layout == "ratio_pivot":
            have = {r["anchor_method"] for r in ours_rows}
            pub = pub[pub["method"].isin(have)]
        else:
            have = {
                (
                    r["anchor_method"],
                    round(float(r["_paper_ratio"] if r["_paper_ratio"] is not None else r["ratio"]), 4),
                )
                for r in ours_rows
            }
            pub = pub[[(m, round(float(x), 4)) in have for m, x in zip(pub["method"], pub["ratio"])]]

    pub_rows: list[dict] = []
    pub_std: list[dict] = []
    pub_printed: list[dict] = []
    if len(pub):
        if spec.layout == "ratio_pivot":
            pub = pub.assign(column=[_ratio_header(r) for r in pub["ratio"]], protocol_label=spec.ppl[0].protocol)
            keys = ["block", "model", "method", "protocol_label"]
        else:
            keys = ["block", "model", "method", "ratio", "ratio_text"]
        for k, g in pub.groupby(keys, sort=False):
            ident = dict(zip(keys, k))
            row = {
                "model": ident["model"],
                "method": ident["method"],
                "anchor_method": ident["method"],
                "achieved": None,
                "n": None,
                "source": "published",
                "block": ident["block"],
            }
            as_printed = {}
            if spec.layout == "ratio_pivot":
                row["protocol_label"] = ident["protocol_label"]
            else:
                row["ratio"] = ident["ratio"]
                as_printed["ratio"] = ident["ratio_text"]
            for c, v, p in zip(g["column"], g["value"], g["printed"]):
                row[c], as_printed[c] = v, p
            pub_rows.append(row)
            pub_std.append({})
            pub_printed.append(as_printed)

    all_rows = ours_rows + pub_rows
    value_cols = (
        _column_order(spec, [c for r in all_rows for c in r if c not in _ID_KEYS])
        if spec.layout != "ratio_pivot"
        else sorted({c for r in all_rows for c in r if c not in _ID_KEYS}, key=_ratio_sort)
    )
    if spec.layout == "ratio_pivot":
        lead = ["model", "method", "protocol_label", "n", "source", "block"]
    elif spec.cells == "native":
        lead = ["model", "method", "ratio", "setting", "achieved", "n", "source", "block"]
    else:
        lead = ["model", "method", "ratio", "achieved", "n", "source", "block"]
    frame = pd.DataFrame(all_rows, columns=[*lead, *value_cols, "anchor_method", "_paper_ratio"])
    std = pd.DataFrame(ours_std + pub_std, columns=value_cols)
    printed = pd.DataFrame([{} for _ in ours_rows] + pub_printed, columns=[*value_cols, "ratio"])
    order = _row_order(frame, spec)
    frame = frame.iloc[order].drop(columns=["anchor_method", "_paper_ratio"]).reset_index(drop=True)
    std = std.iloc[order].reset_index(drop=True)
    printed = printed.iloc[order].reset_index(drop=True)
    cell_sources = [([*ours_src, *({} for _ in pub_rows)])[i] for i in order]
    if spec.layout == "ratio_pivot":
        frame = frame.rename(columns={"protocol_label": "protocol"})
    used_blocks = sorted(set(frame.loc[frame["source"] == "published", "block"]))
    srcs = anchors_mod.sources(anchors[anchors["block"].isin(used_blocks)]) if used_blocks else {}
    table = PaperTable(spec, frame, std, printed, value_cols, srcs, excluded, provenance)
    if by_hash is None and not isinstance(records, pd.DataFrame):
        by_hash = records_by_hash(records)
    if by_hash:
        _add_uncertainty(table, cell_sources, by_hash)
    return table


def _provenance_notes(cells: pd.DataFrame, spec: TableSpec) -> list[str]:
    """Caption lines built from the records themselves: what each native knob means, and which calibration
    (sampler, data, shape, seeds) each method of ours read, so a row can be put beside the paper's."""
    ours = cells[cells["phase"] != "dense"]
    notes = []
    knobs = sorted({str(x).split("=")[0] for x in ours["setting"].dropna() if str(x)})
    notes += [f"setting {k}: {KNOB_MEANINGS.get(k, 'native knob')}" for k in knobs]
    calib: dict[str, set] = {}
    for m, c, seed in zip(ours["base_method"], ours["calibration"], ours["seed"]):
        if isinstance(c, str):
            # seed_key: "<run>/<calibration>" when the draw depends on the calibration seed, else "<run>"
            calib.setdefault(f"{m}: {c.rsplit(', seed', 1)[0]}", set()).add(
                str(seed).split("/")[-1] if "/" in str(seed) else ""
            )
    notes += [
        f"calibration, {k} ("
        + (f"calibration seeds {', '.join(sorted(v))}" if v != {""} else "the draw does not depend on the seed")
        + ")"
        for k, v in sorted(calib.items())
    ]
    no_calib = sorted({m for m, c in zip(ours["base_method"], ours["calibration"]) if not isinstance(c, str)})
    if no_calib:
        notes.append(f"no calibration data read: {', '.join(no_calib)}")
    return notes


_ID_KEYS = {
    "model",
    "method",
    "anchor_method",
    "ratio",
    "setting",
    "achieved",
    "n",
    "source",
    "block",
    "_paper_ratio",
    "protocol_label",
}


def _ratio_header(r: float) -> str:
    return "dense" if r == 0 else f"{100 * r:g}%"


def _ratio_sort(col: str) -> float:
    return 0.0 if col == "dense" else float(col.rstrip("%"))


def _row_order(frame: pd.DataFrame, spec: TableSpec) -> list[int]:
    """Ratio, then method (dense first), ours before the published row of the same (method, ratio)."""

    def key(i: int):
        r = frame.iloc[i]
        ratio = 0.0 if spec.layout == "ratio_pivot" else (r["ratio"] if pd.notna(r["ratio"]) else math.inf)
        method = str(r["anchor_method"])
        return (ratio, method != "dense", method, r["source"] != "ours", str(r["model"]), str(r["method"]))

    return sorted(range(len(frame)), key=key)


# ---------------------------------------------------------------------------------------------------------------
# Uncertainty: computed here once, from the records behind each cell, for every renderer and the dashboard

_CACHE: dict[tuple, Any] = {}  # (kind, records' (hash, created), unit[, other side]) -> Interval | Paired | Exception


def records_by_hash(records: Iterable[Mapping]) -> dict[str, Mapping]:
    """Config hash -> record: what the uncertainty of a cell is computed from (a record without a hash sits under
    None, where no cell looks)."""
    out: dict[Any, Mapping] = {r.get("config_hash"): r for r in records}
    return out


def _records_key(hashes: Sequence[str], by_hash: Mapping[str, Mapping]) -> tuple:
    return tuple((h, str(by_hash[h].get("created"))) for h in hashes)


def cell_interval(hashes: Sequence[str], unit: Any, by_hash: Mapping[str, Mapping]) -> U.Interval | None:
    """The sampling interval of a cell (the mean over the seeds' records ``hashes`` of the value at ``unit``);
    None when a record predates per-sample storage. Raises ValueError when the stored values contradict the
    reported number or the seeds were scored on different units. Cached per record version."""
    key = ("interval", _records_key(hashes, by_hash), unit)
    if key not in _CACHE:
        try:
            _CACHE[key] = U.mean_interval([by_hash[h] for h in hashes], unit)
        except KeyError:  # MissingPerSample (an older record) or no such metric
            _CACHE[key] = None
        except ValueError as exc:
            _CACHE[key] = exc
    out = _CACHE[key]
    if isinstance(out, ValueError):
        raise out
    return out


def cell_paired(a: Sequence[str], b: Sequence[str], unit: Any, by_hash: Mapping[str, Mapping]) -> U.Paired | None:
    """Row a vs row b at ``unit``, None when either lacks per-sample values or they share no units."""
    if not all(h in by_hash for h in (*a, *b)):
        return None
    key = ("paired", _records_key(a, by_hash), _records_key(b, by_hash), unit)
    if key not in _CACHE:
        try:
            _CACHE[key] = U.mean_paired([by_hash[h] for h in a], [by_hash[h] for h in b], unit)
        except (KeyError, ValueError):
            _CACHE[key] = None
    return _CACHE[key]


def _add_uncertainty(table: PaperTable, sources: list[dict], by_hash: Mapping[str, Mapping]) -> None:
    """Fill ``table.intervals`` and ``table.paired`` from the records behind each of our cells."""
    frame = table.frame
    intervals = pd.DataFrame(None, index=frame.index, columns=table.value_columns, dtype=object)
    for i, cells in enumerate(sources):
        for col, (hashes, unit) in cells.items():
            if col not in intervals.columns or not all(h in by_hash for h in hashes):
                continue
            j = intervals.columns.get_loc(col)
            assert isinstance(j, int)  # the value columns are unique
            try:
                # pandas-stubs types a cell as a scalar; an object column holds any object
                intervals.iat[i, j] = cell_interval(hashes, unit, by_hash)  # type: ignore[assignment]
            except ValueError as exc:
                table.uncertainty_notes.append(f"no interval for {frame.iloc[i]['method']} {col}: {exc}")
    table.intervals = intervals
    if table.has_intervals:
        table.paired = _paired_rows(table, sources, by_hash)


_RECOVERED = re.compile(r"^(?P<base>[^\[]*?)\+\w+(?P<variant> \[.*\])?$")  # "<method>+<recovery>[ [variant]]"


def _is_ppl(unit: Any) -> bool:
    return isinstance(unit, str) and unit.split("/", 1)[0].endswith("ppl")


def _paired_rows(table: PaperTable, sources: list[dict], by_hash: Mapping[str, Mapping]) -> list[PairedRow]:
    """Neighbours in rank (lower PPL / higher accuracy first) among our rows of one model and ratio, and each
    recovered row against the same row without recovery; in the first PPL column and the first average column
    that at least two of our rows fill (a ratio-pivot table: in every ratio column)."""
    spec, frame = table.spec, table.frame
    ours = [i for i in range(len(frame)) if frame.iloc[i]["source"] == "ours" and frame.iloc[i]["method"] != "dense"]
    plans: list[tuple[str, str, str, list[int]]] = []
    if spec.layout == "ratio_pivot":
        for model in sorted({str(frame.iloc[i]["model"]) for i in ours}):
            rows = [i for i in ours if frame.iloc[i]["model"] == model]
            plans += [(model, f"ratio {c}", c, rows) for c in table.value_columns if c != "dense"]
    else:
        ppl_headers = {p.header for p in spec.ppl}
        filled = [c for c in table.value_columns if sum(c in sources[i] for i in ours) >= 2]  # ours in >= 2 rows
        heads = [c for c in filled if c.split(" [")[0] in ppl_headers][:1]
        heads += [c for c in filled if spec.avg_header and c.split(" [")[0] == spec.avg_header][:1]
        groups: dict[tuple, list[int]] = {}
        for i in ours:
            groups.setdefault((str(frame.iloc[i]["model"]), float(frame.iloc[i]["ratio"])), []).append(i)
        plans += [(m, f"ratio {render.fmt_ratio(r)}", c, rows) for (m, r), rows in groups.items() for c in heads]
    out: list[PairedRow] = []
    for model, group, col, rows in plans:
        have = [i for i in rows if col in sources[i] and pd.notna(frame.iloc[i][col])]
        if not have:
            continue
        sign = 1.0 if _is_ppl(sources[have[0]][col][1]) else -1.0
        value = {i: float(frame.iloc[i][col]) for i in have}
        have.sort(key=lambda i: sign * value[i])
        pairs = list(itertools.pairwise(have))
        label = {str(frame.iloc[i]["method"]): i for i in have}
        for name, i in label.items():
            m = _RECOVERED.match(name)
            without = m and m["base"] + (m["variant"] or "")
            if without in label:
                pairs.append((i, label[without]))
        for a, b in dict.fromkeys(pairs):
            (ha, ua), (hb, ub) = sources[a][col], sources[b][col]
            p = cell_paired(ha, hb, ua, by_hash) if ua == ub else None
            if p is not None:
                names = str(frame.iloc[a]["method"]), str(frame.iloc[b]["method"])
                out.append(PairedRow(model, group, col, *names, p))
    return out


def build_tables(
    records: Iterable[Mapping], names: Sequence[str] | None = None, published: str = "matched"
) -> dict[str, PaperTable]:
    """Every requested table (default: all), each from its own cells (see `table_records`)."""
    records = [r for r in records if isinstance(r, Mapping)]
    anchors = anchors_mod.load_anchors()
    by_hash = records_by_hash(records)
    return {
        n: build_table(observations(table_records(records, TABLES[n])), TABLES[n], published, anchors, by_hash)
        for n in (names or list(TABLES))
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pruning-lab tables", description="Paper-style tables (Markdown, LaTeX, CSV) from a results store."
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="store directory (default: $PRUNING_STORE or runs/store)"
    )
    parser.add_argument("--table", action="append", choices=sorted(TABLES), help="table to write (repeatable)")
    parser.add_argument("--all", action="store_true", help="write every table that has rows of ours")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    parser.add_argument("--format", default="md,tex,csv", help="comma list of md, tex, csv")
    parser.add_argument(
        "--published",
        choices=("matched", "all", "none"),
        default="matched",
        help="published rows: for our (method, ratio) pairs (default), the whole paper table, or none",
    )
    parser.add_argument(
        "--summary",
        metavar="RATIOS",
        default=None,
        help=(
            "print (and write <table>_summary.md) the README view of each rows table at these "
            "comma-separated ratios, e.g. 0.2,0.5"
        ),
    )
    parser.add_argument(
        "--costs",
        action="store_true",
        help="also write prune_time.md: each method's pruning wall time per model and ratio (ratio-sweep cells)",
    )
    args = parser.parse_args(argv)
    if not args.table and not args.all:
        parser.error("give --table NAME (repeatable) or --all")
    formats = [f for f in args.format.split(",") if f]
    bad = [f for f in formats if f not in ("md", "tex", "csv")]
    if bad:
        parser.error(f"unknown format(s) {bad}; choose from md, tex, csv")

    store = ResultsStore(args.store)
    records = store.records()
    if not records:
        print(f"no records in {store.records_dir}", file=sys.stderr)
        return 1
    names = sorted(TABLES) if args.all else args.table
    tables = build_tables(records, names, args.published)
    missing = []
    for name, table in tables.items():
        if table.n_ours == 0:
            missing.append(name)
            continue
        paths = render.write(table, args.out, formats)
        print(render.markdown(table))
        if args.summary and table.spec.layout == "rows":
            text = render.summary(table, [float(r) for r in args.summary.split(",")])
            paths.append(args.out / f"{name}_summary.md")
            paths[-1].write_text(text, encoding="utf-8")
            print(text)
        print("wrote " + ", ".join(str(p) for p in paths) + "\n")
    if args.costs:
        from experiments.costs import prune_time_frame, prune_time_markdown

        text = prune_time_markdown(prune_time_frame(records))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prune_time.md").write_text(text + "\n", encoding="utf-8")
        print(text + f"\nwrote {args.out / 'prune_time.md'}\n")
    if missing:
        obs = observations(records)
        print(
            f"no rows of ours for {', '.join(missing)}: no record has these tables' protocols. Protocols in the "
            f"store: {', '.join(protocols_present(obs)) or 'none'}",
            file=sys.stderr,
        )
    return 1 if (missing and not args.all) or len(missing) == len(tables) else 0


if __name__ == "__main__":
    sys.exit(main())
