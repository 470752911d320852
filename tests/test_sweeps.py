"""Issue 11 acceptance: sweeps on basic / joblib / local SLURM launchers give exactly 4 + 1 dense records; a
kill -9'd sweep restarts and runs only the missing cells; the dense baseline and calibration are reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import hydra_app_in_process, slurm_skip_reason

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["method=random,magnitude", "pruning.ratio=0.1,0.3", "eval=quick", "progress=false", "threads=1"]


def sweep_cmd(store: Path, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "-m", *SWEEP, f"store.dir={store}", f"hydra.sweep.dir={tmp / 'sweep'}", *extra]


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")


def records(store: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (store / "records").glob("*.json")}


def check_sweep_records(store: Path) -> None:
    recs = records(store)
    methods = sorted((r["plan"]["meta"].get("method", "dense"), r["params"]["target_ratio"]) for r in recs.values())
    assert methods == [("dense", 0.0), ("magnitude_l2", 0.1), ("magnitude_l2", 0.3), ("random", 0.1), ("random", 0.3)]
    dense_hash = next(h for h, r in recs.items() if r["plan"]["meta"].get("method") == "dense")
    assert all(r["dense_record"] == dense_hash for r in recs.values() if r["plan"]["meta"].get("method") != "dense")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib_local"])
def test_local_sweep(tmp_path, launcher):
    store = tmp_path / "store"
    proc = subprocess.run(
        sweep_cmd(store, tmp_path, f"hydra/launcher={launcher}"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep_records(store)
    # the paper tables and the report are produced from exactly these records
    for cmd in (
        ["-m", "experiments.tables", "--store", str(store), "--all", "--out", str(tmp_path / "tables")],
        ["-m", "experiments.report", "--store", str(store), "--out", str(tmp_path / "report.html")],
    ):
        out = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    assert list((tmp_path / "tables").glob("*.md")) and (tmp_path / "report.html").stat().st_size > 10_000
    assert "magnitude" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_slurm_sweep(tmp_path):
    if why := slurm_skip_reason():  # checked when the test runs, not at collection
        pytest.skip(why)
    store = tmp_path / "store"
    proc = subprocess.run(
        sweep_cmd(store, tmp_path, "hydra/launcher=slurm_local"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep_records(store)
    assert list((tmp_path / "sweep" / ".submitit").iterdir()), "cells did not go through SLURM"


@pytest.mark.slow
def test_kill9_joblib_sweep_then_resume(tmp_path):
    store = tmp_path / "store"
    cmd = sweep_cmd(store, tmp_path, "hydra/launcher=joblib_local")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and len(records(store) if (store / "records").exists() else {}) < 2:
        assert proc.poll() is None, "sweep finished before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every joblib worker, mid-sweep
    proc.wait()
    before = {
        h: (r["created"], (store / "records" / f"{h}.json").stat().st_mtime_ns) for h, r in records(store).items()
    }
    assert 2 <= len(before) < 5
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    check_sweep_records(store)
    after = records(store)
    for h, (created, mtime) in before.items():  # finished cells were skipped, not recomputed
        assert after[h]["created"] == created
        assert (store / "records" / f"{h}.json").stat().st_mtime_ns == mtime


FEW = ["eval=quick", "eval.ppl.0.max_windows=4", "eval.ppl.1.max_windows=4"]  # the counts below need passes, not many


def test_second_cell_reuses_dense_baseline_and_calibration(tmp_path, monkeypatch):
    """Counts decoder forward passes: the second cell runs no dense evaluation and reuses the calibration batches."""
    from hydra import compose, initialize_config_dir

    from experiments import cell
    from pruning.eval.perplexity import clear_token_cache

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}

    def count(module, args, output):
        if type(module).__name__ == "LlamaModel":
            calls["n"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:

        def run(*overrides):
            with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
                cfg = compose(
                    "config", overrides=[f"store.dir={tmp_path / 'store'}", "progress=false", *FEW, *overrides]
                )
            calls["n"] = 0
            clear_token_cache()
            rec = cell.run_cell(cfg)
            return rec, calls["n"]

        first, n_first = run("method=magnitude", "pruning.ratio=0.1")
        second, n_second = run("method=random", "pruning.ratio=0.3")
        _, n_dense = run("method=dense", "force=true")
    finally:
        handle.remove()
    assert n_dense > 0
    assert n_first == 2 * n_dense  # dense + pruned evaluation
    assert n_second == n_dense  # pruned evaluation only: the dense record was reused
    assert second["dense_record"] == first["dense_record"] and "eval_dense" not in second["timings"]
    assert second["metrics"]["dense_ppl"] == first["metrics"]["dense_ppl"]
    assert len(records(tmp_path / "store")) == 3


def test_calibration_batches_cached_by_content(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from experiments import cell
    from pruning.models import load_model

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["calibration=llm_pruner"])
    _, tok, _ = load_model("embedded:stories260K")
    a, hit_a = cell.calibration(cfg, tok, "fp", progress=False)
    b, hit_b = cell.calibration(cfg, tok, "fp", progress=False)
    c, hit_c = cell.calibration(cfg, tok, "other-tokenizer", progress=False)
    assert (hit_a, hit_b, hit_c) == (False, True, False)
    assert torch.equal(a, b) and torch.equal(a, c) and a.shape == (10, 64)


def test_second_cell_reuses_calibration_statistics(tmp_path, monkeypatch):
    """FLAP at two ratios: the second cell loads the dense statistics instead of running the calibration forward."""
    from hydra import compose, initialize_config_dir

    from experiments import cell

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}

    def count(module, args, output):
        if type(module).__name__ == "LlamaDecoderLayer":
            calls["n"] += 1

    def run(ratio, method="flap", *extra):
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"store.dir={tmp_path / 'store'}",
                    "progress=false",
                    *FEW,
                    f"method={method}",
                    f"pruning.ratio={ratio}",
                    "calibration.n_samples=16",
                    *extra,
                ],
            )
        calls["n"] = 0
        rec = cell.run_cell(cfg)
        return rec, calls["n"]

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        first, n_first = run(0.1)
        second, n_second = run(0.2)
        _, n_eval = run(0.0, "dense", "force=true")  # one evaluation pass of the model, nothing else
    finally:
        handle.remove()
    assert [s["cached"] for s in first["calibration"]["statistics"]] == [False]
    assert [s["cached"] for s in second["calibration"]["statistics"]] == [True]
    assert second["calibration"]["cached"] is True  # the calibration ids too
    calib_pass = 5 * 2  # 5 decoder layers x 2 batches of 8 calibration samples
    assert n_second == n_eval  # pruned evaluation only
    assert n_first == 2 * n_eval + calib_pass  # dense eval + calibration statistics + pruned eval


IMPOSSIBLE_FIRST = ["method=random", "pruning.ratio=0.75,0.1", "eval=quick", "progress=false", "threads=1"]


def test_impossible_cell_does_not_stop_the_sweep_in_process(tmp_path, capsys, monkeypatch):
    """The sweep below through ``pruning_lab.run.cli -m`` in this process (basic launcher), on 4 PPL windows."""
    from pruning_lab.run import cli

    store = tmp_path / "store"
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    with hydra_app_in_process(), pytest.raises(SystemExit) as stop:
        cli(["-m", *IMPOSSIBLE_FIRST, *FEW[1:], f"store.dir={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert stop.value.code == 2  # a user mistake failed a cell: the sweep's summary, then a non-zero status
    err = capsys.readouterr().err
    assert "error: " in err and "would empty" in err
    recs = records(store)
    assert sorted(r["params"]["target_ratio"] for r in recs.values()) == [0.0, 0.1]


@pytest.mark.slow  # a `python run.py -m` subprocess
def test_impossible_cell_does_not_stop_the_sweep(tmp_path):
    """0.75 would empty a layer of stories260K: that cell reports one error line and writes nothing; the 0.1 cell
    after it still runs; the sweep ends with a summary of both cells and exits 2 (a user mistake failed a cell)."""
    store = tmp_path / "store"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        *IMPOSSIBLE_FIRST,
        f"store.dir={store}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: " in proc.stderr and "would empty" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: 1 of 2 sweep cells failed (listed above)"
    summary = proc.stdout[proc.stdout.index("sweep summary") :].splitlines()
    assert "2 cells: 1 done, 0 skipped (already in the store), 1 failed" in summary[0]
    assert summary[1].split()[:3] == ["#0", "FAILED", "pruning.ratio=0.75:"] and "would empty" in summary[1]
    assert summary[2].split()[:3] == ["#1", "done", "pruning.ratio=0.1:"] and "record " in summary[2]
    recs = records(store)
    assert sorted(r["params"]["target_ratio"] for r in recs.values()) == [0.0, 0.1]
