"""One experiment cell as a recipe of named phases, each a short function that reads and fills a ``Cell``:

    check -> [resume] -> prepare -> calibrate -> load -> evaluate_dense -> prune -> apply -> evaluate -> recover
          -> save -> record

- ``check``: every user mistake is caught before anything heavy: the typed schema of every config group and the rules
  across them (experiments/schema.py: keys, types, ranges, choices, the operating point, layer ranges), then what
  needs the library (data files of the eval, calibration and recovery, device and dtype, the method built from its
  config), then the checkpoint's fingerprint and ``config.json`` (a layer range inside the model, every length within
  its context; no weights are read).
- ``prepare``, once the cell must be computed (not a store hit): every output can be written (the results store,
  the caches), so finished work is never lost to a read-only directory, and the method accepts the calibration
  shape (Search-LLM's held-out fitness windows).
- ``calibrate`` draws the calibration ids with the tokenizer alone, *before* the weights load, so a shape the data
  cannot fill costs seconds, not a model load. A method that draws more sets (``DrawsCalibration``, NIRVANA) gets a
  sampler bound here.
- ``load`` loads the weights (strictly: every tensor and shape the config names, nothing else), checks the budget
  from shapes (an impossible ratio, or one that removes nothing, fails before any scoring) and that every PPL text
  fills a window.
- ``evaluate_dense``, ``prune`` (``method.prune -> PrunePlan``), ``apply`` (surgery + the method's compensation),
  ``evaluate`` (the pruned model), ``recover`` (``recovery.name != none``: train, then evaluate again), ``save``
  (``save_model=true``) and ``record`` (the one record of the cell).

Around the recipe, callbacks (``CellCallback``) do what never changes a number: the results store (resume a finished
cell, reuse the dense baseline of the same (model, eval), write the records) and the loggers (W&B, after the record
is written). Nothing is written unless the cell succeeds; the dense record is written once per (model, eval), by the
first cell that evaluates it, together with that cell's own record. A store that fails at that last write keeps
nothing from being lost: the records go to a fallback file that the error names (``RecordNotSaved``).

Extension points (methods, evaluations and recovery plug in without editing this file):
- ``method.budget(model, ratio)`` before any heavy work; ``method.prune(model, ratio, calib) -> PrunePlan``;
  ``method.apply(model, plan, calib)`` does surgery plus the method's compensation.
- ``pruning.eval.evaluate(model, tokenizer, eval_cfg, ...)`` returns ``{"ppl": {...}, <other blocks>}``; the
  record stores them as ``metrics[block]`` (final model), ``metrics["dense_" + block]`` and, when a recovery ran,
  ``metrics["prerecovery_" + block]``.
- ``pruning.recovery.recover(model, tokenizer, recovery_cfg, ...)`` when ``recovery.name != none``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import experiments.paper_ratios  # noqa: F401  (registers the ${paper_knob:...} config resolver)
from experiments import schema
from experiments.cache import TensorCache, check_cache_writable, dir_fingerprint, file_sha256
from experiments.record import config_hash, make_record
from experiments.store import ResultsStore
from pruning import data
from pruning.calibration import cached_statistics, is_variable_length
from pruning.errors import ConfigError, PruningError, RecordNotSaved
from pruning.eval import EVAL_VERSION, check_eval, check_eval_texts, evaluate
from pruning.methods.base import DrawsCalibration
from pruning.models import load_model
from pruning.models.loading import load_tokenizer, resolve_checkpoint
from pruning.runtime import check_device, hardware, resolve_dtype, seed_everything
from pruning.surgery.save import save_pruned

DENSE = "pruning.methods.baselines.dense"
CALIB_SAMPLER_VERSION = 2  # 2: calibration.sampler chooses among the official samplers (pruning.data.SAMPLERS)


def set_threads(threads: int | None) -> int:
    """Torch threads follow the job's CPUs (SLURM does not bind them with proctrack/linuxproc)."""
    n = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or os.cpu_count() or 1
    torch.set_num_threads(int(n))
    return int(n)


