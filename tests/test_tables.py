"""Paper tables from a store filled by real cells (stories260K, real WikiText-2/PTB windows); anchors as data.

Every number checked here is read back independently: ours from the record JSON files with `json`, published ones
from anchors.csv with the `csv` module.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import statistics
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import anchors as A
from experiments import observations as O
from experiments import render
from experiments import tables as T
from experiments import uncertainty as U
from experiments.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
W = 6  # PPL windows per text: enough to be real, small enough to be fast
LP = f"ppl128-lp:wikitext2:test[:{W} windows]"
LP_PTB = f"ppl128-lp:ptb:validation[:{W} windows]"
SMALL = ["eval=quick", f"eval.ppl.0.max_windows={W}", f"eval.ppl.1.max_windows={W}"]
SL = ["eval=ppl2048", "eval.ppl.0.max_windows=1", "eval.ppl.1.max_windows=1"]
NATIVE = ["pruning.ratio=null"]  # paper tables hold cells set by each paper's own knob (group_ratio here:
P20, P39, P31 = 0.25, 0.5, 0.4  # LLM-Pruner's p; on LLaMA-7B it removes 19.52%, 39.04%, 30.59% -> labels)


def run_cells(store: Path, cells: list[list[str]]) -> None:
    from hydra import compose, initialize_config_dir

    from experiments.cell import run_cell

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for overrides in cells:
            run_cell(compose("config", overrides=[f"store.dir={store}", "progress=false", *overrides]))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tables")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNING_CACHE", str(root / "cache"))
        run_cells(
            root / "store",
            [
                [*SMALL, "method=dense"],
                [*SMALL, "method=magnitude", *NATIVE, f"method.group_ratio={P20}"],  # anchor id l2 (A1 has it at 0.20)
                [*SMALL, "method=magnitude_l1", *NATIVE, f"method.group_ratio={P20}"],  # no anchor
                [*SMALL, "method=magnitude", *NATIVE, f"method.group_ratio={P39}"],
                [*SMALL, "method=random", *NATIVE, f"method.group_ratio={P20}", "seed=0"],
                [*SMALL, "method=random", *NATIVE, f"method.group_ratio={P20}", "seed=1"],
                [*SMALL, "method=random", *NATIVE, f"method.group_ratio={P20}", "method.structures=[block]"],
                # a user mistake: the protocol name says ppl128-lp but the windows are 64 tokens long
                [
                    "eval=quick",
                    "eval.ppl.0.max_windows=4",
                    "eval.ppl.1.max_windows=4",
                    "eval.ppl.0.seq_len=64",
                    "eval.ppl.0.stride=64",
                    "method=magnitude",
                    *NATIVE,
                    f"method.group_ratio={P31}",
                ],
                [*SL, "method=magnitude", *NATIVE, f"method.group_ratio={P20}"],  # Search-LLM's seq-2048 protocol
                # the cross-method sweep's cells: pruning.ratio, the share of all parameters
                [*SMALL, "method=magnitude", "pruning.ratio=0.2"],
                [*SMALL, "method=magnitude", "pruning.ratio=0.4"],
                [*SMALL, "method=random", "pruning.ratio=0.2", "seed=0"],
                [*SMALL, "method=random", "pruning.ratio=0.2", "seed=1"],
            ],
        )
    return root / "store"


def _records(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "records").glob("*.json"))]


def _find(records, method, ratio=None, seed=0, structures=None, eval_len=128, group_ratio=None):
    """One record by method and either pruning.ratio (``ratio``) or LLM-Pruner's knob (``group_ratio``)."""
    hits = [
        r
        for r in records
        if r["plan"]["meta"].get("method") == method
        and (
            r["params"]["target_ratio"] is None
            if ratio is None
            else math.isclose(r["params"]["target_ratio"] or -1, ratio)
        )
        and r["config"]["method"].get("group_ratio") == group_ratio
        and r["config"]["seed"] == seed
        and r["config"]["eval"]["ppl"][0]["seq_len"] == eval_len
        and (structures is None or r["config"]["method"].get("structures") == structures)
    ]
    assert len(hits) == 1, [(r["plan"]["meta"], r["config_hash"]) for r in hits]
    return hits[0]


def _row(table: T.PaperTable, method: str, ratio: float, source: str = "ours") -> pd.Series:
    f = table.frame
    hit = f[(f["method"] == method) & ((f["ratio"] - ratio).abs() < 1e-9) & (f["source"] == source)]
    assert len(hit) == 1, f[["model", "method", "ratio", "source"]]
    return hit.iloc[0]


