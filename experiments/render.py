"""Renderers of a built ``PaperTable`` (experiments/tables.py): Markdown, LaTeX, CSV, HTML (the report) and the README
summary. Ours are printed as mean or "mean ± std" over seeds, published values exactly as the paper printed them;
every renderer writes the table's footnotes (protocol notes, knob meanings, calibration, sources, exclusions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from experiments import anchors as anchors_mod

if TYPE_CHECKING:
    from experiments.tables import PaperTable

_TEXT_COLUMNS = ("model", "method", "source", "protocol")


def fmt_ratio(r: float) -> str:
    """A ratio as a table prints it: two decimals when that is exact (0.20), else as short as exact (0.125)."""
    return f"{r:.2f}" if round(r, 2) == r else f"{r:g}"


_LATEX_SPECIAL = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "±": r"$\pm$",
    "↓": r"$\downarrow$",
    "→": r"$\to$",
    "–": "--",
    "≤": r"$\le$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def markdown_frame(df) -> str:
    """Any DataFrame as a Markdown table (floats to 6 significant digits). Our own tiny renderer:
    DataFrame.to_markdown needs `tabulate`, which is not a declared dependency."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


INTERVAL_NOTE = (
    "[low, high]: {level:.0%} percentile bootstrap interval of our value over the windows / documents it was "
    "evaluated on ({resamples} resamples; for a mean over seeds the units every seed shares are resampled together "
    "and the seeds held fixed): sampling error only. ± std: the spread over calibration seeds, kept apart. A value "
    "without brackets comes from a record written before per-window / per-document results were stored (no "
    "interval)."
)
PAIRED_NOTE = (
    "paired (a vs b on the same windows / documents, {level:.0%} interval; resolved = the interval excludes no "
    "difference): "
)


def interval_text(iv, digits: int = 2, thousands: bool = False) -> str:
    """ " [low, high]" for an Interval (experiments/uncertainty.py), "" for None or an interval without bounds."""
    if getattr(iv, "low", None) is None or not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        return ""
    f = f"{{:,.{digits}f}}" if thousands else f"{{:.{digits}f}}"
    return f" [{f.format(iv.low)}, {f.format(iv.high)}]"


def _interval_at(table: PaperTable, i: int, col: str):
    if table.intervals is None or col not in table.intervals.columns:
        return None
    return table.intervals.iloc[i][col]


def display(table: PaperTable) -> pd.DataFrame:
    """All cells as strings: ours as mean or "mean ± std" (seed spread), then " [low, high]" (sampling interval)
    when the records hold per-sample values; published exactly as printed."""
    out = table.frame.copy().astype(object)

    def pos(col: str) -> int:  # the labels are unique: get_loc gives one position
        return cast(int, out.columns.get_loc(col))

    for i in range(len(out)):
        published = out.iloc[i]["source"] != "ours"
        for col in table.value_columns:
            v = table.frame.iloc[i][col]
            if published:
                text = table.printed.iloc[i][col]
                out.iat[i, pos(col)] = text if isinstance(text, str) else ""
            elif v is None or (isinstance(v, float) and math.isnan(v)):
                out.iat[i, pos(col)] = ""
            else:
                s = table.std.iloc[i][col]
                text = f"{v:.2f}" if pd.isna(s) else f"{v:.2f} ± {s:.2f}"
                out.iat[i, pos(col)] = text + interval_text(_interval_at(table, i, col))
        for col in ("ratio", "achieved"):
            if col in out.columns:
                v = table.frame.iloc[i][col]
                if published and col == "ratio":
                    text = table.printed.iloc[i].get("ratio", "")
                elif pd.isna(v):
                    text = ""
                else:
                    text = fmt_ratio(v) if col == "ratio" else f"{v:.4f}"
                out.iat[i, pos(col)] = text
        if "setting" in out.columns and (published or not isinstance(table.frame.iloc[i]["setting"], str)):
            out.iat[i, pos("setting")] = ""
        if "n" in out.columns:
            n = table.frame.iloc[i]["n"]
            out.iat[i, pos("n")] = "" if pd.isna(n) else str(int(n))
        if published:
            out.iat[i, pos("source")] = "published (" + table.frame.iloc[i]["block"] + ")"
    return out.drop(columns=["block"])


