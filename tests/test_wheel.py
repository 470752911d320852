"""Issue 24, acceptance 2, as a user installs the package: the built wheel, installed (not editable) into a fresh venv
from requirements.lock, runs a cell from an empty directory elsewhere, with the data root from $PRUNING_DATA and with
no data root at all (the embedded model, WikiText-2 test text and C4 slice), and gives a source checkout's numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pruning import data
from pruning.data import CALIB_EMBEDDED, CALIB_FILES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICK = ["eval=quick", "threads=1", "progress=false"]
# eval=quick without PTB, which is not embedded: what a run with no data root can evaluate
WIKITEXT2_ONLY = (
    "eval.ppl=[{name:ppl128-lp,dataset:wikitext2,split:test,seq_len:128,stride:128,bos:once,"
    "batch_size:16,max_windows:50}]"
)
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "outputs",
    "multirun",
    "wandb",
)


def expected_wheel_files() -> set[str]:
    """The library, the experiment layer, the CLI, the sweeper plugin and their data; conf/ as pruning_lab/conf."""
    files = {
        p.relative_to(REPO).as_posix()
        for pkg in ("pruning", "experiments", "pruning_lab", "hydra_plugins")
        for p in (REPO / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    files |= {
        f"pruning_lab/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*") if p.is_file()
    }
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, wheel path, site-packages); the venv sits inside a git repository of someone else's."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)  # the build writes build/ and *.egg-info
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next((tmp / "dist").glob("pruning_lab-*.whl"))
    project = tmp / "someone_elses_project"
    project.mkdir()
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "theirs"], check=True)
    venv = project / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-c",
            str(REPO / "requirements.lock"),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"wheel install into a fresh venv: {time.perf_counter() - t0:.0f} s")
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    yield venv / "bin", wheel, site
    for done in (project, src):  # 1.5 GB venv; pytest keeps its last 3 temp dirs
        shutil.rmtree(done, ignore_errors=True)


def cli(bin_dir: Path, args: list[str], cwd: Path, data_root: Path | None = None) -> subprocess.CompletedProcess:
    """`pruning-lab ARGS` as a user in an empty directory runs it: no checkout on the path, no store override."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PRUNING_DATA", "PRUNING_STORE", "VIRTUAL_ENV")
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    if data_root is not None:
        env["PRUNING_DATA"] = str(data_root)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(bin_dir / "pruning-lab"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def only_record(cwd: Path, pruned: bool = True) -> dict:
    records = [json.loads(p.read_text()) for p in (cwd / "runs" / "store" / "records").glob("*.json")]
    return next(r for r in records if (r["plan"]["meta"].get("method") != "dense") == pruned)


def test_wheel_carries_the_package_and_conf(installed):
    _, wheel, _ = installed
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    assert names == expected_wheel_files()
    meta = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert "pruning-lab = pruning_lab.cli:main" in meta


def test_help_tables_and_bench_from_an_empty_directory(installed, tmp_path):
    bin_dir, _, _ = installed
    t0 = time.perf_counter()
    top = cli(bin_dir, ["--help"], tmp_path)
    print(f"pruning-lab --help: {time.perf_counter() - t0:.2f} s")
    assert top.returncode == 0 and "tables" in top.stdout and "run" in top.stdout
    tables = cli(bin_dir, ["tables", "--help"], tmp_path)
    assert tables.returncode == 0 and tables.stdout.startswith("usage: pruning-lab tables"), tables.stderr[-2000:]
    bench = cli(bin_dir, ["bench"], tmp_path)  # benchmarks/ does not ship: one line, exit 2
    assert bench.returncode == 2 and "needs a source checkout" in bench.stderr
    assert len(bench.stderr.strip().splitlines()) == 1


def checkout_record(args: list[str], data_root: Path, tmp: Path, config_hash: str) -> dict:
    """The same cell from the source checkout (python run.py), for comparison."""
    env = dict(os.environ, PRUNING_DATA=str(data_root), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            *args,
            f"store.dir={tmp / 'checkout_store'}",
            f"hydra.run.dir={tmp / 'checkout_run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "checkout_store" / "records" / f"{config_hash}.json").read_text())


def assert_same_numbers(rec: dict, ref: dict, n_protocols: int) -> None:
    assert rec["params"] == ref["params"] and rec["params"]["before"] == 292_800 > rec["params"]["after"]
    for block in ("ppl", "dense_ppl"):
        assert set(rec["metrics"][block]) == set(ref["metrics"][block]) and len(rec["metrics"][block]) == n_protocols
        for key, res in rec["metrics"][block].items():
            assert res["ppl"] == pytest.approx(ref["metrics"][block][key]["ppl"], rel=1e-6)
            assert res["n_tokens_text"] == ref["metrics"][block][key]["n_tokens_text"]


def test_run_from_an_empty_directory_matches_the_checkout(installed, tmp_path):
    """With $PRUNING_DATA: the README's cell (quick eval) gives the checkout's record hash and numbers; the store is
    ./runs/store; the record names no commit (the repository around the venv is not this package's)."""
    root = data.data_root()
    if root is None:
        pytest.skip("no data root (../shared/data or $PRUNING_DATA): PTB is not embedded")
    bin_dir, _, _ = installed
    cwd = tmp_path / "empty"
    proc = cli(bin_dir, ["run", *QUICK], cwd, data_root=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = only_record(cwd)
    ref = checkout_record(QUICK, root, tmp_path, rec["config_hash"])
    assert_same_numbers(rec, ref, n_protocols=2)
    assert rec["calibration"]["source"] == ref["calibration"]["source"] == str(root / CALIB_FILES["c4"])
    assert rec["git"] == {"sha": None, "dirty": None} and ref["git"]["sha"]
    assert rec["versions"]["pruning-lab"] == ref["versions"]["pruning-lab"]

    listed = cli(bin_dir, ["results", "--format", "json"], cwd)  # the same default store: ./runs/store
    assert listed.returncode == 0 and rec["config_hash"] in listed.stdout


def test_run_with_no_data_root_uses_the_embedded_data(installed, tmp_path):
    """No $PRUNING_DATA and no ../shared/data: the embedded model, C4 slice and WikiText-2 text, read from
    site-packages, give what the checkout gives on its embedded copies."""
    bin_dir, _, site = installed
    cwd = tmp_path / "empty"
    assert not (cwd.parent / "shared" / "data").exists()
    proc = cli(bin_dir, ["run", *QUICK, WIKITEXT2_ONLY], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = only_record(cwd)
    assert rec["calibration"]["source"] == str(site / "pruning" / "assets" / "data" / CALIB_EMBEDDED["c4"])
    (tmp_path / "no_data").mkdir()  # a data root without the files: embedded
    ref = checkout_record([*QUICK, WIKITEXT2_ONLY], tmp_path / "no_data", tmp_path, rec["config_hash"])
    assert ref["calibration"]["source"] == str(REPO / "pruning" / "assets" / "data" / CALIB_EMBEDDED["c4"])
    assert_same_numbers(rec, ref, n_protocols=1)