def _anchor_value(
    block: str, method: str, ratio: float, task: str, protocol: str, metric: str | None = None, model: str = "LLaMA-7B"
):
    with open(REPO / "experiments" / "anchors.csv", newline="", encoding="utf-8") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["block"] == block
            and r["method"] == method
            and r["model"] == model
            and float(r["ratio"]) == ratio
            and r["task"] == task
            and r["protocol"] == protocol
            and (metric is None or r["metric"] == metric)
        ]
    assert len(rows) == 1, rows
    return rows[0]["value"]


# ------------------------------------------------------------------------------------------------------ anchors


def test_anchors_file_is_the_reference_copy_and_every_row_has_a_source():
    ref = REPO.parent / "shared" / "reference" / "anchors.csv"
    ours = REPO / "experiments" / "anchors.csv"
    if ref.is_file():
        assert ours.read_bytes() == ref.read_bytes()
    df = A.load_anchors()
    with open(ours, newline="", encoding="utf-8") as f:
        assert len(df) == sum(1 for _ in csv.DictReader(f))
    assert (df["source"].str.len() > 0).all() and (df["paper"].str.len() > 0).all()
    assert df["published"].all() and df["label"].str.startswith("published (").all()


def test_anchor_parsing_keeps_printed_text_and_parses_numbers():
    assert A.parse_number("8.058") == 8.058 and A.parse_number("80.73%") == 80.73
    assert A.parse_number("-14.09") == -14.09 and math.isnan(A.parse_number("NaN"))
    assert A.parse_ratio("3/7") == pytest.approx(3 / 7) and A.parse_ratio("0.20") == 0.2
    df = A.load_anchors()
    flap = A.select(df, block="C1", model="LLaMA-7B", method="flap", ratio=0.1, task="c4")
    assert list(flap["value"]) == ["8.058"]  # printed oddity kept as printed (METHODS.md §4)
    assert list(A.select(df, block="E1", ratio=0.25)["value_num"]) == [7.24]
    # model names compare without case or punctuation, ratios numerically
    a = A.select(df, paper="LLM-Pruner", model="llama-7b", method="l2", ratio=0.2, protocol="ppl128-lp")
    assert dict(zip(a["task"], a["value"])) == {
        "wikitext2": _anchor_value("A1", "l2", 0.2, "wikitext2", "ppl128-lp"),
        "ptb": _anchor_value("A1", "l2", 0.2, "ptb", "ppl128-lp"),
    }


# ------------------------------------------------------------------------------------------------------- tables


def test_llm_pruner_table_values_are_the_records_values(store):
    recs = _records(store)
    table = T.build_table(ResultsStore(store).records(), "llm_pruner_t1")
    wt, ptb = f"WikiText-2 [first {W} windows]", f"PTB [first {W} windows]"
    mag = _find(recs, "magnitude_l2", group_ratio=P20)
    row = _row(table, "magnitude_l2", 0.2)  # the paper's label for p = 0.25
    assert row[wt] == mag["metrics"]["ppl"][LP]["ppl"] and row[ptb] == mag["metrics"]["ppl"][LP_PTB]["ppl"]
    assert row["achieved"] == pytest.approx(mag["params"]["achieved_ratio"]) and row["n"] == 1
    assert row["setting"] == "group_ratio=0.25"
    assert mag["params"]["operating_point"]["knob"] == "method.group_ratio"
    # cells set by pruning.ratio belong to the ratio sweep, never to a paper table
    assert not (table.frame["setting"] == "").any() or set(table.frame.loc[table.frame["setting"] == "", "method"]) <= {
        "dense"
    }
    assert any(n.startswith("setting group_ratio: LLM-Pruner --pruning_ratio") for n in render.footnotes(table))
    dense = _row(table, "dense", 0.0)
    assert dense[wt] == mag["metrics"]["dense_ppl"][LP]["ppl"]
    # the window-limited numbers never enter the full-test columns, which only the published rows fill
    ours = table.frame[table.frame["source"] == "ours"]
    assert ours["WikiText-2"].isna().all() and ours["PTB"].isna().all()
    # seeds: mean and sample std of the two random runs
    vals = [
        _find(recs, "random", group_ratio=P20, seed=s, structures=["kv_group", "mlp"])["metrics"]["ppl"][LP]["ppl"]
        for s in (0, 1)
    ]
    rnd = table.frame[
        (table.frame["method"].str.startswith("random"))
        & table.frame["method"].str.contains("kv_group")
        & (table.frame["source"] == "ours")
    ]
    assert len(rnd) == 1 and rnd.iloc[0]["n"] == 2 and vals[0] != vals[1]
    i = rnd.index[0]
    assert rnd.iloc[0][wt] == pytest.approx(statistics.mean(vals), rel=1e-12)
    assert table.std.loc[i, wt] == pytest.approx(statistics.stdev(vals), rel=1e-12)
    assert "±" in render.display(table).loc[i, wt]
    # one method run with two structure sets: two rows, told apart by the differing config value
    assert {m for m in ours["method"] if m.startswith("random")} == {
        "random [structures=kv_group+mlp]",
        "random [structures=block]",
    }


