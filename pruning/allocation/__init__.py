"""How a target ratio is spread over layers and structure kinds.

``pruning.ratio`` is the fraction of *all* parameters to remove (embeddings, norms, lm_head in the denominator).
Allocators turn it into per-layer unit counts, check feasibility from counts alone (before any scoring), and
report the fraction actually achieved after rounding to whole units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pruning.errors import InfeasibleRatioError, PruningError
from pruning.structures import StructureSet, removed_params
from pruning.surgery.plan import PrunePlan


def plan_params(sets: list[StructureSet], plan: PrunePlan) -> int:
    """Parameters a plan removes from these sets: exact for heads and channels (the last query head of a KV head
    frees its k/v rows too), the sets' mean block size for blocks."""

    def units(s: StructureSet) -> list[int]:
        if s.kind == "block":
            return [u for u, layer in enumerate(s.unit_layers) if layer in set(plan.blocks)]
        return plan.units(s.kind, s.layer)

    return sum(removed_params(s, units(s)) for s in sets)


def check_ratio(ratio: float | None, name: str = "pruning.ratio") -> float:
    if ratio is None:
        raise InfeasibleRatioError(f"{name} is null and no native ratio knob of the method is set; set {name}")
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise InfeasibleRatioError(f"{name} must be in [0, 1), got {ratio}")
    return ratio


def layer_range(
    n_layers: int, start_frac: float, end_frac: float, start: int | None = None, end: int | None = None
) -> list[int]:
    """Layers [start, end) as fractions of depth, index = floor(frac * L + 0.5), so [4, 30) on 32 layers."""
    s = int(start_frac * n_layers + 0.5) if start is None else int(start)
    e = int(end_frac * n_layers + 0.5) if end is None else int(end)
    s, e = max(0, s), min(n_layers, e)
    return list(range(s, e))


# A method's `layers` config: the candidate layers [start, end) as fractions of depth, or as indices (which win).
LAYER_KEYS = ("start_frac", "end_frac", "start", "end")
ALL_LAYERS = {"start_frac": 0.0, "end_frac": 1.0, "start": None, "end": None}

COUNT_RULES = ("llm_pruner", "floor")


def count_rule(n_units: int, p: float) -> int:
    """Units removed at fraction p: C - int(C(1-p)), LLM-Pruner's MetaPruner rule (rounds the removal up)."""
    return n_units - int(n_units * (1.0 - p))


def floor_rule(n_units: int, p: float) -> int:
    """Units removed at fraction p: int(p·n), the FLAP repository's rule (``sorted[int(ratio·n)]``, rounds down)."""
    return int(n_units * p + 1e-9)


