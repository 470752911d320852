"""The committed reference tables are reproducible: re-running one stories260K cell with the committed preset
gives the same config hash and the same numbers as the record in results/store (≤ 1e-6 relative)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_run, stored_records

REPO = Path(__file__).resolve().parents[1]
REFERENCE_STORE = REPO / "results" / "store" / "records"


@pytest.mark.slow  # a `python run.py` subprocess with the preset's full evaluation
def test_committed_stories_cell_reproduces(tmp_path):
    proc = cli_run(
        tmp_path,
        "experiment=ratio_sweep",
        "model=stories260k",
        "method=llm_pruner",
        "pruning.ratio=0.2",
        "calibration.seed=0",
        "progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (new,) = [r for r in stored_records(tmp_path) if r["plan"]["meta"].get("method") != "dense"]
    committed = REFERENCE_STORE / f"{new['config_hash']}.json"
    assert committed.is_file(), f"the committed command composed a cell that results/store does not hold: {committed}"
    ref = json.loads(committed.read_text())  # the same cell (same hash) as committed
    assert ref["plan"]["meta"]["method"] == "llm_pruner_element1" and ref["config"]["model"]["name"] == "stories260k"
    assert new["plan"]["remove"] == ref["plan"]["remove"]
    assert new["params"] == ref["params"]
    for phase in ("ppl", "dense_ppl"):
        assert new["metrics"][phase].keys() == ref["metrics"][phase].keys()
        for key, res in ref["metrics"][phase].items():
            assert math.isclose(new["metrics"][phase][key]["ppl"], res["ppl"], rel_tol=1e-6), (phase, key)


@pytest.mark.slow  # composes ~250 cells with Hydra and the cell's check phase (no weights)
@pytest.mark.parametrize(
    "argv",
    [
        ["experiment=llm_pruner_table1"],
        ["experiment=flap_table"],
        ["experiment=slicegpt_table"],
        ["experiment=search_llm_table2"],
        ["experiment=ratio_sweep", "pruning.ratio=0.2,0.5", "calibration.seed=0"],
        ["experiment=llm_pruner_table1", "model=stories260k"],
        ["experiment=ratio_sweep", "model=stories260k"],
    ],
)
def test_presets_compose_exactly_the_committed_cells(argv):
    """scripts/reference_runs.sh would find every cell in results/store: the committed records are what today's
    presets compose (same config hash), so the tables never mix code versions and a re-run is all store hits."""
    _check_reference_store(argv)


# LLM-Pruner (its layer range keeps a unit of each kind per layer: at most 44.1%) and Search-LLM (its search space:
# at most 49.4%) cannot remove half of Qwen2.5-Coder-0.5B, whose untied embedding and head are 43% of it
QWEN_AT_50 = "random,magnitude,nirvana_cpu,flap,wanda_sp,shortgpt_cpu,slicegpt_cpu,numerical_cpu,llm_bip"


@pytest.mark.slow  # composing reads the model's config.json: the fetched weights (skipped without an index)
@pytest.mark.parametrize(
    "argv",
    [
        ["experiment=llm_pruner_table1"],
        ["experiment=flap_table"],
        ["experiment=slicegpt_table"],
        ["experiment=search_llm_table2"],
        ["experiment=ratio_sweep", "pruning.ratio=0.2", "calibration.seed=0"],
        ["experiment=ratio_sweep", "pruning.ratio=0.5", "calibration.seed=0", f"method={QWEN_AT_50}"],
    ],
)
def test_qwen_presets_are_complete_in_the_store(qwen_spec, argv):
    """The paper presets run on Qwen2.5-Coder-0.5B at their own operating points, and the ratio sweep at 20% (all 12
    methods) and 50% (the methods that can remove half of this model): every cell is committed."""
    _check_reference_store([*argv, "model=qwen25_coder_05b"])


def _check_reference_store(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/check_reference_store.py", "--store", "results/store", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") >= 3


def test_a_study_preset_is_refused_in_one_line():
    """AdaPruner's cells come from its Optuna search: the check says so instead of a Hydra parse traceback."""
    proc = subprocess.run(
        [sys.executable, "scripts/check_reference_store.py", "--store", "results/store", "experiment=adapruner"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "AdaPrunerSweeper" in proc.stderr
    assert "Traceback" not in proc.stderr
