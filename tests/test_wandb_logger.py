"""W&B logging of a real cell, offline: the run's summary holds the record's metrics; a W&B failure keeps the record.

The offline summary is read back with wandb's own reader of the run's transaction log
(`wandb leet inspect --summary --json <run dir>`): offline runs have no files/wandb-summary.json, which only the
online sender writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["eval=quick", "eval.ppl.0.max_windows=4", "eval.ppl.1.max_windows=4"]


def run(tmp_path: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from experiments.cell import run_cell

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"store.dir={tmp_path / 'store'}",
                "progress=false",
                *SMALL,
                "method=magnitude",
                "pruning.ratio=0.3",
                *overrides,
            ],
        )
    return run_cell(cfg)


def inspect_summary(run_dir: Path) -> dict:
    exe = Path(sys.executable).with_name("wandb")
    res = subprocess.run(
        [str(exe), "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_offline_run_summary_holds_the_records_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    record = run(tmp_path, "logger=wandb", "logger.mode=offline", f"logger.dir={tmp_path / 'wb'}")
    on_disk = json.loads(Path(record["_store_path"]).read_text())
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    info = inspect_summary(runs[0])
    summary = info["summary"]
    assert info["state"] == "finished" and info["project"] == "pruning-lab"
    assert info["name"].startswith("stories260k-magnitude_l2-0.3-")
    ppl = on_disk["metrics"]["ppl"]
    assert len(ppl) == 2
    for label, entry in ppl.items():
        assert summary[f"ppl/{label}"] == entry["ppl"]
        assert summary[f"dense_ppl/{label}"] == on_disk["metrics"]["dense_ppl"][label]["ppl"]
    assert summary["params/after"] == on_disk["params"]["after"] < summary["params/before"]
    assert summary["config_hash"] == on_disk["config_hash"]
    assert info["config"]["method"]["_target_"] == on_disk["config"]["method"]["_target_"]
    assert info["config"]["pruning"]["ratio"] == 0.3
    files = runs[0] / "files"
    assert json.loads((files / "record.json").read_text()) == on_disk  # the full record travels with the run
    widths = json.loads(next((files / "media" / "table").glob("widths_*.table.json")).read_text())
    col = widths["columns"].index("intermediate_size")
    assert [row[col] for row in widths["data"]] == [w["intermediate_size"] for w in on_disk["widths"]]
    assert summary["paper/llm_pruner_t1"]["_type"] == "table-file" and summary["results"]["nrows"] == 1


def test_a_failing_wandb_never_costs_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="W&B logging failed"):
        record = run(tmp_path, "logger=wandb", "logger.mode=offline", f"logger.dir={blocker / 'wandb'}")
    path = Path(record["_store_path"])
    on_disk = json.loads(path.read_text())
    assert on_disk["config_hash"] == record["config_hash"] and on_disk["metrics"] == record["metrics"]

    # an exception inside wandb itself (init raising), on the record already in the store
    from experiments import wandb_logger

    def boom(*args, **kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", boom)
    before = path.read_bytes()
    with pytest.warns(RuntimeWarning, match="wandb is down.*local record is unaffected"):
        assert wandb_logger.log_record(on_disk, {"mode": "offline", "dir": str(tmp_path / "wb2")}) is None
    assert path.read_bytes() == before


def test_logger_config_is_offline_by_default_and_outside_the_repo(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        assert compose("config").logger.name == "none"
        cfg = compose("config", overrides=["logger=wandb"]).logger
        online = compose("config", overrides=["logger=wandb", "logger.mode=online"]).logger
    assert (cfg.name, cfg.mode, cfg.dir, online.mode) == ("wandb", "offline", "runs/wandb", "online")
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "runs/wandb/x"], timeout=30)
    assert ignored.returncode == 0
