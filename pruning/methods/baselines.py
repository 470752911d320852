"""Baselines (METHODS.md §2): dense, random and magnitude (L1/L2) over KV groups / query heads / MLP channels.

Random and L2 are LLM-Pruner's Table 1 baselines (its ``--pruner_type random | l2`` through the same MetaPruner), so
they take LLM-Pruner's native knob ``group_ratio`` and count rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from pruning.allocation import Uniform
from pruning.errors import PruningError
from pruning.importance import MagnitudeScorer, RandomScorer
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.methods.llm_pruner import group_ratio_point


@dataclass
class Baseline(ScoreAndAllocate):
    native_knob = "method.group_ratio"

    def operating_point(self) -> OperatingPoint | None:
        return group_ratio_point(self.allocation)


def _uniform(layers: dict | None, count_rule: str, group_ratio: float | None) -> Uniform:
    """LLM-Pruner's MetaPruner allocation: the same fraction of every kind in every layer of ``layers``."""
    if group_ratio is not None and not 0.0 <= float(group_ratio) < 1.0:
        raise PruningError(f"group_ratio must be in [0, 1), got {group_ratio}")
    return Uniform.over(layers, count_rule=count_rule, group_ratio=None if group_ratio is None else float(group_ratio))


def dense(**_ignored) -> ScoreAndAllocate:
    """No pruning: the baseline cell."""
    return ScoreAndAllocate(name="dense", scorer=None, structures=[], allocation=Uniform())


def random(
    seed: int = 0,
    structures=("kv_group", "mlp"),
    group_ratio: float | None = None,
    count_rule: str = "llm_pruner",
    layers: dict | None = None,
) -> Baseline:
    """``layers``: the candidate layer range ({start_frac, end_frac, start, end}; all layers by default)."""
    return Baseline(
        name="random",
        scorer=RandomScorer(seed),
        structures=list(structures),
        allocation=_uniform(layers, count_rule, group_ratio),
    )


def magnitude(
    p: int = 2,
    aggregation: str = "mean",
    structures=("kv_group", "mlp"),
    group_ratio: float | None = None,
    gqa_fold: str = "own",
    count_rule: str = "llm_pruner",
    layers: dict | None = None,
) -> Baseline:
    """``layers``: the candidate layer range ({start_frac, end_frac, start, end}; all layers by default)."""
    return Baseline(
        name=f"magnitude_l{p}",
        scorer=MagnitudeScorer(p, aggregation, gqa_fold),
        structures=list(structures),
        allocation=_uniform(layers, count_rule, group_ratio),
    )