def pick_device(name: str) -> str:
    return check_device(name)  # auto -> cuda when present; cuda on a CPU-only machine -> one clear error


class Timer(dict):
    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        yield
        self[key] = self.get(key, 0.0) + time.perf_counter() - t0


def build_method(cfg: DictConfig):
    """The method object from ``cfg.method`` (its factory's keywords); a value its factory refuses (a ValueError) is
    one line, not Hydra's wrapped traceback. A TypeError keeps its traceback: the schema has already refused unknown
    keys, so a keyword the factory does not take is a schema that drifted from the code."""
    try:
        return instantiate(cfg.method, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, PruningError):
            raise cause from None
        if isinstance(cause, ValueError):
            target = str(cfg.method.get("_target_", "?")).rsplit(".", 1)[-1]
            raise ConfigError(f"method ({target}): {cause}") from None
        raise


def dense_config(resolved: dict) -> dict:
    """The dense baseline's cell: it depends on the model and the eval only, so every pruning cell of a sweep
    (any method, ratio, calibration, recovery or seed) shares one dense record."""
    d = copy.deepcopy(resolved)
    d["method"] = {"_target_": DENSE}
    d["pruning"] = {"ratio": 0.0}
    d["seed"] = 0
    for key in ("calibration", "recovery", "paper_ratio"):
        d.pop(key, None)
    return d


def cell_config(cfg: DictConfig, uses_calibration: bool = True) -> dict:
    """The resolved config that identifies a cell, with content fingerprints so a changed checkpoint or eval
    code makes a new cell instead of silently reusing an old number. A method that reads no calibration data
    (magnitude, random) has no calibration in its identity, so a calibration-seed sweep runs it once."""
    resolved = cast(dict, OmegaConf.to_container(cfg, resolve=True))  # a DictConfig's container is a dict
    fetch = bool(resolved["model"].pop("fetch", False))  # consent to download, not part of the cell's identity
    resolved["model"]["fingerprint"] = dir_fingerprint(resolve_checkpoint(cfg.model.path, fetch=fetch))
    resolved["eval"]["version"] = EVAL_VERSION
    if resolved["method"].get("_target_") == DENSE:
        resolved = dense_config(resolved)
    elif not uses_calibration:
        resolved.pop("calibration", None)
    return resolved


def calib_key(cfg: DictConfig, model_fingerprint: str) -> dict:
    """Everything the calibration ids depend on: tokenizer (via the checkpoint), data file content, the sampler and
    all its fields (shape, seed, order, join; not ``paper_dataset``, a label)."""
    spec = data.calibration_spec(cfg.calibration)
    return {
        "tokenizer_of": model_fingerprint,
        **spec.draw_key(),
        "source_sha256": file_sha256(data.calibration_source(spec.dataset)),
        "sampler_version": CALIB_SAMPLER_VERSION,
    }


def calibration(cfg: DictConfig, tokenizer, model_fingerprint: str, progress: bool):
    """Calibration token ids ([n, L] tensor, or a list of windows for variable-length samplers), cached on disk by
    tokenizer, data file content and every sampler field."""
    spec = data.calibration_spec(cfg.calibration)
    return TensorCache("calibration").get_or_compute(
        calib_key(cfg, model_fingerprint), lambda: data.draw_calibration(tokenizer, spec, progress=progress)
    )


def check_calibration(cfg: DictConfig, method) -> data.CalibrationSpec:
    """Config-time checks, before any loading: the sampler and its fields, the data file, and that a
    variable-length sampler meets a method that can take windows of different lengths."""
    spec = data.calibration_spec(cfg.calibration)
    if spec.variable_length and not getattr(method, "variable_length_calibration", False):
        name = getattr(method, "name", type(method).__name__)
        raise PruningError(
            f"calibration.sampler={spec.sampler} gives windows of different lengths, which {name} "
            f"cannot take (it needs one [n_samples, seq_len] batch); choose another sampler, e.g. "
            f"calibration=c4"
        )
    return spec