def test_published_rows_sit_beside_ours_with_their_source(store):
    table = T.build_table(ResultsStore(store).records(), "llm_pruner_t1")
    pub = _row(table, "l2", 0.2, source="published")
    assert pub["model"] == "LLaMA-7B" and pub["block"] == "A1" and pd.isna(pub["n"])
    assert pub["WikiText-2"] == float(_anchor_value("A1", "l2", 0.2, "wikitext2", "ppl128-lp"))
    assert pub["PTB"] == float(_anchor_value("A1", "l2", 0.2, "ptb", "ppl128-lp"))
    assert pub["HellaSwag"] == float(_anchor_value("A1", "l2", 0.2, "hellaswag", "zs-lp", "acc_norm"))
    assert pub["Average"] == float(_anchor_value("A1", "l2", 0.2, "avg7", "zs-lp"))
    assert pd.isna(pub[f"WikiText-2 [first {W} windows]"])
    order = list(zip(table.frame["method"], table.frame["source"]))
    assert order.index(("l2", "published")) == order.index(("magnitude_l2", "ours")) + 1
    # matched: only (method, ratio) pairs we ran, plus dense; LLaMA paper's own harness row is not zs-lp
    pubs = table.frame[table.frame["source"] == "published"]
    assert set(zip(pubs["method"], pubs["ratio"])) == {("dense", 0.0), ("l2", 0.2), ("random", 0.2)}
    shown = render.display(table)
    assert set(shown.loc[pubs.index, "source"]) == {"published (A1)"}
    assert shown.loc[pubs.index[0], "WikiText-2"] == _anchor_value("A1", "dense", 0.0, "wikitext2", "ppl128-lp")
    assert "LLM-Pruner paper Table 1" in table.sources["A1"]
    assert not (
        T.build_table(ResultsStore(store).records(), "llm_pruner_t1", published="none").frame["source"] != "ours"
    ).any()
    full = T.build_table(ResultsStore(store).records(), "llm_pruner_t1", published="all")
    assert {"llm_pruner/element1", "llm_pruner/vector+lora"} <= set(full.frame["method"])


def test_protocol_mismatch_and_other_protocols_are_kept_out(store):
    recs = _records(store)
    t1 = T.build_table(ResultsStore(store).records(), "llm_pruner_t1")
    # the seq_len=64 entry that calls itself ppl128-lp is excluded (and listed), its PTB entry is fine
    (bad,) = [
        r for r in recs if r["config"]["eval"]["ppl"][0]["seq_len"] == 64 and r["plan"]["meta"].get("method") != "dense"
    ]
    row = _row(t1, "magnitude_l2", 0.31)
    assert pd.isna(row.get("WikiText-2 [first 4 windows]"))
    assert row["PTB [first 4 windows]"] == bad["metrics"]["ppl"]["ppl128-lp:ptb:validation[:4 windows]"]["ppl"]
    assert any("seq_len=64" in e for e in t1.excluded)
    # seq-2048 numbers go to Search-LLM's table only
    sl = _find(recs, "magnitude_l2", group_ratio=P20, eval_len=2048)
    t2 = T.build_table(ResultsStore(store).records(), "search_llm_t2")
    r2 = _row(t2, "magnitude_l2", 0.2)
    assert r2["WikiText-2 [first 1 windows]"] == sl["metrics"]["ppl"]["ppl2048-sl:wikitext2:test[:1 windows]"]["ppl"]
    assert (t2.frame["source"] == "ours").sum() == 2  # dense + magnitude_l2 only
    assert not any("[first 1 windows]" in c for c in t1.value_columns)
    assert T.build_table(ResultsStore(store).records(), "slicegpt_t1").n_ours == 0


