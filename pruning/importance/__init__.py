"""Importance scorers: small callables ``scorer(structure_set) -> 1-D tensor`` (one score per unit; low = prune).

Variants are arguments, not subclasses (Torch-Pruning's GroupMagnitudeImportance). Scorers register by name so
search methods (AdaPruner) can pick them from a config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pruning.registry import Registry
from pruning.structures import Member, StructureSet

SCORERS: Registry[type["Scorer"]] = Registry("importance scorer")
AGGREGATIONS = ("sum", "mean", "max", "prod", "first", "last")


def aggregate(per_member: list[torch.Tensor], how: str) -> torch.Tensor:
    """Reduce member scores [n_members][n_units] to unit scores (LLM-Pruner ``--grouping_strategy``).

    Members are listed in execution order, so "first" is the root (q/gate) and "last" is o_proj/down_proj.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choices: {', '.join(AGGREGATIONS)}")
    if how == "first":
        return per_member[0]
    if how == "last":
        return per_member[-1]
    stacked = torch.stack(per_member)
    return {"sum": stacked.sum, "mean": stacked.mean, "prod": stacked.prod,
            "max": lambda dim: stacked.max(dim).values}[how](0)


def gather_units(channel_scores: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum a per-channel score vector over each unit's channels (a head sums its d_h rows or columns)."""
    return channel_scores[member.index.to(channel_scores.device)].sum(-1)


class Scorer(ABC):
    needs_calibration = False

    @abstractmethod
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        ...


@SCORERS.register("random")
class RandomScorer(Scorer):
    """Uniform random scores from one seeded generator: the same seed gives the same plan."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, sset: StructureSet) -> torch.Tensor:
        return torch.rand(sset.n_units, generator=self.generator, dtype=torch.float64)


@SCORERS.register("magnitude")
class MagnitudeScorer(Scorer):
    """Σ|w|^p over each member's unit slice, reduced over members (LLM-Pruner MagnitudeImportance, default mean)."""

    def __init__(self, p: int = 2, aggregation: str = "mean"):
        if p not in (1, 2):
            raise ValueError(f"magnitude p must be 1 or 2, got {p}")
        aggregate([torch.zeros(1)], aggregation)  # validate early
        self.p, self.aggregation = p, aggregation

    def _elem(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().double()
        return w.abs() if self.p == 1 else w.pow(2)

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        if sset.kind == "block":
            per_unit = [aggregate([self._elem(m.weight).sum().reshape(1) for m in ms], self.aggregation)
                        for ms in sset.unit_members]
            return torch.cat(per_unit)
        per_member = []
        for m in sset.members:
            channel = self._elem(m.weight)                      # 1-D weights (hidden: norms): per element
            if channel.dim() == 2:
                channel = channel.sum(dim=1 - m.dim)            # one value per row (dim 0) or column (dim 1)
            per_member.append(gather_units(channel, m))
        return aggregate(per_member, self.aggregation)


# Scorer modules register themselves on import (kept last: they import the names above).
from pruning.importance import activation  # noqa: E402,F401
from pruning.importance import ntk, taylor  # noqa: E402,F401
from pruning.importance import obs_saliency  # noqa: E402,F401
from pruning.importance import bip, newton  # noqa: E402,F401
