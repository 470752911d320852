"""LLM-BIP (Wu, arXiv 2412.06419; METHODS.md §3.8) as the framework interpretation ``interp_v1`` [ours; NOT the
paper's formula, which was not available]: block-output importance from one gradient-free forward pass of the dense
model (``pruning.importance.bip``), no compensation, optional LoRA through ``recovery=lora``.

Recipe: one collector pass over the dense model (``absmean`` at down_proj; its sequential walk without drops,
because the scorer's head hooks ride on that forward and dense-mode results may come from the sweep cache) -> scores
-> ``allocation``: ``per_layer`` (default; the cell's uniform allocator: the same fraction of attention units and MLP
channels in every layer, ranked inside each block) or ``global`` (``GlobalRank`` on importances relative to each
block's mean output norm) -> plain surgery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pruning.allocation import Budget, Uniform
from pruning.allocation.global_rank import GlobalRank
from pruning.calibration import collect
from pruning.errors import PruningError
from pruning.importance.bip import BIPScorer
from pruning.methods.base import ScoreAndAllocate
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan

ALLOCATIONS = ("per_layer", "global")


@dataclass
class LlmBip(ScoreAndAllocate):
    scorer: BIPScorer
    allocation: Uniform | GlobalRank = field(default_factory=Uniform)  # per_layer | global
    batch_size: int = 8
    progress: bool = True

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        layers = sorted({s.decoder_layer for s in sets})
        # sequential mode without drops = the dense statistics, from a real forward: dense-mode statistics
        # may be served from the sweep's statistics cache, and the head hooks must see the activations
        with self.scorer.recording(model, layers):
            stats = collect(
                model,
                calib,
                stats={"down_proj": self.scorer.requires},
                layers=layers,
                mode="sequential",
                batch_size=self.batch_size,
                progress=self.progress,
            )
        self.scorer.bind(stats)
        plan = self.allocation.allocate(sets, [self.scorer(s) for s in sets], budget)
        self.scorer.bind(None)
        return plan

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        plan = super().prune(model, ratio, calib)
        plan.meta["llm_bip"] = {"variant": self.scorer.variant, "propagate": self.scorer.propagate}
        return plan


def llm_bip(
    variant: str = "interp_v1",
    propagate: str = "none",
    allocation_mode: str = "per_layer",
    structures=("kv_group", "mlp"),
    batch_size: int = 8,
    progress: bool = True,
    count_rule: str = "llm_pruner",
    layers: dict | None = None,
) -> LlmBip:
    """``layers`` ({start_frac, end_frac, start, end}; all layers by default) is the candidate layer range of both
    allocation modes; ``count_rule`` counts ``per_layer``'s units (``global`` ranks single units)."""
    if allocation_mode not in ALLOCATIONS:
        raise PruningError(f"llm_bip.allocation_mode must be one of {ALLOCATIONS}, got {allocation_mode!r}")
    allocation = Uniform.over(layers, count_rule=count_rule)
    scorer = BIPScorer(variant, propagate, relative=allocation_mode == "global")
    alloc = allocation if allocation_mode == "per_layer" else GlobalRank("param_budget", uniform=allocation)
    return LlmBip(
        name="llm_bip",
        scorer=scorer,
        structures=list(structures),
        allocation=alloc,
        batch_size=batch_size,
        progress=progress,
    )
