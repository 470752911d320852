"""The documentation stays true to the code: every link of the README resolves, every ``python run.py`` command shown
in the README and in docs/ composes and passes the cell's config-time checks, and the site builds with
``mkdocs build --strict`` (broken links, anchors, pages left out of the nav, API modules that do not resolve).

The command check runs what ``experiments.cell.run_cell`` runs before it loads anything (the typed schema, eval
protocol, method, operating point, calibration, recovery), so a documented option that was renamed or now needs
``pruning.ratio=null`` fails here instead of in a reader's terminal. Sweeps (``-m``) are checked at the first value of
every swept key, the preset's own ``hydra.sweeper.params`` included.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|/path/")


def bash_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash block, backslash continuations joined."""
    blocks, current, lang = [], None, None
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and current is None:
            lang, current = m.group(1), []
        elif m:
            if lang == "bash":
                blocks.append(current)
            current = None
        elif current is not None:
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1] + " " + line.strip()
            else:
                current.append(line.strip())
    return blocks


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after run.py) for every ``python run.py`` line; shell variables set in the same block expand."""
    found = []
    for page in PAGES:
        for block in bash_blocks(page.read_text()):
            env = {}
            for line in block:
                if PLACEHOLDER.search(line.split("#", 1)[0]):
                    continue
                tokens = shlex.split(line, comments=True)
                assignment = re.fullmatch(r"(\w+)=(.*)", line.split("#", 1)[0].strip())
                if assignment and len(tokens) == 1:
                    env[assignment.group(1)] = tokens[0].split("=", 1)[1]
                    continue
                tokens = [env.get(t[1:], t) if t.startswith("$") else t for t in tokens]
                if tokens[:2] in (["python", "run.py"], [".venv/bin/python", "run.py"]) and tokens[2:] not in [
                    argv for _, argv in found
                ]:  # the same command on two pages: once
                    found.append((f"{page.relative_to(REPO)}: {' '.join(tokens[2:]) or '(no overrides)'}", tokens[2:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_run_commands():
    """The extraction itself works: the pages show plenty of commands, presets and sweeps among them."""
    assert len(COMMANDS) > 60
    assert any("-m" in argv for _, argv in COMMANDS)
    assert any("experiment=llm_pruner_table1" in argv for _, argv in COMMANDS)


def first_values(overrides: list[str]) -> list[str]:
    """Each sweep override at its first value (``a=1,2`` -> ``a=1``, ``choice(x,y)`` -> ``x``); ranges keep the
    config's default (they cannot be listed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for text in overrides:
        override = parser.parse_override(text)
        if not override.is_sweep_override():
            out.append(text)
            continue
        try:
            first = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval()/range sweeps have no list of values
            continue
        out.append(f"{override.get_key_element()}={first}")
    return out


def compose_documented(argv: list[str]):
    from hydra import compose, initialize_config_dir

    multirun = "-m" in argv or "--multirun" in argv
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    if multirun:
        overrides = first_values(overrides)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        if multirun:  # the preset's own grid, where the command line did not set the key
            given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
            grid = [
                f"{k}={v}"
                for k, v in (cfg.hydra.sweeper.get("params") or {}).items()
                if str(k).lstrip("+~") not in given
            ]
            if grid:
                cfg = compose("config", overrides=overrides + first_values(grid), return_hydra_config=True)
    return cfg


def _first_of_each_page(commands):
    """The fast tier checks each page's first command; the rest (about 75 composes, 7 s) run in the slow tier."""
    seen: set[str] = set()
    out = []
    for where, argv in commands:
        page = where.split(":", 1)[0]
        marks = () if page not in seen else (pytest.mark.slow,)
        seen.add(page)
        out.append(pytest.param(where, argv, id=where, marks=marks))
    return out


@pytest.mark.parametrize("where,argv", _first_of_each_page(COMMANDS))
def test_documented_run_command_passes_the_config_checks(where, argv):
    from omegaconf import open_dict

    from experiments.cell import build_method, check_calibration, operating_point
    from experiments.schema import validate
    from pruning.eval import check_eval
    from pruning.recovery import check_recovery

    cfg = compose_documented(argv)
    typed = cfg.copy()
    with open_dict(typed):
        del typed["hydra"]
    validate(typed)  # the typed schema (torch-free), GPU commands too
    if "cuda" in " ".join(argv):  # a GPU command: this machine can only compose it
        return
    check_eval(cfg.eval)
    method = build_method(cfg)
    operating_point(method, cfg.pruning.ratio, cfg.get("paper_ratio"))
    if method.needs_calibration:
        check_calibration(cfg, method)
    if cfg.recovery.get("name", "none") != "none":
        check_recovery(cfg.recovery)


def readme_links() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]


def test_readme_links_resolve():
    links = readme_links()
    assert len(links) > 10
    missing = [t for t in links if not (REPO / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_is_a_short_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) < 150


def test_install_commands_agree():
    """The docs' install snippet and the README show the same two set-up commands (swap both together)."""
    readme = [line for block in bash_blocks((REPO / "README.md").read_text()) for line in block]
    snippet = [line for block in bash_blocks((REPO / "docs/_snippets/install.md").read_text()) for line in block]
    assert len(snippet) == 2 and all(line in readme for line in snippet)


@pytest.mark.slow  # a mkdocs subprocess (.ci/run also runs mkdocs build --strict as a static check)
@pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_site_builds_strict(tmp_path):
    """mkdocs build --strict: every warning (broken link or anchor, page outside the nav, unresolved API module,
    missing snippet) fails the build. About 5 s."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "methods" / "flap" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "ratio_sweep" / "index.html").is_file()
    api = (tmp_path / "site" / "reference" / "pruning.methods" / "index.html").read_text()
    assert "ScoreAndAllocate" in api


def test_readme_table_is_the_committed_summary():
    """The README's one table is the SmolLM2 block of results/ratio_sweep_summary.md (scripts/readme_table.py)."""
    proc = subprocess.run([sys.executable, "scripts/readme_table.py", "--check"], cwd=REPO)
    assert proc.returncode == 0, "README.md's table differs from ratio_sweep_summary.md: run scripts/readme_table.py"
