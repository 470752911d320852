"""A static, self-contained HTML report of a results store: plots (matplotlib PNGs embedded as base64) and the
paper tables.

Why one static file: it can be attached to a note, opened on a cluster login node's browser or archived with the
records; no server and no network (the figures are data URIs, the CSS is inline). Every plot is titled with the
protocol its numbers come from, so a window-limited PPL is never mistaken for a full-test one.

Sections: PPL vs ratio (one panel per protocol label, dense as a horizontal line), zero-shot average vs ratio (when
the store has zero-shot), kept width per layer (heatmap per method: layers x ratio x {heads, MLP}), efficiency vs
quality (parameters, or MACs when recorded, against PPL), the paper tables, and all records as one table.
A small script sets ``document.body.dataset.rendered`` to the number of decoded images, so a headless browser
test can check that the plots render (``data-plots`` holds how many were written).

Usage: ``python -m experiments.report --store DIR --out report.html``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import render as render_table
from experiments.adapruner import study_sections
from experiments.observations import (
    limit_suffix,
    method_name,
    newest_per_seed,
    observations,
    paper_ratio,
    protocols_present,
)
from experiments.store import ResultsStore, records_table
from experiments.store import _name as store_name
from experiments.tables import build_tables

PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
]
MARKERS = "osD^vP*Xh<>"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222}
h1{font-size:26px;margin-bottom:4px} h2{font-size:20px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin-bottom:6px} .meta{color:#666;font-size:13px} .empty{padding:16px;background:#fff6e0;
border:1px solid #e8c66a;border-radius:6px} figure{margin:12px 0} figcaption{font-size:13px;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee} table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f4;white-space:normal;vertical-align:bottom}
td.t{text-align:left} tr.pub td{background:#eef4ff;font-style:italic} .notes{font-size:12px;color:#555}
.scroll{overflow-x:auto} details{margin:8px 0}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var n = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { n++; } }
  document.body.dataset.rendered = String(n);
});
"""


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Colors:
    def __init__(self, methods: Iterable[str]):
        names = sorted(dict.fromkeys(m for m in methods if m != "dense"))
        self.map = {m: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(names)}

    def __call__(self, method: str):
        return self.map.get(method, ("#000000", "o"))


