"""One experiment cell: load -> dense eval -> prune -> method.apply (surgery + compensation) -> [recovery] -> eval
-> one record in the store.

Every user mistake is caught before the model is scored or evaluated (ratio, names, data files, architecture,
checkpoint), and nothing is written unless the whole cell succeeds.

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
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.cache import TensorCache, dir_fingerprint, file_sha256
from experiments.record import config_hash, make_record
from experiments.store import ResultsStore
from pruning import data
from pruning.allocation import check_ratio
from pruning.calibration import cached_statistics
from pruning.eval import EVAL_VERSION, check_eval, evaluate
from pruning.models import load_model
from pruning.models.loading import resolve_checkpoint
from pruning.runtime import check_device, resolve_dtype, seed_everything
from pruning.surgery.save import save_pruned

DENSE = "pruning.methods.baselines.dense"
CALIB_SAMPLER_VERSION = 1


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
    for key in ("allocation", "calibration", "recovery"):
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
    """Everything the calibration ids depend on: tokenizer (via the checkpoint), data file content, shape, seed."""
    c = cfg.calibration
    return {"tokenizer_of": model_fingerprint, "dataset": c.dataset,
            "source_sha256": file_sha256(data.calibration_source(c.dataset)),
            "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed, "sampler": CALIB_SAMPLER_VERSION}


def calibration(cfg: DictConfig, tokenizer, model_fingerprint: str, progress: bool) -> tuple[torch.Tensor, bool]:
    """Calibration token batches, cached on disk by tokenizer, data file content, shape and seed."""
    c = cfg.calibration
    key = calib_key(cfg, model_fingerprint)
    return TensorCache("calibration").get_or_compute(
        key, lambda: data.calibration_batches(tokenizer, c.dataset, c.n_samples, c.seq_len, c.seed,
                                              progress=progress))


def run_cell(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    timer = Timer()
    t_start = time.perf_counter()
    ratio = check_ratio(cfg.pruning.ratio)
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
    resolved = cell_config(cfg, uses_calibration=method.needs_calibration)
    is_dense = resolved["method"]["_target_"] == DENSE
    ratio = 0.0 if is_dense else ratio
    done = store.get(config_hash(resolved))
    if done is not None and not cfg.get("force", False):   # resumable sweeps: a finished cell is not rerun
        done["_store_path"], done["_skipped"] = str(store.path(done["config_hash"])), True
        return done
    dense_resolved = dense_config(resolved)
    dense_record = None if (is_dense or cfg.get("force", False)) else store.get(config_hash(dense_resolved))

    with timer("load"):
        model, tokenizer, adapter = load_model(cfg.model.path, dtype, cfg.model.get("device_map"),
                                               fetch=bool(cfg.model.get("fetch", False)))
        if cfg.model.get("device_map") is None:
            model.to(device)
    budget = method.budget(model, ratio)      # impossible ratio -> clear error before any scoring

    calib, calib_cached = None, None
    if method.needs_calibration:
        with timer("calibration"):
            calib, calib_cached = calibration(cfg, tokenizer, resolved["model"]["fingerprint"], progress)
        if hasattr(method, "bind_sampler"):   # methods that draw more calibration sets (NIRVANA's KL seed choice)
            method.bind_sampler(lambda ds, n, seq_len, seed: data.calibration_batches(
                tokenizer, ds, n, seq_len, seed, progress=progress), dict(cfg.calibration))

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
    with timer("eval_pruned"):
        pruned = evaluate(model, tokenizer, cfg.eval, device=device, progress=progress) \
            if not plan.is_empty() else dense

    metrics = {} if is_dense else {f"dense_{k}": v for k, v in dense.items()}
    extra = {"plan": plan.to_dict(), "widths": [w.as_dict() for w in adapter.all_widths()],
             "dense_record": None if is_dense else config_hash(dense_resolved)}
    if not is_dense:
        extra["calibration"] = dict(resolved.get("calibration", {}), used=method.needs_calibration,
                                    cached=calib_cached,
                                    statistics=stats_log,
                                    source=str(data.calibration_source(cfg.calibration.dataset))
                                    if method.needs_calibration else None)
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
                "target_ratio": ratio, "planned_ratio": budget.achieved},
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
    row = {"model": cfg["model"]["name"], "method": record["plan"]["meta"].get("method", "dense"),
           "target": params["target_ratio"], "achieved": round(params["achieved_ratio"], 4),
           "params": f"{params['before']:,} -> {params['after']:,}"}
    metrics = record["metrics"]
    for key, res in metrics.get("ppl", {}).items():
        dense = metrics.get("dense_ppl", {}).get(key, res)["ppl"]
        before = metrics.get("prerecovery_ppl", {}).get(key)
        middle = f" -> {before['ppl']:.2f}" if before else ""   # dense -> pruned -> recovered
        row[key] = f"{dense:.2f}{middle} -> {res['ppl']:.2f}"
    return pd.DataFrame([row])