def calibration_record(spec: data.CalibrationSpec, calib) -> dict:
    """What the record says about the calibration actually used, beyond the config: the sampler's normalised fields
    (old configs had no sampler), the file read, and the drawn shape."""
    windows = [int(w.numel()) for w in calib] if is_variable_length(calib) else None
    return {
        "sampler": spec.sampler,
        "order": spec.order,
        "join": spec.join,
        "paper_dataset": spec.paper_dataset,
        "source": str(data.calibration_source(spec.dataset)),
        "n_windows": len(windows) if windows is not None else int(calib.shape[0]),
        "n_tokens": sum(windows) if windows is not None else int(calib.numel()),
    }


def operating_point(method, ratio, paper_ratio=None) -> tuple[float | None, dict | None]:
    """Which setting defines the cell, as (ratio, native knob setting): the rule is the schema's
    (``schema.operating_point_rule``: a native knob and ``pruning.ratio`` at once, a ``paper_ratio`` the method
    cannot read, or neither), applied here to the built method."""
    op = method.operating_point()
    schema.operating_point_rule(
        method.name, op.knob if op else method.native_knob, None if op is None else op.value, ratio, paper_ratio
    )
    if ratio is not None and not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"pruning.ratio={ratio}: must be a number in [0, 1) or null")
    return (None if ratio is None else float(ratio)), None if op is None else op.as_dict()


# ---------------------------------------------------------------------------------------------------------------
# The cell in flight


@dataclass
class Cell:
    """What the phases share: the config, the method and what each phase has produced so far."""

    cfg: DictConfig
    run_dir: Path | None
    device: str
    dtype: torch.dtype
    progress: bool
    recovery: DictConfig | None  # None when recovery.name is none
    method: Any
    ratio: float | None  # pruning.ratio as the method reads it (0 for dense; None: a native knob)
    operating_point: dict | None  # the native knob that defines the cell, if any
    calib_spec: data.CalibrationSpec | None
    resolved: dict  # the cell's identity (config_hash)
    timer: Timer = field(default_factory=Timer)
    t_start: float = field(default_factory=time.perf_counter)
    calib: Any = None
    calib_cached: bool | None = None
    model: Any = None
    tokenizer: Any = None
    adapter: Any = None
    budget: Any = None
    params_before: int | None = None
    dense: dict | None = None  # the dense model's metrics (evaluated here or read from the store)
    dense_record: dict | None = None  # the dense record, when this cell evaluated the dense model (written last)
    plan: Any = None
    stats_log: Any = None
    metrics: dict = field(default_factory=dict)  # the final model's blocks, last phase wins
    extra: dict = field(default_factory=dict)  # record keys beyond the core ones (plan, widths, calibration, ...)

    @property
    def is_dense(self) -> bool:
        return self.resolved["method"]["_target_"] == DENSE

    @property
    def config_hash(self) -> str:
        return config_hash(self.resolved)

    @property
    def dense_resolved(self) -> dict:
        return dense_config(self.resolved)

    def evaluate(self) -> dict:
        return evaluate(self.model, self.tokenizer, self.cfg.eval, device=self.device, progress=self.progress)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks: the store and the loggers


class CellCallback:
    """A step around the recipe that changes no number. Every hook is optional."""

    def resume(self, cell: Cell) -> dict | None:
        """A finished record of this cell, returned instead of running it (resumable sweeps)."""
        return None

    def ready(self, cell: Cell) -> None:
        """The cell will be computed: raise (a ``PruningError``) if its results could not be kept, before any work."""

    def dense_baseline(self, cell: Cell) -> dict | None:
        """The dense model's metrics from an earlier cell of the same (model, eval), so they are not recomputed."""
        return None

    def dense_evaluated(self, cell: Cell, record: dict) -> None:
        """The dense record, made by the first cell that evaluated the dense model of its (model, eval)."""

    def finished(self, cell: Cell, record: dict) -> None:
        """The cell's record, once the whole cell succeeded."""


