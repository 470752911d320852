"""AdaPruner studies (METHODS.md §3.10): a Hydra sweeper on optuna's ask/tell API, the final cell, the history.

``python run.py -m experiment=adapruner`` runs :class:`StudySweeper` (registered as
``hydra_plugins.adapruner_sweeper.AdaPrunerSweeper``: Hydra instantiates sweepers only from that namespace). It asks
TPE for ``n_jobs`` trials at a time, runs them through Hydra's configured launcher (basic, joblib_local,
slurm_local), each an ordinary store cell (``method=adapruner eval=adapruner_objective`` + the sampled values), and
tells optuna the objectives. The rest is optuna's own:

- Resume: ``create_study(load_if_exists=True)``; a re-run asks only the trials missing from ``n_trials``. TPE's seed
  is ``seed`` + the trials already asked: fixed, yet a resumed study does not replay its first proposals. The study
  keeps the settings its trials were scored under (:func:`fixed_settings`, a user attribute); a re-run that changes
  one (another model, ratio or objective length) is refused in one line, since its objectives would not compare.
- A killed driver: running trials keep optuna's heartbeat; at start ``fail_stale_trials`` marks the stale ones FAIL
  and ``RetryHeartbeatStaleTrialCallback`` queues their parameters again (a store hit if the cell had finished).
  A retried FAIL does not count towards ``n_trials``.
- A shape the calibration data cannot fill (``InfeasibleCalibrationError``; alpaca has 90 records of >= 256 tokens)
  is PRUNED. TPE ranks PRUNED trials after every COMPLETE one, so it learns to avoid the corner (it ignores FAIL
  trials, and kept proposing it when they were FAIL). Unlike +inf, no fake objective reaches best-trial queries,
  plots or the dashboard; optuna's constraints API would need an objective value the trial does not have. Any
  other error is FAIL, and the study goes on.
- Then the argmin over COMPLETE trials is pruned for real as an ordinary cell with the final eval (and optional
  LoRA), in the driver whatever the launcher; its record carries the study (``record["study"]``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

# pruning (torch) and optuna are imported where used: Hydra imports this module at every start (hydra_plugins)
log = logging.getLogger(__name__)

SEARCH_KEYS = (
    "calibration.dataset",
    "calibration.n_samples",
    "calibration.seq_len",
    "calibration.seed",
    "method.importance",
    "method.aggregation",
)


# --------------------------------------------------------------------------------------------------- the study


def search_space(config: DictConfig, task_overrides: list[str]) -> dict:
    """The study's distributions: ``hydra.sweeper.params``, then the command line (a sweep such as
    ``choice(4,8)`` replaces a dimension, a plain value fixes it). Refuses, before anything runs, a space or
    objective that would break the study's invariants (METHODS.md §3.10)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from pruning.errors import PruningError
    from pruning.eval.perplexity import protocols_from_cfg
    from pruning.methods.adapruner import OVERLAPS_OBJECTIVE

    parser = OverridesParser.create()
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    space: dict = {}
    for o in parser.parse_overrides(params) + parser.parse_overrides(task_overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            space.pop(key, None)
        elif o.is_choice_sweep():
            choices: list[Any] = list(o.sweep_iterator())  # choice(...) of scalars
            space[key] = CategoricalDistribution(choices)
        elif (
            o.is_interval_sweep()
            and isinstance(iv := o.value(), IntervalSweep)
            and iv.start is not None
            and iv.end is not None
        ):
            lo, hi, log = iv.start, iv.end, "log" in iv.tags
            if isinstance(lo, int) and isinstance(hi, int):
                space[key] = IntDistribution(lo, hi, log=log)
            else:
                space[key] = FloatDistribution(lo, hi, log=log)
        else:
            raise PruningError(
                f"{o.input_line}: a study searches choice(...) or interval(...) values, e.g. int(interval(0, 999))"
            )
    datasets = space["calibration.dataset"].choices if "calibration.dataset" in space else [config.calibration.dataset]
    bad = sorted({str(v) for v in datasets} & set(OVERLAPS_OBJECTIVE))
    if bad:  # every trial would be refused; say so once, before anything runs
        raise PruningError(
            f"calibration.dataset {bad} overlaps the objective documents; use {OVERLAPS_OBJECTIVE[bad[0]]}"
        )
    texts = {(p.dataset, p.split) for p in protocols_from_cfg(config.eval.get("ppl", []))}
    if texts != {("c4", "heldout")}:  # the objective must never be a test text (invariant 2)
        raise PruningError(
            f"the study's objective must be the held-out C4 block (eval=adapruner_objective), got "
            f"{sorted(texts)}; the final cell's eval is hydra.sweeper.final.eval"
        )
    if config.get("recovery") is not None and config.recovery.get("name", "none") != "none":
        raise PruningError(
            "trials are scored without recovery; LoRA on the final cell is "
            "hydra.sweeper.final.recovery=lora (not recovery=...)"
        )
    return space


def fixed_settings(config_name: str, task_overrides: list[str], space: dict) -> dict[str, Any]:
    """Every semantic setting a trial does not sample, flattened (``eval.ppl.0.max_windows``: 128): the trials of one
    study must all be scored under the same ones, or their objectives do not compare."""
    from hydra import compose
    from omegaconf import OmegaConf

    import experiments.paper_ratios  # noqa: F401  (the ${paper_knob:...} resolver)
    from experiments.record import semantic_config

    cfg = compose(config_name=config_name, overrides=_value_overrides(task_overrides, set(space)))
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:  # list items by index, so a message can name eval.ppl.0.max_windows
        if isinstance(value, (dict, list)):
            for k, v in value.items() if isinstance(value, dict) else enumerate(value):
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", semantic_config(OmegaConf.to_container(cfg, resolve=True)))
    return {k: v for k, v in flat.items() if k not in space}


def check_fixed_settings(study, settings: dict[str, Any]) -> None:
    """Record ``settings`` on a new study; refuse a resumed one whose trials ran under other settings."""
    from pruning.errors import PruningError

    stored = study.user_attrs.get("fixed_settings")
    if stored is None:
        study.set_user_attr("fixed_settings", settings)
        return
    unset = "<unset>"
    changed = sorted(k for k in stored.keys() | settings.keys() if stored.get(k, unset) != settings.get(k, unset))
    if changed:
        shown = ", ".join(f"{k}: {stored.get(k, unset)!r} -> {settings.get(k, unset)!r}" for k in changed[:3])
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        raise PruningError(
            f"study {study.study_name!r} was scored under other settings ({shown}{more}); resume it with the same "
            f"overrides, or start another: hydra.sweeper.study_name=<new name>"
        )


def counted_trials(study) -> list:
    """The trials that count towards ``n_trials``: finished (COMPLETE, PRUNED, FAIL), except a FAIL that optuna
    retried after its driver died."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    retried = {n for t in study.trials for n in Retry.retry_history(t)}
    return [t for t in study.trials if t.state.is_finished() and t.number not in retried]


def best_trial(study):
    """argmin of the objective over COMPLETE trials (ties: the earlier trial); None if there is none."""
    done = [t for t in study.trials if t.state.name == "COMPLETE" and math.isfinite(t.value)]
    return min(done, key=lambda t: (t.value, t.number)) if done else None


# Command-line overrides of these groups shape the trials (e.g. a shorter objective), not the final cell, whose
# eval/recovery come from hydra.sweeper.final; hydra.* never changes a cell.
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
        out.append(str(o.input_line))  # the parser sets it for every override
    return out


def trial_overrides(task_overrides: list[str], params: dict) -> list[str]:
    """The overrides of the cell a trial with ``params`` runs: the command line's values plus the sampled ones."""
    return [*_value_overrides(task_overrides, set(params)), *(f"{k}={v}" for k, v in params.items())]


class StudySweeper(Sweeper):
    """``hydra.sweeper`` of conf/experiment/adapruner.yaml (``params`` is read by :func:`search_space`; ``final``:
    the final cell's ``eval`` and ``recovery`` presets and extra ``overrides``)."""

    config: DictConfig  # set by setup(), which Hydra calls before sweep()
    launcher: Launcher

    def __init__(
        self,
        study_name: str,
        storage: str,
        n_trials: int,
        n_jobs: int,
        seed: int,
        heartbeat_interval: int,
        params: Any,
        final: Any,
    ) -> None:
        self.study_name, self.storage, self.n_trials, self.n_jobs = study_name, storage, n_trials, n_jobs
        self.seed, self.heartbeat_interval, self.final = seed, heartbeat_interval, final

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.storages._heartbeat import get_heartbeat_thread  # the thread study.optimize runs per trial

        space = search_space(self.config, arguments)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat, stale-trial retry
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed")  # ask(): we run the heartbeat
            study, storage = self.open_study()
            config_name = self.config.hydra.job.config_name or "config"
            check_fixed_settings(study, fixed_settings(config_name, arguments, space))
            job_idx = 0
            while (missing := self.n_trials - len(counted_trials(study))) > 0:
                with contextlib.ExitStack() as heartbeats:
                    batch = []
                    for _ in range(min(self.n_jobs, missing)):
                        batch.append(study.ask(space))
                        heartbeats.enter_context(get_heartbeat_thread(batch[-1]._trial_id, storage))  # type: ignore[arg-type]  # optuna's __exit__ annotates type[Exception]
                    overrides = [trial_overrides(arguments, t.params) for t in batch]
                    self.validate_batch_is_legal(overrides)
                    for trial, ret in zip(batch, self.launcher.launch(overrides, initial_job_idx=job_idx)):
                        tell(study, trial, ret)
                job_idx += len(batch)
        self.run_final(study, arguments)

    def open_study(self):
        """The stored study (created on first use), its stale trials failed and queued again, TPE seeded."""
        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials

        from pruning.errors import PruningError

        if self.storage.startswith("sqlite:///"):
            Path(self.storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        storage = RDBStorage(
            self.storage,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
        )
        study = optuna.create_study(
            storage=storage, study_name=self.study_name, direction="minimize", load_if_exists=True
        )

        def running() -> list[int]:
            return [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]

        fail_stale_trials(study)
        if running():  # a driver stopped less than the grace period (2 heartbeats) ago, or one is still alive
            log.info(f"waiting {2 * self.heartbeat_interval + 2} s for the heartbeat of trials {running()} to stop")
            time.sleep(2 * self.heartbeat_interval + 2)
            fail_stale_trials(study)
        if alive := running():
            raise PruningError(
                f"study {self.study_name!r} ({self.storage}): trials {alive} have a live heartbeat, "
                f"so another driver is running this study"
            )
        study.sampler = optuna.samplers.TPESampler(seed=self.seed + len(study.trials))
        log.info(
            f"AdaPruner study {self.study_name!r} ({self.storage}): {len(counted_trials(study))}/"
            f"{self.n_trials} trials finished, {len(study.trials)} asked before"
        )
        return study, storage

    def run_final(self, study, arguments: list[str]) -> None:
        """The best configuration as an ordinary cell with the final eval, its record carrying the study."""
        from hydra import compose

        from experiments.cell import one_line_table, run_cell
        from experiments.store import ResultsStore
        from pruning.errors import PruningError

        best = best_trial(study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        if best is None:
            raise PruningError(
                f"AdaPruner study {self.study_name!r} has no COMPLETE trial; see the trials' logs under {sweep_dir}"
            )
        config_name = self.config.hydra.job.config_name or "config"
        final_overrides = [
            *_value_overrides(arguments, set(best.params), trial_only=True),
            *(f"{k}={v}" for k, v in best.params.items()),
            f"eval={self.final.eval}",
            f"recovery={self.final.recovery}",
            *self.final.overrides,
        ]
        summary = study_summary(study, self.storage, config_name, arguments, self.n_trials, self.seed)
        summary["final_overrides"] = final_overrides
        log.info(f"AdaPruner best trial #{best.number}: objective {best.value:.4f} with {best.params}")
        cfg = compose(config_name=config_name, overrides=final_overrides)
        run_dir = sweep_dir / "final"
        record = run_cell(cfg, run_dir=run_dir)
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        record["study"] = summary
        path = (ResultsStore(cfg.store.dir) if cfg.store.dir else ResultsStore()).write(record)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "adapruner_study.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        import pandas as pd

        with pd.option_context("display.width", 250, "display.max_columns", 50):
            print(history_table(summary).to_string(index=False))
            print(
                f"best: trial {best.number}, objective {best.value:.4f}: "
                + " ".join(f"{k}={v}" for k, v in best.params.items())
            )
            print(one_line_table(record).to_string(index=False))
        print(f"final record: {path}")


def tell(study, trial, ret) -> None:
    """A launched trial's outcome: its objective (COMPLETE), PRUNED for a shape the data cannot fill, else FAIL."""
    from optuna.trial import TrialState

    from pruning.errors import InfeasibleCalibrationError

    try:
        value = float(ret.return_value)  # re-raises the job's exception (run.py re-raises inside a study)
    except InfeasibleCalibrationError as e:
        trial.set_user_attr("infeasible", str(e))
        study.tell(trial, state=TrialState.PRUNED)
    except Exception as e:  # noqa: BLE001 - any other error fails this trial, not the study
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)


def _iso(when) -> str | None:
    return None if when is None else when.isoformat()


def study_summary(
    study, storage: str, config_name: str, task_overrides: list[str], n_trials: int | None, seed: int | None
) -> dict:
    """The study as plain data: per trial its state, objective, parameters and store cell (config hash)."""
    from hydra import compose

    from experiments.cell import cell_config
    from experiments.record import config_hash
    from pruning.eval import ppl_label
    from pruning.eval.perplexity import protocols_from_cfg

    trials, objective = [], None
    for t in study.trials:
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": dict(t.params),
            "datetime_start": _iso(t.datetime_start),
            "datetime_complete": _iso(t.datetime_complete),
            "config_hash": None,
        }
        if t.state.name == "COMPLETE":
            cfg = compose(config_name=config_name, overrides=trial_overrides(task_overrides, t.params))
            row["config_hash"] = config_hash(cell_config(cfg))
            objective = objective or ppl_label(protocols_from_cfg(cfg.eval.ppl)[0])
        trials.append(row)
    best = best_trial(study)
    return {
        "name": study.study_name,
        "storage": storage,
        "summarised": datetime.now(UTC).isoformat(),
        "direction": "minimize",
        "objective": objective,
        "n_trials": n_trials,
        "sampler": {"name": type(study.sampler).__name__, "seed": seed},
        "trials": trials,
        "best": None if best is None else next(r for r in trials if r["number"] == best.number),
    }


# --------------------------------------------------------------------------------------------------- reporting


def history_table(summary: dict):
    """One row per trial with the best objective so far (COMPLETE trials only)."""
    import pandas as pd

    rows, best = [], math.inf
    for t in summary["trials"]:
        if t["state"] == "COMPLETE" and t["value"] is not None:
            best = min(best, t["value"])
        # PRUNED: a shape the data cannot fill; records written before optuna 4 stored it as COMPLETE with +inf
        infeasible = t["state"] == "PRUNED" or (t["state"] == "COMPLETE" and t["value"] == math.inf)
        state = "INFEASIBLE" if infeasible else t["state"]
        rows.append(
            {
                "trial": t["number"],
                "state": state,
                "objective": t["value"],
                "best_so_far": best if math.isfinite(best) else None,
                **{k.split(".")[-1]: t["params"].get(k) for k in SEARCH_KEYS},
            }
        )
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
            label = None if i else "infeasible / failed / interrupted"
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
            for r in finals
        )
        note = (
            f"best trial {best.get('number')}: objective {best.get('value', float('nan')):.4f} with "
            + ", ".join(f"{k}={v}" for k, v in (best.get("params") or {}).items())
            + f"; pruned for real: {pruned}"
            + (
                f"; dotted: {', '.join(f'trial {n} {s.lower()}' for n, s in zip(bad['trial'], bad['state']))}"
                if len(bad)
                else ""
            )
        )
        out.append((f"AdaPruner optimisation history: {summary['name']}", _png(fig), note))
    return out