def _mean_std(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Seeds -> mean, std, min and max per group; the newest record wins for a repeated (group, seed)."""
    df = newest_per_seed(df, by)
    g = df.groupby(by, dropna=False, sort=True)
    return pd.DataFrame(
        {
            "mean": g["value"].mean(),
            "std": g["value"].std(ddof=1),
            "min": g["value"].min(),
            "max": g["value"].max(),
            "n": g["value"].size(),
            "achieved": g["achieved"].mean(),
        }
    ).reset_index()


def _panel_grid(n: int, ncols: int = 2):
    ncols = min(ncols, n)
    return int(math.ceil(n / ncols)), ncols


def _line_panels(
    obs: pd.DataFrame, model: str, keys: list[str], title_of, ylabel: str, colors: _Colors, logy: bool, suptitle: str
):
    nrows, ncols = _panel_grid(len(keys))
    fig = _figure(6.4 * ncols + 3.0, 4.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        sub = obs[obs["key"] == key]
        dense = sub[sub["phase"] == "dense"]
        pruned = sub[sub["phase"] != "dense"]
        stats = _mean_std(pruned, ["method", "ratio"])
        for method, g in stats.groupby("method", sort=True):
            color, marker = colors(str(method))
            g = g.sort_values("ratio")
            x = g["achieved"].where(g["achieved"].notna(), g["ratio"])  # blocks and heads overshoot the target
            # bars span the seeds' min..max: honest on a log axis, where mean - std can fall below zero
            bars = [(g["mean"] - g["min"]).clip(lower=0), (g["max"] - g["mean"]).clip(lower=0)]
            ax.errorbar(x, g["mean"], yerr=bars, color=color, marker=marker, ms=5, capsize=3, lw=1.6, label=method)
        title = title_of(key)
        if len(dense):
            d = _mean_std(dense, ["key"])["mean"].iloc[0]
            ax.axhline(d, color="black", ls="--", lw=1.2, label="dense")
            title += f"; dense {d:.4g}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("achieved ratio (fraction of all parameters removed)")
        ax.set_ylabel(ylabel)
        if logy and len(sub) and (sub["value"] > 0).all():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes[: len(keys)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:  # one legend beside the panels, where it hides no data
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside right upper",
            fontsize=8,
            title="method (bars: min-max over calibration seeds)",
            title_fontsize=8,
        )
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=12)
    return fig


def ppl_figures(obs: pd.DataFrame, colors: _Colors) -> list[tuple[str, str, str]]:
    out = []
    ppl = obs[(obs["kind"] == "ppl") & obs["protocol_ok"].astype(bool)]
    for model in sorted(ppl["model"].dropna().unique()):
        sub = ppl[ppl["model"] == model]
        keys = sorted(sub["key"].unique())
        fig = _line_panels(
            sub,
            model,
            keys,
            lambda k: f"PPL {k}",
            "perplexity (log scale)",
            colors,
            True,
            f"{model}: perplexity vs pruning ratio",
        )
        protocols = ", ".join(keys)
        out.append((f"{model}: PPL vs ratio", _png(fig), f"protocols: {protocols}"))
    return out


def zeroshot_figures(obs: pd.DataFrame, colors: _Colors) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    zs = obs[(obs["kind"] == "zeroshot") & (obs["task"] == "average") & obs["protocol_ok"].astype(bool)]
    if not len(zs):
        return out
    zs = zs.assign(
        key=[
            f"{m.replace('preset:', 'preset ')}, {p}" + limit_suffix(lim, "zs")
            for m, p, lim in zip(zs["metric"], zs["protocol"], zs["limit"])
        ]
    )
    for model in sorted(zs["model"].dropna().unique()):
        sub = zs[zs["model"] == model]
        keys = sorted(sub["key"].unique())
        fig = _line_panels(
            sub,
            model,
            keys,
            lambda k: f"zero-shot average (%), {k}",
            "average accuracy (%)",
            colors,
            False,
            f"{model}: zero-shot average vs pruning ratio",
        )
        out.append(
            (
                f"{model}: zero-shot average vs ratio",
                _png(fig),
                "average as recorded by the cell (its metric preset); " + "; ".join(keys),
            )
        )
    return out


def _layer_widths(record: Mapping) -> list[dict | None]:
    """Widths by original layer index; a removed block is None."""
    widths = list(record.get("widths") or [])
    removed = set(((record.get("plan") or {}).get("blocks")) or [])
    n = len(widths) + len(removed)
    it = iter(widths)
    return [None if i in removed else next(it, None) for i in range(n)]


def width_figures(records: Sequence[Mapping], colors: _Colors) -> list[tuple[str, str, str]]:
    """Per model and method: layers x (ratio, heads|MLP) of kept width / dense width, annotated with the count."""
    from matplotlib import colormaps

    out = []
    obs_labels = observations(records)
    labels = (
        obs_labels.drop_duplicates("config_hash").set_index("config_hash")["method"].to_dict()
        if len(obs_labels)
        else {}
    )
    by_model: dict[str, list[Mapping]] = {}
    for r in records:
        if r.get("widths"):
            by_model.setdefault(store_name((r.get("config") or {}).get("model")), []).append(r)
    for model, recs in sorted(by_model.items()):
        dense = [r for r in recs if method_name(r) == "dense"]
        ref = _layer_widths(max(dense, key=lambda r: str(r.get("created")))) if dense else None
        cells: dict[str, dict[float, Mapping]] = {}
        for r in sorted(recs, key=lambda r: str(r.get("created"))):  # newest record per (method, ratio) wins
            if method_name(r) == "dense":
                continue
            method = labels.get(r.get("config_hash"), method_name(r))
            ratio = paper_ratio(r)
            if ratio is not None:
                cells.setdefault(method, {})[ratio] = r
        if not cells:
            continue
        n_layers = max(len(_layer_widths(r)) for m in cells.values() for r in m.values())
        if ref is None:  # no dense record: the widest seen per layer stands in for dense
            ref = [None] * n_layers
            for m in cells.values():
                for r in m.values():
                    for i, w in enumerate(_layer_widths(r)):
                        widest = ref[i]
                        if w and (
                            widest is None
                            or w["num_heads"] > widest["num_heads"]
                            or w["intermediate_size"] > widest["intermediate_size"]
                        ):
                            ref[i] = {
                                k: max(w[k], (widest or {}).get(k, 0)) for k in ("num_heads", "intermediate_size")
                            }
        methods = sorted(cells)
        nrows, ncols = _panel_grid(len(methods), 2)
        max_cols = max(2 * len(v) for v in cells.values())
        fig = _figure(max(5.0, 0.55 * max_cols + 2.2) * ncols, max(2.6, 0.42 * n_layers + 1.6) * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
        im = None
        for ax, method in zip(axes, methods):
            ratios = sorted(cells[method])
            frac = np.full((n_layers, 2 * len(ratios)), np.nan)
            text = [["" for _ in range(2 * len(ratios))] for _ in range(n_layers)]
            for j, ratio in enumerate(ratios):
                for i, w in enumerate(_layer_widths(cells[method][ratio])):
                    d = ref[i] if i < len(ref) else None
                    for k, key in enumerate(("num_heads", "intermediate_size")):
                        if w is None:
                            text[i][2 * j + k] = "removed"
                            frac[i, 2 * j + k] = 0.0
                        else:
                            text[i][2 * j + k] = str(w[key])
                            if d and d.get(key):
                                frac[i, 2 * j + k] = w[key] / d[key]
            im = ax.imshow(np.ma.masked_invalid(frac), cmap=cmap, vmin=0, vmax=1, aspect="auto")
            for i in range(n_layers):
                for c in range(2 * len(ratios)):
                    v = frac[i, c]
                    ax.text(
                        c,
                        i,
                        text[i][c],
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if (not np.isnan(v) and v < 0.55) else "black",
                    )
            ax.set_xticks(range(2 * len(ratios)))
            ax.set_xticklabels(
                [f"{render_table.fmt_ratio(r)}\n{lab}" for r in ratios for lab in ("heads", "MLP")], fontsize=7
            )
            ax.set_yticks(range(n_layers))
            ax.set_yticklabels([f"L{i}" for i in range(n_layers)], fontsize=7)
            ax.set_title(method, fontsize=10)
            ax.set_xlabel("target ratio / structure")
        for ax in axes[len(methods) :]:
            ax.set_visible(False)
        if im is not None:
            fig.colorbar(im, ax=axes[: len(methods)].tolist(), shrink=0.8, label="kept / dense width")
        fig.suptitle(
            f"{model}: kept width per layer (numbers = kept query heads / MLP channels; newest seed)", fontsize=12
        )
        out.append(
            (
                f"{model}: per-layer kept widths",
                _png(fig),
                (
                    "colour = kept / dense width per layer (dense from a method=dense record when present); "
                    "'removed' = the whole block was deleted"
                ),
            )
        )
    return out


def _cost_axis(obs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """MACs per record when the efficiency block has them, else the parameter count after pruning."""
    eff = obs[(obs["kind"] == "efficiency") & obs["metric"].str.contains("macs", case=False, na=False)]
    if len(eff):
        names = sorted(eff["metric"].unique())
        metric = "macs_per_token" if "macs_per_token" in names else names[0]
        m = eff[eff["metric"] == metric].drop_duplicates(["config_hash", "phase"])
        return m[["config_hash", "phase", "value"]].rename(columns={"value": "cost"}), f"MACs ({metric})"
    p = obs.drop_duplicates(["config_hash", "phase"])[["config_hash", "phase", "params_after"]]
    return p.rename(columns={"params_after": "cost"}), "parameters after pruning"


def efficiency_figures(obs: pd.DataFrame, colors: _Colors) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    ppl = obs[(obs["kind"] == "ppl") & obs["protocol_ok"].astype(bool)]
    if not len(ppl):
        return out
    for model in sorted(ppl["model"].dropna().unique()):
        sub = obs[obs["model"] == model]
        cost, xlabel = _cost_axis(sub)
        p = ppl[ppl["model"] == model].merge(cost, on=["config_hash", "phase"], how="left")
        p = p[p["cost"].notna()]
        keys = sorted(p["key"].unique())
        if not keys:
            continue
        nrows, ncols = _panel_grid(len(keys))
        fig = _figure(6.4 * ncols, 4.2 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, key in zip(axes, keys):
            k = p[p["key"] == key]
            for method, g in k.groupby("method", sort=True):
                if method == "dense":
                    g = g.drop_duplicates("key")
                    ax.scatter(g["cost"], g["value"], marker="*", s=160, color="black", zorder=3, label="dense")
                    continue
                color, marker = colors(method)
                ax.scatter(g["cost"], g["value"], color=color, marker=marker, s=36, label=method, alpha=0.85)
                for x, y, r in zip(g["cost"], g["value"], g["ratio"]):
                    ax.annotate(
                        render_table.fmt_ratio(r), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                    )
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity (log scale)")
            ax.set_title(f"PPL {key} vs size", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in axes[len(keys) :]:
            ax.set_visible(False)
        fig.suptitle(f"{model}: efficiency vs quality (labels = target ratio)", fontsize=12)
        out.append((f"{model}: efficiency vs quality", _png(fig), f"x: {xlabel}; y: PPL per protocol"))
    return out


def render(records: Sequence[Mapping], store_label: str = "") -> tuple[str, int]:
    """The report as an HTML string and the number of plots in it."""
    parts: list[str] = []
    figures: list[tuple[str, list[tuple[str, str, str]]]] = []
    warnings_: list[str] = []
    obs = observations(records) if records else observations([])
    if records:
        colors = _Colors(list(obs["method"].dropna().unique()))
        for title, fn in (
            ("Perplexity vs pruning ratio", lambda: ppl_figures(obs, colors)),
            ("Zero-shot average vs pruning ratio", lambda: zeroshot_figures(obs, colors)),
            ("Kept width per layer", lambda: width_figures(records, colors)),
            ("Efficiency vs quality", lambda: efficiency_figures(obs, colors)),
            *study_sections(records),
        ):  # AdaPruner studies, when the store has one
            try:
                figures.append((title, fn()))
            except Exception as exc:  # noqa: BLE001 - a broken plot must not cost the rest of the report
                warnings_.append(f"{title}: could not plot ({type(exc).__name__}: {exc})")
                figures.append((title, []))
    n_plots = sum(len(f) for _, f in figures)

    models = sorted(obs["model"].dropna().unique()) if len(obs) else []
    methods = sorted(obs["method"].dropna().unique()) if len(obs) else []
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(
        f"<h1>Pruning results report</h1><p class=meta>store: {html.escape(store_label)} · "
        f"{len(records)} records · models: {html.escape(', '.join(models) or '-')} · "
        f"methods: {html.escape(', '.join(methods) or '-')} · generated {stamp}</p>"
    )
    if not records:
        parts.append(
            f"<p class=empty>No records in this store yet ({html.escape(store_label)}). Run a cell, e.g. "
            "<code>python run.py method=random pruning.ratio=0.3</code>, then rebuild this report.</p>"
        )
    for w in warnings_:
        parts.append(f"<p class=empty>{html.escape(w)}</p>")
    for title, figs in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not figs:
            parts.append("<p class=meta>No data for this section in the store.</p>")
        for caption, png, note in figs:
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
                f"<figcaption>{html.escape(caption)} — {html.escape(note)}</figcaption></figure>"
            )
    if records:
        parts.append(
            "<h2>Paper tables</h2><p class=meta>Only rows whose protocol matches the table's; published "
            "rows (shaded, italic) come from experiments/anchors.csv with their sources below each "
            "table.</p>"
        )
        try:
            built = build_tables(records)
            shown = [t for t in built.values() if t.n_ours]
            for t in shown:
                parts.append(render_table.html(t))
            empty = [n for n, t in built.items() if not t.n_ours]
            if empty:
                parts.append(
                    f"<p class=meta>No rows of ours (protocol not in the store) for: "
                    f"{html.escape(', '.join(empty))}. Protocols in the store: "
                    f"{html.escape(', '.join(protocols_present(obs)) or 'none')}.</p>"
                )
        except Exception as exc:  # noqa: BLE001 - broken tables must not cost the rest of the report
            parts.append(
                f"<p class=empty>Tables could not be built ({html.escape(type(exc).__name__)}: "
                f"{html.escape(str(exc))})</p>"
            )
        flat = records_table(records)
        parts.append(
            "<h2>All records</h2><details><summary>one row per record "
            f"({len(flat)})</summary><div class=scroll>"
            + flat.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
            + "</div></details>"
        )
    body = "\n".join(parts)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Pruning results report</title>'
        f'<style>{CSS}</style></head>\n<body data-plots="{n_plots}">\n{body}\n<script>{SCRIPT}</script>\n'
        "</body></html>\n"
    )
    return page, n_plots


def write_report(store_dir: str | Path | None, out: str | Path) -> tuple[Path, int]:
    store = ResultsStore(store_dir)
    page, n = render(store.records(), str(store.root))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out, n


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(
    html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 2400, timeout: float = 120
) -> Path:
    """Render the report in headless Chromium (a fresh, throw-away profile) and save a PNG of the first screen."""
    import subprocess
    import tempfile

    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium/chrome executable on PATH (Debian: apt-get install chromium)")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        subprocess.run(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                f"--window-size={width},{height}",
                f"--screenshot={png_path}",
                Path(html_path).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    if not png_path.is_file():
        raise RuntimeError(f"chromium did not write {png_path}")
    return png_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pruning-lab report", description="Static HTML report of a store.")
    parser.add_argument(
        "--store", type=Path, default=None, help="store directory (default: $PRUNING_STORE or runs/store)"
    )
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="output HTML file")
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        help="also save a PNG of the rendered page (headless Chromium), e.g. docs/report.png",
    )
    parser.add_argument("--window-size", default="1400,2400", help="screenshot size WIDTH,HEIGHT in pixels")
    parser.add_argument(
        "--ppl-png",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each model's PPL-vs-ratio figure as DIR/ppl_vs_ratio_<model>.png",
    )
    args = parser.parse_args(argv)
    path, n = write_report(args.store, args.out)
    print(f"wrote {path} ({n} plots)")
    if args.ppl_png is not None:
        records = ResultsStore(args.store).records()
        obs = observations(records)
        args.ppl_png.mkdir(parents=True, exist_ok=True)
        for title, data, _ in ppl_figures(obs, _Colors(obs["method"].unique())):
            out = args.ppl_png / f"ppl_vs_ratio_{title.split(':')[0]}.png"
            out.write_bytes(base64.b64decode(data))
            print(f"wrote {out}")
    if args.screenshot is not None:
        w, h = (int(x) for x in args.window_size.split(","))
        print(f"wrote {screenshot(path, args.screenshot, w, h)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
