"""AdaPruner (issue 12; METHODS.md §3.10 invariants 1-4): the objective block is disjoint from every calibration pool
a study draws from and from the test texts; a trial is an ordinary cell; a study resumes from its sqlite storage
without re-running finished trials and ends with exactly n_trials, also after its driver was killed (optuna's
heartbeat and stale-trial retry); the best configuration is the argmin over COMPLETE trials and reproduces its
objective bit for bit as an ordinary cell; optuna-dashboard reads the study (issue 24)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import open_dict, read_write

from conftest import hydra_app_in_process, slurm_skip_reason
from pruning import data
from pruning.errors import PruningError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
needs_root = pytest.mark.skipif(
    data.data_root() is None or not (data.data_root() / data.CALIB_FILES["c4"]).is_file(),
    reason="needs the data root's 2,000-document C4 parquet",
)

# A small but real study: the preset's search space with cheap calibration shapes and importances, the objective
# on its first 32 windows; the final cell on 8 windows of WikiText-2 / PTB (FINAL_TEST), or, in the default-pass
# test, on the objective's first 16 windows (FINAL_CHEAP: no WikiText-2/PTB tokenisation, still a different cell).
STUDY = [
    "experiment=adapruner",
    "threads=1",
    "progress=false",
    "eval.ppl.0.max_windows=32",
    "calibration.n_samples=choice(4,8)",
    "calibration.seq_len=choice(32,64)",
    "method.importance=choice(vector,element1)",
]
OBJECTIVE = "ppl128-lp:c4:heldout[:32 windows]"
FINAL_TEST = [
    "hydra.sweeper.final.eval=quick",
    'hydra.sweeper.final.overrides=["eval.ppl.0.max_windows=8","eval.ppl.1.max_windows=8"]',
]
FINAL_LABELS = ["ppl128-lp:wikitext2:test[:8 windows]", "ppl128-lp:ptb:validation[:8 windows]"]
FINAL_CHEAP = [
    "hydra.sweeper.final.eval=adapruner_objective",
    'hydra.sweeper.final.overrides=["eval.ppl.0.max_windows=16"]',
]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- invariant 2


@needs_root
def test_objective_block_is_disjoint_from_calibration_pools_and_test_texts():
    import pyarrow.parquet as pq

    root = data.data_root()
    docs = pq.read_table(root / "calib/c4/c4_validation_2k.parquet", columns=["text"]).column("text").to_pylist()
    held = docs[1800:]
    assert len(docs) == 2000 and list(data.C4_HELDOUT_DOCS) == list(range(1800, 2000))
    assert data.ppl_text("c4", "heldout") == "\n\n".join(held)  # the objective text is exactly that block
    held_h = {sha(t) for t in held}
    assert len(held_h) == 200
    # every pool in the study's search space
    search = data.calibration_texts("c4_search")
    assert len(search) == 1800 and search == docs[:1800]
    for ds in ("c4_search", "alpaca"):
        assert not held_h & {sha(t) for t in data.calibration_texts(ds)}, ds
    assert held_h <= {sha(t) for t in data.calibration_texts("c4")}  # plain c4 keeps all 2,000 (existing draws)
    # the final test texts: WikiText-2 test rows, PTB validation/test lines, and no held document inside them
    wt = [json.loads(line)["text"] for line in (root / "ppl/wikitext2_raw/test.jsonl").open(encoding="utf-8")]
    ptb = [line.strip() for split in ("valid", "test") for line in (root / f"ppl/ptb/ptb.{split}.txt").open()]
    assert not held_h & {sha(t) for t in wt + ptb}
    test_text = data.ppl_text("wikitext2", "test") + data.ppl_text("ptb", "validation") + data.ppl_text("ptb", "test")
    assert not [t for t in held if t.strip()[:80] in test_text]


@needs_root
def test_study_calibration_windows_never_come_from_the_objective_block(stories):
    """Token-level: no drawn calibration row occurs in a held-out document; the same detector does fire on plain
    c4, whose draws were left unchanged (so it would catch a leak)."""
    _, tok, _ = stories
    held = [tok(t).input_ids for t in data.calibration_texts("c4")[1800:]]  # tokenised like the sampler does

    def windows(seq_len: int) -> set[int]:
        return {hash(tuple(ids[j : j + seq_len])) for ids in held for j in range(len(ids) - seq_len + 1)}

    for seq_len, draws in ((64, [("c4_search", 128, 0), ("alpaca", 128, 1)]), (128, [("c4_search", 64, 7)])):
        held_windows = windows(seq_len)
        for ds, n, seed in draws:
            rows = data.calibration_batches(tok, ds, n, seq_len, seed, progress=False)
            assert not [r for r in rows.tolist() if hash(tuple(r)) in held_windows], (ds, n, seq_len, seed)
    rows = data.calibration_batches(tok, "c4", 128, 128, 0, progress=False)
    assert sum(hash(tuple(r)) in held_windows for r in rows.tolist()) >= 10  # c4 reaches the block (14 of 128)


# --------------------------------------------------------------------------------------------- the method


def test_adapruner_is_llm_pruner_recorded_as_adapruner(stories):
    from pruning.methods.adapruner import adapruner
    from pruning.methods.llm_pruner import llm_pruner
    from pruning.models import load_model

    model, tok, adapter = stories
    calib = data.calibration_batches(tok, "alpaca", 8, 64, 3, progress=False)
    ada = adapruner(importance="vector", aggregation="max", calibration_dataset="alpaca")
    plan = ada.prune(model, 0.2, calib)
    ref_model, _, _ = load_model("embedded:stories260K")
    ref = llm_pruner(importance="vector", aggregation="max").prune(ref_model, 0.2, calib)
    assert plan.remove == ref.remove and plan.remove["mlp"]
    assert plan.meta["method"] == "adapruner" and ref.meta["method"] == "llm_pruner_vector"
    assert (plan.meta["importance"], plan.meta["aggregation"]) == ("vector", "max")
    before = adapter.num_params()
    widths = [adapter.widths(layer).intermediate_size for layer in adapter.layers]
    ada.apply(model, plan, calib)
    kept = [adapter.widths(layer).intermediate_size for layer in adapter.layers]
    assert [w - k for w, k in zip(widths, kept)] == [len(plan.remove["mlp"].get(i, [])) for i in range(len(widths))]
    assert adapter.num_params() < before
    with pytest.raises(PruningError, match="c4_search"):
        adapruner(calibration_dataset="c4")


def _study_config(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "experiment=adapruner",
                f"store.dir={tmp_path / 'store'}",
                f"hydra.sweeper.storage=sqlite:///{tmp_path / 's.db'}",
                *overrides,
            ],
            return_hydra_config=True,
        )


def test_study_refuses_leaky_objective_pool_and_trial_recovery_before_running(tmp_path):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from experiments.adapruner import search_space

    def space(cfg, *sweeps):  # compose() takes no sweep syntax; the sweeper gets it with the task overrides
        return search_space(cfg, [*cfg.hydra.overrides.task, *sweeps])

    got = space(_study_config(tmp_path))  # the preset's own space is accepted
    assert got["calibration.seed"] == IntDistribution(0, 999)
    assert got["calibration.n_samples"] == CategoricalDistribution([10, 32, 64, 128])
    assert list(got) == [
        "calibration.dataset",
        "calibration.n_samples",
        "calibration.seq_len",
        "calibration.seed",
        "method.importance",
        "method.aggregation",
    ]
    got = space(_study_config(tmp_path, "calibration.dataset=alpaca"), "calibration.seq_len=choice(64,256)")
    assert "calibration.dataset" not in got  # a plain value fixes a key, a sweep replaces it
    assert got["calibration.seq_len"] == CategoricalDistribution([64, 256])
    with pytest.raises(PruningError, match="overlaps the objective"):  # on the command line
        space(_study_config(tmp_path, "calibration.dataset=c4"))
    cfg = _study_config(tmp_path)
    with read_write(cfg), open_dict(cfg):  # in the search space
        cfg.hydra.sweeper.params["calibration.dataset"] = "choice(c4_search, c4)"
    with pytest.raises(PruningError, match="overlaps the objective"):
        space(cfg)
    with pytest.raises(PruningError, match="held-out C4 block"):  # the objective on a test text
        space(_study_config(tmp_path, "eval=ppl128"))
    with pytest.raises(PruningError, match=r"hydra\.sweeper\.final\.recovery=lora"):
        space(_study_config(tmp_path, "recovery=lora"))
    with pytest.raises(PruningError, match="choice"):  # a range is not a distribution
        space(_study_config(tmp_path), "calibration.seed=range(0,4)")
    assert not (tmp_path / "s.db").exists()  # nothing was created or run


def test_a_resumed_study_refuses_settings_its_trials_were_not_scored_under(tmp_path):
    """A study resumed with another objective length (or model, ratio, ...) would rank objectives that do not
    compare; the sampled keys and the run's bookkeeping (threads, store, hydra.*) may change."""
    import optuna
    from hydra import initialize_config_dir

    from experiments.adapruner import check_fixed_settings, fixed_settings, search_space

    base = ["experiment=adapruner", "eval.ppl.0.max_windows=32", "calibration.n_samples=choice(4,8)"]
    space = search_space(_study_config(tmp_path), base)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):

        def settings(*extra):
            return fixed_settings("config", [*base, *extra], space)

        first = settings("threads=1", f"store.dir={tmp_path}", "hydra.sweeper.n_trials=3")
        assert first["eval.ppl.0.max_windows"] == 32 and first["pruning.ratio"] == 0.2
        assert not {"calibration.n_samples", "calibration.seed", "method.importance", "threads"} & first.keys()
        assert not [k for k in first if k.startswith(("store.", "hydra."))]
        study = optuna.create_study(study_name="s", direction="minimize")
        check_fixed_settings(study, first)  # a new study records them
        assert study.user_attrs["fixed_settings"] == first
        check_fixed_settings(study, settings("threads=2", "hydra.sweeper.n_trials=5"))  # bookkeeping only: resumes
        with pytest.raises(PruningError, match=r"eval\.ppl\.0\.max_windows: 32 -> 64.*study_name=<new name>"):
            check_fixed_settings(study, settings("eval.ppl.0.max_windows=64"))
        with pytest.raises(PruningError, match=r"pruning\.ratio: 0\.2 -> 0\.3"):
            check_fixed_settings(study, settings("pruning.ratio=0.3"))


