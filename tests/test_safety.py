"""Issue 23 (safety), in process: damaged checkpoints and corrupt data files are one line naming the file before any
evaluation, a store that refuses the last write loses nothing, a plan that removes nothing is an error, and a sweep
summarises its cells. Real stories260K weights, saved to tmp and damaged; real data files, corrupted copies.
The same mistakes through the CLI (exit status, one `error:` line, empty store): tests/test_cli_safety.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from experiments.cell import CellCallback, StoreCallback, run_cell
from experiments.store import ResultsStore
from experiments.sweeps import summary_lines
from pruning import data
from pruning.errors import CheckpointError, DataError, PruningError, RecordNotSaved
from pruning.models import load_model
from pruning.models.loading import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "pruning" / "assets" / "stories260K"
WEIGHTS = "model.safetensors"
SMALL = ["eval=quick", "eval.ppl.0.max_windows=2", "eval.ppl.1.max_windows=2", "progress=false"]


# --------------------------------------------------------------------------------------------- damaged checkpoints


def damaged(tmp_path: Path, tensors=None, config=None, files=None) -> Path:
    """stories260K saved to tmp, then damaged: ``tensors(state_dict)`` edits the weights, ``config`` updates
    config.json, ``files`` replaces whole files by their new text."""
    d = tmp_path / "ckpt"
    shutil.copytree(ASSET, d)
    if tensors is not None:
        sd = load_file(d / WEIGHTS)
        tensors(sd)
        save_file(sd, d / WEIGHTS, metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **config}))
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    return d


def _resize(key: str, rows: int):
    def edit(sd):
        sd[key] = sd[key][:rows].clone()

    return edit


CHECKPOINTS = {
    # name: (damage, words the one line must hold)
    "tensor_missing": (
        dict(tensors=lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight")),
        ["1 tensor missing", "initialised at random", "model.layers.2.mlp.up_proj.weight"],
    ),
    "lm_head_missing": (dict(tensors=lambda sd: sd.pop("lm_head.weight")), ["missing", "(lm_head.weight)"]),
    "extra_tensor": (
        dict(tensors=lambda sd: sd.__setitem__("model.layers.1.mlp.extra.weight", torch.ones(4))),
        ["does not use", "model.layers.1.mlp.extra.weight"],
    ),
    "config_fewer_layers": (
        dict(config={"num_hidden_layers": 3}),
        ["num_hidden_layers=3 but the weights hold 5 layers", "18 tensors", "model.layers.3.input_layernorm.weight"],
    ),
    "config_more_layers": (
        dict(config={"num_hidden_layers": 7}),
        ["num_hidden_layers=7 but the weights hold only 5 layers", "initialised at random", "model.layers.5."],
    ),
    "config_hidden_size": (
        dict(config={"hidden_size": 128}),
        ["hidden_size=128 but the weights' embedding is 64 wide", "lm_head.weight [512, 64] in the file"],
    ),
    "config_intermediate_size": (
        dict(config={"intermediate_size": 100}),
        ["15 tensors of another shape", "model.layers.0.mlp.down_proj.weight [64, 172] in the file vs [64, 100]"],
    ),
    "tensor_shape": (
        dict(tensors=_resize("model.layers.1.mlp.up_proj.weight", 100)),
        ["model.layers.1.mlp.up_proj.weight [100, 64] in the file vs [172, 64]"],
    ),
    "tokenizer_empty": (dict(files={"tokenizer.json": ""}), ["tokenizer.json is empty"]),
    "tokenizer_broken": (dict(files={"tokenizer.json": '{"version": "1.0", "model": '}), ["tokenizer.json", "JSON"]),
    "vocab_smaller_than_tokenizer": (
        dict(config={"vocab_size": 256}),
        ["512 tokens but config.json has vocab_size=256"],
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_damaged_checkpoint_is_one_line_naming_the_file(case, tmp_path):
    damage, needles = CHECKPOINTS[case]
    ckpt = damaged(tmp_path, **damage)
    with pytest.raises(CheckpointError) as e:
        load_model(str(ckpt))
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_tokenizer_damage_fails_before_the_weights(tmp_path):
    """The cell draws calibration with the tokenizer alone: a broken tokenizer.json fails there, in seconds."""
    ckpt = damaged(tmp_path, files={"tokenizer.json": ""})
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is empty"):
        load_tokenizer(str(ckpt))


def test_intact_copy_loads_identically(tmp_path):
    """The strict loader accepts the intact checkpoint, and gives exactly the embedded model's weights."""
    model, _, _ = load_model(str(damaged(tmp_path)))
    reference = load_file(ASSET / WEIGHTS)
    state = model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