class StoreCallback(CellCallback):
    """The results store: skip a finished cell, reuse the dense baseline, write the records (``force`` recomputes).

    The store is checked writable before the cell computes anything; should a write still fail (the store became
    read-only meanwhile), the record goes to a fallback file (``ResultsStore.write_or_fallback``) and the cell's
    record carries ``_unsaved``, which ``run_cell`` turns into ``RecordNotSaved`` after every callback ran."""

    def __init__(self, store: ResultsStore, force: bool = False):
        self.store, self.force = store, force
        self.unsaved: list[str] = []  # what could not be written to the store, and where it went instead

    def resume(self, cell: Cell) -> dict | None:
        done = None if self.force else self.store.get(cell.config_hash)
        if done is not None:
            done["_store_path"], done["_skipped"] = str(self.store.path(done["config_hash"])), True
        return done

    def dense_baseline(self, cell: Cell) -> dict | None:
        if cell.is_dense or self.force:
            return None
        record = self.store.get(config_hash(cell.dense_resolved))
        if record is None:
            return None
        return {k.removeprefix("dense_"): v for k, v in record["metrics"].items() if not k.startswith("prerecovery_")}

    def ready(self, cell: Cell) -> None:
        self.store.check_writable()

    def _write(self, record: dict, what: str) -> Path:
        path, problem = self.store.write_or_fallback(record)
        if problem:
            self.unsaved.append(f"{what} record to {path}")
        return path

    def dense_evaluated(self, cell: Cell, record: dict) -> None:
        self._write(record, "the dense")

    def finished(self, cell: Cell, record: dict) -> None:
        record["_store_path"] = str(self._write(record, "the"))
        if self.unsaved:
            record["_unsaved"] = (
                f"results store {self.store.records_dir} could not be written at the end of the cell "
                f"({self.store.last_error}); saved {' and '.join(self.unsaved)} instead: copy "
                f"{'them' if len(self.unsaved) > 1 else 'it'} into {self.store.records_dir}/ once it is writable"
            )


class LoggerCallback(CellCallback):
    """W&B (``logger=wandb``), after the store: a logging failure warns and never costs the record."""

    def __init__(self, logger_cfg: DictConfig):
        self.logger_cfg = logger_cfg

    def finished(self, cell: Cell, record: dict) -> None:
        try:
            from experiments.wandb_logger import log_record

            log_record(record, self.logger_cfg)
        except Exception as exc:  # noqa: BLE001 - a failing logger must not cost the stored record
            warnings.warn(
                f"logger {self.logger_cfg.get('name')!r} failed: {exc}; record kept at {record.get('_store_path')}",
                RuntimeWarning,
                stacklevel=2,
            )


def default_callbacks(cfg: DictConfig) -> list[CellCallback]:
    """The store of ``store.dir`` (else $PRUNING_STORE or <repo>/runs/store), then the configured logger."""
    callbacks: list[CellCallback] = [
        StoreCallback(
            ResultsStore(cfg.store.dir) if cfg.store.dir else ResultsStore(), force=bool(cfg.get("force", False))
        )
    ]
    if cfg.get("logger") and cfg.logger.get("name", "none") != "none":
        callbacks.append(LoggerCallback(cfg.logger))
    return callbacks


# ---------------------------------------------------------------------------------------------------------------
# The phases


def check(cfg: DictConfig, run_dir: str | Path | None = None) -> Cell:
    """Everything that can be wrong in the config, before any data or weights are read."""
    schema.validate(cfg)  # keys, types, ranges, choices and the rules across them (torch-free)
    check_eval(cfg.eval)  # the eval's data files fail before loading
    set_threads(cfg.get("threads"))
    seed_everything(cfg.seed)  # random, numpy, torch: the one place (pruning.runtime)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device, cfg.model.get("device_map"))  # e.g. float16 on CPU -> error
    recovery_cfg = cfg.get("recovery")
    recovering = recovery_cfg is not None and recovery_cfg.get("name", "none") != "none"
    if recovering:  # bad recovery settings / missing data fail before heavy work
        from pruning.recovery import check_recovery

        check_recovery(recovery_cfg)
    method = build_method(cfg)  # cheap (no model yet); it decides whether calibration is identity
    ratio, op = operating_point(method, cfg.pruning.ratio, cfg.get("paper_ratio"))
    calib_spec = check_calibration(cfg, method) if method.needs_calibration else None
    resolved = cell_config(cfg, uses_calibration=method.needs_calibration)
    model_config = schema.read_model_config(resolve_checkpoint(cfg.model.path, fetch=bool(cfg.model.get("fetch"))))
    if model_config is not None:  # an unreadable config.json is the loader's to report
        schema.check_model(resolved, model_config)  # layer range inside the model, lengths within its context
    if resolved["method"]["_target_"] == DENSE:
        ratio = 0.0
    return Cell(
        cfg=cfg,
        run_dir=None if run_dir is None else Path(run_dir),
        device=device,
        dtype=dtype,
        progress=bool(cfg.get("progress", True)),
        recovery=recovery_cfg if recovering else None,
        method=method,
        ratio=ratio,
        operating_point=op,
        calib_spec=calib_spec,
        resolved=resolved,
    )