# --------------------------------------------------------------------------------------------- the study


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")


def study_cmd(tmp: Path, name: str, n_trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "run.py",
        "-m",
        *STUDY,
        f"store.dir={tmp / 'store'}",
        f"hydra.sweeper.storage=sqlite:///{tmp / 'study.db'}",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweep.dir={tmp / name}",
        *extra,
    ]


def run_study_here(tmp: Path, name: str, n_trials: int, *extra: str) -> str:
    """The study driver in this process (``pruning_lab.run.cli``, what ``run.py -m`` calls; basic launcher): what
    it printed."""
    from pruning_lab.run import cli

    out = io.StringIO()
    with hydra_app_in_process(), contextlib.redirect_stdout(out):
        cli(study_cmd(tmp, name, n_trials, *extra)[2:])  # without [python, run.py]
    return out.getvalue()


def run_study(tmp: Path, name: str, n_trials: int, *extra: str, timeout: int = 900) -> str:
    proc = subprocess.run(
        study_cmd(tmp, name, n_trials, *extra), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def sql_trials(db: Path) -> list[tuple[int, str, float | None]]:
    """(number, state, value) read from optuna's tables with plain sqlite3, independent of optuna."""
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v "
            "ON v.trial_id = t.trial_id ORDER BY t.number"
        ).fetchall()