# ------------------------------------------------------------------------------------------------ corrupt data


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A data root whose files are links to the real one; ``put(rel, content)`` replaces one by a corrupt copy."""
    real = data.data_root()
    if real is None:
        pytest.skip("no data root")
    root = tmp_path / "data"
    for f in real.rglob("*"):
        if f.is_file():
            (root / f.relative_to(real)).parent.mkdir(parents=True, exist_ok=True)
            (root / f.relative_to(real)).symlink_to(f)
    monkeypatch.setenv("PRUNING_DATA", str(root))

    def put(rel: str, content) -> Path:
        path = root / rel
        path.unlink()
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return put


C4 = data.CALIB_FILES["c4"]
PTB = data.PPL_FILES[("ptb", "validation")]
WIKI = data.PPL_FILES[("wikitext2", "test")]


def test_c4_parquet_empty_columnless_or_not_parquet(data_root):
    for content, needle in (
        (pa.table({"text": pa.array([], pa.string())}), "has no rows"),
        (pa.table({"url": ["a", "b"]}), "has no 'text' column (columns: ['url'])"),
        (b"PAR1 this is not parquet", "is unreadable"),
        (pa.table({"text": ["a doc", None]}), "row 1 has no text"),
    ):
        path = data_root(C4, content)
        for read in (lambda: data.calibration_texts("c4"), lambda: data.ppl_text("c4", "heldout")):
            with pytest.raises(DataError) as e:
                read()
            assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_broken_jsonl_line_names_file_and_line(data_root, tmp_path):
    rows = [json.dumps({"instruction": "say hi", "input": "", "output": "hi"})] * 3
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join([rows[0], rows[1][:-5], rows[2]]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{alpaca}: line 2 is not JSON")):
        data.instruction_records(str(alpaca))
    good = Path(data.ppl_source("wikitext2", "test")).read_text().splitlines()
    path = data_root(WIKI, "\n".join([*good[:3], "{broken", *good[3:10]]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 4 is not JSON")):
        data.ppl_text("wikitext2", "test")


def test_binary_or_empty_ptb(data_root):
    path = data_root(PTB, bytes(range(256)) * 8)
    with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 text")):
        data.ppl_text("ptb", "validation")
    path = data_root(PTB, " a b c \x00\x00 \n")
    with pytest.raises(DataError, match="NUL bytes"):
        data.ppl_text("ptb", "validation")
    path = data_root(PTB, "\n\n")
    with pytest.raises(DataError, match=re.escape(f"{path} holds no text")):
        data.ppl_text("ptb", "validation")


def test_corrupt_alpaca_json_names_the_file(data_root):
    path = data_root(data.CALIB_FILES["alpaca"], '[{"instruction": "a", "output": "b"}, ')
    with pytest.raises(DataError, match=re.escape(str(path))):
        data.calibration_texts("alpaca")


# -------------------------------------------------------------------------------------------- finished work kept


def composed(tmp_path, *overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"store.dir={tmp_path / 'store'}", *SMALL, *overrides])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def block(directory: Path) -> None:
    """Make ``directory`` refuse new files even for root (who ignores permission bits): a file in its place."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_text("not a directory\n")


def test_unwritable_store_or_cache_fails_before_any_work(tmp_path, cache, monkeypatch):
    block(tmp_path / "store" / "records")
    cfg = composed(tmp_path, "method=random", "pruning.ratio=0.2")
    with pytest.raises(
        PruningError, match=re.escape(f"results store {tmp_path / 'store' / 'records'} is not writable")
    ):
        run_cell(cfg)
    assert not (cache / "calibration").exists()  # before calibration, hence before the weights

    block(tmp_path / "ro-cache")
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "ro-cache"))
    with pytest.raises(PruningError, match=re.escape(f"cache directory {tmp_path / 'ro-cache'} is not writable")):
        run_cell(composed(tmp_path, "method=random", "pruning.ratio=0.2", f"store.dir={tmp_path / 'store2'}"))
    assert not (tmp_path / "store2").exists()  # the check itself leaves nothing behind


