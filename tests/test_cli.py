"""The `pruning-lab` dispatch: --help lists every command, each command answers its own --help, a typo is one line
with exit 2, and neither --help nor a typo imports torch (the dispatch stays lazy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pruning_lab import run
from pruning_lab.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]

# Runs the dispatch on each argv in a fresh interpreter and reports what it printed and whether torch got imported,
# so laziness is measured, not assumed.
PROBE = """
import contextlib, io, json, sys
from pruning_lab.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def probe(*argvs: list[str]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_typos_and_run_help_without_importing_torch():
    help_, typo, bare, run_help, run_typo, key_typo, bad_value = probe(
        ["--help"],
        ["tabels", "--all"],
        [],
        ["run", "--help"],
        ["run", "method=magnitud"],
        ["run", "+pruning.ratoi=0.5"],  # a key: the schema alone, before Hydra
        ["run", "method=magnitude", "method.structures=mlp"],  # a value: Hydra composes, the schema refuses
    )
    assert help_["code"] == 0 and help_["err"] == ""
    listed = {
        line.split()[0]: " ".join(line.split()[1:])
        for line in help_["out"].splitlines()
        if line.startswith("  ") and not line.lstrip().startswith("-")
    }
    assert listed == {name: about for name, (_, about) in COMMANDS.items()}
    assert set(COMMANDS) >= {"run", "results", "tables", "report", "fetch", "convert", "bench"}

    assert typo["code"] == 2 and typo["out"] == ""
    lines = typo["err"].strip().splitlines()
    assert len(lines) == 1 and "unknown command 'tabels'" in lines[0] and "did you mean 'tables'" in lines[0]
    assert bare["code"] == 2 and "commands:" in bare["err"]  # no command: the usage, on stderr

    # `run` is the Hydra app of run.py: its help lists conf/'s groups; a bad group value is one line, exit 2
    assert run_help["code"] == 0 and "run is powered by Hydra" in run_help["out"]
    assert "stories260k" in run_help["out"]
    assert run_typo["code"] == 2 and run_typo["out"] == "" and len(run_typo["err"].strip().splitlines()) == 1
    assert "unknown method 'magnitud'" in run_typo["err"]
    for mistake, words in ((key_typo, "unknown key pruning.ratoi"), (bad_value, "method.structures='mlp'")):
        assert mistake["code"] == 2 and mistake["out"] == "", mistake
        assert mistake["err"].startswith(f"error: {words}") and len(mistake["err"].strip().splitlines()) == 1
    assert not bad_value["torch"]  # after all seven


def test_every_command_answers_its_own_help(capsys, monkeypatch):
    """In this process (torch is loaded already, so only each command's own module is imported)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for argparse
    for name in COMMANDS:
        if name == "run":
            continue  # Hydra's help: in the probe above
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: pruning-lab {name}"), (name, out[:300])


def test_a_checkout_reads_its_own_conf():
    assert run.CONF == REPO / "conf"