def prepare(cell: Cell, callbacks: list[CellCallback]) -> None:
    """Once the cell must be computed, before anything heavy: its results can be kept (the store via the callbacks,
    the caches) and the method accepts the calibration shape."""
    check_cache_writable()
    for cb in callbacks:
        cb.ready(cell)
    check_method_calibration = getattr(cell.method, "check_calibration", None)
    if cell.calib_spec is not None and check_method_calibration is not None:
        check_method_calibration(cell.calib_spec.n_samples, cell.calib_spec.seq_len)


def calibrate(cell: Cell) -> None:
    """Calibration ids drawn (or read from the cache) with the tokenizer alone, before the weights load."""
    if not cell.method.needs_calibration:
        return
    cfg = cell.cfg
    with cell.timer("calibration"):
        tokenizer = load_tokenizer(cfg.model.path, fetch=bool(cfg.model.get("fetch", False)))
        cell.calib, cell.calib_cached = calibration(
            cfg, tokenizer, cell.resolved["model"]["fingerprint"], cell.progress
        )
    if isinstance(cell.method, DrawsCalibration):  # more calibration sets, drawn like the run's (NIRVANA's seeds)
        spec, progress = cell.calib_spec, cell.progress
        assert spec is not None  # such a method needs calibration, so check_calibration made the spec
        cell.method.bind_sampler(
            lambda ds, n, seq_len, seed: data.draw_calibration(
                tokenizer,
                dataclasses.replace(spec, dataset=ds, n_samples=n, seq_len=seq_len, seed=seed),
                progress=progress,
            ),
            dict(cfg.calibration),
        )


def load(cell: Cell) -> None:
    """The weights on the device (verified against the config), then the budget from shapes: an impossible ratio,
    or one that removes nothing, fails before any scoring; then every PPL text must fill a window, so no check
    waits for the dense evaluation."""
    cfg = cell.cfg
    with cell.timer("load"):
        cell.model, cell.tokenizer, cell.adapter = load_model(
            cfg.model.path, cell.dtype, cfg.model.get("device_map"), fetch=bool(cfg.model.get("fetch", False))
        )
        if cfg.model.get("device_map") is None:
            cell.model.to(cell.device)
    cell.budget = cell.method.budget(cell.model, cell.ratio)
    cell.params_before = cell.adapter.num_params()
    if asks_for_removal(cell) and cell.operating_point is None and cell.budget.removed_params == 0:
        raise PruningError(removes_nothing(cell, f"pruning.ratio={cell.ratio:g}"))
    check_eval_texts(cell.tokenizer, cfg.eval)


def asks_for_removal(cell: Cell) -> bool:
    """The cell's setting asks for parameters to go: ``pruning.ratio`` > 0, or a native knob not at its no-op
    value. A plan that then removes nothing is a mistake (a layer range or structure set with nothing prunable
    at that setting), not a result."""
    if cell.is_dense:
        return False
    if cell.operating_point is None:
        return bool(cell.ratio)
    op = cell.method.operating_point()
    return op is None or op.removes


