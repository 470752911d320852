"""Issue 23 (safety) through the CLI: damaged checkpoints, unwritable stores and caches, corrupt data files, plans
that remove nothing and checks that used to come after the dense evaluation. Each mistake must end as exit status
2, exactly one `error:` line naming the key or file, no traceback, and nothing in the store (no record, no temp
file). Then: a store made read-only during a run (the numbers are printed and saved to the named fallback) and a
sweep with a failing cell (the good cells run, a summary, non-zero exit). The in-process twins: tests/test_safety.py.

Root ignores permission bits, so read-only directories are tested in a child without CAP_DAC_OVERRIDE (setpriv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning import data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "pruning" / "assets" / "stories260K"
QUICK = ["eval=quick", "eval.ppl.0.max_windows=4", "eval.ppl.1.max_windows=4", "progress=false", "threads=1"]
C4, PTB, WIKI = data.CALIB_FILES["c4"], data.PPL_FILES[("ptb", "validation")], data.PPL_FILES[("wikitext2", "test")]


def as_non_root() -> list[str]:
    """A command prefix under which permission bits hold even for root (no DAC override), or [] for a normal user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a read-only directory cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


class Sandbox:
    """One CLI run's directories: store, cache (``$PRUNING_CACHE``), hydra run dir, and on demand a data root whose
    files link to the real one, with some replaced by corrupt copies."""

    def __init__(self, tmp: Path):
        self.tmp, self.store, self.cache = tmp, tmp / "store", tmp / "cache"
        self.env = {"PRUNING_CACHE": str(self.cache)}
        self.prefix: list[str] = []

    def data_file(self, rel: str, content) -> Path:
        root = self.tmp / "data"
        if not root.exists():
            real = data.data_root()
            if real is None:
                pytest.skip("no data root")
            for f in real.rglob("*"):
                if f.is_file():
                    (root / f.relative_to(real)).parent.mkdir(parents=True, exist_ok=True)
                    (root / f.relative_to(real)).symlink_to(f)
            self.env["PRUNING_DATA"] = str(root)
        path = root / rel
        path.unlink()
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def checkpoint(self, tensors=None, config=None, files=None) -> str:
        """stories260K saved to tmp, then damaged (as tests/test_safety.py)."""
        d = self.tmp / "ckpt"
        shutil.copytree(ASSET, d)
        if tensors is not None:
            sd = load_file(d / "model.safetensors")
            tensors(sd)
            save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        if config is not None:
            (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **config}))
        for name, text in (files or {}).items():
            (d / name).write_text(text)
        return f"model.path={d}"

    def read_only(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o555)
        self.prefix = as_non_root()
        return directory

    def command(self, args: list[str], multirun: bool = False) -> list[str]:
        where = f"hydra.sweep.dir={self.tmp / 'sweep'}" if multirun else f"hydra.run.dir={self.tmp / 'run'}"
        return [
            *self.prefix,
            sys.executable,
            "run.py",
            *(["-m"] if multirun else []),
            f"store.dir={self.store}",
            where,
            *QUICK,
            *args,
        ]

    def full_env(self) -> dict:
        return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", **self.env)

    def run(self, args: list[str], multirun: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(args, multirun), cwd=REPO, env=self.full_env(), capture_output=True, text=True, timeout=600
        )

    def store_files(self) -> list[Path]:
        return [p for p in self.store.rglob("*") if not p.is_dir()] if self.store.exists() else []

    def cleanup(self):
        for d in (self.store / "records", self.tmp / "ro-cache"):
            if d.exists():
                d.chmod(0o755)


def after(_prepared, *args: str) -> list[str]:
    """The CLI args of a case whose setup (the first argument, e.g. a corrupted data file) is done."""
    return list(args)


def _resize(key: str, rows: int):
    def edit(sd):
        sd[key] = sd[key][:rows].clone()

    return edit


def _broken_jsonl(s: Sandbox) -> str:
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"})
    path = s.tmp / "alpaca.jsonl"
    path.write_text("\n".join([good] * 40 + [good[:-7]] + [good] * 40) + "\n")
    return str(path)


def _wikitext_with_broken_line(s: Sandbox) -> Path:
    good = data.ppl_source("wikitext2", "test").read_text(encoding="utf-8").splitlines()
    return s.data_file(WIKI, "\n".join([*good[:5], '{"text": "cut', *good[5:]]) + "\n")


def _read_only_cache(s: Sandbox) -> Path:
    s.env["PRUNING_CACHE"] = str(s.read_only(s.tmp / "ro-cache"))
    return s.tmp / "ro-cache"


