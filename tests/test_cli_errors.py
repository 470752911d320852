"""Acceptance: bad input gets one clear line on stderr, exit code 2, and nothing in the results store.

Fast tier: every case through ``pruning_lab.run.cli`` in this process (what ``run.py`` and ``pruning-lab run`` call).
Integration tier (``slow``): the same cases as a user meets them, ``python run.py ...`` in a fresh interpreter, where
an import-time warning on stderr would also break the one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import hydra_app_in_process

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "pruning" / "assets" / "stories260K"


def run_in_process(args, tmp_path, capsys, monkeypatch, env_extra=None):
    """``cli(argv)`` here: the exit code, the non-blank stderr lines and the records written."""
    from pruning_lab.run import cli

    store = tmp_path / "store"
    for key, value in (env_extra or {}).items():
        monkeypatch.setenv(key, value)
    if "HF_HUB_CACHE" in (env_extra or {}):  # huggingface_hub read the variable at import: point its constant too
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env_extra["HF_HUB_CACHE"])
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    with hydra_app_in_process(), pytest.raises(SystemExit) as exit_:
        cli([f"store.dir={store}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false", "threads=1", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = list((store / "records").glob("*")) if (store / "records").exists() else []
    return exit_.value.code, lines, records


def run_cli(args, tmp_path, env_extra=None):
    store = tmp_path / "store"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "run.py", f"store.dir={store}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    records = list((store / "records").glob("*")) if (store / "records").exists() else []
    return proc, lines, records


def unsupported_checkpoint(tmp_path) -> str:
    d = tmp_path / "gpt2ish"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 50257})
    )
    return str(d)


def corrupt_checkpoint(tmp_path) -> str:
    d = tmp_path / "corrupt"
    shutil.copytree(ASSET, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    return str(d)


CASES = {
    "unknown_method": (lambda t: ["method=magnitud"], {}, ["unknown method", "choices:", "magnitude"]),
    "unknown_model": (lambda t: ["model=llama-9b"], {}, ["unknown model", "stories260k"]),
    "ratio_one": (lambda t: ["pruning.ratio=1.0"], {}, ["[0, 1)"]),
    "ratio_negative": (lambda t: ["pruning.ratio=-0.1"], {}, ["[0, 1)"]),
    "ratio_empties_layer": (lambda t: ["pruning.ratio=0.7"], {}, ["would empty", "at most"]),
    "missing_data": (lambda t: [], {"PRUNING_DATA": "EMPTY"}, ["ptb.valid.txt", "PRUNING_DATA"]),
    "unsupported_arch": (
        lambda t: [f"model.path={unsupported_checkpoint(t)}"],
        {},
        ["model_type='gpt2'", "supported families", "llama"],
    ),
    "corrupt_checkpoint": (lambda t: [f"model.path={corrupt_checkpoint(t)}"], {}, ["corrupt checkpoint"]),
    "hub_model_offline": (
        lambda t: ["model=qwen25_7b"],
        {"HF_HUB_CACHE": "EMPTY"},
        ["hub model Qwen/Qwen2.5-7B", "offline", "PRUNING_MODEL_PATH"],
    ),
    "unknown_calibration_sampler": (
        lambda t: ["calibration.sampler=bookcorpus"],
        {},
        ["calibration.sampler='bookcorpus'", "one of", "slicegpt"],
    ),
    # beyond the model's context (config.json's max_position_embeddings), before the data is read
    "calibration_longer_than_context": (
        lambda t: ["method=wanda_sp", "calibration.seq_len=1000000"],
        {},
        ["calibration.seq_len=1000000", "max_position_embeddings=2048"],
    ),
    "calibration_variable_length_for_gradients": (
        lambda t: ["method=llm_pruner", "calibration=shortgpt"],
        {},
        ["different lengths", "llm_pruner_element1 cannot take"],
    ),
    # a native knob and pruning.ratio would both claim to define the cell (issue 22): refused before any model work
    "native_knob_with_ratio": (
        lambda t: ["method.group_ratio=0.25", "pruning.ratio=0.3"],
        {},
        ["method.group_ratio=0.25 sets the operating point", "pruning.ratio=0.3", "pruning.ratio=null"],
    ),
    "paper_ratio_with_ratio": (
        lambda t: ["method=slicegpt", "paper_ratio=0.25"],
        {},
        ["paper_ratio=0.25 (method.slicing=0.25)", "pass pruning.ratio=null"],
    ),
    "paper_ratio_without_paper": (
        lambda t: ["method=llm_bip", "paper_ratio=0.2", "pruning.ratio=null"],
        {},
        ["paper_ratio=0.2 has no meaning for method llm_bip"],
    ),
    "no_ratio_no_knob": (
        lambda t: ["method=shortgpt", "pruning.ratio=null"],
        {},
        ["pruning.ratio is null", "method.n_blocks"],
    ),
    "removed_allocation_group": (
        lambda t: ["method=magnitude", "allocation=layer_range"],
        {},
        ["allocation config group was removed", "method.layers"],
    ),
}


def case_env(env: dict, tmp_path) -> dict:
    if env.get("PRUNING_DATA") == "EMPTY":
        (tmp_path / "empty").mkdir()
        return {"PRUNING_DATA": str(tmp_path / "empty")}
    if env.get("HF_HUB_CACHE") == "EMPTY":  # no cached copy, whatever this machine's HF cache holds
        (tmp_path / "hf").mkdir()
        return {"HF_HUB_CACHE": str(tmp_path / "hf")}
    return env


def check_one_line(code, lines, records, needles, detail):
    assert code == 2, detail
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert records == []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_no_record(case, tmp_path, capsys, monkeypatch):
    make_args, env, needles = CASES[case]
    code, lines, records = run_in_process(make_args(tmp_path), tmp_path, capsys, monkeypatch, case_env(env, tmp_path))
    check_one_line(code, lines, records, needles, lines)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_no_record_from_a_fresh_interpreter(case, tmp_path):
    make_args, env, needles = CASES[case]
    proc, lines, records = run_cli(make_args(tmp_path), tmp_path, case_env(env, tmp_path))
    check_one_line(proc.returncode, lines, records, needles, proc.stderr[-3000:])