def sql_retried(db: Path) -> dict[int, int]:
    """Retry trial number -> the trial it repeats (optuna's stale-trial retry stores ``failed_trial``)."""
    with sqlite3.connect(db) as con:
        return {
            n: json.loads(v)
            for n, v in con.execute(
                "SELECT t.number, a.value_json FROM trials t JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
                "WHERE a.key = 'failed_trial'"
            )
        }


def sql_params(db: Path) -> dict[int, dict[str, float]]:
    """Trial number -> its parameters (optuna's internal representation)."""
    out: dict[int, dict[str, float]] = {}
    with sqlite3.connect(db) as con:
        for n, name, value in con.execute(
            "SELECT t.number, p.param_name, p.param_value FROM trials t JOIN trial_params p ON p.trial_id = t.trial_id"
        ):
            out.setdefault(n, {})[name] = value
    return out


def records(store: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (store / "records").glob("*.json")}


def trial_records(store: Path) -> dict[str, dict]:
    return {
        h: r
        for h, r in records(store).items()
        if r["plan"]["meta"].get("method") == "adapruner" and OBJECTIVE in r["metrics"]["ppl"] and "study" not in r
    }


def final_record(store: Path) -> dict:
    (rec,) = [r for r in records(store).values() if "study" in r]
    return rec


