"""FLAP's allocation modes (METHODS.md §3.3 "Allocation", CASIA-IVA-Lab/FLAP lib/prune.py ``--structure``).

- ``UL-UM`` uniform layers, uniform modules: every layer loses the same fraction of its attention units and of its
  MLP channels (the framework's ``Uniform`` allocator, which picks that fraction for the target).
- ``UL-MM`` uniform layers, manual mix: every layer loses ``remove_heads // n_layers`` attention units (FLAP's
  ``--remove_heads`` is a total over layers); the MLP channel count per layer is then fixed by the target.
- ``AL-MM`` adaptive layers, manual mix: the ``remove_heads`` lowest attention units over all layers, then the
  lowest MLP channels over all layers up to the target.
- ``AL-AM`` (default) adaptive layers and modules: each (layer, module) channel metric is z-scored (mean and
  unbiased std over that layer's channels; attention over its H·d_h o_proj inputs, then averaged per unit), all
  units of all layers are pooled and removed lowest first until the removed parameters are closest to the target.
  FLAP weighs a head as 512/3 MLP channels (its params in channel units); counting parameters directly is that
  weighting generalised to KV groups and query heads (params(unit)/(3d), METHODS.md).

Framework semantics: ``pruning.ratio`` is a fraction of ALL parameters (FLAP's own ratio counts attention+MLP
weights only), the compensation biases FLAP adds (d params per o_proj/down_proj that loses units) are counted, and
the allocation reports what it achieved. A layer is never emptied: the adaptive modes keep each layer's best
attention unit (for query heads: one head per KV group) and best MLP channel out of the pool; the uniform modes
refuse a count that would empty a layer. Feasibility is decided from counts, before any scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pruning.allocation import Budget, Uniform, _removed, check_ratio
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.importance.activation import ATTENTION_KINDS, output_member, reduce_units
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan

STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """FLAP's ``standarlization``: (x − mean) / std (unbiased) over one (layer, module) metric vector.

    A constant vector (std 0, e.g. zero variance everywhere) carries no ranking information and maps to zeros.
    """
    x = x.double()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


@dataclass
class _Entry:
    """A removable step: one unit, or for query heads one head from every KV group (a "round")."""

    set_idx: int
    units: list[int]
    score: float
    params: int


def _entries(i: int, sset: StructureSet, score: torch.Tensor) -> list[_Entry]:
    """Removable entries of one set, lowest first per set; the best entry (the one a layer keeps) is left out."""
    score = score.double().cpu()
    if sset.partition is None:
        order = torch.argsort(score, stable=True).tolist()
        return [_Entry(i, [u], float(score[u]), sset.params_per_unit) for u in order[:-1]]
    groups = int(sset.partition.max()) + 1
    per_group = [(sset.partition == g).nonzero().flatten() for g in range(groups)]
    ordered = [m[torch.argsort(score[m], stable=True)].tolist() for m in per_group]
    rounds = min(len(o) for o in ordered)
    out = []
    for r in range(rounds - 1):       # round r removes the r-th lowest head of every group; the last round stays
        units = [o[r] for o in ordered]
        out.append(_Entry(i, units, float(score[units].mean()), groups * sset.params_per_unit))
    return out


def _site_key(sset: StructureSet) -> tuple[int, str]:
    return sset.layer, "o_proj" if sset.kind in ATTENTION_KINDS else "down_proj"


@dataclass
class FlapBudget(Budget):
    """Counts decided before scoring (uniform modes) or the target the adaptive modes aim at."""

    structure: str = "AL-AM"
    counts: dict = field(default_factory=dict)


@dataclass
class FlapAllocation:
    structure: str = "AL-AM"
    remove_heads: int | None = None      # UL-MM / AL-MM: attention units removed in total over the layers
    uniform: Uniform = field(default_factory=Uniform)   # layer range; UL-UM's per-layer fraction
    bias_params: int = 0                 # params added per (layer, o_proj|down_proj) that loses units

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise PruningError(f"unknown FLAP structure {self.structure!r}; choices: {', '.join(STRUCTURES)}")
        if self.structure in ("UL-MM", "AL-MM"):
            if self.remove_heads is None or int(self.remove_heads) < 0:
                raise PruningError(f"FLAP structure {self.structure} needs remove_heads >= 0 (attention units "
                                   "removed in total over the layers, FLAP's --remove_heads); e.g. "
                                   "method.remove_heads=5")
            self.remove_heads = int(self.remove_heads)

    def layers(self, n_layers: int) -> list[int]:
        return self.uniform.layers(n_layers)

    # -- scores ------------------------------------------------------------------------------------------------
    def unit_scores(self, sset: StructureSet, channel_scores: torch.Tensor) -> torch.Tensor:
        """AL-*: z-score the layer's channel metric, then average per unit; UL-*: sum per unit (FLAP's code)."""
        member = output_member(sset)
        if self.structure.startswith("AL"):
            return reduce_units(standardize(channel_scores), member, "mean")
        return reduce_units(channel_scores.double(), member, "sum")

    # -- counts --------------------------------------------------------------------------------------------------
    def _overhead(self, sets: list[StructureSet], removed_per_set: list[int]) -> int:
        touched = {_site_key(s) for s, n in zip(sets, removed_per_set) if n > 0}
        return self.bias_params * len(touched)

    def _split(self, sets):
        attn = [s for s in sets if s.kind in ATTENTION_KINDS]
        mlp = [s for s in sets if s.kind == "mlp"]
        other = sorted({s.kind for s in sets} - set(ATTENTION_KINDS) - {"mlp"})
        if other:
            raise PruningError(f"FLAP prunes heads and MLP channels, not {other}")
        return attn, mlp

    def _uniform_mix(self, sets, total: int) -> tuple[int, int, int, dict]:
        """UL-MM counts: attention units per layer from remove_heads, MLP channels per layer for the target."""
        attn, mlp = self._split(sets)
        n_attn_layers = max(len(attn), 1)
        per_layer = self.remove_heads // n_attn_layers
        removed_attn = []
        for s in attn:
            groups = int(s.partition.max()) + 1 if s.partition is not None else 1
            r = per_layer - per_layer % groups            # query heads: the same number from every KV group
            if r >= s.n_units:
                raise InfeasibleRatioError(f"remove_heads={self.remove_heads} removes {per_layer} attention units "
                                           f"per layer, emptying layer {s.layer} ({s.n_units} units)")
            removed_attn.append(r)
        return attn, mlp, per_layer, dict(zip([id(s) for s in attn], removed_attn))

    def budget(self, sets: list[StructureSet], ratio: float, total_params: int) -> FlapBudget:
        ratio = check_ratio(ratio)
        target = ratio * total_params
        if not sets or ratio == 0.0:
            return FlapBudget(ratio, total_params, 0.0, 0, self.structure)
        attn, mlp = self._split(sets)
        if self.structure == "UL-UM":
            b = self.uniform.budget(sets, ratio, total_params)
            over = self._overhead(sets, [_removed(s, b.p) for s in sets])
            if over:   # aim the weights at target + the biases they bring
                b = self.uniform.budget(sets, min(ratio + over / total_params, 0.999999), total_params)
                over = self._overhead(sets, [_removed(s, b.p) for s in sets])
            return FlapBudget(ratio, total_params, b.p, b.removed_params - over, self.structure,
                              {"p": b.p})
        if self.structure == "UL-MM":
            attn, mlp, per_layer, r_attn = self._uniform_mix(sets, total_params)
            attn_params = sum(r_attn[id(s)] * s.params_per_unit for s in attn)
            best = None
            for c in range(min((s.n_units for s in mlp), default=1)):
                removed = [r_attn[id(s)] for s in attn] + [c] * len(mlp)
                net = attn_params + c * sum(s.params_per_unit for s in mlp) - self._overhead(attn + mlp, removed)
                if best is None or abs(net - target) < abs(best[1] - target):
                    best = (c, net)
            if attn_params - self._overhead(attn, [r_attn[id(s)] for s in attn]) > target + 1e-9:
                raise InfeasibleRatioError(f"remove_heads={self.remove_heads} alone removes more than "
                                           f"pruning.ratio={ratio} of all parameters")
            c, net = best
            return FlapBudget(ratio, total_params, 0.0, net, self.structure,
                              {"attn_units_per_layer": per_layer, "mlp_per_layer": c})
        # adaptive modes: feasibility from counts (every set keeps its best unit / one round)
        max_removed = 0
        for s in sets:
            groups = int(s.partition.max()) + 1 if s.partition is not None else 1
            max_removed += (s.n_units - groups) * s.params_per_unit
        max_removed -= self._overhead(sets, [s.n_units for s in sets])
        if target > max_removed + 1e-9:
            raise InfeasibleRatioError(
                f"pruning.ratio={ratio} is infeasible for FLAP {self.structure}: keeping one attention unit and one "
                f"MLP channel per layer, at most {max_removed / total_params:.4f} of all parameters can be removed")
        if self.structure == "AL-MM":
            n_attn = sum((s.n_units - (int(s.partition.max()) + 1 if s.partition is not None else 1))
                         for s in attn)
            if self.remove_heads > n_attn:
                raise InfeasibleRatioError(f"remove_heads={self.remove_heads} exceeds the {n_attn} attention units "
                                           "that can go without emptying a layer")
            ppu = max((s.params_per_unit for s in attn), default=0)
            if self.remove_heads * ppu > target + 1e-9:
                raise InfeasibleRatioError(f"remove_heads={self.remove_heads} alone removes more than "
                                           f"pruning.ratio={ratio} of all parameters")
        return FlapBudget(ratio, total_params, 0.0, int(round(target)), self.structure)

    # -- plan ------------------------------------------------------------------------------------------------------
    def allocate(self, sets: list[StructureSet], scores: list[torch.Tensor], budget: FlapBudget) -> PrunePlan:
        target = budget.target * budget.total_params
        if budget.target == 0.0 or not sets:
            plan = PrunePlan()
            removed = 0
        elif self.structure == "UL-UM":
            plan = self.uniform.allocate(sets, scores, Budget(budget.target, budget.total_params, budget.p,
                                                              budget.removed_params))
            removed = budget.removed_params
        elif self.structure == "UL-MM":
            attn, mlp, _, r_attn = self._uniform_mix(sets, budget.total_params)
            c = budget.counts["mlp_per_layer"]
            plan = PrunePlan()
            for i, (s, sc) in enumerate(zip(sets, scores)):
                entries = _entries(i, s, sc)
                if s.kind in ATTENTION_KINDS:
                    groups = int(s.partition.max()) + 1 if s.partition is not None else 1
                    take = entries[: r_attn[id(s)] // groups]
                else:
                    take = entries[:c]
                for e in take:
                    plan.add(s.kind, s.layer, e.units)
            removed = budget.removed_params
        else:
            entries = [e for i, (s, sc) in enumerate(zip(sets, scores)) for e in _entries(i, s, sc)]
            entries.sort(key=lambda e: (e.score, e.set_idx, e.units[0]))
            if self.structure == "AL-MM":
                attn_e = [e for e in entries if sets[e.set_idx].kind in ATTENTION_KINDS]
                fixed, n = [], 0
                for e in attn_e:
                    if n + len(e.units) > self.remove_heads:
                        break
                    fixed.append(e)
                    n += len(e.units)
                pool = [e for e in entries if sets[e.set_idx].kind == "mlp"]
            else:
                fixed, pool = [], entries
            chosen, removed = self._closest_prefix(sets, fixed, pool, target)
            plan = PrunePlan()
            for e in chosen:
                plan.add(sets[e.set_idx].kind, sets[e.set_idx].layer, e.units)
        plan.meta["allocation"] = {"type": "flap", "structure": self.structure, "target": budget.target,
                                   "achieved": removed / budget.total_params, "counts": dict(budget.counts),
                                   "bias_params": self.bias_params}
        return plan

    def _closest_prefix(self, sets, fixed: list[_Entry], pool: list[_Entry], target: float):
        """Remove ``fixed`` and then the lowest ``pool`` entries while that brings removed params closer to target."""
        touched: set = set()
        removed = 0
        for e in fixed:
            removed += e.params
            key = _site_key(sets[e.set_idx])
            if key not in touched:
                touched.add(key)
                removed -= self.bias_params
        best_k, best_removed = 0, removed
        for k, e in enumerate(pool, 1):
            removed += e.params
            key = _site_key(sets[e.set_idx])
            if key not in touched:
                touched.add(key)
                removed -= self.bias_params
            if abs(removed - target) < abs(best_removed - target):
                best_k, best_removed = k, removed
        return fixed + pool[:best_k], best_removed
