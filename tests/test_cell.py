"""The cell recipe (experiments/cell.py): its callbacks around the phases, and optional method abilities declared by
a protocol (``DrawsCalibration``) instead of probed with hasattr. Real stories260K cells, a few PPL windows."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import cell
from experiments.cell import CellCallback, run_cell
from experiments.record import config_hash
from pruning.methods.base import DrawsCalibration

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["eval=quick", "eval.ppl.0.max_windows=4", "eval.ppl.1.max_windows=4", "progress=false"]


def composed(tmp_path, *overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"store.dir={tmp_path / 'store'}", *SMALL, *overrides])


class Recorder(CellCallback):
    def __init__(self, dense=None):
        self.events, self.records, self.dense = [], {}, dense

    def resume(self, c):
        self.events.append("resume")

    def dense_baseline(self, c):
        self.events.append("dense_baseline")
        return self.dense

    def dense_evaluated(self, c, record):
        self.events.append("dense_evaluated")
        self.records["dense"] = record

    def finished(self, c, record):
        self.events.append("finished")
        self.records["cell"] = record


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))


def test_callbacks_see_the_phases_in_order_and_replace_the_store(tmp_path):
    rec = Recorder()
    record = run_cell(composed(tmp_path, "method=magnitude", "pruning.ratio=0.2"), callbacks=[rec])
    assert rec.events == ["resume", "dense_baseline", "dense_evaluated", "finished"]
    assert rec.records["cell"] is record and "_store_path" not in record
    assert not (tmp_path / "store").exists()  # the store is a callback: without it nothing is written
    dense = rec.records["dense"]
    assert dense["config_hash"] == record["dense_record"] == config_hash(dense["config"])
    assert dense["metrics"] == {
        k.removeprefix("dense_"): v for k, v in record["metrics"].items() if k.startswith("dense_")
    }
    assert list(record["timings"]) == ["load", "eval_dense", "prune", "surgery", "eval_pruned", "total"]


def test_dense_baseline_from_a_callback_is_not_recomputed(tmp_path):
    first = Recorder()
    run_cell(composed(tmp_path, "method=random", "pruning.ratio=0.2"), callbacks=[first])
    known = first.records["dense"]["metrics"]
    second = Recorder(dense=known)
    record = run_cell(composed(tmp_path, "method=random", "pruning.ratio=0.3"), callbacks=[second])
    assert second.events == ["resume", "dense_baseline", "finished"]
    assert "eval_dense" not in record["timings"] and record["metrics"]["dense_ppl"] == known["ppl"]


def test_resume_returns_before_any_data_or_weights(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the cell went past resume")

    monkeypatch.setattr(cell, "load_model", refuse)
    monkeypatch.setattr(cell, "load_tokenizer", refuse)

    class Done(CellCallback):
        def resume(self, c):
            return {"config_hash": c.config_hash, "done": True}

    cfg = composed(tmp_path, "method=llm_pruner", "pruning.ratio=0.2")
    assert run_cell(cfg, callbacks=[Done()])["done"] is True


def test_only_nirvana_declares_extra_calibration_draws(tmp_path):
    names = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    draws = [n for n in names if isinstance(cell.build_method(composed(tmp_path, f"method={n}")), DrawsCalibration)]
    assert draws == ["nirvana", "nirvana_cpu"]


def test_cell_binds_the_sampler_of_a_method_that_draws_more(tmp_path):
    """NIRVANA's KL choice through the cell: the candidate sets are drawn with the run's sampler and shape."""
    record = run_cell(
        composed(
            tmp_path,
            "method=nirvana",
            "pruning.ratio=0.2",
            "method.round_to=4",
            "calibration.n_samples=4",
            "calibration.seq_len=32",
            "method.kl_select.seeds=[0,1]",
            "method.kl_select.n_samples=4",
            "method.kl_select.seq_len=32",
        )
    )
    sel = record["plan"]["meta"]["kl_select"]
    assert sel["seeds"] == [0, 1] and sel["chosen_seed"] in (0, 1) and len(sel["kl"]) == 2
    assert sel["calibration"] == {
        "sampler": record["calibration"]["sampler"],
        "dataset": "c4",
        "n_samples": 4,
        "seq_len": 32,
    }


def test_a_record_says_where_it_computed(tmp_path):
    """Device, resolved dtype (``auto`` is float32 on CPU), threads and where the weights sit: the GPU tier reads
    them to check one GPU per sweep job and a spread device_map."""
    rec = Recorder()
    record = run_cell(
        composed(tmp_path, "method=magnitude", "pruning.ratio=0.2", "model.dtype=auto", "threads=1"), callbacks=[rec]
    )
    for r in (record, rec.records["dense"]):
        hw = r["hardware"]
        assert (hw["device"], hw["dtype"], hw["torch_threads"], hw["param_devices"]) == ("cpu", "float32", 1, ["cpu"])
        assert hw["gpus"] == [] and set(hw) == {
            "device",
            "dtype",
            "torch_threads",
            "gpus",
            "cuda_visible_devices",
            "param_devices",
        }
