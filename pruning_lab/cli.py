"""``pruning-lab <command> [args]``: one command for every tool of the lab.

Tiny and lazy on purpose: a command's module is imported only when that command runs, so ``pruning-lab --help``
and a mistyped command answer at once, without importing torch. Each command keeps its own ``--help``.
"""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

PROG = "pruning-lab"

# name -> ("module:function", one line for --help). Every function takes the arguments after the command name and
# returns an exit code (or None for 0). A new command is one line here (issue 25's `dashboard`, for one).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pruning_lab.run:cli", "prune and evaluate one cell, or sweep with -m (the Hydra app of run.py)"),
    "results": ("experiments.store:main", "show the results store as a table"),
    "tables": ("experiments.tables:main", "render the paper tables from the results store"),
    "report": ("experiments.report:main", "write the static HTML report of a results store"),
    "dashboard": ("experiments.dashboard:main", "build (or --serve) the interactive HTML dashboard of a results store"),
    "fetch": ("pruning.models.fetch:main", "download, verify and convert a model the data root cannot hold"),
    "convert": ("pruning.models.convert:main", "convert a GGUF checkpoint into a Hugging Face checkpoint"),
    "bench": ("pruning_lab.cli:bench", "run the efficiency benchmarks (needs a source checkout)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [args]   ({PROG} <command> --help for a command's own options)",
        "",
        "Structured pruning of LLaMA-family LLMs: published methods, physical surgery, honest evaluation.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this message", "  --version   print the installed version"]
    return "\n".join(lines)


def bench(argv: list[str]) -> int:
    """benchmarks/ measures a checkout against its results/ folder, so it does not ship in the wheel."""
    spec = find_spec("pruning")  # locates the package without importing it (and torch)
    root = Path(spec.origin).resolve().parents[1] if spec and spec.origin else None
    if root is None or not (root / "benchmarks" / "__main__.py").is_file():
        print(
            f"error: {PROG} bench needs a source checkout (benchmarks/ is not part of the installed package); "
            f"run it from a clone with an editable install (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"{PROG} {version('pruning-lab')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"{PROG}: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[name][0].partition(":")
    sys.argv = [f"{PROG} {name}", *rest]  # argparse's prog and Hydra's argv, as the user typed them
    try:
        code = getattr(import_module(module), function)(rest)
    except BrokenPipeError:
        from pruning_lab.run import reader_gone

        reader_gone()
    return code if isinstance(code, int) else 0
