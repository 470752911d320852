"""Acceptance 1, as a user runs it: `python run.py` prunes stories260K and prints a one-line table; the record
lands in the store and `pruning-lab results` prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "run.py", f"store.dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def check_output(proc, tmp_path, protocol_max_windows):
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
    table = subprocess.run(
        [sys.executable, "-m", "experiments.store", "--store", str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0 and rec["config_hash"] in table.stdout


def test_run_quick_eval_prints_table_and_writes_record(tmp_path):
    check_output(run(["eval=quick"], tmp_path), tmp_path, 50)


@pytest.mark.slow
def test_readme_default_run(tmp_path):
    """The exact README command (full WikiText-2 and PTB at seq_len 128)."""
    check_output(run([], tmp_path), tmp_path, None)