def test_flap_pivot_has_ratios_as_columns(store):
    recs = _records(store)
    t = T.build_table(ResultsStore(store).records(), "flap_lm")
    ours = t.frame[
        (t.frame["method"] == "magnitude_l2")
        & (t.frame["source"] == "ours")
        & (t.frame["protocol"] == f"ppl128-lp [first {W} windows]")
    ]
    assert len(ours) == 1
    assert ours.iloc[0]["20%"] == _find(recs, "magnitude_l2", group_ratio=P20)["metrics"]["ppl"][LP]["ppl"]
    assert ours.iloc[0]["39%"] == _find(recs, "magnitude_l2", group_ratio=P39)["metrics"]["ppl"][LP]["ppl"]
    dense_pub = t.frame[(t.frame["method"] == "dense") & (t.frame["source"] == "published")]
    assert list(dense_pub["dense"]) == [float(_anchor_value("D1", "dense", 0.0, "wikitext2", "ppl128-lp"))]


def test_writers_and_cli(store, tmp_path):
    table = T.build_table(ResultsStore(store).records(), "llm_pruner_t1")
    md = render.markdown(table)
    assert md.startswith("### LLM-Pruner Table 1") and "| published (A1) |" in md and "published (A1): LLM-Pruner" in md
    tex = render.latex(table)
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
    ncols = len(render.display(table).columns)
    assert len(body) == len(table.frame) + 1 and all(ln.count(" & ") == ncols - 1 for ln in body)
    assert r"magnitude\_l2" in tex and r"\begin{tabular}" in tex
    back = pd.read_csv(pd.io.common.StringIO(render.csv(table)))
    assert len(back) == len(table.frame)
    assert back.loc[back["method"] == "l2", "source"].iloc[0].startswith("published (A1: LLM-Pruner: ")

    out = tmp_path / "results"
    assert T.main(["--store", str(store), "--all", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    for name in ("llm_pruner_t1", "search_llm_t2", "flap_lm"):
        assert {f"{name}.md", f"{name}.tex", f"{name}.csv"} <= names
    assert not any(n.startswith("slicegpt_t1") for n in names)  # no rows of ours under ppl2048-sg
    assert T.main(["--store", str(store), "--table", "slicegpt_t1", "--out", str(out)]) == 1
    assert T.main(["--store", str(tmp_path / "empty"), "--all", "--out", str(out)]) == 1


def test_summary_view_pivots_ratios_with_seed_counts(store, tmp_path):
    recs = _records(store)
    table = T.build_table(ResultsStore(store).records(), "ratio_sweep")
    text = render.summary(table, [0.2, 0.4])
    lines = text.splitlines()
    head = lines[2].strip("| ").split(" | ")
    assert head[:2] == ["method", "20%: WikiText-2"] and "20%: n" in head and "40%: WikiText-2" in head
    assert "group_ratio" not in text  # paper-knob cells stay out of the cross-method sweep
    assert "- ratio: pruning.ratio, the share of ALL parameters removed." in text  # the caption names the axis ...
    # ... and what each method calibrated on (its sampler), or that it read no calibration data
    assert any(ln.startswith(("- calibration, ", "- no calibration data read: ")) for ln in lines)
    col = {h: i for i, h in enumerate(head)}
    mag = next(ln for ln in lines if ln.startswith("| magnitude_l2 |")).strip("| ").split(" | ")
    # one seed: the value and its sampling interval over the 6 windows (the records store per-window values)
    for ratio in (0.2, 0.4):
        rec = _find(recs, "magnitude_l2", ratio)
        iv = U.interval(rec, f"ppl/{LP}")
        want = f"{rec['metrics']['ppl'][LP]['ppl']:,.1f} [{iv.low:,.1f}, {iv.high:,.1f}]"
        assert mag[col[f"{100 * ratio:g}%: WikiText-2"]] == want
    assert mag[col["20%: n"]] == "1" and "95% bootstrap interval" in lines[0]
    # random ran with another structures list only in the LLM-Pruner table's cells: no variant label here
    assert "structures=" not in text
    rnd = next(ln for ln in lines if ln.startswith("| random |")).strip("| ").split(" | ")
    # two seeds: mean ± std (seed spread), then the interval of the mean (the shared windows resampled together)
    two = [r for r in recs if r["config"]["method"].get("structures") == ["kv_group", "mlp"]]
    two = [r for r in two if "random" in r["config"]["method"]["_target_"] and r["params"]["target_ratio"] == 0.2]
    values = [r["metrics"]["ppl"][LP]["ppl"] for r in two]
    iv = U.mean_interval(two, f"ppl/{LP}")
    assert len(two) == 2 and iv.estimate == pytest.approx(statistics.mean(values), rel=1e-12)
    want = f"{statistics.mean(values):,.1f} ± {statistics.stdev(values):,.1f} [{iv.low:,.1f}, {iv.high:,.1f}]"
    assert rnd[col["20%: WikiText-2"]] == want and rnd[col["20%: n"]] == "2" and rnd[col["40%: n"]] == "–"
    body = [ln.split(" | ")[1] for ln in lines[4:] if ln.startswith("| ")]
    values = [float(v.split(" ")[0].replace(",", "")) for v in body]
    assert values == sorted(values)  # best first
    out = tmp_path / "summary"
    assert T.main(["--store", str(store), "--table", "ratio_sweep", "--summary", "0.2,0.4", "--out", str(out)]) == 0
    assert (out / "ratio_sweep_summary.md").read_text() == text


@pytest.mark.slow
def test_zero_shot_columns_follow_each_papers_metric(tmp_path, monkeypatch):
    """Real lm-eval runs (first 4 docs per task) of dense and pruned stories260K; the tables pick acc or acc_norm
    per task as each paper did, in percent, and average the papers' way."""
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    zs = ["eval=zeroshot7_quick", "eval.zeroshot.limit=4", "eval.ppl.0.max_windows=2", "eval.ppl.1.max_windows=2"]
    run_cells(tmp_path / "store", [[*zs, "method=magnitude", *NATIVE, f"method.group_ratio={P31}"]])
    (rec,) = [r for r in _records(tmp_path / "store") if r["plan"]["meta"]["method"] != "dense"]
    records = ResultsStore(tmp_path / "store").records()
    lp = {
        "boolq": ("BoolQ", "acc"),
        "piqa": ("PIQA", "acc"),
        "hellaswag": ("HellaSwag", "acc_norm"),
        "winogrande": ("WinoGrande", "acc"),
        "arc_easy": ("ARC-e", "acc"),
        "arc_challenge": ("ARC-c", "acc_norm"),
        "openbookqa": ("OBQA", "acc_norm"),
    }
    t1 = T.build_table(records, "llm_pruner_t1")
    for method, block in (("magnitude_l2", rec["metrics"]["zeroshot"]), ("dense", rec["metrics"]["dense_zeroshot"])):
        row = _row(t1, method, 0.31 if method != "dense" else 0.0)
        expect = {h: 100 * block[task][m] for task, (h, m) in lp.items()}
        for header, value in expect.items():
            assert row[f"{header} [limit 4]"] == pytest.approx(value, abs=1e-9)
            assert pd.isna(row[header])  # never in the full-set column
        assert row["Average [limit 4]"] == pytest.approx(statistics.mean(expect.values()), abs=1e-9)
        assert row["Average [limit 4]"] == pytest.approx(block["average"]["score"], abs=1e-9)
        # its interval: each task's documents resampled (tasks in order, one generator), the tasks' mean in points
        bits = [[c == "1" for c in block[task]["per_doc"][m]] for task, (_, m) in lp.items()]
        rng = np.random.default_rng(U.SEED)
        per_task = [
            [100 * np.mean(np.array(b)[rng.integers(0, len(b), len(b))]) for _ in range(U.RESAMPLES)] for b in bits
        ]
        low, high = np.quantile(np.mean(per_task, axis=0), [0.025, 0.975])
        iv = t1.intervals.loc[int(row.name), "Average [limit 4]"]
        assert iv.estimate == pytest.approx(row["Average [limit 4]"], abs=1e-9) and iv.n == (4,) * 7
        assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-12)
    sg = {
        "piqa": ("PIQA", "acc_norm"),
        "hellaswag": ("HellaSwag", "acc_norm"),
        "winogrande": ("WinoGrande", "acc"),
        "arc_easy": ("ARC-e", "acc_norm"),
        "arc_challenge": ("ARC-c", "acc_norm"),
    }
    # SliceGPT's table holds only SliceGPT cells evaluated its way (ppl2048-sg): one more real cell
    sg_cell = ["method=slicegpt_cpu", "eval=slicegpt_cpu", "eval.zeroshot.limit=4", "eval.ppl.0.max_windows=1"]
    run_cells(tmp_path / "store", [[*sg_cell, *NATIVE, "method.slicing=0.25"]])
    (sg_rec,) = [r for r in _records(tmp_path / "store") if r["plan"]["meta"]["method"] == "slicegpt"]
    t_sg = T.build_table(ResultsStore(tmp_path / "store").records(), "slicegpt_t1")
    assert set(t_sg.frame["method"]) == {"dense", "slicegpt"}  # the LLM-Pruner-protocol cell is not SliceGPT's row
    row = _row(t_sg, "slicegpt", 0.25)
    block = sg_rec["metrics"]["zeroshot"]
    assert row["Avg (5) [limit 4]"] == pytest.approx(statistics.mean(100 * block[t][m] for t, (_, m) in sg.items()))
    assert "BoolQ [limit 4]" not in t_sg.value_columns


def test_anchor_ids_of_our_methods(store):
    recs = _records(store)
    assert O.anchor_method(_find(recs, "magnitude_l2", group_ratio=P20)) == "l2"
    assert O.anchor_method(_find(recs, "random", group_ratio=P20, structures=["kv_group", "mlp"])) == "random"
    # removing whole decoder layers at random is not the papers' random baseline: no published row beside it
    block = _find(recs, "random", group_ratio=P20, structures=["block"])
    assert O.anchor_method(block) == "random[block]"
    table = T.build_table(ResultsStore(store).records(), "llm_pruner_t1")
    order = list(zip(table.frame["method"], table.frame["source"]))
    assert order[order.index(("random", "published")) - 1] == ("random [structures=kv_group+mlp]", "ours")


# ------------------------------------------------------------------------------ intervals (issue 25, acceptance 3)


def _stored_windows(entry) -> tuple[list[float], list[float]]:
    """Decoded by hand from the documented layout (little-endian float64 / uint32), not with experiments.persample."""
    w = entry["per_window"]
    nll = struct.unpack(f"<{len(base64.b64decode(w['nll_sum'])) // 8}d", base64.b64decode(w["nll_sum"]))
    tok = struct.unpack(f"<{len(base64.b64decode(w['n_tokens'])) // 4}I", base64.b64decode(w["n_tokens"]))
    return list(nll), [float(t) for t in tok]


def _plain_row_interval(seed_windows, resamples=U.RESAMPLES, seed=U.SEED, level=U.LEVEL):
    """Percentile bootstrap of the mean over seeds of each seed's PPL, one resample of the shared windows at a time
    (every seed on the same resampled windows)."""
    rng = np.random.default_rng(seed)
    n = len(seed_windows[0][0])
    reps = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        reps.append(
            np.mean([math.exp(sum(nll[i] for i in idx) / sum(tok[i] for i in idx)) for nll, tok in seed_windows])
        )
    return tuple(np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]))


