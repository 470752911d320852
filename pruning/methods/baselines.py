"""Baselines (METHODS.md §2): dense, random and magnitude (L1/L2) over KV groups / query heads / MLP channels."""

from __future__ import annotations

from pruning.allocation import Uniform
from pruning.importance import MagnitudeScorer, RandomScorer
from pruning.methods.base import ScoreAndAllocate


def dense(**_ignored) -> ScoreAndAllocate:
    """No pruning: the baseline cell."""
    return ScoreAndAllocate(name="dense", scorer=None, structures=[], allocation=Uniform())


def random(seed: int = 0, structures=("kv_group", "mlp"), allocation: Uniform | None = None) -> ScoreAndAllocate:
    return ScoreAndAllocate(name="random", scorer=RandomScorer(seed), structures=list(structures),
                            allocation=allocation or Uniform())


def magnitude(p: int = 2, aggregation: str = "mean", structures=("kv_group", "mlp"),
              allocation: Uniform | None = None) -> ScoreAndAllocate:
    return ScoreAndAllocate(name=f"magnitude_l{p}", scorer=MagnitudeScorer(p, aggregation),
                            structures=list(structures), allocation=allocation or Uniform())
