"""The Hydra app: run one pruning cell, or a sweep with ``-m`` (``pruning-lab run``, ``python run.py``).

conf/ is the repository's top-level config directory in a source checkout and ships inside the wheel as
``pruning_lab/conf`` (pyproject.toml maps it there), so an installed package runs from any directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import experiments.paper_ratios  # noqa: F401  (registers the ${paper_knob:...} config resolver; torch-free)


def conf_dir() -> Path:
    """conf/ of this install: inside the package (wheel) or beside it (source checkout, editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"no conf/config.yaml in {here} or {here.parent}: a broken install of pruning-lab")


CONF = conf_dir()


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One cell. A user mistake is one ``error:`` line and exit status 2; in a sweep it fails that cell only, and
    the sweep's summary (experiments/sweeps.py) lists every cell's outcome at the end."""
    from experiments.cell import run_cell  # torch: here, so `run --help` answers at once
    from pruning.errors import PruningError, RecordNotSaved

    hc = HydraConfig.get()
    study = "AdaPrunerSweeper" in str(hc.sweeper.get("_target_", ""))
    sweep = hc.mode == RunMode.MULTIRUN and not study
    try:
        record = run_cell(cfg, run_dir=hc.runtime.output_dir)
    except PruningError as e:
        if isinstance(e, RecordNotSaved):  # the cell finished: its numbers first, then where they were saved
            print_record(e.record)
        print(f"error: {e}", file=sys.stderr)
        if study:  # a study's trial: the study records it PRUNED (infeasible calibration) or FAIL, and goes on
            raise
        if sweep:  # one impossible cell of a sweep writes no record; the other cells still run
            from experiments.sweeps import write_outcome

            write_outcome("failed", f"error: {e}")
            return None
        sys.exit(2)
    except Exception as e:
        if not sweep:
            raise  # a programming error keeps its traceback
        import traceback

        from experiments.sweeps import write_outcome
        from pruning.errors import one_line

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


def check_group_choices(argv: list[str]) -> None:
    """One line for an unknown ``group=name`` (Hydra's own message spans a dozen lines and a search path), or for a
    key an older config layout had (e.g. ``allocation=layer_range``), naming the key that replaced it."""
    from experiments.migrate import moved_override  # torch-free

    for arg in argv:
        moved = moved_override(arg)
        if moved:
            print(f"error: {moved}", file=sys.stderr)
            sys.exit(2)
        key, sep, value = arg.lstrip("+~").partition("=")
        group_dir = CONF / key
        if not sep or "/" in key or "(" in value or not group_dir.is_dir() or key.startswith("hydra"):
            continue
        for name in value.split(","):
            name = name.strip()
            if name and not (group_dir / f"{name}.yaml").is_file():
                choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
                print(f"error: unknown {key} {name!r}; choices: {', '.join(choices)}", file=sys.stderr)
                sys.exit(2)


def cli(argv: list[str], prog: str = "pruning-lab run") -> None:
    """Hydra parses ``sys.argv`` itself, so the arguments are put there."""
    check_group_choices(argv)
    sys.argv = [prog, *argv]
    main()
