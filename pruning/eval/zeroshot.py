"""Zero-shot accuracy through lm-eval on the local data root (METHODS.md §1.5).

Why lm-eval and not our own loop: the papers' numbers come from lm-evaluation-harness prompts and scoring
(loglikelihood of each choice as a continuation; ``acc`` = argmax of the summed log-probabilities, ``acc_norm`` =
argmax after dividing by the choice's length in characters, as lm-eval does; ``len(str)``, which equals the byte
length on these ASCII-dominated sets). Re-implementing that would make our numbers a second, subtly different
protocol. The tasks are lm-eval's own definitions with only the data source changed
(``pruning.eval.tasks``), and the model is handed over in memory (``HFLM(pretrained=model)``), so a pruned model
is evaluated exactly as it sits after surgery and is never re-loaded from disk.

Metric per task follows a named preset, and the average is the papers' plain mean of task scores in percent:

=============  =====  =====  =========  ==========  ========  =============  ==========  ==============
preset         boolq  piqa   hellaswag  winogrande  arc_easy  arc_challenge  openbookqa  average over
=============  =====  =====  =========  ==========  ========  =============  ==========  ==============
llm_pruner     acc    acc    acc_norm   acc         acc       acc_norm       acc_norm    7 tasks
nirvana        acc    acc    acc_norm   acc         acc       acc_norm       acc [ours]  7 tasks [ours]
slicegpt       --     acc_n  acc_norm   acc         acc_norm  acc_norm       --          5 tasks
=============  =====  =====  =========  ==========  ========  =============  ==========  ==============

(NIRVANA's harness names acc_norm for arc_challenge/hellaswag and "acc for the others"; OBQA is not in its list,
so acc is our reading.) Every task row keeps both acc and acc_norm with their stderr whatever the preset, so a
table under another preset can be rebuilt from the record without re-running.

Every task row also keeps each document's correctness for acc and acc_norm (``per_doc``, packed by
``experiments.persample``), taken from lm-eval's own sample log, so intervals and paired tests need no re-run;
the reported accuracy is lm-eval's mean of exactly these values.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from experiments.persample import digest, doc_block
from pruning import data
from pruning.errors import PruningError
from pruning.eval.blocks import config_block
from pruning.eval.tasks import TASKS
from pruning.utils import eval_mode

TASK_ORDER = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

PRESETS: dict[str, dict[str, str]] = {
    "llm_pruner": {
        "boolq": "acc",
        "piqa": "acc",
        "hellaswag": "acc_norm",
        "winogrande": "acc",
        "arc_easy": "acc",
        "arc_challenge": "acc_norm",
        "openbookqa": "acc_norm",
    },
    "nirvana": {
        "boolq": "acc",
        "piqa": "acc",
        "hellaswag": "acc_norm",
        "winogrande": "acc",
        "arc_easy": "acc",
        "arc_challenge": "acc_norm",
        "openbookqa": "acc",
    },
    "slicegpt": {
        "piqa": "acc_norm",
        "hellaswag": "acc_norm",
        "winogrande": "acc",
        "arc_easy": "acc_norm",
        "arc_challenge": "acc_norm",
    },
}


@dataclass
class ZeroShotConfig:
    """The ``eval.zeroshot`` block; every field is recorded with the scores."""

    tasks: list[str] = field(default_factory=lambda: list(TASK_ORDER))
    metric_preset: str = "llm_pruner"
    limit: int | None = None  # first `limit` documents of each task (quick runs); None = full sets
    batch_size: int = 8  # lm-eval's loglikelihood batch; results do not depend on it beyond fp noise
    num_fewshot: int = 0  # the papers' protocol; only 0 is supported (no training splits offline)
    max_length: int | None = None  # context cap; None = lm-eval's default (the model's max_position_embeddings)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise PruningError(
                f"zeroshot: unknown task(s) {unknown or '[] (empty list)'}; choices: {', '.join(TASK_ORDER)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise PruningError(f"zeroshot: duplicate tasks in {self.tasks}")
        if self.metric_preset not in PRESETS:
            raise PruningError(f"zeroshot: unknown metric_preset {self.metric_preset!r}; choices: {', '.join(PRESETS)}")
        if not any(t in PRESETS[self.metric_preset] for t in self.tasks):
            raise PruningError(
                f"zeroshot: metric_preset {self.metric_preset!r} scores "
                f"{list(PRESETS[self.metric_preset])}; none of them is in tasks {self.tasks}"
            )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise PruningError(f"zeroshot: limit must be an int >= 1 or null, got {self.limit!r}")
        if self.num_fewshot != 0:
            raise PruningError(
                f"zeroshot: num_fewshot must be 0 (the papers' protocol; the offline data root has "
                f"no training splits to draw shots from), got {self.num_fewshot!r}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PruningError(f"zeroshot: batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise PruningError(f"zeroshot: max_length must be an int >= 2 or null, got {self.max_length!r}")

    @classmethod
    def from_cfg(cls, block: Any) -> ZeroShotConfig:
        """From the Hydra ``eval.zeroshot`` node (or a plain dict); unknown keys are an error, not ignored."""
        return config_block(cls, block, "eval.zeroshot")


def task_files(name: str) -> dict[str, Path]:
    """The data-root files of one task; a missing one is a DataError naming it (raised before any model load)."""
    task = TASKS[name]
    root = data.data_root()
    out = {}
    for role, rel in task.files.items():
        path = root / rel if root is not None else None
        if path is None or not path.is_file():
            raise data._missing(rel, f"zero-shot task {name!r} ({role} file)")
        out[role] = path
    return out


def check_zeroshot(block: Any) -> ZeroShotConfig:
    """Validate the config and find every data file; cheap, so the cell calls it before loading the model."""
    cfg = ZeroShotConfig.from_cfg(block)
    for name in cfg.tasks:
        task_files(name)
    return cfg


def harness_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


@contextmanager
def _quiet_harness():
    """lm-eval warns on every in-memory model and custom dataset (expected here); keep its progress bars only."""
    import datasets

    log = logging.getLogger("lm_eval")
    level, bars = log.level, datasets.utils.logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def make_lm(model, tokenizer, batch_size: int, device=None, max_length: int | None = None):
    """lm-eval's HF wrapper around the in-memory model.

    The tokenizer is copied because HFLM may set a pad token on it; the cell's tokenizer must stay as loaded.
    HFLM also calls ``model.eval()``; ``zeroshot`` restores the training flag afterwards.
    """
    from lm_eval.models.huggingface import HFLM

    with _quiet_harness():
        return HFLM(
            pretrained=model,
            tokenizer=copy.deepcopy(tokenizer),
            backend="causal",
            batch_size=batch_size,
            device=str(device) if device is not None else None,
            max_length=max_length,
        )


def run_harness(lm, cfg: ZeroShotConfig, log_samples: bool = True) -> dict:
    """``lm_eval.simple_evaluate`` on the local task definitions; returns lm-eval's raw result dict.

    ``log_samples`` (lm-eval's per-document log) only adds ``raw["samples"]``; the scores are the same."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    sizes: dict[str, int] = {}
    configs = [TASKS[name].config(task_files(name), first=cfg.limit, sizes=sizes) for name in cfg.tasks]
    with _quiet_harness():
        # include_defaults=False: the built-in tasks would try the hub, and indexing them costs ~10 s.
        raw = simple_evaluate(
            model=lm,
            tasks=configs,
            task_manager=TaskManager(include_defaults=False),
            num_fewshot=0,
            limit=cfg.limit,
            log_samples=log_samples,
        )
    for name, n in sizes.items():  # lm-eval saw only the first `limit` documents; the file holds n
        raw["n-samples"][name]["original"] = n
    return raw


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def per_doc(samples: list[dict], n_docs: int, task: str) -> dict[str, str]:
    """The ``per_doc`` block of one task from lm-eval's sample log: correctness per document in doc_id order."""
    samples = sorted((s for s in samples if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
    ids = [s["doc_id"] for s in samples]
    if ids != list(range(n_docs)):
        raise PruningError(
            f"zeroshot {task}: lm-eval logged documents {ids[:5]}... ({len(ids)}), expected doc_id "
            f"0..{n_docs - 1} once each"
        )
    metrics = [m for m in ("acc", "acc_norm") if all(m in s for s in samples)]
    return doc_block({m: [s[m] for s in samples] for m in metrics}, digest(s["doc_hash"] for s in samples))


def summarize(raw: dict, cfg: ZeroShotConfig) -> dict[str, Any]:
    """lm-eval's raw result -> our record block: per task acc/acc_norm (+stderr), the preset metric, the average,
    and (when ``raw`` has lm-eval's sample log) the per-document correctness."""
    preset = PRESETS[cfg.metric_preset]
    out: dict[str, Any] = {}
    for name in cfg.tasks:
        res, n = raw["results"][name], raw["n-samples"][name]
        row: dict[str, Any] = {
            m: _num(res.get(f"{m},none")) for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
        }
        metric = preset.get(name)
        row.update(
            metric=metric,
            score=None if metric is None else 100.0 * row[metric],
            n_docs=int(n["effective"]),
            n_docs_total=int(n["original"]),
            split=TASKS[name].split,
            source={k: str(p) for k, p in task_files(name).items()},
        )
        if "samples" in raw:
            row["per_doc"] = per_doc(raw["samples"][name], row["n_docs"], name)
        out[name] = row
    scored = [name for name in cfg.tasks if name in preset]
    metrics = ", ".join(f"{t}={preset[t]}" for t in scored)
    complete = len(scored) == len(preset)
    out["average"] = {
        "score": sum(out[t]["score"] for t in scored) / len(scored),
        "metric": f"mean of {len(scored)} task scores in % ({cfg.metric_preset}: {metrics})"
        + ("" if complete else f"; PARTIAL: {len(scored)} of the preset's {len(preset)} tasks"),
        "n_tasks": len(scored),
        "complete": complete,  # False: not comparable with the papers' average
    }
    out["protocol"] = {
        **asdict(cfg),
        "harness": "lm-eval",
        "harness_version": harness_version(),
        "max_length": raw.get("max_length", cfg.max_length),
        "docs": "first `limit` of each task" if cfg.limit else "full sets",
    }
    return out


def zeroshot(model, tokenizer, cfg: Any, device=None, progress: bool = True) -> dict[str, Any]:
    """Evaluate the in-memory ``model`` on the configured tasks; the block the cell records as ``zeroshot``.

    ``progress`` is accepted for the common evaluate() signature; lm-eval draws its own request bars regardless.
    """
    cfg = check_zeroshot(cfg)
    t0 = time.perf_counter()
    with eval_mode(model):  # HFLM calls model.eval() too; the caller's training flag comes back afterwards
        lm = make_lm(model, tokenizer, cfg.batch_size, device, cfg.max_length)
        raw = run_harness(lm, cfg)
    out = summarize(raw, cfg)
    out["protocol"]["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def zeroshot_table(block: dict[str, Any], dense: dict[str, Any] | None = None):
    """Printable table: one row per task plus the average; with ``dense`` (a different block), score as d -> p."""
    import pandas as pd

    tasks = [t for t in block if t in TASKS]
    n_preset = len(PRESETS[block["protocol"]["metric_preset"]])
    compare = dense is not None and dense is not block

    def score(b: dict, key: str) -> str:
        s = b[key]["score"]
        return "-" if s is None else f"{s:.2f}"

    rows = []
    for t in tasks + ["average"]:
        r = block[t]
        is_task = t != "average"
        rows.append(
            {
                "task": t if is_task else f"average ({r['n_tasks']}{'' if r['complete'] else ' of ' + str(n_preset)})",
                "metric": (r["metric"] or "-") if is_task else block["protocol"]["metric_preset"],
                "n_docs": r["n_docs"] if is_task else "",
                "acc": f"{100 * r['acc']:.2f}" if is_task and r["acc"] is not None else "",
                "acc_norm": f"{100 * r['acc_norm']:.2f}" if is_task and r["acc_norm"] is not None else "",
                "score %": f"{score(dense, t)} -> {score(block, t)}"
                if compare and dense is not None
                else score(block, t),
            }
        )
    return pd.DataFrame(rows)
