"""Published numbers as data: `anchors.csv` (one record per line, copied from reference/anchors.csv) as a DataFrame.

Why a data file and not constants in the table code: a published number must be traceable to the paper table it
came from, kept exactly as printed ("8.058", "126.0", "NaN", "80.73%"), and never be confused with a number this
project produced. Every row therefore keeps its `block`, `paper` and `source`, the printed text in `value`, and a
`label` that says "published (...)"; `value_num` is the parsed float for arithmetic and plotting.

Columns: block, paper, model, method, ratio, metric, task, protocol, value, source, note (as in the CSV), plus
ratio_value (float; "3/7" -> 0.4286, "unstated" -> NaN), value_num (float), published (always True), label.
The ratio is the paper's own ratio (METHODS.md §1.3), which means different things in different papers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

ANCHORS_CSV = Path(__file__).with_name("anchors.csv")
CSV_COLUMNS = ("block", "paper", "model", "method", "ratio", "metric", "task", "protocol", "value", "source", "note")

# The two numeric forms that are not plain floats: "80.73%" (percent printed with its sign) and "~49".
_NUMBER_RE = re.compile(r"^[~+]?\s*(-?[0-9][0-9,]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?)\s*%?$")


def parse_number(text: str) -> float:
    """The float a printed value stands for; NaN when the paper printed NaN or no number at all."""
    s = str(text).strip()
    if s.lower() in ("nan", "", "-", "unstated"):
        return math.nan
    m = _NUMBER_RE.match(s)
    if not m:
        return math.nan
    return float(m.group(1).replace(",", ""))


def parse_ratio(text: str) -> float:
    """A paper's ratio label as a float; fractions such as "3/7" (Torch-Pruning's Qwen example) are evaluated."""
    s = str(text).strip()
    if "/" in s:
        num, _, den = s.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return math.nan
    return parse_number(s)


def model_key(name: str) -> str:
    """Case- and punctuation-free model name, so a config's `llama-7b` finds the anchors' `LLaMA-7B`."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def published_label(block: str, source: str) -> str:
    return f"published ({block}: {source})"


@lru_cache(maxsize=4)
def _load(path: str) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing anchor columns {missing}")
    df = df[list(CSV_COLUMNS)].copy()
    df["ratio_value"] = df["ratio"].map(parse_ratio).astype(float)
    df["value_num"] = df["value"].map(parse_number).astype(float)
    df["published"] = True
    df["label"] = [published_label(b, s) for b, s in zip(df["block"], df["source"])]
    return df


def load_anchors(path: str | Path | None = None) -> pd.DataFrame:
    """Every published record (a fresh copy, so callers may modify it)."""
    return _load(str(Path(path) if path is not None else ANCHORS_CSV)).copy()


def _as_set(value) -> set | None:
    if value is None:
        return None
    if isinstance(value, (str, float, int)):
        return {value}
    return set(value)


def select(
    df: pd.DataFrame | None = None,
    *,
    block: str | Iterable[str] | None = None,
    paper: str | Iterable[str] | None = None,
    model: str | Iterable[str] | None = None,
    method: str | Iterable[str] | None = None,
    ratio: float | Iterable[float] | None = None,
    protocol: str | Iterable[str] | None = None,
    task: str | Iterable[str] | None = None,
    metric: str | Iterable[str] | None = None,
    tol: float = 1e-6,
) -> pd.DataFrame:
    """Rows matching every given filter (a value or a collection of values).

    `model` compares case- and punctuation-free (model_key); `ratio` compares numerically within `tol`, so
    0.2 finds the printed "0.20" and 0 finds dense; everything else is an exact string match.
    """
    df = load_anchors() if df is None else df
    mask = pd.Series(True, index=df.index)
    for col, want in (
        ("block", block),
        ("paper", paper),
        ("method", method),
        ("protocol", protocol),
        ("task", task),
        ("metric", metric),
    ):
        values = _as_set(want)
        if values is not None:
            mask &= df[col].isin(values)
    models = _as_set(model)
    if models is not None:
        keys = {model_key(m) for m in models}
        mask &= df["model"].map(model_key).isin(keys)
    ratios = _as_set(ratio)
    if ratios is not None:
        near = pd.Series(False, index=df.index)
        for r in ratios:
            near |= (df["ratio_value"] - float(r)).abs() <= tol
        mask &= near
    return df[mask]


def sources(df: pd.DataFrame) -> dict[str, str]:
    """block -> "paper: source (note)" for the rows given, for a table's footnotes (S1 rows each name their own)."""
    out: dict[str, list[str]] = {}
    row: Any  # itertuples' namedtuples: the columns are not typed
    for row in df.drop_duplicates(["block", "paper", "source"]).itertuples(index=False):
        text = f"{row.paper}: {row.source}" + (f" (note: {row.note})" if row.note else "")
        out.setdefault(row.block, []).append(text)
    return {block: "; ".join(texts) for block, texts in sorted(out.items())}