def _removed(sset: StructureSet, p: float, rule: str = "llm_pruner") -> int:
    """Units of one set removed at fraction p under a count rule.

    llm_pruner: attention units are counted on their root's channels, floor((C - int(C(1-p))) / d_h) with
    C = units·d_h (``count_channels``), as LLM-Pruner's consecutive groups; query heads come off every KV group
    equally. floor: int(p·n) units of each kind per layer (FLAP's code); query heads int(p·H) of the layer's H,
    whichever score lowest (uneven KV groups).
    """
    if rule == "floor":
        return floor_rule(sset.n_units, p)
    if sset.partition is not None:
        groups = int(sset.partition.max()) + 1
        return count_rule(sset.n_units // groups, p) * groups
    c = sset.count_channels  # LLM-Pruner: floor((C - int(C(1-p))) / d_h) KV groups with C = H_kv·d_h
    return count_rule(sset.n_units * c, p) // c


@dataclass
class Budget:
    target: float | None  # requested fraction of all params; None when a native knob set the counts
    total_params: int
    p: float  # per-kind unit fraction chosen
    removed_params: int

    @property
    def achieved(self) -> float:
        return self.removed_params / self.total_params


@dataclass
class Uniform:
    """Every layer in the range loses the same fraction p of each structure kind (LLM-Pruner's local pruning).

    p is chosen so the achieved fraction of all parameters is closest to the target. With
    ``layer_start_frac=0.125, layer_end_frac=0.9375`` this is LLM-Pruner's layer range [4, 30) of 32 layers.
    Under the floor rule a query head's KV head may lose all its query heads (and leave with them) only once the
    scores are known: p is chosen on the heads' own parameters, and the plan reports the exact removal.
    """

    layer_start_frac: float = 0.0
    layer_end_frac: float = 1.0
    layer_start: int | None = None
    layer_end: int | None = None
    group_ratio: float | None = None  # set p directly (paper presets, e.g. LLM-Pruner 0.25)
    count_rule: str = "llm_pruner"  # llm_pruner (C - int(C(1-p)) on root channels) | floor (int(p·n), FLAP repo)

    def __post_init__(self):
        if self.count_rule not in COUNT_RULES:
            raise InfeasibleRatioError(f"unknown count_rule {self.count_rule!r}; choices: {', '.join(COUNT_RULES)}")

    @classmethod
    def over(cls, layers: Mapping | None = None, default: Mapping = ALL_LAYERS, **kwargs) -> Uniform:
        """The allocator on a method config's layer range ``layers: {start_frac, end_frac, start, end}`` (missing
        keys from ``default``); ``kwargs`` are the other fields (count_rule, group_ratio)."""
        layers = dict(layers or {})
        unknown = sorted(set(layers) - set(LAYER_KEYS))
        if unknown:
            raise PruningError(f"unknown method.layers keys {unknown}; choices: {', '.join(LAYER_KEYS)}")
        r = {**default, **layers}
        return cls(
            layer_start_frac=float(r["start_frac"]),
            layer_end_frac=float(r["end_frac"]),
            layer_start=r["start"],
            layer_end=r["end"],
            **kwargs,
        )

    def layers(self, n_layers: int) -> list[int]:
        return layer_range(n_layers, self.layer_start_frac, self.layer_end_frac, self.layer_start, self.layer_end)

    def removed(self, sset: StructureSet, p: float) -> int:
        return _removed(sset, p, self.count_rule)

    def _params_at(self, sets: list[StructureSet], p: float) -> int:
        return sum(self.removed(s, p) * s.params_per_unit for s in sets)

    def budget(self, sets: list[StructureSet], ratio: float | None, total_params: int) -> Budget:
        """Choose p from counts alone, so an impossible ratio fails before any scoring; ``group_ratio`` (the
        native knob) fixes p and ``ratio`` is then not read."""
        if self.group_ratio is not None:
            p = float(self.group_ratio)
            bad = [s for s in sets if self.removed(s, p) >= s.n_units]
            if bad:
                raise InfeasibleRatioError(
                    f"group_ratio={p} would remove every {bad[0].kind} unit of layer {bad[0].layer}"
                )
            return Budget(ratio, total_params, p, self._params_at(sets, p))
        ratio = check_ratio(ratio)
        if not sets or ratio == 0.0:
            return Budget(ratio, total_params, 0.0, 0)
        # candidate p values: every breakpoint where some set's removed count changes
        cands = {0.0}
        for s in sets:
            even_split = s.partition is not None and self.count_rule == "llm_pruner"
            groups = int(s.partition.max()) + 1 if even_split and s.partition is not None else 1
            n = s.n_units // groups
            cands.update((k / n) + 1e-12 for k in range(n))
        feasible = sorted(p for p in cands if p < 1.0 and not any(self.removed(s, p) >= s.n_units for s in sets))
        best_max = self._params_at(sets, feasible[-1]) / total_params
        if ratio > best_max + 1e-9:
            kinds = sorted({s.kind for s in sets})
            layers = sorted({s.layer for s in sets if s.layer is not None})
            span = f"layers {layers[0]}..{layers[-1]}" if layers else "the model"  # hidden/block sets: model-wide
            raise InfeasibleRatioError(
                f"pruning.ratio={ratio} would empty a layer's {'/'.join(kinds)}: uniform allocation over "
                f"{span} can remove at most {best_max:.4f} of all parameters while keeping at "
                f"least one unit of each kind per layer"
            )
        p = min(feasible, key=lambda q: (abs(self._params_at(sets, q) / total_params - ratio), q))
        return Budget(ratio, total_params, p, self._params_at(sets, p))

    def allocate(self, sets: list[StructureSet], scores: list[torch.Tensor], budget: Budget) -> PrunePlan:
        plan = PrunePlan()
        for sset, score in zip(sets, scores):
            n = self.removed(sset, budget.p)
            if n == 0:
                continue
            if sset.partition is not None and self.count_rule == "llm_pruner":  # lowest m inside every KV group
                groups = int(sset.partition.max()) + 1
                m = n // groups
                for g in range(groups):
                    members = (sset.partition == g).nonzero().flatten()
                    order = torch.argsort(score[members], stable=True)
                    plan.add(sset.kind, sset.layer, members[order[:m]].tolist())
            else:
                lowest = torch.argsort(score, stable=True)[:n].tolist()
                if sset.kind == "block":
                    lowest = [sset.unit_layers[u] for u in lowest]
                plan.add(sset.kind, sset.layer, lowest)
        plan.meta["allocation"] = {
            "type": "uniform",
            "p": budget.p,
            "count_rule": self.count_rule,
            "target": budget.target,
            "achieved": plan_params(sets, plan) / budget.total_params,
        }
        return plan
