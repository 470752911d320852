"""Wanda-SP (structured Wanda as FLAP's baseline, METHODS.md §3.4): |W|·‖X‖ at the o_proj/down_proj inputs,
uniform per layer, layers pruned sequentially.

Recipe: ``calibration.sequential`` yields layer l's statistics on inputs produced by the already-pruned layers < l
-> ``wanda`` scores -> the uniform allocator's cut for that layer -> ``step.drop(plan)`` so layer l+1 sees layer l
pruned. The model is not touched until ``apply`` (plain surgery, no compensation: surviving weights are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pruning.allocation import Budget, Uniform
from pruning.calibration import sequential
from pruning.importance.activation import WandaScorer
from pruning.methods.base import ScoreAndAllocate
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan


@dataclass
class WandaSP(ScoreAndAllocate):
    variable_length_calibration = True      # statistics only through pruning.calibration
    batch_size: int = 8
    progress: bool = True

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        plan = PrunePlan()
        for step in sequential(model, calib, stats=self.scorer.requires, sites=("o_proj", "down_proj"),
                               layers=sorted({s.layer for s in sets}), batch_size=self.batch_size,
                               progress=self.progress):
            layer_sets = [s for s in sets if s.layer == step.layer]
            self.scorer.bind({step.layer: step.stats})
            layer_plan = self.allocation.allocate(layer_sets, [self.scorer(s) for s in layer_sets], budget)
            for kind, per in layer_plan.remove.items():
                for layer, units in per.items():
                    plan.add(kind, layer, units)
            plan.meta["allocation"] = layer_plan.meta.get("allocation")
            step.drop(layer_plan)
        self.scorer.bind(None)
        return plan


def wanda_sp(structures=("kv_group", "mlp"), batch_size: int = 8, progress: bool = True,
             allocation: Uniform | None = None) -> WandaSP:
    return WandaSP(name="wanda_sp", scorer=WandaScorer(), structures=list(structures),
                   allocation=allocation or Uniform(), batch_size=batch_size, progress=progress)