def footnotes(table: PaperTable, paired: bool = True) -> list[str]:
    """The spec's notes, the provenance read from the records, the published sources and what was excluded; with
    ``paired`` the paired comparisons as one note (Markdown prints them as a table of their own instead)."""
    notes = list(table.spec.notes) + list(table.provenance)
    first = table.first_interval
    if first is not None:
        notes.append(INTERVAL_NOTE.format(level=first.level, resamples=first.resamples))
        if table.paired and paired:
            notes.append(PAIRED_NOTE.format(level=first.level) + "; ".join(p.text() for p in table.paired))
    notes += list(table.uncertainty_notes)
    notes += [f"published ({b}): {s}" for b, s in table.sources.items()]
    notes += [f"excluded: {e}" for e in table.excluded]
    return notes


def paired_frame(table: PaperTable) -> pd.DataFrame:
    """The paired comparisons of neighbouring rows, one per line: a PPL ratio a / b or an accuracy difference a - b
    in points, with its interval and whether it tells the two rows apart."""
    rows = [
        [p.model, p.group, p.column, p.a, p.b, *p.measure(), "yes" if p.paired.resolved else "no"] for p in table.paired
    ]
    return pd.DataFrame(rows, columns=["model", "rows at", "column", "a", "b", "compared", "value", "resolved"])


def markdown(table: PaperTable) -> str:
    """Title, the table, its footnotes as a list, then the paired comparisons as a table."""
    lines = [f"### {table.spec.title}", "", markdown_frame(display(table)), ""]
    lines += [f"- {n}" for n in footnotes(table, paired=False)]
    first = table.first_interval
    if table.paired and first is not None:
        lines += ["", PAIRED_NOTE.format(level=first.level).rstrip(": ").capitalize() + ":", ""]
        lines += [markdown_frame(paired_frame(table))]
    return "\n".join(lines) + "\n"


def latex(table: PaperTable) -> str:
    """A booktabs ``table`` environment with the footnotes under it."""
    df = display(table)
    cols = list(df.columns)
    body = [" & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    body += [" & ".join(latex_escape(str(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
    notes = " ".join(latex_escape(n) for n in footnotes(table))
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\caption{{{latex_escape(table.spec.title)}}}",
            rf"\label{{tab:{table.spec.name}}}",
            r"\begin{tabular}{" + "".join("l" if c in _TEXT_COLUMNS else "r" for c in cols) + "}",
            r"\toprule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            rf"\par\footnotesize {notes}",
            r"\end{table}",
            "",
        ]
    )


def csv(table: PaperTable) -> str:
    """Numbers, not text: means, `<col> std`, and the full source ("ours" / "published (block: source)")."""
    df = table.frame.copy()
    df["n"] = df["n"].astype("Int64")
    for col in table.value_columns:
        df[f"{col} std"] = table.std[col]
    if table.has_intervals:  # only then: a store without per-sample values writes the same CSV as before
        for col in table.value_columns:
            ivs = [_interval_at(table, i, col) for i in range(len(df))]
            df[f"{col} ci_low"] = [getattr(iv, "low", None) for iv in ivs]
            df[f"{col} ci_high"] = [getattr(iv, "high", None) for iv in ivs]
    df["source"] = [
        s if s == "ours" else anchors_mod.published_label(b, table.sources.get(b, ""))
        for s, b in zip(table.frame["source"], table.frame["block"])
    ]
    return df.to_csv(index=False)


def _row_at(g: pd.DataFrame, method, ratio: float):
    """The index of ``method``'s row at ``ratio`` in ``g``, or None."""
    hit = g[(g["method"] == method) & ((g["ratio"] - ratio).abs() < 1e-9)]
    return None if hit.empty else hit.index[0]


