"""NIRVANA's allocation (METHODS.md §3.2 "Allocation", official ``Llama/main.py``): one global score threshold for
KV groups and one for MLP neurons over all layers, with the attention/MLP split fixed by γ.

With P_a = 2(g+1)·d·d_h params per KV group and P_m = 3d per neuron, r = (1/γ)·H_kv/I pruned groups per pruned
neuron, and a budget B of params: n_a = B / (P_a + P_m/r) groups and n_m = n_a/r neurons (both truncated, as in
the code). Every unit scoring ≤ the n-th smallest score goes; a layer that would lose all its KV groups spares its
last one, and each layer's *kept* MLP width is rounded up to a multiple of ``round_to`` by sparing its best
candidates (at least ``round_to`` are kept). Widths therefore differ per layer; the record reports what was achieved.
With NIRVANA's ``sparsity`` these are the official counts; with ``pruning.ratio`` the group budget is the one whose
achieved removal after truncation, sparing and rounding is closest to the target (the framework's ratio semantics),
which matters on small models where one KV group or one rounding step is a point of the total.

Budget: ``pruning.ratio`` × all params (the framework's ratio), or NIRVANA's own ``sparsity`` × attention+MLP params
(embeddings and lm_head excluded, METHODS.md §1.3) when set. The official code treats a zero group budget as
threshold 0; here it prunes no groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pruning.allocation import Budget, check_ratio
from pruning.errors import InfeasibleRatioError
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan


@dataclass
class NirvanaBudget(Budget):
    n_attn: int = 0
    n_mlp: int = 0
    budget_params: float = 0.0


def _totals(sets: list[StructureSet], kind: str) -> tuple[int, float]:
    """(number of units, mean params per unit) of one kind over all layers."""
    chosen = [s for s in sets if s.kind == kind]
    n = sum(s.n_units for s in chosen)
    return n, (sum(s.n_units * s.params_per_unit for s in chosen) / n if n else 0.0)


@dataclass
class NirvanaAllocation:
    gamma: float = 3.36
    round_to: int = 8
    sparsity: float | None = None

    def __post_init__(self):
        if not float(self.gamma) > 0:
            raise InfeasibleRatioError(f"nirvana gamma must be > 0, got {self.gamma}")
        if int(self.round_to) < 1:
            raise InfeasibleRatioError(f"nirvana round_to must be a positive int, got {self.round_to}")
        if self.sparsity is not None and not 0.0 <= float(self.sparsity) < 1.0:
            raise InfeasibleRatioError(f"nirvana sparsity must be in [0, 1), got {self.sparsity}")

    def layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers))  # every layer is eligible (the code parses but ignores layer ranges)

    def budget(self, sets: list[StructureSet], ratio: float | None, total_params: int) -> NirvanaBudget:
        """``sparsity`` (the native knob) or ``ratio`` (share of all params; not read when sparsity is set)."""
        h_kv, p_a = _totals(sets, "kv_group")
        inter, p_m = _totals(sets, "mlp")
        if self.sparsity is not None:
            b = float(self.sparsity) * (h_kv * p_a + inter * p_m)
        else:
            ratio = check_ratio(ratio)
            b = ratio * total_params
        if not h_kv or not inter:
            raise InfeasibleRatioError("nirvana prunes KV groups and MLP neurons: both structure kinds are needed")
        r = (1.0 / float(self.gamma)) * h_kv / inter
        n_a_f = b / (p_a + p_m / r)
        n_a, n_m = int(n_a_f), int(n_a_f / r)
        layers = len([s for s in sets if s.kind == "kv_group"])
        max_a = h_kv - layers
        max_m = sum(s.n_units - min(s.n_units, int(self.round_to)) for s in sets if s.kind == "mlp")
        if n_a > max_a or n_m > max_m:
            scale = min(max_a / n_a_f if n_a_f else math.inf, max_m * r / n_a_f if n_a_f else math.inf)
            raise InfeasibleRatioError(
                f"{f'sparsity={self.sparsity}' if self.sparsity is not None else f'pruning.ratio={ratio}'} "
                f"asks nirvana for {n_a} KV groups and {n_m} MLP neurons, but with gamma={self.gamma} every layer "
                f"must keep one KV group and {self.round_to} neurons: at most {scale * b / total_params:.4f} of all "
                f"parameters can go"
            )
        removed = n_a * p_a + n_m * p_m
        return NirvanaBudget(
            ratio, total_params, n_a / h_kv, int(round(removed)), n_attn=n_a, n_mlp=n_m, budget_params=b
        )

    def _counts(self, sets: list[StructureSet], b: float) -> tuple[int, int]:
        h_kv, p_a = _totals(sets, "kv_group")
        inter, p_m = _totals(sets, "mlp")
        r = (1.0 / float(self.gamma)) * h_kv / inter
        n_a_f = b / (p_a + p_m / r)
        return int(n_a_f), int(n_a_f / r)

    def _plan_for(self, pairs, n_attn: int, n_mlp: int) -> tuple[PrunePlan, int, dict]:
        plan, removed, thr = PrunePlan(), 0, {}
        for kind, n in (("kv_group", n_attn), ("mlp", n_mlp)):
            if n > 0:
                allscores = torch.cat([sc for s, sc in pairs if s.kind == kind])
                thr[kind] = float(torch.kthvalue(allscores, min(n, allscores.numel())).values)
        for sset, score in pairs:
            if sset.kind not in thr:
                continue
            cand = torch.nonzero(score <= thr[sset.kind]).flatten()
            if sset.kind == "kv_group":
                drop = cand[:-1] if len(cand) == sset.n_units else cand  # spare the last index
            else:
                drop = self._round_mlp(score, cand)
            if len(drop):
                plan.add(sset.kind, sset.layer, drop.tolist())
                removed += len(drop) * sset.params_per_unit
        return plan, removed, thr

    def allocate(self, sets: list[StructureSet], scores: list[torch.Tensor], budget: NirvanaBudget) -> PrunePlan:
        """Official thresholds for ``sparsity``; for ``pruning.ratio`` the group budget whose achieved removal
        (after truncation, sparing and rounding) is closest to the target, with γ's split and the rounding kept."""
        pairs = [(s, sc.double().cpu()) for s, sc in zip(sets, scores) if s.kind in ("kv_group", "mlp")]
        target = budget.budget_params
        n_a, n_m = budget.n_attn, budget.n_mlp
        if self.sparsity is None and target > 0:
            full = sum(s.n_units * s.params_per_unit for s, _ in pairs)
            achieved = lambda b: self._plan_for(pairs, *self._counts(sets, b))[1]  # noqa: E731
            lo, hi = 0.0, float(full)
            for _ in range(60):  # smallest budget whose achieved removal reaches the target
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if achieved(mid) < target else (lo, mid)
            n_a, n_m = min(
                (self._counts(sets, b) for b in (lo, hi)), key=lambda c: abs(self._plan_for(pairs, *c)[1] - target)
            )
        plan, removed, thr = self._plan_for(pairs, n_a, n_m)
        plan.meta["allocation"] = {
            "type": "nirvana",
            "gamma": float(self.gamma),
            "round_to": int(self.round_to),
            "sparsity": self.sparsity,
            "budget_params": target,
            "official_counts": [budget.n_attn, budget.n_mlp],
            "counts": [n_a, n_m],
            "thresholds": thr,
            "kv_groups_pruned": sum(map(len, plan.remove.get("kv_group", {}).values())),
            "mlp_neurons_pruned": sum(map(len, plan.remove.get("mlp", {}).values())),
            "removed_params": removed,
            "target": budget.target,
        }
        return plan

    def _round_mlp(self, score: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Drop ``cand`` but spare its best members until the kept width is a multiple of round_to (≥ round_to)."""
        n, k = score.numel(), int(self.round_to)
        kept0 = n - len(cand)
        kept = min(n, -(-kept0 // k) * k) or min(n, k)
        spare = kept - kept0
        if spare <= 0:
            return cand
        if spare >= len(cand):
            return cand[:0]
        order = torch.argsort(score[cand], descending=True, stable=True)
        keep = set(cand[order[:spare]].tolist())
        return torch.tensor([c for c in cand.tolist() if c not in keep], dtype=torch.long)