def test_table_intervals_are_a_plain_bootstrap_of_the_stored_windows(store):
    recs = _records(store)
    table = T.build_table(ResultsStore(store).records(), "llm_pruner_t1")
    wt = f"WikiText-2 [first {W} windows]"
    # one seed
    mag = _find(recs, "magnitude_l2", group_ratio=P20)
    i = int(_row(table, "magnitude_l2", 0.2).name)
    iv = table.intervals.loc[i, wt]
    assert iv.estimate == mag["metrics"]["ppl"][LP]["ppl"] and iv.n == (W,) and iv.low < iv.estimate < iv.high
    assert (iv.low, iv.high) == pytest.approx(
        _plain_row_interval([_stored_windows(mag["metrics"]["ppl"][LP])]), rel=1e-12
    )
    # two seeds: the mean of the seeds' PPLs, the shared windows resampled together, seeds held fixed
    two = [
        _find(recs, "random", group_ratio=P20, seed=s, structures=["kv_group", "mlp"])["metrics"]["ppl"][LP]
        for s in (0, 1)
    ]
    rnd = table.frame[table.frame["method"] == "random [structures=kv_group+mlp]"]
    iv = table.intervals.loc[rnd.index[0], wt]
    assert iv.estimate == pytest.approx(statistics.mean(e["ppl"] for e in two), rel=1e-12)
    assert (iv.low, iv.high) == pytest.approx(_plain_row_interval([_stored_windows(e) for e in two]), rel=1e-12)
    # the dense row's interval is over its own (dense_ppl) windows
    dense = table.intervals.loc[int(_row(table, "dense", 0.0).name), wt]
    assert dense.estimate == mag["metrics"]["dense_ppl"][LP]["ppl"]
    assert (dense.low, dense.high) == pytest.approx(
        _plain_row_interval([_stored_windows(mag["metrics"]["dense_ppl"][LP])]), rel=1e-12
    )
    # every renderer shows the same numbers
    md, tex, text = render.markdown(table), render.latex(table), render.csv(table)
    iv = table.intervals.loc[i, wt]
    cell = f"{mag['metrics']['ppl'][LP]['ppl']:.2f} [{iv.low:.2f}, {iv.high:.2f}]"
    assert cell in md and cell in tex and "95% percentile bootstrap interval" in md
    row = next(r for r in csv.DictReader(text.splitlines()) if r["method"] == "magnitude_l2" and r["source"] == "ours")
    assert float(row[f"{wt} ci_low"]) == pytest.approx(table.intervals.loc[i, wt].low, rel=1e-12)
    assert float(row[f"{wt} ci_high"]) == pytest.approx(table.intervals.loc[i, wt].high, rel=1e-12)
    # published rows have no interval
    pub = table.frame.index[table.frame["source"] == "published"]
    assert all(table.intervals.loc[j].isna().all() for j in pub)


