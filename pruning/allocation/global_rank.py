"""Global ranking across layers (Numerical Pruning §3.3, METHODS.md §3.7 "Allocation"; LLM-BIP ``global``).

All units of all candidate layers are pooled and removed lowest score first. The scores must already be comparable
across layers and kinds (Numerical: α-scaled z*; LLM-BIP: importance relative to the block's output norm).

``threshold``:
- ``param_budget`` (default) [ours]: remove in ascending order while that brings the removed parameters closer to
  ``pruning.ratio`` × all params, so the achieved fraction lands within one unit of the target.
- ``unit_count`` (the paper's Eq. 8): ``pruning.ratio`` is read as the paper's ρ, a fraction of *units* (heads +
  channels over all candidate layers); η = the ρ·N-th lowest score. The parameter fraction achieved is reported.

A layer is never emptied: every set keeps its best unit, as in FLAP's adaptive modes (the pooled entries are built by
the same helper). Query heads go one at a time wherever they rank (uneven KV groups); a KV head leaves with its last
query head and its k/v rows count as removed. Feasibility is decided from counts, before scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pruning.allocation import Budget, Uniform, check_ratio, plan_params
from pruning.allocation.flap import Tally, _entries, _max_removed
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan

THRESHOLDS = ("param_budget", "unit_count")


@dataclass
class GlobalRank:
    threshold: str = "param_budget"
    uniform: Uniform = field(default_factory=Uniform)  # candidate layer range only

    def __post_init__(self):
        if self.threshold not in THRESHOLDS:
            raise PruningError(f"unknown threshold {self.threshold!r}; choices: {', '.join(THRESHOLDS)}")

    def layers(self, n_layers: int) -> list[int]:
        return self.uniform.layers(n_layers)

    def budget(self, sets: list[StructureSet], ratio: float | None, total_params: int) -> Budget:
        ratio = check_ratio(ratio)
        if not sets or ratio == 0.0:
            return Budget(ratio, total_params, 0.0, 0)
        bad = [s.kind for s in sets if s.kind not in ("kv_group", "q_head", "mlp")]
        if bad:
            raise PruningError(f"global ranking pools heads and MLP channels, not {sorted(set(bad))}")
        if self.threshold == "unit_count":
            n_units = sum(s.n_units for s in sets)
            removable = sum(s.n_units - 1 for s in sets)
            if int(ratio * n_units) > removable:
                raise InfeasibleRatioError(
                    f"unit_count threshold: removing {ratio} of {n_units} units would empty "
                    f"a layer (at most {removable} can go)"
                )
            est = ratio * sum(s.n_units * s.params_per_unit for s in sets)  # exact value known after ranking
            return Budget(ratio, total_params, ratio, int(round(est)))
        max_removed = sum(_max_removed(s) for s in sets)
        if ratio * total_params > max_removed + 1e-9:
            raise InfeasibleRatioError(
                f"pruning.ratio={ratio} is infeasible for global ranking: keeping one attention unit and one MLP "
                f"channel per layer, at most {max_removed / total_params:.4f} of all parameters can be removed"
            )
        return Budget(ratio, total_params, 0.0, int(round(ratio * total_params)))

    def allocate(self, sets: list[StructureSet], scores: list[torch.Tensor], budget: Budget) -> PrunePlan:
        plan = PrunePlan()
        removed = 0
        ratio = check_ratio(budget.target)  # the ratio budget() checked
        if ratio > 0 and sets:
            entries = [e for i, (s, sc) in enumerate(zip(sets, scores)) for e in _entries(i, s, sc)]
            entries.sort(key=lambda e: (e.score, e.set_idx, e.unit))
            if self.threshold == "unit_count":
                chosen = entries[: int(ratio * sum(s.n_units for s in sets))]
            else:
                target = ratio * budget.total_params
                tally, best_k, best = Tally(sets), 0, 0
                for k, e in enumerate(entries, 1):
                    tally.take(e)
                    if abs(tally.removed - target) < abs(best - target):
                        best_k, best = k, tally.removed
                chosen = entries[:best_k]
            for e in chosen:
                plan.add(sets[e.set_idx].kind, sets[e.set_idx].layer, [e.unit])
            removed = plan_params(sets, plan)
        split: dict[str, int] = {}
        for kind, per in plan.remove.items():
            split[kind] = sum(len(v) for v in per.values())
        plan.meta["allocation"] = {
            "type": "global_rank",
            "threshold": self.threshold,
            "target": budget.target,
            "achieved": removed / budget.total_params,
            "removed_units": split,
        }
        return plan