# name -> (setup(sandbox) -> CLI args, words the one error line must hold)
CASES = {
    # checkpoints: verified strictly, before any evaluation
    "ckpt_tensor_missing": (
        lambda s: [s.checkpoint(tensors=lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))],
        ["does not match its config.json", "missing", "model.layers.2.mlp.up_proj.weight"],
    ),
    "ckpt_extra_tensor": (
        lambda s: [s.checkpoint(tensors=lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.ones(3)))],
        ["does not use", "model.layers.0.extra.weight"],
    ),
    "ckpt_config_fewer_layers": (
        lambda s: [s.checkpoint(config={"num_hidden_layers": 4})],
        ["num_hidden_layers=4 but the weights hold 5 layers", "model.layers.4."],
    ),
    "ckpt_config_more_layers": (
        lambda s: [s.checkpoint(config={"num_hidden_layers": 6})],
        ["num_hidden_layers=6 but the weights hold only 5 layers", "model.layers.5."],
    ),
    "ckpt_hidden_size": (
        lambda s: [s.checkpoint(config={"hidden_size": 96})],
        ["hidden_size=96 but the weights' embedding is 64 wide"],
    ),
    "ckpt_tensor_shape": (
        lambda s: [s.checkpoint(tensors=_resize("model.layers.3.self_attn.q_proj.weight", 32))],
        ["model.layers.3.self_attn.q_proj.weight [32, 64] in the file vs [64, 64]"],
    ),
    "ckpt_tokenizer_empty": (
        lambda s: [s.checkpoint(files={"tokenizer.json": ""})],
        ["tokenizer.json is empty", "/ckpt/"],
    ),
    "ckpt_tokenizer_broken": (
        lambda s: [s.checkpoint(files={"tokenizer.json": '{"model": {"vocab": '})],
        ["tokenizer.json is not valid JSON", "/ckpt/"],
    ),
    # store and cache: checked writable before the model loads
    "store_read_only": (
        lambda s: after(s.read_only(s.store / "records"), "method=random"),
        ["results store", "/store/records is not writable", "store.dir="],
    ),
    "cache_read_only": (
        lambda s: after(_read_only_cache(s), "method=random"),
        ["cache directory", "/ro-cache is not writable", "$PRUNING_CACHE"],
    ),
    # corrupt data files: one line naming the file
    "c4_parquet_empty": (
        lambda s: after(s.data_file(C4, pa.table({"text": pa.array([], pa.string())})), "method=wanda_sp"),
        ["C4 parquet", C4, "has no rows"],
    ),
    "c4_parquet_no_text_column": (
        lambda s: after(s.data_file(C4, pa.table({"url": ["u1", "u2"]})), "method=wanda_sp"),
        ["C4 parquet", C4, "no 'text' column"],
    ),
    "c4_not_parquet": (
        lambda s: after(s.data_file(C4, b"\x00\x01 not parquet at all"), "method=wanda_sp"),
        ["C4 parquet", C4, "unreadable"],
    ),
    "alpaca_jsonl_broken_line": (
        lambda s: ["method=random", "recovery=lora", f"recovery.data={_broken_jsonl(s)}"],
        ["alpaca.jsonl: line 41 is not JSON"],
    ),
    "wikitext_jsonl_broken_line": (
        lambda s: after(_wikitext_with_broken_line(s), "method=random"),
        [WIKI, "line 6 is not JSON"],
    ),
    "ptb_binary": (
        lambda s: after(s.data_file(PTB, bytes(range(128, 256)) * 64), "method=random"),
        [PTB, "not UTF-8 text"],
    ),
    "ptb_empty": (
        lambda s: after(s.data_file(PTB, ""), "method=random"),
        [PTB, "holds no text"],
    ),
    # plans that remove nothing at a ratio above zero
    "noop_empty_structures": (
        lambda s: ["method=magnitude", "method.structures=[]"],
        ["method.structures=[]", "non-empty list"],  # the config schema, before the plan exists
    ),
    "noop_empty_layer_range": (
        lambda s: ["method=magnitude", "method.layers.start=2", "method.layers.end=2"],
        ["method.layers", "start=2 end=2 selects no layer"],
    ),
    "noop_reversed_layer_range": (
        lambda s: ["method=wanda_sp", "method.layers.start=4", "method.layers.end=1"],
        ["method.layers", "start=4 end=1 selects no layer"],
    ),
    "noop_layer_range_outside": (
        lambda s: ["method=magnitude", "method.layers.start=6", "method.layers.end=8"],
        ["method.layers.start=6", "stories260k has 5"],
    ),
    "noop_ratio_rounds_to_zero": (
        lambda s: ["method=magnitude", "pruning.ratio=0.0002"],
        ["pruning.ratio=0.0002 removes nothing", "rounds its plan to zero units"],
    ),
    # checks that used to come after the dense evaluation (which then left a dense record behind)
    "search_llm_fitness_windows": (
        lambda s: ["method=search_llm", "method.preset=quick", "calibration.n_samples=4", "calibration.seq_len=64"],
        ["n_windows=5", "calibration.n_samples=4; raise calibration.n_samples above 5"],
    ),
    "ptb_shorter_than_a_window": (
        lambda s: after(s.data_file(PTB, " a short text \n of two lines \n"), "method=random"),
        [PTB, "fewer than one window of 128"],
    ),
}