def deterministic(plan: dict) -> dict:
    """The plan without the scorer's own measurements (seconds, memory), which vary from run to run."""
    plan = json.loads(json.dumps(plan))
    for key in ("seconds", "memory"):
        plan["meta"].get("scoring", {}).pop(key, None)
    return plan


def job_dirs(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.name.isdigit())


def check_final(tmp: Path, n_trials: int, final_eval: list[str]) -> dict:
    """Invariants 3-4 on the stored study: n_trials COMPLETE trials, the final cell is their argmin."""
    rows = sql_trials(tmp / "study.db")
    retried = set(sql_retried(tmp / "study.db").values())  # a killed trial that optuna ran again
    assert len([s for n, s, _ in rows if s in ("COMPLETE", "FAIL", "PRUNED") and n not in retried]) == n_trials
    assert {s for n, s, _ in rows if n in retried} <= {"FAIL"}
    done = [(n, v) for n, s, v in rows if s == "COMPLETE"]
    assert done  # (the test space has no infeasible shape: every trial runs)
    best_number = min(done, key=lambda nv: (nv[1], nv[0]))[0]
    final = final_record(tmp / "store")
    study = final["study"]
    assert study["best"]["number"] == best_number and study["best"]["value"] == dict(done)[best_number]
    assert [t["number"] for t in study["trials"]] == [n for n, _, _ in rows]
    best_params = study["best"]["params"]
    searched = {k.split(".")[1]: v for k, v in best_params.items() if k.startswith("calibration.")}
    assert {k: final["config"]["calibration"][k] for k in searched} == searched
    assert (final["config"]["method"]["importance"], final["config"]["method"]["aggregation"]) == (
        best_params["method.importance"],
        best_params["method.aggregation"],
    )
    assert list(final["metrics"]["ppl"]) == final_eval  # the final eval
    trials = trial_records(tmp / "store")
    for t in study["trials"]:  # every COMPLETE trial is a store cell with exactly that value
        if t["state"] == "COMPLETE":
            assert trials[t["config_hash"]]["metrics"]["ppl"][OBJECTIVE]["ppl"] == t["value"]
    return final


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    """A 2-trial study run once for the module, in this process (the resume test extends it to 3 trials; the slow
    tests run their studies as ``python run.py -m``)."""
    tmp = tmp_path_factory.mktemp("study")
    run_study_here(tmp, "sweep1", 2, *FINAL_CHEAP)
    return tmp