def test_table_paired_differences(store):
    recs = _records(store)
    by_hash = {r["config_hash"]: r for r in ResultsStore(store).records()}
    mag = _find(recs, "magnitude_l2", group_ratio=P20)
    unit = f"ppl/{LP}"
    # a model with itself: exactly 0, a zero-width interval, a ratio of exactly 1; never "resolved"
    same = T.cell_paired([mag["config_hash"]], [mag["config_hash"]], unit, by_hash)
    assert (same.diff.estimate, same.diff.low, same.diff.high) == (0.0, 0.0, 0.0)
    assert (same.ratio.estimate, same.ratio.low, same.ratio.high) == (1.0, 1.0, 1.0) and not same.resolved
    # two rows of the table at one ratio: log of the ratio of the row means, on the shared windows
    table = T.build_table(list(by_hash.values()), "llm_pruner_t1")
    wt = f"WikiText-2 [first {W} windows]"
    pairs = [p for p in table.paired if p.column == wt and p.group == "ratio 0.20"]
    assert pairs, [p.text() for p in table.paired]
    for p in pairs:
        a, b = _row(table, p.a, 0.2)[wt], _row(table, p.b, 0.2)[wt]
        assert p.paired.ratio.estimate == pytest.approx(a / b, rel=1e-12) and a <= b  # better row first
        assert p.paired.diff.estimate == pytest.approx(math.log(a / b), rel=1e-12)
        assert p.paired.ratio.low <= p.paired.ratio.estimate <= p.paired.ratio.high
    assert any(n.startswith("paired (a vs b") for n in render.footnotes(table))
    # Markdown prints them as a table of their own, one line per comparison, not as one long footnote
    md = render.markdown(table)
    assert "- paired (a vs b" not in md
    lines = [ln for ln in md.splitlines() if ln.startswith(f"| {pairs[0].model} | ") and " | PPL a / b | " in ln]
    assert len(lines) == sum(p.paired.ratio is not None for p in table.paired)
    r = pairs[0].paired.ratio
    assert f"| {pairs[0].a} | {pairs[0].b} | PPL a / b | {r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}] |" in md


