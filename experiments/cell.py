"""One experiment cell: calibration -> load -> dense eval -> prune -> method.apply (surgery + compensation) ->
[recovery] -> eval -> one record in the store.

Every user mistake is caught before the model is scored or evaluated (ratio, names, data files, architecture,
checkpoint), and nothing is written unless the whole cell succeeds. Calibration is drawn with the tokenizer alone
before the weights load, so a shape the data cannot fill costs seconds, not a model load.

Extension points (so methods, evaluations and recovery plug in without editing this file's flow):
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
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import experiments.paper_ratios  # noqa: F401  (registers the ${paper_knob:...} config resolver)
from experiments.cache import TensorCache, dir_fingerprint, file_sha256
from experiments.record import config_hash, make_record
from experiments.store import ResultsStore
from pruning import data
from pruning.allocation import check_ratio
from pruning.calibration import cached_statistics, is_variable_length
from pruning.errors import PruningError
from pruning.eval import EVAL_VERSION, check_eval, evaluate
from pruning.models import load_model
from pruning.models.loading import load_tokenizer, resolve_checkpoint
from pruning.runtime import check_device, resolve_dtype, seed_everything
from pruning.surgery.save import save_pruned

DENSE = "pruning.methods.baselines.dense"
CALIB_SAMPLER_VERSION = 2      # 2: calibration.sampler chooses among the official samplers (pruning.data.SAMPLERS)


def set_threads(threads: int | None) -> int:
    """Torch threads follow the job's CPUs (SLURM does not bind them with proctrack/linuxproc)."""
    n = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or os.cpu_count() or 1
    torch.set_num_threads(int(n))
    return int(n)


def pick_device(name: str) -> str:
    return check_device(name)          # auto -> cuda when present; cuda on a CPU-only machine -> one clear error


class Timer(dict):
    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        yield
        self[key] = self.get(key, 0.0) + time.perf_counter() - t0


def build_method(cfg: DictConfig):
    # partial + call: Hydra would turn a dataclass kwarg back into a config node
    return instantiate(cfg.method, _partial_=True, _convert_="all")(allocation=instantiate(cfg.allocation))


def dense_config(resolved: dict) -> dict:
    """The dense baseline's cell: it depends on the model and the eval only, so every pruning cell of a sweep
    (any method, ratio, calibration, recovery or seed) shares one dense record."""
    d = copy.deepcopy(resolved)
    d["method"] = {"_target_": DENSE}
    d["pruning"] = {"ratio": 0.0}
    d["seed"] = 0
    for key in ("allocation", "calibration", "recovery", "paper_ratio"):
        d.pop(key, None)
    return d