@needs_root
@pytest.mark.slow  # three studies' cells and a final cell; the default pass checks the search space and the method
def test_study_resumes_without_rerunning_finished_trials(small_study, tmp_path, monkeypatch):
    tmp_path, fresh = small_study, tmp_path
    first = {
        h: (r["created"], (tmp_path / "store" / "records" / f"{h}.json").stat().st_mtime_ns)
        for h, r in trial_records(tmp_path / "store").items()
    }
    assert len(first) == 2 and [s for _, s, _ in sql_trials(tmp_path / "study.db")] == ["COMPLETE"] * 2
    out = run_study_here(tmp_path, "sweep2", 3, *FINAL_CHEAP)  # same study, one more trial wanted
    assert job_dirs(tmp_path / "sweep2") == ["0"]  # only the missing trial was launched
    final = check_final(tmp_path, 3, ["ppl128-lp:c4:heldout[:16 windows]"])
    assert [s for _, s, _ in sql_trials(tmp_path / "study.db")] == ["COMPLETE"] * 3
    after = trial_records(tmp_path / "store")
    for h, (created, mtime) in first.items():  # finished trials were not recomputed or rewritten
        assert after[h]["created"] == created
        assert (tmp_path / "store" / "records" / f"{h}.json").stat().st_mtime_ns == mtime
    assert len(after) == 3 and f"final record: {tmp_path / 'store'}" in out

    # the history the report plots: best-so-far is the running minimum of the stored objectives
    from experiments.adapruner import history_table
    from experiments.report import render

    values = [v for _, _, v in sql_trials(tmp_path / "study.db")]
    hist = history_table(final["study"])
    assert hist["objective"].tolist() == values
    assert hist["best_so_far"].tolist() == [min(values[: i + 1]) for i in range(len(values))]
    page, _ = render(list(records(tmp_path / "store").values()))
    assert f"AdaPruner optimisation history: {final['study']['name']}" in page
    assert f"best trial {final['study']['best']['number']}: objective {final['study']['best']['value']:.4f}" in page

    # Invariants 1 and 4: the best trial's configuration as an ordinary cell (fresh store, nothing cached) is the
    # same cell (config hash), with the same plan and the same objective to the last bit.
    from hydra import compose, initialize_config_dir

    from experiments.cell import run_cell
    from pruning.eval.perplexity import clear_token_cache

    monkeypatch.setenv("PRUNING_CACHE", str(fresh / "cache"))
    clear_token_cache()
    best = final["study"]["best"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "method=adapruner",
                "eval=adapruner_objective",
                "eval.ppl.0.max_windows=32",
                f"store.dir={fresh / 'store'}",
                "progress=false",
                *(f"{k}={v}" for k, v in best["params"].items()),
            ],
        )
    rec = run_cell(cfg)
    trial = after[best["config_hash"]]
    assert rec["config_hash"] == best["config_hash"] and "_skipped" not in rec
    assert rec["metrics"]["ppl"][OBJECTIVE]["ppl"] == best["value"]
    assert rec["metrics"] == trial["metrics"] and rec["widths"] == trial["widths"]
    assert deterministic(rec["plan"]) == deterministic(trial["plan"]) and rec["plan"]["remove"]
    assert math.isfinite(best["value"]) and best["value"] > trial["metrics"]["dense_ppl"][OBJECTIVE]["ppl"]