class BreakStore(CellCallback):
    """The store becomes unwritable while the cell computes (after its check, before its records are written)."""

    def __init__(self, records_dir: Path):
        self.records_dir = records_dir

    def dense_baseline(self, cell):
        block(self.records_dir)


def test_store_failing_at_the_end_saves_the_records_to_the_named_fallback(tmp_path, cache):
    store = ResultsStore(tmp_path / "store")
    with pytest.raises(RecordNotSaved) as e:
        run_cell(
            composed(tmp_path, "method=magnitude", "pruning.ratio=0.2"),
            callbacks=[StoreCallback(store), BreakStore(store.records_dir)],
        )
    msg, record = str(e.value), e.value.record
    fallback = cache / "unsaved-records"
    saved = {p.name: json.loads(p.read_text()) for p in fallback.glob("*.json")}
    assert sorted(saved) == sorted([f"{record['config_hash']}.json", f"{record['dense_record']}.json"])
    assert saved[f"{record['config_hash']}.json"]["metrics"] == json.loads(json.dumps(record["metrics"]))
    assert str(fallback / f"{record['config_hash']}.json") in msg and str(store.records_dir) in msg
    assert "\n" not in msg and record["params"]["achieved_ratio"] > 0.1
    assert store.records_dir.is_file()  # nothing was written into (or instead of) the store


# ------------------------------------------------------------------------------------------------- no-op cells


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # caught by the config schema (experiments/schema.py) before the plan exists, with the rule named
        (["method.structures=[]"], ["method.structures=[]", "non-empty list"]),
        (["method.layers.start=3", "method.layers.end=3"], ["start=3 end=3 selects no layer"]),
        (["method.layers.start=4", "method.layers.end=2"], ["start=4 end=2 selects no layer"]),
        (["method.layers.start=7", "method.layers.end=9"], ["method.layers.start=7", "stories260k has 5"]),
        (["pruning.ratio=0.0001"], ["pruning.ratio=0.0001 removes nothing", "rounds its plan to zero units"]),
    ],
)
def test_plan_that_removes_nothing_is_an_error(overrides, needles, tmp_path, cache):
    with pytest.raises(PruningError) as e:
        run_cell(composed(tmp_path, "method=magnitude", "pruning.ratio=0.2", *overrides))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not (tmp_path / "store").exists()


def test_ratio_zero_is_not_a_no_op_error(tmp_path, cache):
    """Asking for nothing and getting nothing is fine (a ratio-0 point of a sweep)."""
    record = run_cell(composed(tmp_path, "method=magnitude", "pruning.ratio=0"))
    assert record["params"]["achieved_ratio"] == 0.0


# ------------------------------------------------------------------------------------------------ late checks


def test_search_llm_fitness_windows_checked_before_any_work(tmp_path, cache):
    cfg = composed(tmp_path, "method=search_llm", "method.preset=quick", "calibration.n_samples=5")
    with pytest.raises(
        PruningError,
        match=r"n_windows=5 .* calibration.n_samples=5; raise calibration.n_samples above 5",
    ):
        run_cell(cfg)
    assert not (cache / "calibration").exists()


def test_short_ptb_fails_before_the_dense_evaluation(tmp_path, cache, data_root):
    path = data_root(PTB, " a few words only \n another line \n")

    class NoDense(CellCallback):
        def dense_baseline(self, cell):
            raise AssertionError("reached the dense evaluation")

    with pytest.raises(PruningError) as e:
        run_cell(composed(tmp_path, "method=random", "pruning.ratio=0.2"), callbacks=[NoDense()])
    assert str(path) in str(e.value) and "fewer than one window of 128" in str(e.value)


# ------------------------------------------------------------------------------------------------ sweep summary


def test_sweep_summary_lines():
    outcomes = [
        {"num": 0, "status": "done", "detail": "record r0", "crashed": False, "overrides": ["a=1", "b=x"]},
        {"num": 1, "status": "failed", "detail": "error: boom", "crashed": False, "overrides": ["a=2", "b=x"]},
        {"num": 2, "status": "skipped", "detail": "record r2", "crashed": False, "overrides": ["a=3", "b=x"]},
    ]
    lines = summary_lines(outcomes, "sweepdir")
    assert lines[0] == ("sweep summary (sweepdir): 3 cells: 1 done, 1 skipped (already in the store), 1 failed")
    assert lines[2] == "  #1   FAILED   a=2: error: boom"
    assert [line.split()[1] for line in lines[1:]] == ["done", "FAILED", "skipped"]
