"""The Hydra app: run one pruning cell, or a sweep with ``-m`` (``pruning-lab run``, ``python run.py``).

conf/ is the repository's top-level config directory in a source checkout and ships inside the wheel as
``pruning_lab/conf`` (pyproject.toml maps it there), so an installed package runs from any directory.

One error path: every user mistake ends as one ``error:`` line on stderr and exit status 2, with nothing written;
Ctrl-C as one ``interrupted`` line and exit status 130; a programming error keeps its full traceback. The command line
is checked before Hydra's app starts and before torch is imported (``check_command``): group names, removed keys,
Hydra's own composition (an unknown key, a bad override), and the typed schema (experiments/schema.py) of every cell
the command would run, so a typo costs a fraction of a second, not a model load.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from experiments.errors import ConfigError, PruningError, one_line

# A sweep larger than this is checked on a cover of its grid (the first cell and every value of every swept key),
# not cell by cell: composing costs ~0.1 s a cell, and a combination only some cells have is still refused by the
# cell's own check phase (that cell fails, the others run).
MAX_CHECKED_CELLS = 64


def conf_dir() -> Path:
    """conf/ of this install: inside the package (wheel) or beside it (source checkout, editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"no conf/config.yaml in {here} or {here.parent}: a broken install of pruning-lab")


CONF = conf_dir()