def summary(table: PaperTable, ratios: Sequence[float]) -> str:
    """The README view of a rows table: per model, one row per method of ours (recovery variants left out),
    each PPL column at each ratio as "mean ± std" and n, methods ordered by their first column at the first
    ratio (best first), the dense value in the heading."""
    f = table.frame
    ours = f[(f["source"] == "ours") & ~f["method"].astype(str).str.contains(r"\+\w+$")]
    out = []
    for model, g in ours.groupby("model", sort=True):
        cols = [c for c in table.value_columns if g[c].notna().any()]
        names = [c.split(" [")[0] for c in cols]  # the subset goes to the heading when it is shared
        short = {c: n if names.count(n) == 1 else c for c, n in zip(cols, names)}
        dense = g[g["method"] == "dense"]
        head = ", ".join(f"{short[c]} {dense.iloc[0][c]:.2f}" for c in cols) if len(dense) else "not run"
        first = table.first_interval
        brackets = "" if first is None else f"; [low, high] = {first.level:.0%} bootstrap interval over the windows"
        out += [
            f"**{model}** (dense: {head}; n = calibration seeds{brackets})",
            "",
            "| method | "
            + " | ".join(
                f"{100 * r:g}%: {short[c]}" if j < len(cols) else f"{100 * r:g}%: n"
                for r in ratios
                for j, c in enumerate(cols + ["n"])
            )
            + " |",
            "|---" * (1 + len(ratios) * (len(cols) + 1)) + "|",
        ]
        g = g[g["method"] != "dense"]
        # method -> its row index at each ratio (None: not run)
        rows = {m: [_row_at(g, m, r) for r in ratios] for m in dict.fromkeys(g["method"])}
        # methods ordered by their first column at the first ratio, best first; not run there: last
        key = {m: (at[0] is None, 0.0 if at[0] is None else float(f.loc[at[0], cols[0]]), m) for m, at in rows.items()}
        for method in sorted(rows, key=key.__getitem__):
            parts = [str(method)]
            for i in rows[method]:
                for c in cols:
                    v, sd = (None, None) if i is None else (f.loc[i, c], table.std.loc[i, c])
                    iv = None if i is None else _interval_at(table, int(i), c)
                    parts.append(
                        "–"
                        if v is None or pd.isna(v)
                        else f"{v:,.1f}" + ("" if pd.isna(sd) else f" ± {sd:,.1f}") + interval_text(iv, 1, True)
                    )
                parts.append("–" if i is None else str(int(f.loc[i, "n"])))
            out.append("| " + " | ".join(parts) + " |")
        out.append("")
    # the operating point and each method's calibration sampler, as the full table's caption says them
    axis = "pruning.ratio, the share of ALL parameters removed" if table.spec.cells == "ratio" else "each paper's knob"
    out += [f"- ratio: {axis}.", *(f"- {line}" for line in table.provenance), ""]
    return "\n".join(out)


def write(table: PaperTable, out_dir: str | Path, formats: Sequence[str] = ("md", "tex", "csv")) -> list[Path]:
    """``<out_dir>/<table name>.<md|tex|csv>``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {"md": markdown, "tex": latex, "csv": csv}
    paths = []
    for fmt in formats:
        p = out / f"{table.spec.name}.{fmt}"
        p.write_text(writers[fmt](table), encoding="utf-8")
        paths.append(p)
    return paths


def html(table: PaperTable) -> str:
    """The table as an HTML fragment for the report: published rows get class "pub", text columns class "t"."""
    df = display(table)
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cls = ' class="pub"' if str(row[list(df.columns).index("source")]).startswith("published") else ""
        cells = "".join(
            f"<td{' class=t' if c in _TEXT_COLUMNS else ''}>{escape(str(v))}</td>" for c, v in zip(df.columns, row)
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
    notes = "".join(f"<li>{escape(n)}</li>" for n in footnotes(table))
    return (
        f"<h3>{escape(table.spec.title)}</h3><div class=scroll><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div><ul class=notes>{notes}</ul>"
    )