def assert_one_error_line(proc: subprocess.CompletedProcess, needles: list[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_is_one_line_exit_2_empty_store(case, tmp_path):
    setup, needles = CASES[case]
    s = Sandbox(tmp_path)
    try:
        proc = s.run(setup(s))
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert_one_error_line(proc, needles)
        assert s.store_files() == []
        assert not list(s.cache.glob("unsaved-records/*"))
    finally:
        s.cleanup()


def test_store_made_read_only_during_the_run_prints_and_saves_to_the_fallback(tmp_path):
    """The store passes the check, then becomes read-only while the cell computes (as soon as its calibration is
    cached, i.e. before the model loads): the table is still printed, both records go to the fallback that the
    error line names, exit 2."""
    s = Sandbox(tmp_path)
    records = s.store / "records"
    records.mkdir(parents=True)
    s.prefix = as_non_root()
    proc = subprocess.Popen(
        s.command(["method=wanda_sp", "pruning.ratio=0.2"]),
        cwd=REPO,
        env=s.full_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not list(s.cache.glob("calibration/*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        records.chmod(0o555)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        records.chmod(0o755)
    assert proc.returncode == 2, err[-3000:]
    line = assert_one_error_line(subprocess.CompletedProcess([], 2, out, err), [str(records), "could not be written"])
    assert "ppl128-lp:wikitext2:test[:4 windows]" in out and "wanda" in out  # the result table, printed
    saved = {p.name: json.loads(p.read_text()) for p in (s.cache / "unsaved-records").glob("*.json")}
    assert len(saved) == 2  # the dense record and the cell's
    for name in saved:
        assert str(s.cache / "unsaved-records" / name) in line
    cell = next(r for r in saved.values() if r["plan"]["meta"].get("method") != "dense")
    assert cell["params"]["target_ratio"] == 0.2 and 0.15 < cell["params"]["achieved_ratio"] < 0.25
    ppl = next(iter(cell["metrics"]["ppl"].values()))["ppl"]
    assert f"{ppl:.2f}" in out  # the printed table holds the saved numbers
    assert s.store_files() == []


def test_sweep_with_a_failing_cell_runs_the_others_summarises_and_fails(tmp_path):
    """An impossible cell among good ones: the good cells run and are recorded, the summary lists each cell with
    its outcome, the exit status is 2; a second run of the same sweep finds the good cells in the store."""
    s = Sandbox(tmp_path)
    args = ["method=random", "pruning.ratio=0.1,0.0002,0.2"]
    first = s.run(args, multirun=True)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert first.stderr.strip().splitlines()[-1] == "error: 1 of 3 sweep cells failed (listed above)"
    summary = first.stdout[first.stdout.index("sweep summary") :].splitlines()
    assert "3 cells: 2 done, 0 skipped (already in the store), 1 failed" in summary[0]
    assert [line.split()[1] for line in summary[1:4]] == ["done", "FAILED", "done"]
    assert "pruning.ratio=0.0002: error: pruning.ratio=0.0002 removes nothing" in summary[2]
    recs = [json.loads(p.read_text()) for p in (s.store / "records").glob("*.json")]
    assert sorted(r["params"]["target_ratio"] for r in recs) == [0.0, 0.1, 0.2]  # dense + the two good cells

    second = s.run(args, multirun=True)
    assert second.returncode == 2
    summary = second.stdout[second.stdout.index("sweep summary") :].splitlines()
    assert "3 cells: 0 done, 2 skipped (already in the store), 1 failed" in summary[0]
    assert len(list((s.store / "records").glob("*.json"))) == 3
