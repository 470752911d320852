"""The `pruning-lab` dispatch: --help lists every command, each command answers its own --help, a typo is one line
with exit 2, and neither --help nor a typo imports torch (the dispatch stays lazy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

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
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_typo_and_no_command_without_importing_torch():
    help_, typo, bare = probe(["--help"], ["tabels", "--all"], [])
    assert help_["code"] == 0 and help_["err"] == ""
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in help_["out"].splitlines()
              if line.startswith("  ") and not line.lstrip().startswith("-")}
    assert listed == {name: about for name, (_, about) in COMMANDS.items()}
    assert set(COMMANDS) >= {"run", "results", "tables", "report", "fetch", "convert", "bench"}

    assert typo["code"] == 2 and typo["out"] == ""
    lines = typo["err"].strip().splitlines()
    assert len(lines) == 1 and "unknown command 'tabels'" in lines[0] and "did you mean 'tables'" in lines[0]
    assert bare["code"] == 2 and "commands:" in bare["err"]             # no command: the usage, on stderr
    assert not bare["torch"]                                            # after all three


def test_every_command_answers_its_own_help(capsys, monkeypatch):
    """In this process (torch is loaded already, so only each command's own module is imported)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))                    # main() sets sys.argv for argparse
    for name in COMMANDS:
        if name == "run":
            continue                                                    # Hydra's help: below
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: pruning-lab {name}"), (name, out[:300])


@pytest.fixture
def hydra_cleared():
    yield
    GlobalHydra.instance().clear()


def test_run_passes_hydra_arguments_through(capsys, hydra_cleared, monkeypatch):
    """`pruning-lab run` is the Hydra app of run.py: its --help lists the config groups of conf/, and a bad group
    value is refused in one line before any work."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))                    # cli() sets sys.argv for Hydra
    with pytest.raises(SystemExit) as exit_:
        run.cli(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "run is powered by Hydra" in out and "stories260k" in out
    assert run.CONF == REPO / "conf"                                    # a checkout reads its own conf/
    with pytest.raises(SystemExit) as exit_:
        run.cli(["method=magnitud"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "unknown method 'magnitud'" in err