def task(cfg) -> float | None:
    """One cell: the Hydra task function (``main`` wraps it in ``@hydra.main``). A user mistake is one ``error:``
    line and exit status 2; in a sweep it fails that cell only, and the sweep's summary (experiments/sweeps.py)
    lists every cell's outcome at the end."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments.cell import run_cell  # torch: here, so `run --help` answers at once
    from pruning.errors import RecordNotSaved

    hc = HydraConfig.get()
    study = "AdaPrunerSweeper" in str(hc.sweeper.get("_target_", ""))
    sweep = hc.mode == RunMode.MULTIRUN and not study
    from experiments.sweeps import heartbeat

    try:
        with heartbeat(hc.runtime.output_dir):
            record = run_cell(cfg, run_dir=hc.runtime.output_dir)
    except PruningError as e:
        if isinstance(e, RecordNotSaved):  # the cell finished: its numbers first, then where they were saved
            print_record(e.record)
        print(f"error: {one_line(e)}", file=sys.stderr)
        if study:  # a study's trial: the study records it PRUNED (infeasible calibration) or FAIL, and goes on
            raise
        if sweep:  # one impossible cell of a sweep writes no record; the other cells still run
            from experiments.sweeps import write_outcome

            write_outcome("failed", f"error: {one_line(e)}")
            return None
        sys.exit(2)
    except Exception as e:
        if not sweep:
            raise  # a programming error keeps its traceback
        import traceback

        from experiments.sweeps import write_outcome

        traceback.print_exc()  # the traceback, and the sweep goes on to its other cells and its summary
        write_outcome("failed", f"crashed: {type(e).__name__}: {one_line(e)} (traceback above)", crashed=True)
        return None
    print_record(record)
    if sweep:
        from experiments.sweeps import write_outcome

        write_outcome("skipped" if record.get("_skipped") else "done", f"record {record['_store_path']}")
    first = next(iter(record["metrics"].get("ppl", {}).values()), None)
    return None if first is None else float(first["ppl"])


def print_record(record: dict) -> None:
    """The result table of a cell (PPL, zero-shot, efficiency blocks) and where its record is."""
    import pandas as pd

    from experiments.cell import one_line_table

    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(one_line_table(record).to_string(index=False))
        metrics = record["metrics"]
        if "zeroshot" in metrics:
            from pruning.eval.zeroshot import zeroshot_table

            print(zeroshot_table(metrics["zeroshot"], metrics.get("dense_zeroshot")).to_string(index=False))
        if "efficiency" in metrics:
            from pruning.eval.efficiency import efficiency_table

            print(efficiency_table(metrics["efficiency"], metrics.get("dense_efficiency")).to_string(index=False))
    if record.get("_unsaved"):
        return  # the error line that follows says where the record went
    print(
        f"record: {record['_store_path']}"
        + ("  (already complete: skipped; force=true recomputes)" if record.get("_skipped") else "")
    )


def main() -> None:
    """The Hydra app on ``sys.argv`` (``@hydra.main`` applied here, so importing this module does not load Hydra)."""
    import hydra

    import experiments.paper_ratios  # noqa: F401  (registers the ${paper_knob:...} config resolver)

    hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(task)()


# ------------------------------------------------------------------------------------------------- the checks


def check_group_choices(argv: list[str]) -> None:
    """One line for an unknown ``group=name`` (Hydra's own message spans a dozen lines and a search path), or for a
    key an older config layout had (e.g. ``allocation=layer_range``), naming the key that replaced it. No Hydra
    import: the cheapest check runs first."""
    from experiments.migrate import moved_override  # torch-free

    for arg in argv:
        moved = moved_override(arg)
        if moved:
            raise ConfigError(moved)
        key, sep, value = arg.lstrip("+~").partition("=")
        group_dir = CONF / key
        if not sep or "/" in key or "(" in value or not group_dir.is_dir() or key.startswith("hydra"):
            continue
        for name in value.split(","):
            name = name.strip()
            if name and not (group_dir / f"{name}.yaml").is_file():
                choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
                near = difflib.get_close_matches(name, choices, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ConfigError(f"unknown {key} {name!r}{hint}; choices: {', '.join(choices)}")


def check_keys(argv: list[str]) -> None:
    """Each override's key against the schema (``experiments.schema.check_key``), before Hydra is imported: a typo in
    a key is one line in a fraction of a second. Group choices, ``hydra`` keys and Hydra's flags are not keys of the
    schema."""
    from experiments.schema import check_key

    for arg in argv:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if not sep or arg.startswith("-") or key.startswith("hydra") or "/" in key or "@" in key:
            continue
        if (CONF / key).is_dir() or "(" in key or "[" in key:
            continue
        check_key(key)


def check_command(argv: list[str]) -> None:
    """Compose every cell the command would run and check it against the schema, before Hydra's app and torch.
    Hydra's own flags (``--help``, ``--cfg``, ``-cd``, ...) are left to Hydra."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return
    from experiments.schema import validate

    multirun = any(a in ("-m", "--multirun") for a in argv)
    cells = list(compose_cells([a for a in argv if a not in ("-m", "--multirun")], multirun))
    for job, cfg in cells:
        try:
            validate(cfg)
        except ConfigError as e:
            swept = [o for o in job if o not in argv]  # the cell's own values, not the command's fixed ones
            where = f" (sweep cell: {' '.join(swept)})" if len(cells) > 1 and swept else ""
            raise ConfigError(f"{e}{where}") from None


def compose_cells(overrides: list[str], multirun: bool) -> Iterator[tuple[list[str], object]]:
    """(the cell's overrides, its composed config) for the one cell of a run, or for the cells of a sweep: the grid
    Hydra's basic sweeper would launch (the preset's ``hydra.sweeper.params`` and the command line's sweeps), all of
    it up to ``MAX_CHECKED_CELLS``, else a cover of it; a study sweeper's (AdaPruner) first point only."""
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import experiments.paper_ratios  # noqa: F401  (registers the ${paper_knob:...} config resolver; torch-free)

    parser = OverridesParser.create()
    with hydra_errors(overrides):
        parsed = parser.parse_overrides(overrides)
    with initialize_config_dir(str(CONF), version_base="1.3", job_name="run"):
        if not multirun:
            yield overrides, compose_cell(overrides)
            return
        first = [first_value(o) for o in parsed if not (o.is_sweep_override() and not o.is_discrete_sweep())]
        base = compose_cell(first, hydra=True)
        sweeper = base.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            yield first, compose_cell(first)
            return
        fixed = [o.input_line for o in parsed if o.is_hydra_override()]
        preset = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        with hydra_errors(preset):
            # hydra types Override.input_line Optional; parse_overrides always sets it
            grid = sweep_grid(parser.parse_overrides([*preset, *(o.input_line for o in parsed)]))  # type: ignore[list-item]
        for job in grid_cells(grid):
            yield job, compose_cell([*fixed, *job])  # type: ignore[list-item]  # input_line, as above


def first_value(o) -> str:
    if o.is_sweep_override():
        return f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
    return o.input_line


def sweep_grid(parsed) -> list[list[str]]:
    """Per key, the overrides of its values, as Hydra's BasicSweeper.split_arguments orders them (a key on the
    command line replaces the preset's)."""
    lists: dict[str, list[str]] = {}
    for o in parsed:
        if o.is_hydra_override():
            continue
        key = o.get_key_element()
        if o.is_sweep_override():
            lists[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            lists[key] = [f"{key}={o.get_value_element_as_str()}"] if not o.is_delete() else [o.input_line]
    return list(lists.values())


def grid_cells(grid: list[list[str]]) -> list[list[str]]:
    """Every cell of the grid, or past MAX_CHECKED_CELLS the first cell and each value of each key with the others at
    their first value."""
    n = 1
    for values in grid:
        n *= len(values)
    if n <= MAX_CHECKED_CELLS:
        return [list(cell) for cell in itertools.product(*grid)]
    first = [values[0] for values in grid]
    cover = [first]
    for i, values in enumerate(grid):
        cover += [[*first[:i], v, *first[i + 1 :]] for v in values[1:]]
    return cover


def compose_cell(overrides: list[str], hydra: bool = False):
    """The composed config of one cell. A value override is applied as ``++key=value`` (set, or add when missing): the
    same config for every key the config has, and a key it lacks reaches the schema, whose one line names the keys
    its parent does have (Hydra would stop at "not in struct", and a second composition would cost ~0.2 s)."""
    from hydra import compose

    with hydra_errors(overrides):
        return compose("config", overrides=[forced(o) for o in overrides], return_hydra_config=hydra)


def forced(arg: str) -> str:
    """``key=value`` as ``++key=value`` for a config value (not a group choice, a ``hydra`` key, a ``+``/``~`` one)."""
    key, sep, _ = arg.partition("=")
    if not sep or arg.startswith(("+", "~")) or key.startswith("hydra") or "/" in key or "@" in key:
        return arg
    return arg if (CONF / key).is_dir() else f"++{arg}"


@contextmanager
def hydra_errors(overrides: list[str]):
    """Hydra's composition and override-parsing errors as one ``ConfigError`` line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        msg = composition_error(e, overrides)
        for o in overrides:  # as the user wrote them (compose_cell forces value overrides)
            msg = msg.replace(forced(o), o) if forced(o) != o else msg
        raise ConfigError(msg) from None


def composition_error(e: BaseException, overrides: list[str]) -> str:
    """One line for Hydra's message: an unknown key names the keys its parent has; the rest keeps Hydra's own words
    (its first lines), without the object types and the link."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if key and "not in struct" in str(cause):
        return unknown_key(str(key), overrides)
    text = str(e)
    already = re.search(r"An item is already at '([^']+)'", text)
    if already:
        return f"{already[1]} already exists: set it without the leading + ({already[1]}=...)"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        return f"unknown {group} {name!r}; choices: {', '.join(sorted(e.options))}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {one_line(e)}"
    lines = [
        line.strip()
        for line in [*text.splitlines(), *str(cause or "").splitlines()]
        if line.strip() and not line.strip().startswith(("full_key:", "object_type", "See https", "Set the env"))
    ]
    return "; ".join(dict.fromkeys(lines)) or type(e).__name__


def unknown_key(key: str, overrides: list[str]) -> str:
    """``key`` is in no config: the keys its parent does have (composed without the override), and a near match."""
    from hydra import compose
    from omegaconf import DictConfig

    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] not in (key, *prefixes(key))]
    try:
        node = compose("config", overrides=rest)
    except Exception:  # noqa: BLE001 - the names are a hint; the key itself is the message
        return f"unknown key {key}"
    parts = key.split(".")
    path: list[str] = []
    for part in parts:
        child = node.get(part) if isinstance(node, DictConfig) else None
        if not isinstance(child, DictConfig) or part == parts[-1]:
            if isinstance(node, DictConfig) and part in node:  # the parent is a value, not a group of keys
                return f"unknown key {key}: {'.'.join([*path, part])} has no keys"
            break
        node, path = child, [*path, part]
    valid = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
    bad = ".".join([*path, parts[len(path)]])
    where = ".".join(path) or "the top level"
    if path == ["method"] and isinstance(node, DictConfig) and node.get("_target_"):
        where = f"method {str(node.get('_target_')).rsplit('.', 1)[-1]}"
    near = difflib.get_close_matches(parts[len(path)], valid, n=1)
    hint = f" (did you mean {'.'.join([*path, near[0]])}?)" if near else ""
    return f"unknown key {bad}: {where} has {', '.join(valid) or 'no keys'}{hint}"


def prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@contextmanager
def full_errors():
    """Hydra prints an exception itself (a shortened traceback) unless HYDRA_FULL_ERROR is set; with it set, the
    exception reaches ``cli``, which prints a user mistake as one line and lets anything else keep its traceback."""
    old = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = old


def reader_gone() -> None:
    """The reader of stdout went away (``run.py --help | head``): exit like a shell tool, without a traceback.
    stdout is pointed at /dev/null first, so the interpreter's final flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)  # 128 + SIGPIPE


def cli(argv: list[str], prog: str = "pruning-lab run") -> None:
    """Check the command (torch-free), then run Hydra's app; Hydra parses ``sys.argv`` itself, so the arguments are
    put there. Exit status: 2 for a user mistake (one ``error:`` line), 130 for Ctrl-C (one ``interrupted`` line)."""
    try:
        check_group_choices(argv)
        check_keys(argv)
        check_command(argv)
        sys.argv = [prog, *argv]
        with full_errors():
            try:
                main()
            except Exception as e:  # Hydra's own composition of what check_command left to it (e.g. with --cfg)
                from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

                if isinstance(e, (ConfigCompositionException, MissingConfigException, OverrideParseException)):
                    raise ConfigError(composition_error(e, argv)) from None
                raise
    except PruningError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        reader_gone()
