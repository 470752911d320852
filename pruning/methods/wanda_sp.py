"""Wanda-SP (structured Wanda as FLAP's baseline, METHODS.md §3.4): |W|·‖X‖ at the o_proj/down_proj inputs,
uniform per layer, layers pruned sequentially.

Recipe: ``calibration.sequential`` yields layer l's statistics on inputs produced by the already-pruned layers < l
-> ``wanda`` scores -> the uniform allocator's cut for that layer -> ``step.drop(plan)`` so layer l+1 sees layer l
pruned. The model is not touched until ``apply`` (plain surgery, no compensation: surviving weights are unchanged).

As the FLAP repository's ``prune_wanda_sp``: int(p·n) units of each kind per layer (``count_rule: floor``) and, with
GQA, single query heads (``structures=[q_head, mlp]``; a KV head leaves with its last query head). Operating point:
``attn_mlp_ratio`` (native, the code's ``--pruning_ratio`` p: int(p·H) query heads and int(p·I) MLP channels in
every layer), or ``pruning.ratio`` (a share of all parameters; p is the per-layer fraction that comes closest, and
the plan reports the exact removal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from pruning.allocation import Budget, Uniform, plan_params
from pruning.calibration import sequential
from pruning.errors import PruningError
from pruning.importance.activation import WandaScorer
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.methods.flap import attn_mlp_ratio_point
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan


@dataclass
class WandaSP(ScoreAndAllocate):
    native_knob = "method.attn_mlp_ratio"
    variable_length_calibration = True  # statistics only through pruning.calibration

    scorer: WandaScorer
    attn_mlp_ratio: float | None = None  # native knob (fixes the allocator's per-layer fraction)
    batch_size: int = 8
    progress: bool = True

    def operating_point(self) -> OperatingPoint | None:
        return attn_mlp_ratio_point(self.attn_mlp_ratio)

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        plan = PrunePlan()
        for step in sequential(
            model,
            calib,
            stats=self.scorer.requires,
            sites=("o_proj", "down_proj"),
            layers=sorted({s.decoder_layer for s in sets}),
            batch_size=self.batch_size,
            progress=self.progress,
        ):
            layer_sets = [s for s in sets if s.layer == step.layer]
            self.scorer.bind({step.layer: step.stats})
            layer_plan = self.allocation.allocate(layer_sets, [self.scorer(s) for s in layer_sets], budget)
            for kind, per in layer_plan.remove.items():
                for layer, units in per.items():
                    plan.add(kind, layer, units)
            step.drop(layer_plan)
        self.scorer.bind(None)
        plan.meta["allocation"] = dict(
            layer_plan.meta["allocation"], achieved=plan_params(sets, plan) / budget.total_params
        )
        return plan


def wanda_sp(
    structures=("q_head", "mlp"),
    attn_mlp_ratio: float | None = None,
    count_rule: str = "floor",
    batch_size: int = 8,
    progress: bool = True,
    layers: dict | None = None,
) -> WandaSP:
    """Uniform per layer over ``layers`` ({start_frac, end_frac, start, end}; all layers by default); the count rule
    is FLAP's int(p·n) by default, and ``attn_mlp_ratio`` (if set) fixes p."""
    allocation = Uniform.over(layers, count_rule=count_rule)
    if attn_mlp_ratio is not None:
        if not 0.0 <= float(attn_mlp_ratio) < 1.0:
            raise PruningError(f"wanda_sp attn_mlp_ratio must be in [0, 1), got {attn_mlp_ratio}")
        attn_mlp_ratio = float(attn_mlp_ratio)
        allocation = dataclasses.replace(allocation, group_ratio=attn_mlp_ratio)
    return WandaSP(
        name="wanda_sp",
        scorer=WandaScorer(),
        structures=list(structures),
        allocation=allocation,
        attn_mlp_ratio=attn_mlp_ratio,
        batch_size=batch_size,
        progress=progress,
    )
