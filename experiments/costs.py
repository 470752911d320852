"""What pruning costs: each method's wall time per model, from the records' phase timings, so a user can plan a
sweep and see how a method's cost grows with the model (issue: second real family).

Only cells set by ``pruning.ratio`` (the ratio sweep) enter, one row per (model, method, ratio): the phases that
prune (calibration draw, scoring and selection, surgery with any compensation); loading and evaluation are left
out. The numbers are what the cells measured where they ran (the records keep the thread count and the host), so
they compare methods and models run the same way, not machines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from experiments.observations import method_name, observations, without_study_trials

PHASES = {"calibration": "calibration s", "prune": "scoring s", "surgery": "surgery s"}


def prune_time_frame(records: Iterable[Mapping]) -> pd.DataFrame:
    """One row per (model, method, ratio) of the ratio-sweep cells: the median of each phase over the cells that
    share them (calibration seeds), and how many cells that is. A study's trials are left out: its final cell
    stands for it (each trial's time is in its own record)."""
    records = [
        r
        for r in without_study_trials(records)
        if ((r.get("config") or {}).get("pruning") or {}).get("ratio") is not None
    ]
    obs = observations(records)
    obs = obs[obs["phase"] != "dense"]
    label = dict(zip(obs["config_hash"], obs["method"]))  # the tables' row label: names what differs (e.g. preset)
    rows = []
    for r in records:
        cfg = r.get("config") or {}
        ratio = (cfg.get("pruning") or {}).get("ratio")
        timings = r.get("timings") or {}
        if ratio is None or method_name(r) == "dense" or "prune" not in timings:
            continue  # (a recovered cell's pruning phases are the same work; its label says "+lora")
        calib = r.get("calibration") or {}
        cached = any(s.get("cached") for s in calib.get("statistics") or [])
        method = label.get(r.get("config_hash"), method_name(r))
        row = {"model": str((cfg.get("model") or {}).get("name")), "method": method, "ratio": float(ratio)}
        row.update({col: float(timings.get(phase, 0.0)) for phase, col in PHASES.items()})
        row["threads"] = cfg.get("threads")
        row["stats_cached"] = cached
        row["params"] = (r.get("params") or {}).get("before")
        rows.append(row)
    cols = ["model", "method", "ratio", *PHASES.values(), "pruning s", "cells", "threads", "params", "stats_cached"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    out = df.groupby(["model", "method", "ratio"], as_index=False).agg(
        **{c: (c, "median") for c in PHASES.values()},
        cells=("scoring s", "size"),
        threads=("threads", "first"),
        params=("params", "max"),
        stats_cached=("stats_cached", "any"),
    )
    out["pruning s"] = out[list(PHASES.values())].sum(axis=1)
    return out[cols].sort_values(["ratio", "model", "pruning s"]).reset_index(drop=True)


def prune_time_markdown(df: pd.DataFrame) -> str:
    """Per ratio: methods as rows, each model's pruning time (and its phases) as columns, smallest model first; with
    two or more models, the growth factor of the largest over the next smaller one."""
    lines = [
        "### Pruning wall time per method and model (ratio-sweep cells)",
        "",
        (
            "Seconds per cell: calibration draw + scoring/selection + surgery (with compensation); loading and "
            "evaluation excluded. Median over the calibration seeds of a cell (`cells`). Measured where the "
            "records ran (the reference runs: 2-core CPU, 1 torch thread per cell, 2 cells at a time, beside "
            "other work: expect +-50% between runs). `*`: the cell reused calibration statistics another cell had"
            " computed (FLAP's and ShortGPT's sweep cells after the first ratio), so its scoring time is not the "
            "method's cost."
        ),
        "",
    ]
    for ratio, part in df.groupby("ratio"):
        models = sorted(part["model"].unique(), key=lambda m: part.loc[part["model"] == m, "params"].max())
        lines += [f"**pruning.ratio = {ratio:g}**", ""]
        head = ["method"] + [f"{m} pruning s (cal / score / surgery)" for m in models]
        growth = len(models) >= 2
        if growth:
            head.append(f"{models[-1]} / {models[-2]}")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, rows in part.groupby("method", sort=False):
            by = {m: rows[rows["model"] == m] for m in models}
            cells = [str(method)]
            for m in models:
                if by[m].empty:
                    cells.append("")
                    continue
                x = by[m].iloc[0]
                star = "*" if x["stats_cached"] else ""
                cells.append(
                    f"{x['pruning s']:,.0f}{star} ({x['calibration s']:,.0f} / {x['scoring s']:,.0f} / "
                    f"{x['surgery s']:,.0f})"
                )
            if growth:
                a, b = by[models[-2]], by[models[-1]]
                ok = not a.empty and not b.empty and a.iloc[0]["pruning s"] >= 1
                ok = ok and not (a.iloc[0]["stats_cached"] or b.iloc[0]["stats_cached"])
                cells.append(f"{b.iloc[0]['pruning s'] / a.iloc[0]['pruning s']:.1f}x" if ok else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
