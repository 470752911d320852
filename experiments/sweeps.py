"""What each cell of a sweep (``python run.py -m ...``) ended as, and one summary at the end of the sweep.

Why files: a cell runs in whatever process its launcher gives it (the driver for the basic launcher, a joblib
worker, a SLURM job), so the driver cannot see its outcome in memory, and a failed cell must not stop the others
(run.py returns instead of raising). Each cell therefore writes its outcome (done, skipped as a store hit, failed
with the reason) as a small JSON file under ``<hydra.sweep.dir>/.cell_outcomes/``; the Hydra callback
``SweepSummary`` (``hydra.callbacks.sweep_summary`` in conf/config.yaml) clears them when a sweep starts, and when
it ends prints one line per cell and exits non-zero if any cell failed: 2 when every failure was a user mistake
(a ``PruningError``), 1 when a cell crashed.

An AdaPruner study (``hydra/sweeper=AdaPrunerSweeper``) is left alone: its trials' errors are PRUNED or FAIL states
of the study, which prints its own history and final cell.

Torch-free: Hydra instantiates the callback in every process, before any cell runs.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.fileio import atomic_write

OUTCOMES_DIR = ".cell_outcomes"
STATUSES = ("done", "skipped", "failed")
HEARTBEAT = "heartbeat"  # touched every HEARTBEAT_SECONDS in a running cell's job directory
HEARTBEAT_SECONDS = 30.0


@contextmanager
def heartbeat(job_dir: str | Path, every: float = HEARTBEAT_SECONDS) -> Iterator[Path]:
    """Touch ``<job_dir>/heartbeat`` while the cell runs: a progress view (the dashboard's) then tells a cell in a
    long silent phase (Search-LLM's search with progress=false) from one whose process is gone. Removed at the end."""
    path = Path(job_dir) / HEARTBEAT
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                path.touch()
            except OSError:  # the job directory went away: nothing to tell
                return
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name="cell-heartbeat", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def is_study(config: DictConfig) -> bool:
    """True for an AdaPruner study: its sweeper owns the trials' outcomes."""
    return "AdaPrunerSweeper" in str(config.hydra.sweeper.get("_target_", ""))


def outcomes_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / OUTCOMES_DIR


def write_outcome(status: str, detail: str, crashed: bool = False) -> None:
    """Record how this sweep cell ended (called by run.py's task function inside a multirun job)."""
    from hydra.core.hydra_config import HydraConfig

    assert status in STATUSES, status
    hc = HydraConfig.get()
    directory = Path(str(hc.sweep.dir)) / OUTCOMES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    num = int(hc.job.num)
    outcome = {"num": num, "status": status, "detail": detail, "crashed": crashed, "overrides": list(hc.overrides.task)}
    atomic_write(directory / f"{num}.json", json.dumps(outcome) + "\n")


def read_outcomes(directory: Path) -> list[dict]:
    out = []
    for path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda o: o["num"])


def varying(outcomes: list[dict]) -> list[list[str]]:
    """Each cell's overrides that differ between cells (what identifies it in the sweep); all of them when the
    sweep has one cell."""
    if len(outcomes) < 2:
        return [o["overrides"] for o in outcomes]
    shared = set.intersection(*(set(o["overrides"]) for o in outcomes))
    return [[x for x in o["overrides"] if x not in shared] for o in outcomes]


def summary_lines(outcomes: list[dict], where: str) -> list[str]:
    """The summary: a header, then one line per cell."""
    counts = {s: sum(o["status"] == s for o in outcomes) for s in STATUSES}
    header = (
        f"sweep summary ({where}): {len(outcomes)} cells: {counts['done']} done, "
        f"{counts['skipped']} skipped (already in the store), {counts['failed']} failed"
    )
    lines = [header]
    for o, ident in zip(outcomes, varying(outcomes)):
        label = "FAILED" if o["status"] == "failed" else o["status"]
        lines.append(f"  #{o['num']:<3} {label:<8} {' '.join(ident) or '(no overrides)'}: {o['detail']}")
    return lines


class SweepSummary(Callback):
    """Hydra callback: clear the outcome files when a sweep starts; print the summary and set the exit status when
    it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_study(config):
            return
        for path in outcomes_dir(config).glob("*.json"):
            path.unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A cell that raised past run.py (which records its own outcomes) still appears as failed."""
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN or is_study(config) or job_return.status != JobStatus.FAILED:
            return
        path = outcomes_dir(config) / f"{config.hydra.job.num}.json"
        if not path.is_file():
            e = job_return._return_value
            write_outcome("failed", f"{type(e).__name__}: {e}", crashed=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if is_study(config):
            return
        outcomes = read_outcomes(outcomes_dir(config))
        print("\n".join(summary_lines(outcomes, str(config.hydra.sweep.dir))), flush=True)
        failed = [o for o in outcomes if o["status"] == "failed"]
        if failed:
            print(f"error: {len(failed)} of {len(outcomes)} sweep cells failed (listed above)", file=sys.stderr)
            sys.exit(1 if any(o["crashed"] for o in failed) else 2)