def cell_config(cfg: DictConfig, uses_calibration: bool = True) -> dict:
    """The resolved config that identifies a cell, with content fingerprints so a changed checkpoint or eval
    code makes a new cell instead of silently reusing an old number. A method that reads no calibration data
    (magnitude, random) has no calibration in its identity, so a calibration-seed sweep runs it once."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fetch = bool(resolved["model"].pop("fetch", False))     # consent to download, not part of the cell's identity
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
    return {"tokenizer_of": model_fingerprint, **spec.draw_key(),
            "source_sha256": file_sha256(data.calibration_source(spec.dataset)),
            "sampler_version": CALIB_SAMPLER_VERSION}


def calibration(cfg: DictConfig, tokenizer, model_fingerprint: str, progress: bool):
    """Calibration token ids ([n, L] tensor, or a list of windows for variable-length samplers), cached on disk by
    tokenizer, data file content and every sampler field."""
    spec = data.calibration_spec(cfg.calibration)
    return TensorCache("calibration").get_or_compute(
        calib_key(cfg, model_fingerprint), lambda: data.draw_calibration(tokenizer, spec, progress=progress))


def check_calibration(cfg: DictConfig, method) -> data.CalibrationSpec:
    """Config-time checks, before any loading: the sampler and its fields, the data file, and that a
    variable-length sampler meets a method that can take windows of different lengths."""
    spec = data.calibration_spec(cfg.calibration)
    if spec.variable_length and not getattr(method, "variable_length_calibration", False):
        name = getattr(method, "name", type(method).__name__)
        raise PruningError(f"calibration.sampler={spec.sampler} gives windows of different lengths, which {name} "
                           f"cannot take (it needs one [n_samples, seq_len] batch); choose another sampler, e.g. "
                           f"calibration=c4")
    return spec


def calibration_record(spec: data.CalibrationSpec, calib) -> dict:
    """What the record says about the calibration actually used, beyond the config: the sampler's normalised fields
    (old configs had no sampler), the file read, and the drawn shape."""
    windows = [int(w.numel()) for w in calib] if is_variable_length(calib) else None
    return {"sampler": spec.sampler, "order": spec.order, "join": spec.join, "paper_dataset": spec.paper_dataset,
            "source": str(data.calibration_source(spec.dataset)),
            "n_windows": len(windows) if windows is not None else int(calib.shape[0]),
            "n_tokens": sum(windows) if windows is not None else int(calib.numel())}


def operating_point(method, ratio, paper_ratio=None) -> tuple[float | None, dict | None]:
    """Which setting defines the cell: ``pruning.ratio`` (share of ALL params) or the method's native knob
    (METHODS.md §1.3), set directly or through ``paper_ratio``. Both at once would make the record claim a ratio the
    method did not use."""
    op = method.operating_point()
    if paper_ratio is not None and op is None:
        raise PruningError(f"paper_ratio={paper_ratio} has no meaning for method {method.name}: no paper table of its "
                           f"is reproduced (experiments/paper_ratios.py); use pruning.ratio")
    if op is not None:
        if ratio is not None:
            via = f"paper_ratio={paper_ratio} ({op})" if paper_ratio is not None else str(op)
            raise PruningError(f"{via} sets the operating point of this cell, so pruning.ratio={ratio} would not be "
                               f"used; pass pruning.ratio=null (or drop {'paper_ratio' if paper_ratio is not None else op.knob})")
        return None, op.as_dict()
    if ratio is None and method.name != "dense":
        knob = f" or set {method.native_knob}" if method.native_knob else ""
        raise PruningError(f"pruning.ratio is null: set it (share of all parameters removed){knob}")
    return (None if ratio is None else check_ratio(ratio)), None


def run_cell(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    timer = Timer()
    t_start = time.perf_counter()
    check_eval(cfg.eval)                      # unknown protocol keys / missing data files fail before loading
    set_threads(cfg.get("threads"))
    seed_everything(cfg.seed)                 # random, numpy, torch: the one place (pruning.runtime)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device, cfg.model.get("device_map"))   # e.g. float16 on CPU -> error
    progress = bool(cfg.get("progress", True))
    recovery_cfg = cfg.get("recovery")
    recovering = recovery_cfg is not None and recovery_cfg.get("name", "none") != "none"
    if recovering:                            # bad recovery settings / missing data fail before heavy work
        from pruning.recovery import check_recovery

        check_recovery(recovery_cfg)
    store = ResultsStore(cfg.store.dir) if cfg.store.dir else ResultsStore()

    method = build_method(cfg)                # cheap (no model yet); it decides whether calibration is identity
    ratio, op = operating_point(method, cfg.pruning.ratio, cfg.get("paper_ratio"))
    calib_spec = check_calibration(cfg, method) if method.needs_calibration else None
    resolved = cell_config(cfg, uses_calibration=method.needs_calibration)
    is_dense = resolved["method"]["_target_"] == DENSE
    ratio = 0.0 if is_dense else ratio
    done = store.get(config_hash(resolved))
    if done is not None and not cfg.get("force", False):   # resumable sweeps: a finished cell is not rerun
        done["_store_path"], done["_skipped"] = str(store.path(done["config_hash"])), True
        return done
    dense_resolved = dense_config(resolved)
    dense_record = None if (is_dense or cfg.get("force", False)) else store.get(config_hash(dense_resolved))

    calib, calib_cached = None, None
    if method.needs_calibration:              # drawn with the tokenizer alone, before the weights load: a shape the
        with timer("calibration"):            # data cannot fill fails here, in seconds
            calib_tokenizer = load_tokenizer(cfg.model.path, fetch=bool(cfg.model.get("fetch", False)))
            calib, calib_cached = calibration(cfg, calib_tokenizer, resolved["model"]["fingerprint"], progress)
        if hasattr(method, "bind_sampler"):   # methods that draw more calibration sets (NIRVANA's KL seed choice)
            method.bind_sampler(lambda ds, n, seq_len, seed: data.draw_calibration(
                calib_tokenizer, dataclasses.replace(calib_spec, dataset=ds, n_samples=n, seq_len=seq_len, seed=seed),
                progress=progress), dict(cfg.calibration))

    with timer("load"):
        model, tokenizer, adapter = load_model(cfg.model.path, dtype, cfg.model.get("device_map"),
                                               fetch=bool(cfg.model.get("fetch", False)))
        if cfg.model.get("device_map") is None:
            model.to(device)
    budget = method.budget(model, ratio)      # impossible ratio -> clear error before any scoring

    params_before = adapter.num_params()
    if dense_record is not None:              # computed once per (model, eval) by an earlier cell
        dense = {k[len("dense_"):] if k.startswith("dense_") else k: v
                 for k, v in dense_record["metrics"].items() if not k.startswith("prerecovery_")}
    else:
        with timer("eval_dense"):
            dense = evaluate(model, tokenizer, cfg.eval, device=device, progress=progress)
        if not is_dense:
            store.write(make_record(dense_resolved, metrics=dense,
                                    params={"before": params_before, "after": params_before, "achieved_ratio": 0.0,
                                            "target_ratio": 0.0, "planned_ratio": 0.0},
                                    timings={"eval_dense": timer["eval_dense"], "total": timer["eval_dense"]},
                                    extra={"plan": {"remove": {}, "blocks": [], "meta": {"method": "dense"}},
                                           "widths": [w.as_dict() for w in adapter.all_widths()]}))
    with timer("prune"), cached_statistics(TensorCache("statistics"),
                                           {"model": resolved["model"]["fingerprint"]}) as stats_log:
        plan = method.prune(model, ratio, calib)
    with timer("surgery"):
        method.apply(model, plan, calib)
    params_after = adapter.num_params()
    with timer("eval_pruned"):                # also for an empty plan: apply may still change weights (SliceGPT
        pruned = dense if is_dense else evaluate(model, tokenizer, cfg.eval, device=device,   # at 0% rotates)
                                                 progress=progress)

    metrics = {} if is_dense else {f"dense_{k}": v for k, v in dense.items()}
    extra = {"plan": plan.to_dict(), "widths": [w.as_dict() for w in adapter.all_widths()],
             "dense_record": None if is_dense else config_hash(dense_resolved)}
    if not is_dense:
        extra["calibration"] = dict(resolved.get("calibration", {}), used=method.needs_calibration,
                                    cached=calib_cached, statistics=stats_log,
                                    **(calibration_record(calib_spec, calib) if method.needs_calibration
                                       else {"source": None}))
    if recovering:
        from pruning.recovery import recover

        with timer("recovery"):
            extra["recovery"] = recover(model, tokenizer, recovery_cfg, device=device, progress=progress,
                                        run_dir=run_dir)
        metrics.update({f"prerecovery_{k}": v for k, v in pruned.items()})
        with timer("eval_recovered"):
            pruned = evaluate(model, tokenizer, cfg.eval, device=device, progress=progress)
        params_after = adapter.num_params()
    metrics.update(pruned)

    if run_dir is not None and cfg.get("save_model"):
        with timer("save"):
            extra["saved_model"] = str(save_pruned(model, Path(run_dir) / "pruned_model", tokenizer,
                                            meta={"config_hash": config_hash(resolved), "plan": plan.to_dict()}))
    timer["total"] = time.perf_counter() - t_start
    record = make_record(
        resolved,
        metrics=metrics,
        params={"before": params_before, "after": params_after, "achieved_ratio": 1 - params_after / params_before,
                "target_ratio": ratio, "operating_point": op, "planned_ratio": budget.achieved},
        timings=dict(timer),
        extra=extra,
    )
    store.write(record)
    record["_store_path"] = str(store.path(record["config_hash"]))
    if cfg.get("logger") and cfg.logger.get("name", "none") != "none":   # after the write: W&B never costs a record
        try:
            from experiments.wandb_logger import log_record

            log_record(record, cfg.logger)
        except Exception as exc:  # noqa: BLE001
            import warnings

            warnings.warn(f"logger {cfg.logger.get('name')!r} failed: {exc}; record kept at {record['_store_path']}",
                          RuntimeWarning, stacklevel=2)
    return record


def one_line_table(record: dict) -> pd.DataFrame:
    """The row a person wants after a run: PPL dense -> pruned per protocol, params and achieved ratio."""
    cfg, params = record["config"], record["params"]
    op = params.get("operating_point")
    row = {"model": cfg["model"]["name"], "method": record["plan"]["meta"].get("method", "dense"),
           "target": f"{op['knob'].removeprefix('method.')}={op['value']:g}" if op else params["target_ratio"],
           "achieved": round(params["achieved_ratio"], 4),
           "params": f"{params['before']:,} -> {params['after']:,}"}
    metrics = record["metrics"]
    for key, res in metrics.get("ppl", {}).items():
        dense = metrics.get("dense_ppl", {}).get(key, res)["ppl"]
        before = metrics.get("prerecovery_ppl", {}).get(key)
        middle = f" -> {before['ppl']:.2f}" if before else ""   # dense -> pruned -> recovered
        row[key] = f"{dense:.2f}{middle} -> {res['ppl']:.2f}"
    return pd.DataFrame([row])
