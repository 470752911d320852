"""Acceptance (issue 23): mistakes a new user makes, each through the CLI as typed (``python run.py ...``): exit status
2, exactly one stderr line, starting with ``error:`` and naming the key (or group, or file) at fault, no Python
traceback, and nothing in the store: no record, no temp file.

One table, one row per mistake, grouped by class; a class's rows try several values. Most rows are refused before
torch is imported (about a second each); the rows that need the model's ``config.json`` go through the cell's check
phase. Slow tier: every row is a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# id -> (arguments after run.py, words the error line must hold: the first names the key, group or file)
MISTAKES: dict[str, tuple[list[str], list[str]]] = {
    # a typo in a group name
    "group_method": (["method=magnitud"], ["unknown method 'magnitud'", "did you mean magnitude"]),
    "group_model": (["model=llama-9b"], ["unknown model 'llama-9b'", "stories260k"]),
    "group_eval": (["eval=ppl12"], ["unknown eval 'ppl12'", "did you mean ppl128"]),
    "group_calibration": (["calibration=c5"], ["unknown calibration 'c5'", "c4"]),
    "group_experiment": (["-m", "experiment=flap_tabel"], ["unknown experiment 'flap_tabel'", "flap_table"]),
    "group_removed": (["allocation=layer_range"], ["allocation", "method.layers"]),
    # a typo in a key, with and without Hydra's `+` (its own hint for an unknown key)
    "key_plus_pruning": (["+pruning.ratoi=0.5"], ["unknown key pruning.ratoi", "did you mean pruning.ratio"]),
    "key_pruning": (["pruning.ratoi=0.5"], ["unknown key pruning.ratoi", "did you mean pruning.ratio"]),
    "key_plus_method": (
        ["method=magnitude", "+method.structurs=[mlp]"],
        ["unknown key method.structurs", "did you mean method.structures"],
    ),
    "key_method_of_another_method": (
        ["method=llm_pruner", "+method.structures=[mlp]"],
        ["unknown key method.structures", "method llm_pruner has"],
    ),
    "key_nested": (["method.memory.budgt=0.1"], ["unknown key method.memory.budgt", "method.memory.budget"]),
    "key_top_level": (["treads=1"], ["unknown key treads", "did you mean threads"]),
    "key_plus_calibration": (["+calibration.seqlen=64"], ["unknown key calibration.seqlen", "calibration.seq_len"]),
    "key_plus_eval": (["+eval.zeroshot.taks=[boolq]"], ["unknown key eval.zeroshot.taks", "eval.zeroshot.tasks"]),
    "key_plus_existing": (["+pruning.ratio=0.5"], ["pruning.ratio already exists", "without the leading +"]),
    # a value of the wrong type or out of range
    "ratio_text": (["pruning.ratio=abc"], ["pruning.ratio='abc'", "a number in [0, 1) or null"]),
    "ratio_one": (["pruning.ratio=1.5"], ["pruning.ratio=1.5", "[0, 1)"]),
    "ratio_unparsable": (["pruning.ratio=[0.2"], ["pruning.ratio=[0.2", "cannot parse"]),
    "seq_len_text": (["calibration.seq_len=abc"], ["calibration.seq_len='abc'", "an integer >= 2"]),
    "seq_len_one": (["calibration.seq_len=1"], ["calibration.seq_len=1", "an integer >= 2"]),
    "threads_negative": (["threads=-1"], ["threads=-1", "an integer >= 1 or null"]),
    "threads_zero": (["threads=0"], ["threads=0", "an integer >= 1 or null"]),
    "threads_text": (["threads=abc"], ["threads='abc'", "an integer >= 1 or null"]),
    "seed_fraction": (["seed=1.5"], ["seed=1.5", "an integer"]),
    "device": (["device=gpu"], ["device='gpu'", "cuda:N"]),
    "bool_text": (["save_model=maybe"], ["save_model='maybe'", "true or false"]),
    "dtype": (["model.dtype=float8"], ["model.dtype='float8'", "bfloat16"]),
    "choice": (["method.importance=taylor"], ["method.importance='taylor'", "element1"]),
    "sampler": (["calibration.sampler=bookcorpus"], ["calibration.sampler='bookcorpus'", "slicegpt"]),
    "union_value": (["method=numerical", "method.lambda=abc"], ["method.lambda='abc'", "inf or a number > 0"]),
    "string_for_list": (
        ["method=magnitude", "method.structures=mlp"],
        ["method.structures='mlp'", "write method.structures=[mlp]"],
    ),
    "structure_unknown": (["method=flap", "method.structures=[block]"], ["method.structures[0]='block'", "q_head"]),
    "sweep_cell": (["-m", "pruning.ratio=0.2,abc"], ["pruning.ratio='abc'", "sweep cell: pruning.ratio=abc"]),
    # rules across keys
    "structures_empty": (["method=magnitude", "method.structures=[]"], ["method.structures=[]", "non-empty list"]),
    "layers_reversed": (
        ["method=magnitude", "method.layers.start=3", "method.layers.end=1"],
        ["method.layers", "start=3 end=1 selects no layer"],
    ),
    "layers_empty": (
        ["method=wanda_sp", "method.layers.start=2", "method.layers.end=2"],
        ["method.layers", "start=2 end=2 selects no layer"],
    ),
    "layers_fractions_reversed": (
        ["method=magnitude", "method.layers.start_frac=0.8", "method.layers.end_frac=0.2"],
        ["method.layers", "start_frac=0.8 end_frac=0.2"],
    ),
    "knob_and_ratio": (
        ["method=slicegpt", "method.slicing=0.3"],
        ["method.slicing=0.3 sets the operating point", "pruning.ratio=null"],
    ),
    "no_ratio_no_knob": (["method=shortgpt", "pruning.ratio=null"], ["pruning.ratio is null", "method.n_blocks"]),
    "flap_structure_needs_heads": (["method=flap", "method.structure=UL-MM"], ["method.remove_heads", "UL-MM"]),
    "fitness_takes_every_sample": (
        ["method=search_llm_quick", "calibration.n_samples=3"],
        ["calibration.n_samples=3", "method.fitness.n_windows"],
    ),
    # rules that need the model's config.json (read in the cell's check phase, before any weights)
    "layer_outside_model": (["method=magnitude", "method.layers.start=7"], ["method.layers.start=7", "below 5"]),
    "layer_end_outside_model": (["method=magnitude", "method.layers.end=9"], ["method.layers.end=9", "at most 5"]),
    "calibration_beyond_context": (
        ["method=wanda_sp", "calibration.seq_len=4096"],
        ["calibration.seq_len=4096", "max_position_embeddings=2048"],
    ),
}


def run_cli(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    store = tmp_path / "store"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    hydra_dir = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    proc = subprocess.run(
        [sys.executable, "run.py", f"store.dir={store}", f"{hydra_dir}={tmp_path / 'run'}", "threads=1", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, store


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_error_line_and_nothing_written(case, tmp_path):
    args, words = MISTAKES[case]
    proc, store = run_cli(args, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    left = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    assert left == [], left  # no record, no temp file


def test_the_table_has_forty_mistakes():
    assert len(MISTAKES) >= 40


def test_ctrl_c_is_one_line_exit_130_and_nothing_half_written(tmp_path):
    """SIGINT 8 s into a real cell (importing, loading or computing): one line, exit 130, an empty store."""
    import signal
    import time

    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "run.py", f"store.dir={store}", f"hydra.run.dir={tmp_path / 'run'}", "threads=1"],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job inherits SIGINT ignored
    )
    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    # progress bars (tqdm, on stderr) may have started on a fast machine; besides them, one line
    bar = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
    assert [line for line in err.splitlines() if line.strip() and not bar.search(line)] == ["interrupted"]
    assert "Traceback" not in out + err
    left = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    assert left == [], left


def test_help_into_a_closed_pipe_is_quiet(tmp_path):
    """`run.py --help | head`: the reader leaves early; exit 141 like a shell tool, no traceback."""
    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write raises BrokenPipeError
    try:
        proc = subprocess.run(
            [sys.executable, "run.py", "--help"], cwd=REPO, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(w)
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert proc.stderr == ""