def removes_nothing(cell: Cell, setting: str) -> str:
    """The one line for a no-op cell: what was asked, and where the method looked for something to prune."""
    method = cell.method
    name = getattr(method, "name", type(method).__name__)
    n = len(cell.adapter.layers)
    allocation = getattr(method, "allocation", None)
    layers = allocation.layers(n) if allocation is not None and hasattr(allocation, "layers") else None
    scope = [f"method.structures={list(method.structures)}"] if hasattr(method, "structures") else []
    if layers is not None:
        scope.append(f"layers [{layers[0]}, {layers[-1] + 1}) of {n}" if layers else f"no layer of {n}")
    if hasattr(method, "sets") and not method.sets(cell.model):
        why, fix = "finds no prunable structure", "choose a non-empty method.layers range and method.structures"
    else:
        why, fix = "rounds its plan to zero units", f"raise {setting.split('=')[0]}, or widen the layers or structures"
    return f"{setting} removes nothing: {name} {why} ({', '.join(scope)}); {fix}"


def evaluate_dense(cell: Cell, callbacks: list[CellCallback]) -> None:
    """The dense model's metrics: an earlier cell's (once per (model, eval)), else evaluated here and recorded."""
    cell.dense = next((d for d in (cb.dense_baseline(cell) for cb in callbacks) if d is not None), None)
    if cell.dense is not None:
        return
    with cell.timer("eval_dense"):
        cell.dense = cell.evaluate()
    if not cell.is_dense:  # a method=dense cell is its own dense record
        n = cell.params_before
        record = make_record(
            cell.dense_resolved,
            metrics=cell.dense,
            params={"before": n, "after": n, "achieved_ratio": 0.0, "target_ratio": 0.0, "planned_ratio": 0.0},
            timings={"eval_dense": cell.timer["eval_dense"], "total": cell.timer["eval_dense"]},
            extra={
                "plan": {"remove": {}, "blocks": [], "meta": {"method": "dense"}},
                "widths": [w.as_dict() for w in cell.adapter.all_widths()],
                "hardware": hardware(cell.device, cell.dtype, cell.model),
            },
        )
        cell.dense_record = record  # written with the cell's own record: a cell that fails leaves no record


def prune(cell: Cell) -> None:
    """``method.prune``: scores and allocation -> a PrunePlan; dense statistics come from the sweep's cache."""
    with (
        cell.timer("prune"),
        cached_statistics(TensorCache("statistics"), {"model": cell.resolved["model"]["fingerprint"]}) as stats_log,
    ):
        cell.plan = cell.method.prune(cell.model, cell.ratio, cell.calib)
    cell.stats_log = stats_log
    if asks_for_removal(cell) and cell.plan.is_empty():
        op = cell.operating_point
        setting = f"{op['knob']}={op['value']:g}" if op else f"pruning.ratio={cell.ratio:g}"
        raise PruningError(removes_nothing(cell, setting))


def apply(cell: Cell) -> None:
    """``method.apply``: surgery plus the method's compensation."""
    with cell.timer("surgery"):
        cell.method.apply(cell.model, cell.plan, cell.calib)


def evaluate_pruned(cell: Cell) -> None:
    """The pruned model's metrics, also for an empty plan (apply may still change weights: SliceGPT at 0% rotates)."""
    assert cell.dense is not None  # evaluate_dense ran before
    with cell.timer("eval_pruned"):
        cell.metrics = cell.dense if cell.is_dense else cell.evaluate()
    cell.extra = {
        "plan": cell.plan.to_dict(),
        "widths": [w.as_dict() for w in cell.adapter.all_widths()],
        "dense_record": None if cell.is_dense else config_hash(cell.dense_resolved),
        "hardware": hardware(cell.device, cell.dtype, cell.model),
    }
    if not cell.is_dense:
        method = cell.method
        cell.extra["calibration"] = dict(
            cell.resolved.get("calibration", {}),
            used=method.needs_calibration,
            cached=cell.calib_cached,
            statistics=cell.stats_log,
            **(calibration_record(cell.calib_spec, cell.calib) if cell.calib_spec is not None else {"source": None}),
        )