@needs_root
@pytest.mark.slow
def test_killed_study_resumes_and_retries_the_lost_trials(tmp_path):
    """kill -9 the driver after the first trial's cell is stored (optuna is told a batch at its end, so both
    trials of the batch are RUNNING in sqlite). The re-run waits for their heartbeat to go stale, optuna marks them
    FAIL and queues their parameters again; the stored one comes back as a store hit, untouched."""
    beat = "hydra.sweeper.heartbeat_interval=1"
    cmd = study_cmd(tmp_path, "sweep1", 3, beat, *FINAL_TEST)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and not (
        (tmp_path / "store" / "records").exists() and trial_records(tmp_path / "store")
    ):
        assert proc.poll() is None, "study finished before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = {
        h: (tmp_path / "store" / "records" / f"{h}.json").stat().st_mtime_ns for h in trial_records(tmp_path / "store")
    }
    assert 1 <= len(stored) <= 2 and {s for _, s, _ in sql_trials(tmp_path / "study.db")} == {"RUNNING"}
    killed = sql_params(tmp_path / "study.db")
    assert len(killed) == 2
    t0 = time.time()
    run_study(tmp_path, "sweep2", 3, beat, *FINAL_TEST)
    final = check_final(tmp_path, 3, FINAL_LABELS)
    states = {n: s for n, s, _ in sql_trials(tmp_path / "study.db")}
    retries = sql_retried(tmp_path / "study.db")
    assert sorted(retries.values()) == sorted(killed) and all(states[n] == "FAIL" for n in killed)
    params = sql_params(tmp_path / "study.db")
    assert all(params[r] == killed[k] for r, k in retries.items())  # the same configuration again
    trials = {t["number"]: t for t in final["study"]["trials"]}
    assert all(trials[r]["state"] == "COMPLETE" for r in retries)
    assert {trials[r]["config_hash"] for r in retries} >= set(stored)  # the stored cell is one of the retries
    for h, mtime in stored.items():  # ... and was not recomputed
        assert (tmp_path / "store" / "records" / f"{h}.json").stat().st_mtime_ns == mtime
    # the two retries and one new trial: 3 counted trials, 3 jobs, no fourth
    assert len(job_dirs(tmp_path / "sweep2")) == 3 and len(states) == 5
    assert time.time() - t0 > 2  # it waited for the grace period


@needs_root
@pytest.mark.slow
def test_study_with_joblib_launcher(tmp_path):
    run_study(tmp_path, "sweep", 2, "hydra/launcher=joblib_local", *FINAL_TEST)
    check_final(tmp_path, 2, FINAL_LABELS)
    assert job_dirs(tmp_path / "sweep") == ["0", "1"]
    stored = {
        h: p.stat().st_mtime_ns
        for h, p in ((h, tmp_path / "store" / "records" / f"{h}.json") for h in trial_records(tmp_path / "store"))
    }
    run_study(tmp_path, "again", 2, "hydra/launcher=joblib_local", *FINAL_TEST)  # a finished study: no job
    assert job_dirs(tmp_path / "again") == [] and len(sql_trials(tmp_path / "study.db")) == 2
    assert {h: (tmp_path / "store" / "records" / f"{h}.json").stat().st_mtime_ns for h in stored} == stored
    check_final(tmp_path, 2, FINAL_LABELS)


@needs_root
@pytest.mark.slow
def test_study_with_local_slurm_launcher(tmp_path):
    """Trials run as SLURM array jobs; the final cell runs in the driver."""
    if why := slurm_skip_reason():  # checked when the test runs, not at collection
        pytest.skip(why)
    run_study(tmp_path, "sweep", 2, "hydra/launcher=slurm_local", *FINAL_TEST, timeout=1200)
    final = check_final(tmp_path, 2, FINAL_LABELS)
    assert list((tmp_path / "sweep" / ".submitit").iterdir()), "trials did not go through SLURM"
    assert final["params"]["after"] < final["params"]["before"]


