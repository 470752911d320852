"""AdaPruner studies (METHODS.md §3.10): resume, final cell, history plot.

Hydra's optuna sweeper asks, launches and tells the trials; each trial is an ordinary store cell
(``method=adapruner eval=adapruner_objective`` + the sampled calibration/importance/aggregation). This module is the
Hydra callback ``hydra.callbacks.adapruner`` of ``conf/experiment/adapruner.yaml``:

- ``on_multirun_start`` (driver, before the sweeper exists): the stock sweeper runs ``n_trials`` *new* trials per
  invocation. We lower its ``n_trials`` to the finished trials (COMPLETE or FAIL) still missing in the sqlite study,
  so re-running an interrupted command finishes the same study and never re-runs a finished trial, and we offset
  the TPE seed by the trials already asked (the same seed would otherwise replay the first random proposals).
  A trial left RUNNING by a killed
  driver becomes COMPLETE if its cell reached the store (the sweeper tells a batch only when all of it ran), else it
  stays RUNNING, does not count, and a new trial replaces it.
- A shape the calibration data cannot fill (alpaca has 90 records of >= 256 tokens, so 128 x 256 is impossible) is a
  COMPLETE trial with objective +inf (run.py returns it for InfeasibleCalibrationError): TPE ignores FAIL trials and,
  its marginals being good, kept proposing that corner; +inf teaches it to avoid it.
- ``on_multirun_end`` (driver): argmin of the objective over COMPLETE trials, then that configuration as an ordinary
  cell with the final eval (and optional recovery) through ``run_cell``, in the driver process whatever the launcher
  (under ``slurm_local`` the trials are SLURM jobs, the final cell is not). The study's history goes into the final
  record (``record["study"]``), which is what the HTML report plots.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from pruning.errors import PruningError

log = logging.getLogger(__name__)

SEARCH_KEYS = ("calibration.dataset", "calibration.n_samples", "calibration.seq_len", "calibration.seed",
               "method.importance", "method.aggregation")


# --------------------------------------------------------------------------------------------------- the study


def _sqlite_path(storage: str) -> Path | None:
    return Path(storage[len("sqlite:///"):]) if storage.startswith("sqlite:///") else None


def load_study(storage: str, study_name: str):
    """The stored study, or None when the storage has no study of that name yet."""
    import optuna

    path = _sqlite_path(storage)
    if path is not None and not path.is_file():
        return None
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def complete_trials(study) -> list:
    import optuna

    return [] if study is None else study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def finished_trials(study) -> list:
    """The trials that count towards n_trials: COMPLETE, PRUNED or FAIL (optuna's ``is_finished``)."""
    return [] if study is None else [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def best_trial(study):
    """argmin of the objective over COMPLETE trials (ties: the earlier trial); None if none has a finite value."""
    done = [t for t in complete_trials(study) if t.value is not None and math.isfinite(t.value)]
    return min(done, key=lambda t: (t.value, t.number)) if done else None


# Command-line overrides of these groups shape the trials (e.g. a shorter objective), not the final cell, whose
# eval/recovery come from the callback's own settings; hydra.* never changes a cell.
TRIAL_ONLY = ("eval", "recovery", "hydra")


def _value_overrides(task_overrides: list[str], drop: set[str], trial_only: bool = False) -> list[str]:
    """Command-line overrides without sweep syntax and without the keys a trial sets itself (``trial_only``:
    also without the TRIAL_ONLY groups)."""
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(task_overrides):
        key = o.get_key_element()
        if o.is_sweep_override() or key in drop or (trial_only and re.split(r"[./]", key)[0] in TRIAL_ONLY):
            continue
        out.append(o.input_line)
    return out


def trial_config(config_name: str, task_overrides: list[str], params: dict) -> DictConfig:
    """The cell a trial with ``params`` runs: the command line's value overrides plus the sampled values."""
    from hydra import compose

    return compose(config_name=config_name, overrides=[*_value_overrides(task_overrides, set(params)),
                                                      *(f"{k}={v}" for k, v in params.items())])


def trial_record(cfg: DictConfig) -> dict | None:
    """The store's complete record of a trial's cell, if any (what run.py would return as a store hit)."""
    from experiments.cell import cell_config
    from experiments.record import config_hash
    from experiments.store import ResultsStore

    store = ResultsStore(cfg.store.dir) if cfg.store.dir else ResultsStore()
    return store.get(config_hash(cell_config(cfg)))


def _search_values(config: DictConfig, key: str) -> list[Any]:
    """Every value ``key`` can take in this study (sweeper params and command line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    lines += list(config.hydra.overrides.task)
    out: list[Any] = []
    for o in OverridesParser.create().parse_overrides(lines):
        if o.get_key_element() == key:
            out += list(o.sweep_string_iterator()) if o.is_choice_sweep() else [o.value()]
    return out


class AdaPrunerStudy(Callback):
    """``eval`` / ``recovery``: the final cell's presets; ``overrides``: more overrides for the final cell only."""

    def __init__(self, eval: str = "ppl128", recovery: str = "none", overrides: list[str] | None = None,
                 run_final: bool = True) -> None:
        self.eval, self.recovery = eval, recovery
        self.overrides = list(overrides or [])
        self.run_final = run_final
        self.base_seed: int | None = None
        self.n_trials: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pruning.eval.perplexity import protocols_from_cfg
        from pruning.methods.adapruner import OVERLAPS_OBJECTIVE

        sw = config.hydra.sweeper
        if "optuna" not in str(sw.get("_target_", "")):
            raise PruningError("the adapruner study needs hydra/sweeper=optuna (conf/experiment/adapruner.yaml)")
        storage, name = sw.storage, sw.study_name
        if not storage or not name:
            raise PruningError("the adapruner study needs hydra.sweeper.storage (sqlite:///...) and study_name, "
                               "so that it can resume")
        bad = sorted({str(v) for v in _search_values(config, "calibration.dataset")} & set(OVERLAPS_OBJECTIVE))
        if bad:   # every trial would be refused; say so once, before anything runs
            raise PruningError(f"calibration.dataset {bad} overlaps the objective documents; use "
                               f"{OVERLAPS_OBJECTIVE[bad[0]]}")
        texts = {(p.dataset, p.split) for p in protocols_from_cfg(config.eval.get("ppl", []))}
        if texts != {("c4", "heldout")}:   # the objective must never be a test text (invariant 2)
            raise PruningError(f"the study's objective must be the held-out C4 block (eval=adapruner_objective), got "
                               f"{sorted(texts)}; the final cell's eval is hydra.callbacks.adapruner.eval")
        if config.get("recovery") is not None and config.recovery.get("name", "none") != "none":
            raise PruningError("trials are scored without recovery; LoRA on the final cell is "
                               "hydra.callbacks.adapruner.recovery=lora (not recovery=...)")
        path = _sqlite_path(storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # the sweeper writes optimization_results.yaml there even when a finished study launches no job
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        study = load_study(storage, name)
        if study is not None:
            self.recover_interrupted(study, config, kwargs.get("config_name") or "config")
        n_done = len(finished_trials(study))
        n_asked = 0 if study is None else len(study.trials)
        self.n_trials = int(sw.n_trials)
        remaining = max(0, self.n_trials - n_done)
        with read_write(sw), open_dict(sw):
            sw.n_trials = remaining
            if sw.sampler.get("seed") is not None:
                self.base_seed = int(sw.sampler.seed)
                sw.sampler.seed = self.base_seed + n_asked
        log.info(f"AdaPruner study {name!r} ({storage}): {n_done}/{self.n_trials} trials finished, {n_asked} asked "
                 f"before; running {remaining} more")

    @staticmethod
    def recover_interrupted(study, config: DictConfig, config_name: str) -> None:
        """A RUNNING trial left by a killed driver (the sweeper tells a batch only after all of it ran) is COMPLETE
        with the stored value if its cell finished; otherwise it stays RUNNING (a SLURM job may still finish it;
        the next invocation looks again) and is replaced, as it does not count as finished."""
        import optuna

        task = list(config.hydra.overrides.task)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            rec = trial_record(trial_config(config_name, task, t.params)) if t.params else None
            ppl = next(iter(rec["metrics"].get("ppl", {}).values()), None) if rec else None
            if ppl is not None:
                study.tell(t.number, float(ppl["ppl"]))          # exactly what run.py returned for this cell
                log.info(f"trial {t.number} was interrupted after its cell finished: COMPLETE from the store")
            else:
                log.info(f"trial {t.number} was interrupted before its cell finished: left RUNNING, replaced")

    def on_multirun_end(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if not self.run_final:
            return
        sw = config.hydra.sweeper
        study = load_study(sw.storage, sw.study_name)
        best = best_trial(study)
        if best is None:
            raise PruningError(f"AdaPruner study {sw.study_name!r} has no COMPLETE trial with a finite objective; "
                               f"see the trials' logs under {config.hydra.sweep.dir}")
        task = list(config.hydra.overrides.task)
        final_overrides = [*_value_overrides(task, set(best.params), trial_only=True),
                           *(f"{k}={v}" for k, v in best.params.items()),
                           f"eval={self.eval}", f"recovery={self.recovery}", *self.overrides]
        summary = study_summary(study, sw.storage, config_name or "config", task, self.n_trials, self.base_seed)
        summary["final_overrides"] = final_overrides
        log.info(f"AdaPruner best trial #{best.number}: objective {best.value:.4f} with {best.params}")

        from hydra import compose

        from experiments.cell import one_line_table, run_cell
        from experiments.store import ResultsStore

        cfg = compose(config_name=config_name or "config", overrides=final_overrides)
        run_dir = Path(config.hydra.sweep.dir) / "final"
        record = run_cell(cfg, run_dir=run_dir)
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        record["study"] = summary
        path = (ResultsStore(cfg.store.dir) if cfg.store.dir else ResultsStore()).write(record)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "adapruner_study.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        import pandas as pd

        with pd.option_context("display.width", 250, "display.max_columns", 50):
            print(history_table(summary).to_string(index=False))
            print(f"best: trial {best.number}, objective {best.value:.4f}: "
                  + " ".join(f"{k}={v}" for k, v in best.params.items()))
            print(one_line_table(record).to_string(index=False))
        print(f"final record: {path}")


def _iso(when) -> str | None:
    return None if when is None else when.isoformat()


def study_summary(study, storage: str, config_name: str, task_overrides: list[str], n_trials: int | None,
                  seed: int | None) -> dict:
    """The study as plain data: per trial its state, objective, parameters and store cell (config hash)."""
    from experiments.cell import cell_config
    from experiments.record import config_hash
    from pruning.eval import ppl_label
    from pruning.eval.perplexity import protocols_from_cfg

    trials, objective = [], None
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
               "datetime_start": _iso(t.datetime_start), "datetime_complete": _iso(t.datetime_complete),
               "config_hash": None}
        if t.state.name == "COMPLETE":
            cfg = trial_config(config_name, task_overrides, t.params)
            row["config_hash"] = config_hash(cell_config(cfg))
            objective = objective or ppl_label(protocols_from_cfg(cfg.eval.ppl)[0])
        trials.append(row)
    best = best_trial(study)
    return {"name": study.study_name, "storage": storage, "summarised": datetime.now(timezone.utc).isoformat(),
            "direction": "minimize", "objective": objective, "n_trials": n_trials,
            "sampler": {"name": type(study.sampler).__name__, "seed": seed}, "trials": trials,
            "best": None if best is None else next(r for r in trials if r["number"] == best.number)}


# --------------------------------------------------------------------------------------------------- reporting


def history_table(summary: dict):
    """One row per trial with the best objective so far (COMPLETE trials only)."""
    import pandas as pd

    rows, best = [], math.inf
    for t in summary["trials"]:
        if t["state"] == "COMPLETE" and t["value"] is not None:
            best = min(best, t["value"])
        state = "INFEASIBLE" if t["state"] == "COMPLETE" and t["value"] == math.inf else t["state"]
        rows.append({"trial": t["number"], "state": state, "objective": t["value"],
                     "best_so_far": best if math.isfinite(best) else None,
                     **{k.split(".")[-1]: t["params"].get(k) for k in SEARCH_KEYS}})
    return pd.DataFrame(rows)


def study_sections(records) -> list[tuple[str, Any]]:
    """The report's (title, figures function) entries: one section when the store holds a study's final record."""
    if not any(r.get("study") for r in records):
        return []
    return [("AdaPruner optimisation history and best configuration", lambda: study_figures(records))]


def study_figures(records) -> list[tuple[str, str, str]]:
    """Report section: per study, the optimisation history (objective per trial, best-so-far line) from its latest
    final record, and the best configuration with every final cell pruned from it (e.g. without and with LoRA)."""
    from experiments.report import _figure, _png

    studies: dict[str, list] = {}
    for rec in records:
        if rec.get("study"):
            studies.setdefault(rec["study"]["name"], []).append(rec)
    out = []
    for finals in studies.values():
        finals.sort(key=lambda r: (len(r["study"]["trials"]), r["study"].get("summarised") or ""))
        summary = finals[-1]["study"]
        df = history_table(summary)
        ok = df[df["state"] == "COMPLETE"]
        fig = _figure(7.5, 3.6)
        ax = fig.subplots()
        ax.plot(ok["trial"], ok["objective"], "o", color="#1f77b4", label="trial objective")
        ax.step(ok["trial"], ok["best_so_far"], where="post", color="#d62728", label="best so far")
        bad = df[df["state"] != "COMPLETE"]
        for i, (n, state) in enumerate(zip(bad["trial"], bad["state"])):
            label = None if i else "infeasible (+inf) / failed / interrupted"
            ax.axvline(n, color="#999999" if state == "INFEASIBLE" else "#e377c2", lw=0.8, ls=":", label=label)
        ax.set_xlabel("trial")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"PPL {summary.get('objective') or ''}")
        ax.set_title(f"AdaPruner study {summary['name']} ({len(ok)} evaluated of {len(df)} trials)")
        ax.legend(fontsize=8)
        best = summary.get("best") or {}
        pruned = "; ".join(
            f"recovery={(r['config'].get('recovery') or {}).get('name', 'none')} (record {r.get('config_hash')}): "
            + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in r.get("metrics", {}).get("ppl", {}).items())
            for r in finals)
        note = (f"best trial {best.get('number')}: objective {best.get('value', float('nan')):.4f} with "
                + ", ".join(f"{k}={v}" for k, v in (best.get("params") or {}).items())
                + f"; pruned for real: {pruned}"
                + (f"; dotted: {', '.join(f'trial {n} {s.lower()}' for n, s in zip(bad['trial'], bad['state']))}"
                   if len(bad) else ""))
        out.append((f"AdaPruner optimisation history: {summary['name']}", _png(fig), note))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.adapruner --storage sqlite:///runs/studies/X.db --study X``: the trial table."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m experiments.adapruner", description=main.__doc__)
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    args = p.parse_args(argv)
    study = load_study(args.storage, args.study)
    if study is None:
        print(f"error: no study {args.study!r} in {args.storage}")
        return 2
    rows = [{"trial": t.number, "state": t.state.name, "objective": t.value, **t.params} for t in study.trials]
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(pd.DataFrame(rows).to_string(index=False))
    best = best_trial(study)
    print("best:", None if best is None else f"trial {best.number} objective {best.value} {best.params}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