def recover(cell: Cell) -> dict:
    """With ``recovery``: train the pruned model, then evaluate it again; returns the metrics before recovery."""
    if cell.recovery is None:
        return {}
    from pruning.recovery import recover as run_recovery

    with cell.timer("recovery"):
        cell.extra["recovery"] = run_recovery(
            cell.model, cell.tokenizer, cell.recovery, device=cell.device, progress=cell.progress, run_dir=cell.run_dir
        )
    before = {f"prerecovery_{k}": v for k, v in cell.metrics.items()}
    with cell.timer("eval_recovered"):
        cell.metrics = cell.evaluate()
    return before


def save(cell: Cell) -> None:
    """``save_model=true``: the pruned model, HF-loadable, in the run directory."""
    if cell.run_dir is None or not cell.cfg.get("save_model"):
        return
    with cell.timer("save"):
        cell.extra["saved_model"] = str(
            save_pruned(
                cell.model,
                cell.run_dir / "pruned_model",
                cell.tokenizer,
                meta={"config_hash": cell.config_hash, "plan": cell.plan.to_dict()},
            )
        )


def record(cell: Cell, prerecovery: dict) -> dict:
    """The cell's one record: config, metrics (final, dense_, prerecovery_), sizes, timings and the extras."""
    assert cell.dense is not None  # evaluate_dense ran before
    metrics = {} if cell.is_dense else {f"dense_{k}": v for k, v in cell.dense.items()}
    metrics.update(prerecovery)
    metrics.update(cell.metrics)
    after = cell.adapter.num_params()
    cell.timer["total"] = time.perf_counter() - cell.t_start
    return make_record(
        cell.resolved,
        metrics=metrics,
        params={
            "before": cell.params_before,
            "after": after,
            "achieved_ratio": 1 - after / cell.params_before,
            "target_ratio": cell.ratio,
            "operating_point": cell.operating_point,
            "planned_ratio": cell.budget.achieved,
        },
        timings=dict(cell.timer),
        extra=cell.extra,
    )


def run_cell(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: list[CellCallback] | None = None) -> dict:
    """Run one cell (or return its finished record); ``callbacks`` default to the store and the configured logger."""
    callbacks = default_callbacks(cfg) if callbacks is None else callbacks
    cell = check(cfg, run_dir)
    done = next((r for r in (cb.resume(cell) for cb in callbacks) if r is not None), None)
    if done is not None:
        return done
    prepare(cell, callbacks)
    calibrate(cell)
    load(cell)
    evaluate_dense(cell, callbacks)
    prune(cell)
    apply(cell)
    evaluate_pruned(cell)
    prerecovery = recover(cell)
    save(cell)
    rec = record(cell, prerecovery)
    for cb in callbacks:
        if cell.dense_record is not None:
            cb.dense_evaluated(cell, cell.dense_record)
        cb.finished(cell, rec)
    if rec.get("_unsaved"):  # the numbers are in the fallback file; the caller prints them and fails
        raise RecordNotSaved(rec["_unsaved"], rec)
    return rec


def one_line_table(record: dict) -> pd.DataFrame:
    """The row a person wants after a run: PPL dense -> pruned per protocol, params and achieved ratio."""
    cfg, params = record["config"], record["params"]
    op = params.get("operating_point")
    row = {
        "model": cfg["model"]["name"],
        "method": record["plan"]["meta"].get("method", "dense"),
        "target": f"{op['knob'].removeprefix('method.')}={op['value']:g}" if op else params["target_ratio"],
        "achieved": round(params["achieved_ratio"], 4),
        "params": f"{params['before']:,} -> {params['after']:,}",
    }
    metrics = record["metrics"]
    for key, res in metrics.get("ppl", {}).items():
        dense = metrics.get("dense_ppl", {}).get(key, res)["ppl"]
        before = metrics.get("prerecovery_ppl", {}).get(key)
        middle = f" -> {before['ppl']:.2f}" if before else ""  # dense -> pruned -> recovered
        row[key] = f"{dense:.2f}{middle} -> {res['ppl']:.2f}"
    return pd.DataFrame([row])
