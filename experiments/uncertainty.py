"""How sure a number is: bootstrap intervals over windows and documents, paired differences, seed spread.

Computed here once, from the per-window NLL sums and per-document correctness a record stores
(``experiments.persample``), for the tables layer and the dashboard. Two kinds of uncertainty are kept apart on
purpose:

- sampling error: the evaluation scored a finite sample of windows / documents. A percentile bootstrap resamples
  those units with replacement (``interval``); for two models scored on the *same* units the paired bootstrap
  resamples the per-unit differences (``paired``), which cancels the shared difficulty of each unit and is much
  tighter than two separate intervals. A paired difference is "resolved" when its interval excludes 0.
- seed spread: the same cell run with other calibration seeds gives other models; ``seed_summary`` reports mean,
  std, min and max over seeds and, separately, each seed's own sampling interval. It never pools the two.

The statistics. PPL = exp(sum NLL / sum scored tokens) over the resampled windows (windows may score different
token counts, so this is a ratio estimator, not a mean of per-window PPLs). Accuracy (in %) = 100 x the mean
correctness over the resampled documents; an average over tasks resamples each task's documents independently
and averages the task accuracies, as the papers' average does. A paired PPL reports the difference of mean NLL
(nats/token, a - b) and the PPL ratio a / b = exp(difference); a paired accuracy the difference in points.

Resampling: one ``numpy.random.default_rng(seed)``; groups (tasks) are drawn in order, and within a group resample
b is ``rng.integers(0, n, n)`` (drawn in blocks of rows to bound memory), so every interval is deterministic for a
given seed. Percentile method, with numpy's default (linear) quantile interpolation: with a few dozen windows
and skewed per-window NLLs BCa would correct for bias and skew, but it needs a jackknife per statistic and its
gain is within the Monte-Carlo noise at these sizes; the coverage test in tests/test_uncertainty.py measures what
the percentile interval achieves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from experiments.persample import doc_values, window_values
from experiments.record import NON_SEMANTIC

LEVEL = 0.95  # default confidence level
RESAMPLES = 2000  # default bootstrap resamples
SEED = 0  # default bootstrap seed
_BLOCK = 1 << 21  # indices drawn per block of resamples (bounds memory at ~16 MB per array)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval [low, high] at ``level``."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int
    n: tuple[int, ...]  # units resampled: windows, or documents per task
    unit: str  # "ppl", "%", "nats/token", "x" (ratio) or "points"

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Paired:
    """a - b on shared units: ``diff`` (mean NLL in nats/token, or accuracy in points) and, for PPL, the ratio."""

    diff: Interval
    ratio: Interval | None = None  # PPL_a / PPL_b = exp(diff)

    @property
    def resolved(self) -> bool:
        """The difference's interval excludes 0: the sample of units tells the two models apart."""
        return self.diff.excludes_zero

    def as_dict(self) -> dict:
        return {
            "diff": self.diff.as_dict(),
            "ratio": None if self.ratio is None else self.ratio.as_dict(),
            "resolved": self.resolved,
        }


# ---------------------------------------------------------------------------------------------------------------
# The resampler


def _check(level: float, resamples: int) -> None:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")


