"""Every committed result still renders the same tables (issue 24, acceptance 5).

The golden files in tests/fixtures/tables_golden/ were rendered by the pre-split ``experiments/tables.py`` (main at
49982a5) from the 153 records then in results/store (now results/archive/pre-protocols/store), before the store
was migrated to record schema 2
(experiments/migrate.py); ``records.txt`` lists them by their schema-2 hashes. The test renders the same records,
migrated, with today's code, and compares Markdown, LaTeX, CSV and the README summary byte for byte. Later
additions to results/store are not read, so they do not move the golden output; a change of
experiments/anchors.csv (the published rows) does, and then the golden files are re-rendered on purpose. They were
re-rendered once on purpose when each paper table began to keep only its paper's own methods (TableSpec.methods):
the SliceGPT rows left LLM-Pruner's, FLAP's and Search-LLM's tables, nothing else moved; and the summaries once
when they began to end with the operating point and the calibration samplers of the full table's caption.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "tables_golden"
STORE = REPO / "results" / "archive" / "pre-protocols" / "store"


def golden_records() -> list[dict]:
    from experiments.store import ResultsStore

    store = ResultsStore(STORE)
    hashes = GOLDEN.joinpath("records.txt").read_text().split()
    records = [store.get(h) for h in hashes]
    missing = [h for h, r in zip(hashes, records) if r is None]
    assert not missing, f"results/store lost {len(missing)} of the golden records, e.g. {missing[:3]}"
    return records


@pytest.fixture(scope="module")
def rendered() -> dict:
    from experiments.tables import TABLES, build_tables

    return build_tables(golden_records(), sorted(TABLES))


@pytest.mark.parametrize("name", ["flap_lm", "flap_zs", "llm_pruner_t1", "ratio_sweep", "search_llm_t2", "slicegpt_t1"])
def test_tables_render_as_before(rendered, name):
    from experiments import render

    table = rendered[name]
    assert table.n_ours > 0
    assert render.markdown(table) == GOLDEN.joinpath(f"{name}.md").read_text()
    assert render.latex(table) == GOLDEN.joinpath(f"{name}.tex").read_text()
    assert render.csv(table) == GOLDEN.joinpath(f"{name}.csv").read_text()
    summary = GOLDEN / f"{name}_summary.md"
    if summary.is_file():
        assert render.summary(table, [0.2, 0.5]) == summary.read_text()


def test_golden_covers_every_table():
    from experiments.tables import TABLES

    assert sorted(TABLES) == sorted(p.stem for p in GOLDEN.glob("*.md") if not p.stem.endswith("_summary"))


def test_reading_and_tables_stay_torch_free():
    """Records, tables and the uncertainty module load without torch (and without the pruning package)."""
    code = (
        "import sys; import experiments.tables, experiments.uncertainty, experiments.store; "
        "from experiments.store import ResultsStore; ResultsStore('results/store').records(); "
        "bad = sorted(k for k in sys.modules if k == 'torch' or k == 'pruning' or k.startswith('pruning.')); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
