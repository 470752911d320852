"""Importance scorers: small callables ``scorer(structure_set) -> 1-D tensor`` (one score per unit; low = prune).

Variants are arguments, not subclasses (Torch-Pruning's GroupMagnitudeImportance). Scorers register by name so
search methods (AdaPruner) can pick them from a config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pruning.registry import Registry
from pruning.structures import Member, StructureSet

SCORERS: Registry[type[Scorer]] = Registry("importance scorer")
AGGREGATIONS = ("sum", "mean", "max", "prod", "first", "last")
GQA_FOLDS = ("own", "official")
# The root member of each kind (LLM-Pruner's ``root_instances``: k_proj under GQA in llama3.py, gate_proj for the
# MLP); "first" aggregation reads it. "last" is the last member in execution order (o_proj / down_proj).
ROOTS = {"kv_group": "k_proj", "q_head": "q_proj", "mlp": "gate_proj", "hidden": "embed_tokens"}


def aggregate(per_member: list[torch.Tensor], how: str, root: int = 0) -> torch.Tensor:
    """Reduce member scores ``[n_members][...]`` elementwise over the members (LLM-Pruner ``--grouping_strategy``);
    ``root`` is the index of the group's root member (what "first" returns)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choices: {', '.join(AGGREGATIONS)}")
    if how == "first":
        return per_member[root]
    if how == "last":
        return per_member[-1]
    stacked = torch.stack(per_member)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "prod":
        return stacked.prod(0)
    return stacked.max(0).values


def gather_units(channel_scores: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum a per-channel score vector over each unit's channels (a head sums its d_h rows or columns)."""
    return channel_scores[member.index.to(channel_scores.device)].sum(-1)


def _official_fold_index(sset: StructureSet, member: Member) -> torch.Tensor:
    """The q/o channels LLM-Pruner's llama3.py credits to KV group j: it aligns q_proj's H·d_h channel scores onto
    k_proj's H_kv·d_h with ``view(H/H_kv, H_kv·d_h).sum(0)``, so group j collects query heads j, j+H_kv, ...
    (other groups' heads), while surgery removes the group's own heads. The parity fixture confirms this reading."""
    n_kv, width = sset.n_units, member.index.shape[1]
    d_h = next(m.index.shape[1] for m in sset.members if m.name == "k_proj")
    g = width // d_h
    heads = torch.arange(n_kv)[:, None] + n_kv * torch.arange(g)[None, :]  # [n_kv, g]
    return (heads[:, :, None] * d_h + torch.arange(d_h)).reshape(n_kv, width)


def group_scores(
    sset: StructureSet, channel_scores: list[torch.Tensor], how: str, gqa_fold: str = "own"
) -> torch.Tensor:
    """Unit scores from per-channel member scores, in the official order: align every member onto the root's
    channels (a KV group's g query heads summed channel by channel onto its d_h k_proj channels), reduce over the
    members per channel with ``how``, then sum a unit's channels. For sum and mean the order does not matter; for
    max, prod and first it does. ``gqa_fold="official"`` reproduces llama3.py's cross-group fold of query heads."""
    if gqa_fold not in GQA_FOLDS:
        raise ValueError(f"unknown gqa_fold {gqa_fold!r}; choices: {', '.join(GQA_FOLDS)}")
    width = min(m.index.shape[1] for m in sset.members)
    aligned = []
    for ch, m in zip(channel_scores, sset.members):
        index = m.index
        if gqa_fold == "official" and sset.kind == "kv_group" and m.name in ("q_proj", "o_proj"):
            index = _official_fold_index(sset, m)
        per_unit = ch[index.to(ch.device)]  # [n_units, k]
        aligned.append(per_unit.reshape(per_unit.shape[0], -1, width).sum(1))  # [n_units, width]
    names = [m.name for m in sset.members]
    root = names.index(ROOTS[sset.kind]) if ROOTS.get(sset.kind) in names else 0
    return aggregate(aligned, how, root).sum(-1)


class Scorer(ABC):
    needs_calibration = False

    @abstractmethod
    def __call__(self, sset: StructureSet) -> torch.Tensor: ...


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

    def __init__(self, p: int = 2, aggregation: str = "mean", gqa_fold: str = "own"):
        if p not in (1, 2):
            raise ValueError(f"magnitude p must be 1 or 2, got {p}")
        aggregate([torch.zeros(1)], aggregation)  # validate early
        if gqa_fold not in GQA_FOLDS:
            raise ValueError(f"unknown gqa_fold {gqa_fold!r}; choices: {', '.join(GQA_FOLDS)}")
        self.p, self.aggregation, self.gqa_fold = p, aggregation, gqa_fold

    def _elem(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().double()
        return w.abs() if self.p == 1 else w.pow(2)

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        if sset.kind == "block":
            per_unit = [
                aggregate([self._elem(p).sum().reshape(1) for p in ps], self.aggregation) for ps in sset.unit_params
            ]
            return torch.cat(per_unit)
        per_member = []
        for m in sset.members:
            channel = self._elem(m.weight)  # 1-D weights (hidden: norms): per element
            if channel.dim() == 2:
                channel = channel.sum(dim=1 - m.dim)  # one value per row (dim 0) or column (dim 1)
            per_member.append(channel)
        return group_scores(sset, per_member, self.aggregation, self.gqa_fold)


# Scorer modules register themselves on import (kept last: they import the names above).
from pruning.importance import activation, bip, newton, ntk, obs_saliency, taylor  # noqa: E402,F401