def resampled_sums(groups: Sequence[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """Per group (an [n] or [n, k] array of per-unit values), the column sums of ``resamples`` bootstrap resamples
    of its rows, as a [resamples, k] array. Groups are resampled independently, in order, from one generator."""
    rng = np.random.default_rng(seed)
    out = []
    for values in groups:
        values = np.asarray(values, dtype=np.float64)
        columns = np.ascontiguousarray((values[:, None] if values.ndim == 1 else values).T)
        k, n = columns.shape
        if n == 0:
            raise ValueError("cannot bootstrap over zero units")
        sums = np.empty((resamples, k))
        rows = max(1, _BLOCK // n)
        for b0 in range(0, resamples, rows):
            idx = rng.integers(0, n, size=(min(rows, resamples - b0), n))
            for j, column in enumerate(columns):  # one contiguous gather + sum per column: ~6x a 3-D gather
                sums[b0 : b0 + len(idx), j] = np.take(column, idx).sum(axis=1)
        out.append(sums)
    return out


def _interval(estimate: float, replicates: np.ndarray, level: float, n: tuple[int, ...], unit: str) -> Interval:
    if not np.all(np.isfinite(replicates)):  # an infinite / NaN PPL has no meaningful interval
        low = high = math.nan
    else:
        low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high), float(level), len(replicates), n, unit)


# ---------------------------------------------------------------------------------------------------------------
# On arrays


def ppl_interval(
    nll: npt.ArrayLike, tokens: npt.ArrayLike, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """PPL over windows (per-window NLL sums and scored tokens) with its percentile bootstrap interval."""
    _check(level, resamples)
    nll, tokens = _same_length(nll, tokens)
    (s,) = resampled_sums([np.stack([nll, tokens], axis=1)], resamples, seed)
    with np.errstate(over="ignore"):
        reps = np.exp(s[:, 0] / s[:, 1])
    return _interval(_ppl(nll.sum() / tokens.sum()), reps, level, (len(nll),), "ppl")


def ppl_paired(
    nll_a: npt.ArrayLike,
    nll_b: npt.ArrayLike,
    tokens: npt.ArrayLike,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Model a vs model b on the same windows: difference of mean NLL (a - b) and PPL ratio a / b."""
    _check(level, resamples)
    nll_a, tokens = _same_length(nll_a, tokens)
    nll_b, _ = _same_length(nll_b, tokens)
    d = nll_a - nll_b  # per window; exactly 0 when a and b are the same model
    (s,) = resampled_sums([np.stack([d, tokens], axis=1)], resamples, seed)
    diff_reps = s[:, 0] / s[:, 1]
    diff = d.sum() / tokens.sum()
    n = (len(d),)
    with np.errstate(over="ignore"):
        return Paired(
            _interval(diff, diff_reps, level, n, "nats/token"), _interval(_ppl(diff), np.exp(diff_reps), level, n, "x")
        )


def accuracy_interval(
    correct: Sequence[npt.ArrayLike], *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Accuracy in % with its interval; with several tasks (one correctness array each), their plain average."""
    _check(level, resamples)
    groups = [np.asarray(c, dtype=np.float64) for c in correct]
    sums = resampled_sums(groups, resamples, seed)
    reps = np.mean([100.0 * s[:, 0] / len(g) for s, g in zip(sums, groups)], axis=0)
    return _interval(_average_score(groups), reps, level, tuple(len(g) for g in groups), "%")


def accuracy_paired(
    correct_a: Sequence[npt.ArrayLike],
    correct_b: Sequence[npt.ArrayLike],
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Model a vs model b on the same documents (per task): difference in accuracy points, a - b."""
    _check(level, resamples)
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired accuracy: {len(correct_a)} tasks vs {len(correct_b)}")
    diffs = []
    for a, b in zip(correct_a, correct_b):
        a, b = _same_length(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        diffs.append(a - b)
    sums = resampled_sums(diffs, resamples, seed)
    reps = np.mean([100.0 * s[:, 0] / len(d) for s, d in zip(sums, diffs)], axis=0)
    estimate = _average_score([np.asarray(a, np.float64) for a in correct_a]) - _average_score(
        [np.asarray(b, np.float64) for b in correct_b]
    )
    return Paired(_interval(estimate, reps, level, tuple(len(d) for d in diffs), "points"))


def _ppl(nll_mean: float) -> float:
    """exp with pruning.eval.perplexity's convention: above 700 nats the PPL is inf, NaN stays NaN."""
    return math.inf if nll_mean > 700 else math.exp(nll_mean)


def _average_score(groups: Sequence[np.ndarray]) -> float:
    """The reported arithmetic, bit for bit: lm-eval's sum/len per task, x100, Python's sum over tasks / k."""
    scores = [100.0 * (sum(g.tolist()) / len(g)) for g in groups]
    return sum(scores) / len(scores)


def _same_length(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired per-unit values must be 1-D of one length, got shapes {a.shape} and {b.shape}")
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# On records
#
# A metric is addressed by a key: "<block>/<label>" for PPL ("ppl/ppl128-lp:wikitext2:test[:32 windows]"), or
# "<block>/<task>[/<acc|acc_norm>]" (the task's preset metric when none is named) and "<block>/average" for
# zero-shot; <block> is "ppl"/"zeroshot" (final model), "dense_..." or "prerecovery_...".


@dataclass(frozen=True)
class _Units:
    kind: str  # "ppl" or "acc"
    groups: list[np.ndarray]  # ppl: [[n, 2] (nll, tokens)]; acc: one bool array per task
    ids: tuple  # what must agree for two records to be paired
    reported: float  # the number the record reports (PPL, or score in %)


def _block(record: Mapping, key: str) -> tuple[str, str, Mapping]:
    block, sep, rest = key.partition("/")
    blocks = record.get("metrics") or {}
    if not sep or block not in blocks:
        raise KeyError(f"no metric {key!r}: keys look like '<block>/<label>' with block one of {sorted(blocks)}")
    return block, rest, blocks[block]


def _units(record: Mapping, key: str) -> _Units:
    """The per-unit values behind one reported number, checked to reproduce it."""
    block_name, rest, block = _block(record, key)
    head = block_name.rsplit("_", 1)[-1]
    if head == "ppl":
        entry = block.get(rest)
        if not isinstance(entry, Mapping):
            raise KeyError(f"no PPL entry {rest!r} in {block_name}; entries: {sorted(block)}")
        nll, tokens = window_values(entry)
        recomputed = _ppl(nll.sum() / tokens.sum())
        if not (
            math.isclose(recomputed, entry["ppl"], rel_tol=1e-9)
            or recomputed == entry["ppl"]
            or (math.isnan(recomputed) and math.isnan(entry["ppl"]))
        ):
            raise ValueError(f"{key}: per-window values give PPL {recomputed!r}, the record reports {entry['ppl']!r}")
        ids: tuple = (entry["per_window"]["windows"], tuple(tokens.tolist()))
        return _Units("ppl", [np.stack([nll, tokens.astype(np.float64)], axis=1)], ids, float(entry["ppl"]))
    if head != "zeroshot":
        raise KeyError(f"{key!r}: intervals exist for ppl and zeroshot blocks, not {block_name!r}")
    task, _, metric = rest.partition("/")
    if task == "average":
        avg = block.get("average") or {}
        tasks = [
            t
            for t, row in block.items()
            if t not in ("protocol", "average") and isinstance(row, Mapping) and row.get("metric")
        ]
        if len(tasks) != avg.get("n_tasks"):
            raise ValueError(f"{key}: {len(tasks)} scored task rows but the average says n_tasks={avg.get('n_tasks')}")
        pairs = [(t, block[t]["metric"]) for t in tasks]
        reported = avg["score"]
    else:
        row = block.get(task)
        if not isinstance(row, Mapping) or task == "protocol":
            raise KeyError(f"no zero-shot task {task!r} in {block_name}")
        chosen = metric or row.get("metric")
        if chosen not in ("acc", "acc_norm"):
            raise KeyError(f"{key}: name the metric (acc or acc_norm); this task is not in the preset")
        pairs = [(task, chosen)]
        reported = 100.0 * row[chosen]
    groups = [doc_values(block[t], m) for t, m in pairs]
    recomputed = _average_score([g.astype(np.float64) for g in groups])
    if not math.isclose(recomputed, reported, rel_tol=1e-12, abs_tol=1e-12):
        raise ValueError(f"{key}: per-document values give {recomputed!r} %, the record reports {reported!r}")
    ids = tuple((t, m, block[t]["per_doc"]["docs"]) for t, m in pairs)
    return _Units("acc", groups, ids, float(reported))


def interval(
    record: Mapping, key: str, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Bootstrap interval of one reported number; ``estimate`` is the reported value itself."""
    u = _units(record, key)
    if u.kind == "ppl":
        out = ppl_interval(u.groups[0][:, 0], u.groups[0][:, 1], level=level, resamples=resamples, seed=seed)
    else:
        out = accuracy_interval(u.groups, level=level, resamples=resamples, seed=seed)
    return Interval(u.reported, out.low, out.high, out.level, out.resamples, out.n, out.unit)


def paired(
    record_a: Mapping,
    record_b: Mapping,
    key: str,
    key_b: str | None = None,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """a - b for one metric of two records (or two phases of one: ``key_b="dense_ppl/..."``) on their shared
    units; refuses when the windows or documents differ (another tokenizer, another limit, another task set)."""
    ua, ub = _units(record_a, key), _units(record_b, key_b or key)
    if ua.kind != ub.kind or ua.ids != ub.ids:
        what = "windows (token ids and counts)" if ua.kind == "ppl" else "tasks, metrics or documents"
        raise ValueError(
            f"paired {key} vs {key_b or key}: the two were not scored on the same {what}; "
            f"a paired difference needs shared units"
        )
    if ua.kind == "ppl":
        a, b = ua.groups[0], ub.groups[0]
        return ppl_paired(a[:, 0], b[:, 0], a[:, 1], level=level, resamples=resamples, seed=seed)
    return accuracy_paired(ua.groups, ub.groups, level=level, resamples=resamples, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# Seeds


@dataclass(frozen=True)
class SeedSummary:
    """One cell over calibration seeds: the spread of the reported values, and each seed's sampling interval.

    ``std`` is the sample std (ddof=1; NaN for one seed). There is deliberately no pooled interval: seed spread
    (another calibration set gives another model) and sampling error (a finite set of windows / documents) answer
    different questions.
    """

    key: str
    seeds: tuple[str, ...]
    values: tuple[float, ...]
    mean: float
    std: float
    min: float
    max: float
    sampling: tuple[Interval, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def as_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("key", "seeds", "values", "mean", "std", "min", "max", "n")},
            "sampling": [i.as_dict() for i in self.sampling],
        }


def _without_seeds(value):
    if isinstance(value, Mapping):
        return {k: _without_seeds(v) for k, v in value.items() if k != "seed" and k != "progress"}
    if isinstance(value, list):
        return [_without_seeds(v) for v in value]
    return value


def seed_label(record: Mapping) -> str:
    cfg = record.get("config") or {}
    calib = cfg.get("calibration")
    if not isinstance(calib, Mapping):
        calib = {}
    return f"seed={cfg.get('seed')}" + (f", calibration.seed={calib['seed']}" if "seed" in calib else "")


def seed_summary(
    records: Sequence[Mapping], key: str, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
) -> SeedSummary:
    """Spread over the seeds of one cell plus each seed's interval; the records must differ only in seeds."""
    if not records:
        raise ValueError("seed_summary needs at least one record")
    same = [{k: v for k, v in _without_seeds(r.get("config") or {}).items() if k not in NON_SEMANTIC} for r in records]
    for r, cfg in zip(records[1:], same[1:]):
        if cfg != same[0]:
            diff = sorted(k for k in set(cfg) | set(same[0]) if cfg.get(k) != same[0].get(k))
            raise ValueError(
                f"seed_summary: record {r.get('config_hash')} differs from "
                f"{records[0].get('config_hash')} in more than seeds (config keys {diff})"
            )
    labels = [seed_label(r) for r in records]
    if len(set(labels)) != len(labels):
        raise ValueError(f"seed_summary: repeated seeds {labels}; keep one record per seed")
    sampling = tuple(interval(r, key, level=level, resamples=resamples, seed=seed) for r in records)
    values = np.array([i.estimate for i in sampling])
    return SeedSummary(
        key,
        tuple(labels),
        tuple(values.tolist()),
        float(values.mean()),
        float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        float(values.min()),
        float(values.max()),
        sampling,
    )


# ---------------------------------------------------------------------------------------------------------------
# Rows of a table: the mean over a cell's seeds, on units every seed shares


def _row_units(records: Sequence[Mapping], keys: str | Sequence[str]) -> list[list[_Units]]:
    """Per record, the units of each key; all records must have been scored on the same units."""
    if not records:
        raise ValueError("an interval needs at least one record")
    keys = [keys] if isinstance(keys, str) else list(keys)
    units = [[_units(r, k) for k in keys] for r in records]
    kinds = {u.kind for us in units for u in us}
    if len(kinds) != 1 or ("ppl" in kinds and len(keys) != 1):
        raise ValueError(f"{keys}: one PPL key, or zero-shot keys whose plain average is wanted")
    first = [u.ids for u in units[0]]
    for r, us in zip(records[1:], units[1:]):
        if [u.ids for u in us] != first:
            raise ValueError(
                f"{keys}: record {r.get('config_hash')} was not scored on the same windows or documents as "
                f"{records[0].get('config_hash')}"
            )
    return units


def _task_groups(units: Sequence[_Units]) -> list[np.ndarray]:
    """One record's per-task correctness arrays over all its keys (a "<block>/average" key holds several tasks)."""
    return [g for u in units for g in u.groups]


def _row_replicates(units: list[list[_Units]], resamples: int, seed: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bootstrap replicates of the row's value (mean over records) with every record on the same resample.

    Column layout: PPL [nll_1 .. nll_R, tokens]; accuracy, per task, [bits_1 .. bits_R]. With one record this draws
    exactly what ``interval`` draws (the same generator, the same n per group)."""
    r = len(units)
    if units[0][0].kind == "ppl":
        table = units[0][0].groups[0]
        cols = np.column_stack([us[0].groups[0][:, 0] for us in units] + [table[:, 1]])
        (s,) = resampled_sums([cols], resamples, seed)
        with np.errstate(over="ignore"):
            return np.exp(s[:, :r] / s[:, r : r + 1]).mean(axis=1), (len(table),)
    per_record = [_task_groups(us) for us in units]
    groups = [np.column_stack([g[t] for g in per_record]).astype(np.float64) for t in range(len(per_record[0]))]
    sums = resampled_sums(groups, resamples, seed)
    per_task = [100.0 * s / len(g) for s, g in zip(sums, groups)]  # [B, R] per task
    return np.mean(per_task, axis=0).mean(axis=1), tuple(len(g) for g in groups)


def _row_value(units: list[list[_Units]]) -> float:
    """The row's reported value: the mean over records of each record's number (PPL, score, or task average)."""
    if units[0][0].kind == "ppl":
        return float(np.mean([us[0].reported for us in units]))
    return float(np.mean([_average_score([g.astype(np.float64) for g in _task_groups(us)]) for us in units]))


def mean_interval(
    records: Sequence[Mapping],
    keys: str | Sequence[str],
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Sampling interval of a table row's value: the mean over its seeds' records of one metric, or of the plain
    average of several zero-shot keys (a table's own task set and metrics), the shared windows / documents
    resampled together and the seeds held fixed. Seed spread is not in it (it is the row's ± std). With one
    record and one key it equals ``interval``."""
    _check(level, resamples)
    units = _row_units(records, keys)
    reps, n = _row_replicates(units, resamples, seed)
    return _interval(_row_value(units), reps, level, n, "ppl" if units[0][0].kind == "ppl" else "%")


def mean_paired(
    records_a: Sequence[Mapping],
    records_b: Sequence[Mapping],
    keys: str | Sequence[str],
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Paired:
    """Row a vs row b (each a mean over its seeds) on the units both were scored on, resampled together.

    PPL: ``diff`` = log(mean PPL_a / mean PPL_b) (with one record per row: the difference of mean NLL, nats per
    token, as ``paired``) and ``ratio`` = mean PPL_a / mean PPL_b; accuracy: the difference in points."""
    _check(level, resamples)
    units = _row_units([*records_a, *records_b], keys)
    ua, ub = units[: len(records_a)], units[len(records_a) :]
    if not ua or not ub:
        raise ValueError("a paired difference needs at least one record on each side")
    reps_a, n = _row_replicates(ua, resamples, seed)
    reps_b, _ = _row_replicates(ub, resamples, seed)  # the same seed: the same resampled units for both rows
    va, vb = _row_value(ua), _row_value(ub)
    if ua[0][0].kind != "ppl":
        return Paired(_interval(va - vb, reps_a - reps_b, level, n, "points"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        diff = _interval(math.log(va / vb), np.log(reps_a / reps_b), level, n, "nats/token")
        return Paired(diff, _interval(va / vb, reps_a / reps_b, level, n, "x"))