def test_prune_time_table_is_the_records_phase_timings(store, tmp_path):
    """Each ratio-sweep cell's calibration + scoring + surgery seconds, the median over its seeds; paper-knob cells
    and evaluation are left out."""
    from experiments.costs import prune_time_frame

    recs = _records(store)
    df = prune_time_frame(recs)
    sweep = [r for r in recs if r["config"]["pruning"]["ratio"] is not None and r["plan"]["meta"]["method"] != "dense"]
    assert len(df) == len({(r["plan"]["meta"]["method"], r["config"]["pruning"]["ratio"]) for r in sweep}) == 3
    for r in sweep:
        t = r["timings"]
        row = df[
            (df["method"].str.startswith(r["plan"]["meta"]["method"]))
            & (df["ratio"] == r["config"]["pruning"]["ratio"])
        ]
        same = [
            s
            for s in sweep
            if s["plan"]["meta"]["method"] == r["plan"]["meta"]["method"]
            and s["config"]["pruning"]["ratio"] == r["config"]["pruning"]["ratio"]
        ]
        med = {
            k: statistics.median(s["timings"].get(k, 0.0) for s in same) for k in ("calibration", "prune", "surgery")
        }
        assert len(row) == 1 and int(row["cells"].iloc[0]) == len(same)
        assert row["pruning s"].iloc[0] == pytest.approx(sum(med.values()), abs=1e-9)  # the phases' medians, summed
        assert row["scoring s"].iloc[0] == pytest.approx(med["prune"], abs=1e-9)
        assert "eval_pruned" in t  # present in the record, never in the table
    assert T.main(["--store", str(store), "--table", "ratio_sweep", "--costs", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "prune_time.md").read_text()
    assert "pruning.ratio = 0.2" in text and "pruning.ratio = 0.4" in text and "stories260k" in text


def test_a_seed_independent_draw_is_one_run_not_three():
    """ShortGPT's CPU calibration reads the first documents in file order: its three calibration-seed cells of the
    committed sweep are one run (n = 1 in the table), while LLM-Pruner's random draws stay three repeats."""
    from experiments.observations import seed_key

    recs = [
        r for r in ResultsStore(REPO / "results" / "store").records() if r["config"]["model"]["name"] == "stories260k"
    ]

    def keys(method):
        return {
            seed_key(r)
            for r in recs
            if r["plan"]["meta"]["method"] == method and r["config"]["pruning"].get("ratio") == 0.2
        }

    assert len(keys("shortgpt")) == 1
    assert len(keys("llm_pruner_element1")) == 3
    table = T.build_table(recs, "ratio_sweep")
    f = table.frame
    short = f[(f["method"].str.startswith("shortgpt")) & ((f["ratio"] - 0.2).abs() < 1e-9) & (f["source"] == "ours")]
    assert list(short["n"]) == [1]


def test_a_single_variant_is_labelled_like_its_siblings_on_another_model():
    """Qwen without its quick-search cell has only Search-LLM's initialisation at 20%; SmolLM2 has it and the quick
    search, told apart by [preset, generations]. The lone Qwen row says it is the initialisation instead of passing
    as plain search_llm."""
    recs = [
        r
        for r in ResultsStore(REPO / "results" / "store").records()
        if r["config"]["model"]["name"] in ("qwen25_coder_05b", "smollm2_135m")
        and r["plan"]["meta"]["method"] == "search_llm"
        and r["config"]["pruning"].get("ratio") == 0.2
        and (r["config"]["model"]["name"], r["config"]["method"]["preset"]) != ("qwen25_coder_05b", "quick")
    ]
    labels = {(r["config"]["model"]["name"], r["config"]["method"]["preset"]) for r in recs}
    assert labels == {("qwen25_coder_05b", "init"), ("smollm2_135m", "init"), ("smollm2_135m", "quick")}
    f = T.build_table(recs, "ratio_sweep").frame
    ours = f[(f["source"] == "ours") & (f["method"] != "dense")]
    assert set(ours.loc[ours["model"] == "qwen25_coder_05b", "method"]) == {"search_llm [preset=init, generations=0]"}
    assert set(ours.loc[ours["model"] == "smollm2_135m", "method"]) == {
        "search_llm [preset=init, generations=0]",
        "search_llm [preset=quick, generations=8]",
    }
    # alone (no sibling variant anywhere) a method keeps its bare name
    alone = T.build_table([r for r in recs if r["config"]["model"]["name"] == "qwen25_coder_05b"], "ratio_sweep").frame
    assert set(alone.loc[alone["source"] == "ours", "method"]) == {"dense", "search_llm"}


def test_an_adapruner_study_is_its_final_cell_in_the_tables():
    """Qwen has AdaPruner twice at 20%: its method config set by hand, and the final cell of a 12-trial study
    (experiment=adapruner_cpu). The rows say which is which; the study's trials (objective-only cells) are search
    steps, in no table row and no cost row."""
    from experiments.costs import prune_time_frame
    from experiments.observations import study_trial_hashes

    recs = [
        r
        for r in ResultsStore(REPO / "results" / "store").records()
        if r["config"]["model"]["name"] == "qwen25_coder_05b" and r["plan"]["meta"]["method"] == "adapruner"
    ]
    (final,) = [r for r in recs if "study" in r]
    trials = study_trial_hashes(recs)
    assert len(trials) == len(final["study"]["trials"]) == 12 and trials <= {r["config_hash"] for r in recs}
    f = T.build_table(recs, "ratio_sweep").frame
    ours = f[(f["source"] == "ours") & (f["method"] != "dense")]
    assert len(ours) == 2 and sorted(m.rsplit("study=", 1)[1] for m in ours["method"]) == [
        "12 trials]",
        "none]",
    ]
    costs = prune_time_frame(recs)
    assert len(costs) == 2 and set(costs["method"]) == set(ours["method"])


def test_a_calibration_over_every_document_is_captioned_as_all():
    """ShortGPT's full config reads every document (n_samples null): the caption and the row label say "all", not
    "None" or "null"."""
    from experiments.observations import calibration_label

    full = [
        r
        for r in ResultsStore(REPO / "results" / "store").records()
        if r["plan"]["meta"]["method"] == "shortgpt" and r["config"]["calibration"]["n_samples"] is None
    ]
    assert full and all("c4 for pg19_validation all x256" in calibration_label(r) for r in full)
    assert "None" not in (REPO / "results" / "ratio_sweep.md").read_text()
    f = T.build_table(list(ResultsStore(REPO / "results" / "store").records()), "ratio_sweep").frame
    assert "shortgpt [n_samples=all]" in set(f["method"]) and "shortgpt [n_samples=null]" not in set(f["method"])