@needs_root
@pytest.mark.slow
def test_shape_the_data_cannot_fill_is_pruned_not_failed(tmp_path):
    """alpaca has 90 records of >= 256 tokens: 128 x 256 is a PRUNED trial (TPE ranks it after every COMPLETE
    one and learns to avoid it), no value, no store record, never the best; 128 x 64 is evaluated normally."""
    run_study(
        tmp_path,
        "sweep",
        4,
        "calibration.dataset=alpaca",
        "calibration.n_samples=128",
        "calibration.seq_len=choice(64,256)",
        *FINAL_CHEAP,
    )
    study = final_record(tmp_path / "store")["study"]
    shapes = {t["number"]: t["params"]["calibration.seq_len"] for t in study["trials"]}
    assert sorted(set(shapes.values())) == [64, 256]  # both kinds were asked (seed 0)
    for number, state, value in sql_trials(tmp_path / "study.db"):
        assert (state, value is None) == (("PRUNED", True) if shapes[number] == 256 else ("COMPLETE", False))
    with sqlite3.connect(tmp_path / "study.db") as con:
        reasons = [
            json.loads(v)
            for (v,) in con.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'infeasible'")
        ]
    assert len(reasons) == list(shapes.values()).count(256) and all("256" in r for r in reasons)
    trials = trial_records(tmp_path / "store")
    assert all(t["config"]["calibration"]["seq_len"] == 64 for t in trials.values()) and trials
    assert study["best"]["params"]["calibration.seq_len"] == 64
    from experiments.adapruner import history_table

    hist = history_table(study)
    assert set(hist.loc[hist["seq_len"] == 256, "state"]) == {"INFEASIBLE"}


@pytest.mark.slow
def test_a_second_driver_on_a_running_study_stops(tmp_path):
    """A trial whose heartbeat is live belongs to a running driver: a second driver waits out the grace period,
    then refuses, and leaves the trial alone; once that heartbeat stops, the trial is failed and queued again."""
    import threading

    import optuna
    from optuna.storages import RDBStorage

    from experiments.adapruner import StudySweeper, counted_trials

    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        storage = RDBStorage(url, heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    stop = threading.Event()

    def beat():  # the other driver
        while not stop.wait(0.5):
            storage.record_heartbeat(trial._trial_id)

    other = threading.Thread(target=beat)
    storage.record_heartbeat(trial._trial_id)
    other.start()
    sweeper = StudySweeper(
        study_name="s", storage=url, n_trials=1, n_jobs=1, seed=0, heartbeat_interval=1, params=None, final=None
    )
    t0 = time.time()
    try:
        with pytest.raises(PruningError, match=r"trials \[0\] have a live heartbeat"):
            sweeper.open_study()
    finally:
        stop.set()
        other.join()
    assert time.time() - t0 >= 4 and study.trials[0].state.name == "RUNNING"
    again, _ = sweeper.open_study()  # the heartbeat stopped: FAIL, and the same x queued
    states = [(t.number, t.state.name, t.params) for t in again.trials]
    assert states == [(0, "FAIL", trial.params), (1, "WAITING", trial.params)] and counted_trials(again) == []


# --------------------------------------------------------------------------------------------- optuna-dashboard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_root
@pytest.mark.slow  # an optuna-dashboard server process, on the study above
def test_optuna_dashboard_reads_the_study(small_study):
    """optuna-dashboard (the optuna extra) serves the study's sqlite file: its page, and its API lists the study
    with the trials and best trial that sqlite holds."""
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("optuna-dashboard is not installed (pip install -e '.[optuna]')")
    db = small_study / "study.db"
    rows = sql_trials(db)
    port = free_port()
    proc = subprocess.Popen(
        [exe, f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() else ""
                time.sleep(0.3)
        with urllib.request.urlopen(f"{base}/dashboard", timeout=10) as r:
            assert r.status == 200 and "<title>Optuna Dashboard</title>" in r.read().decode()
        (study,) = studies
        assert study["study_name"].startswith("adapruner-stories260k-p0.2")
        with urllib.request.urlopen(f"{base}/api/studies/{study['study_id']}", timeout=10) as r:
            detail = json.load(r)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert [(t["number"], t["state"].upper(), (t.get("values") or [None])[0]) for t in detail["trials"]] == rows
    best = min((v, n) for n, s, v in rows if s == "COMPLETE")[1]
    assert [t["number"] for t in detail["best_trials"]] == [best]
    assert {p["name"] for p in detail["trials"][0]["params"]} == {
        "calibration.dataset",
        "calibration.n_samples",
        "calibration.seq_len",
        "calibration.seed",
        "method.importance",
        "method.aggregation",
    }
