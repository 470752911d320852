"""Acceptance 1, as a user runs it: `python run.py` prunes stories260K and prints a one-line table; the record
lands in the store and `pruning-lab results` prints it.

Fast tier: the quick-eval cell through ``pruning_lab.run.cli`` and the results table through ``experiments.store.main``
in this process. Integration tier (``slow``): the same as ``python run.py`` subprocesses, and the README's exact
command (full WikiText-2 and PTB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import cli_run, hydra_app_in_process

REPO = Path(__file__).resolve().parents[1]


def run(args, tmp_path):
    return cli_run(tmp_path, *args)


def check_output(proc, tmp_path, protocol_max_windows, results_table=None):
    """``results_table(store) -> stdout`` of `pruning-lab results`; by default ``python -m experiments.store``."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    header, row = lines[-3], lines[-2]
    subset = f"[:{protocol_max_windows} windows]" if protocol_max_windows else ""
    for col in (
        "model",
        "method",
        "target",
        "achieved",
        "params",
        f"ppl128-lp:wikitext2:test{subset}",
        f"ppl128-lp:ptb:validation{subset}",
    ):
        assert col in header
    assert "stories260k" in row and "llm_pruner_element1" in row and "292,800 ->" in row
    records = [json.loads(p.read_text()) for p in (tmp_path / "store" / "records").glob("*.json")]
    assert len(records) == 2  # the pruned cell and the dense baseline it wrote for reuse
    rec = next(r for r in records if r["plan"]["meta"].get("method") != "dense")
    dense_rec = next(r for r in records if r["plan"]["meta"].get("method") == "dense")
    assert rec["dense_record"] == dense_rec["config_hash"]
    assert rec["params"]["before"] == 292_800 > rec["params"]["after"]
    assert abs(rec["params"]["achieved_ratio"] - 0.2) < 0.01
    for key, res in rec["metrics"]["ppl"].items():
        dense = rec["metrics"]["dense_ppl"][key]
        assert res["max_windows"] == protocol_max_windows and res["seq_len"] == 128 and res["bos"] == "once"
        assert res["ppl"] > dense["ppl"] > 1
    assert rec["config"]["pruning"]["ratio"] == 0.2 and rec["git"]["sha"] and rec["versions"]["torch"]
    if results_table is None:
        table = subprocess.run(
            [sys.executable, "-m", "experiments.store", "--store", str(tmp_path / "store")],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert table.returncode == 0, table.stderr[-2000:]
        results_table = table.stdout
    else:
        results_table = results_table(tmp_path / "store")
    assert rec["config_hash"] in results_table


def test_run_quick_eval_in_process(tmp_path, capsys, monkeypatch):
    """The default cell (quick eval) as `run.py` runs it, in this process."""
    from experiments.store import main as results
    from pruning_lab.run import cli

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    with hydra_app_in_process():
        cli([f"store.dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", "threads=1", "eval=quick"])
    out = capsys.readouterr()

    def results_table(store):
        assert results(["--store", str(store)]) == 0
        return capsys.readouterr().out

    proc = SimpleNamespace(returncode=0, stdout=out.out, stderr=out.err)
    check_output(proc, tmp_path, 50, results_table)


@pytest.mark.slow
def test_run_quick_eval_prints_table_and_writes_record(tmp_path):
    check_output(run(["eval=quick"], tmp_path), tmp_path, 50)


@pytest.mark.slow
def test_readme_default_run(tmp_path):
    """The exact README command (full WikiText-2 and PTB at seq_len 128)."""
    check_output(run([], tmp_path), tmp_path, None)
