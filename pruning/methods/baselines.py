"""Baselines (METHODS.md §2): dense, random and magnitude (L1/L2) over KV groups / query heads / MLP channels.

Random and L2 are LLM-Pruner's Table 1 baselines (its ``--pruner_type random | l2`` through the same MetaPruner), so
they take LLM-Pruner's native knob ``group_ratio`` and count rule.
"""

from __future__ import annotations

import dataclasses
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


def _with_group_ratio(allocation: Uniform | None, group_ratio: float | None) -> Uniform:
    allocation = allocation or Uniform()
    if group_ratio is None:
        return allocation
    if not 0.0 <= float(group_ratio) < 1.0:
        raise PruningError(f"group_ratio must be in [0, 1), got {group_ratio}")
    return dataclasses.replace(allocation, group_ratio=float(group_ratio))


def dense(**_ignored) -> ScoreAndAllocate:
    """No pruning: the baseline cell."""
    return ScoreAndAllocate(name="dense", scorer=None, structures=[], allocation=Uniform())


def random(seed: int = 0, structures=("kv_group", "mlp"), group_ratio: float | None = None,
           allocation: Uniform | None = None) -> Baseline:
    return Baseline(name="random", scorer=RandomScorer(seed), structures=list(structures),
                    allocation=_with_group_ratio(allocation, group_ratio))


def magnitude(p: int = 2, aggregation: str = "mean", structures=("kv_group", "mlp"), group_ratio: float | None = None,
              gqa_fold: str = "own", allocation: Uniform | None = None) -> Baseline:
    return Baseline(name=f"magnitude_l{p}", scorer=MagnitudeScorer(p, aggregation, gqa_fold),
                    structures=list(structures), allocation=_with_group_ratio(allocation, group_ratio))
