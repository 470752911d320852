"""FLAP's allocation modes (METHODS.md §3.3 "Allocation", CASIA-IVA-Lab/FLAP lib/prune.py ``--structure``).

- ``UL-UM`` uniform layers, uniform modules: every layer loses the same fraction of its attention units and of its
  MLP channels (the framework's ``Uniform`` allocator under FLAP's count rule ``int(p·n)``).
- ``UL-MM`` uniform layers, manual mix: every layer loses ``remove_heads // n_layers`` attention units (FLAP's
  ``--remove_heads`` is a total over layers); the MLP channel count per layer is then fixed by the target.
- ``AL-MM`` adaptive layers, manual mix: the ``remove_heads`` lowest attention units over all layers, then the
  lowest MLP channels over all layers up to the target.
- ``AL-AM`` (default) adaptive layers and modules: each (layer, module) channel metric is z-scored (mean and
  unbiased std over that layer's channels; attention over its H·d_h o_proj inputs, then averaged per unit), all
  units of all layers are pooled and removed lowest first.

Query-head units (the default with GQA) are single heads, as FLAP's code removes them on an MHA expansion: any query
head may go, and a KV head leaves with its last query head (its k/v rows are then counted as removed too).

Two operating points:
- ``attn_mlp_ratio`` (native, FLAP's ``--pruning_ratio``): the official counts. UL-UM: ``int(p·n)`` units per kind
  and layer. UL-MM / AL-MM: FLAP's ``cal_remove_neuron`` MLP count. AL-AM: the pooled scores sorted descending, each
  unit weighted by its parameters in MLP-channel units as the code counts them on the MHA form (a query head
  4·d·d_h/(3d) = 4·d_h/3, FLAP's 512/3 at d_h = 128; a KV group g of them; an MLP channel 1), threshold τ = the
  score where the cumulative weight comes closest to (1 − p)·Σ weights, every unit scoring ≤ τ goes.
- ``pruning.ratio`` (the framework's, a share of ALL parameters): the adaptive modes remove lowest first while that
  brings the exact removed parameters closer to the target; the compensation biases FLAP adds (d params per
  o_proj/down_proj that loses units) are counted.

Either way the plan reports the exact fraction of all parameters it removes. A layer is never emptied: with
``pruning.ratio`` each layer's best attention unit and best MLP channel stay out of the pool and the uniform modes
refuse a count that would empty a layer; with ``attn_mlp_ratio`` AL-AM's threshold is the official one and a layer
it would empty keeps its best unit (``spared`` in the plan's meta). Feasibility is decided from counts, before any
scoring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pruning.allocation import Budget, Uniform, check_ratio, plan_params
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
    """A removable unit of one set and its score (comparable across the pooled sets)."""

    set_idx: int
    unit: int
    score: float


def _entries(i: int, sset: StructureSet, score: torch.Tensor) -> list[_Entry]:
    """Removable units of one set, lowest first; the best one (the unit the layer keeps) is left out."""
    score = score.double().cpu()
    order = torch.argsort(score, stable=True).tolist()
    return [_Entry(i, u, float(score[u])) for u in order[:-1]]


class Tally:
    """Exact parameters removed as entries are taken one at a time: the unit's own, the k/v rows of a KV head whose
    last query head goes, minus the compensation bias (``bias_params``) the first time a layer's o_proj/down_proj
    loses inputs."""

    def __init__(self, sets: list[StructureSet], bias_params: int = 0):
        self.sets, self.bias_params = sets, bias_params
        self.left: dict[tuple[int, int], int] = {}
        self.touched: set = set()
        self.removed = 0

    def take(self, e: _Entry) -> int:
        s = self.sets[e.set_idx]
        delta = s.params_per_unit
        if s.partition is not None:
            key = (e.set_idx, int(s.partition[e.unit]))
            if key not in self.left:
                self.left[key] = int((s.partition == key[1]).sum())
            self.left[key] -= 1
            delta += s.group_params if self.left[key] == 0 else 0
        site = _site_key(s)
        if site not in self.touched:
            self.touched.add(site)
            delta -= self.bias_params
        self.removed += delta
        return delta


def _max_removed(s: StructureSet) -> int:
    """Parameters one set can lose while keeping one unit (for query heads: all KV heads but one go too)."""
    groups = int(s.partition.max()) + 1 if s.partition is not None else 1
    return (s.n_units - 1) * s.params_per_unit + (groups - 1) * s.group_params


def _al_am_weight(s: StructureSet) -> float:
    """A unit's weight in AL-AM's official threshold. The code's weight tensor is ``torch.ones_like`` of the sort
    indices, an integer tensor, so a head's 512/3 is stored as 170: here int(4·d_h/3) per query head (10 on
    stories260K, 85 at d_h = 64), g of them per KV group; an MLP channel 1."""
    if s.kind == "mlp":
        return 1.0
    q = next(m for m in s.members if m.name == "q_proj")
    d_h = q.index.shape[1] if s.kind == "q_head" else q.index.shape[1] // _heads_per_unit(s)
    return float(_heads_per_unit(s) * int(4 * d_h / 3))


def _heads_per_unit(s: StructureSet) -> int:
    if s.kind == "q_head":
        return 1
    k = next(m for m in s.members if m.name == "k_proj")
    q = next(m for m in s.members if m.name == "q_proj")
    return q.index.shape[1] // k.index.shape[1]


def _mha_params(s: StructureSet) -> int:
    """One unit's weights on the MHA form, as FLAP's ``cal_remove_neuron`` counts them: 3·d per MLP channel, 4·d per
    query channel of an attention unit (its q, k, v rows and o column)."""
    root = next(m for m in s.members if m.name in ("q_proj", "gate_proj"))
    d = root.weight.shape[1]
    return 3 * d if s.kind == "mlp" else 4 * d * root.index.shape[1]


def _site_key(sset: StructureSet) -> tuple[int, str]:
    return sset.decoder_layer, "o_proj" if sset.kind in ATTENTION_KINDS else "down_proj"


@dataclass
class FlapBudget(Budget):
    """Counts decided before scoring (uniform modes) or the target the adaptive modes aim at."""

    structure: str = "AL-AM"
    counts: dict = field(default_factory=dict)


@dataclass
class FlapAllocation:
    structure: str = "AL-AM"
    remove_heads: int | None = None  # UL-MM / AL-MM: attention units removed in total over the layers
    uniform: Uniform = field(default_factory=Uniform)  # layer range; UL-UM's per-layer fraction
    bias_params: int = 0  # params added per (layer, o_proj|down_proj) that loses units
    attn_mlp_ratio: float | None = None  # native knob: FLAP's --pruning_ratio with the official counts

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise PruningError(f"unknown FLAP structure {self.structure!r}; choices: {', '.join(STRUCTURES)}")
        if self.structure in ("UL-MM", "AL-MM"):
            if self.remove_heads is None or int(self.remove_heads) < 0:
                raise PruningError(
                    f"FLAP structure {self.structure} needs remove_heads >= 0 (attention units "
                    "removed in total over the layers, FLAP's --remove_heads); e.g. "
                    "method.remove_heads=5"
                )
            self.remove_heads = int(self.remove_heads)
        if self.attn_mlp_ratio is not None:
            if not 0.0 <= float(self.attn_mlp_ratio) < 1.0:
                raise PruningError(f"flap attn_mlp_ratio must be in [0, 1), got {self.attn_mlp_ratio}")
            self.attn_mlp_ratio = float(self.attn_mlp_ratio)

    def layers(self, n_layers: int) -> list[int]:
        return self.uniform.layers(n_layers)

    @property
    def _remove_heads(self) -> int:
        """remove_heads of the UL-MM / AL-MM modes (checked in __post_init__)."""
        if self.remove_heads is None:
            raise PruningError(f"FLAP structure {self.structure} needs remove_heads")
        return self.remove_heads

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

    def _net(self, sets: list[StructureSet], plan: PrunePlan) -> int:
        """Exact parameters the plan removes, minus the compensation biases it adds."""
        return plan_params(sets, plan) - self._overhead(sets, [len(plan.units(s.kind, s.layer)) for s in sets])

    def _split(self, sets):
        attn = [s for s in sets if s.kind in ATTENTION_KINDS]
        mlp = [s for s in sets if s.kind == "mlp"]
        other = sorted({s.kind for s in sets} - set(ATTENTION_KINDS) - {"mlp"})
        if other:
            raise PruningError(f"FLAP prunes heads and MLP channels, not {other}")
        return attn, mlp

    def _heads_per_layer(self, attn: list[StructureSet]) -> int:
        """UL-MM: attention units per layer, ``remove_heads // n_layers`` as FLAP's code."""
        per_layer = self._remove_heads // max(len(attn), 1)
        for s in attn:
            if per_layer >= s.n_units:
                raise InfeasibleRatioError(
                    f"remove_heads={self.remove_heads} removes {per_layer} attention units "
                    f"per layer, emptying layer {s.layer} ({s.n_units} units)"
                )
        return per_layer

    def _native_uniform(self, p: float) -> Uniform:
        return dataclasses.replace(self.uniform, group_ratio=p, count_rule="floor")

    def _native_mlp_counts(self, sets: list[StructureSet], p: float) -> dict[int, int]:
        """UL-MM / AL-MM MLP channels at ``attn_mlp_ratio`` p, FLAP's ``cal_remove_neuron``: (p·W − W_heads) / 3d
        with W the attention+MLP weights on the MHA form (per layer for UL-MM, over all layers for AL-MM) and
        W_heads the removed heads'. Keys: layer (UL-MM) or -1 (AL-MM, one global count)."""
        attn, mlp = self._split(sets)
        if not attn or not mlp:
            raise PruningError(f"FLAP {self.structure} needs attention and MLP structure sets")
        d3 = _mha_params(mlp[0])
        head = _mha_params(attn[0])
        if self.structure == "UL-MM":
            per_layer = self._heads_per_layer(attn)
            out: dict[int, int] = {}
            bad: list[tuple[int, int]] = []
            for s in mlp:
                a = next((x for x in attn if x.layer == s.layer), None)
                w = s.n_units * d3 + (a.n_units * _mha_params(a) if a is not None else 0)
                out[s.decoder_layer] = int((p * w - (per_layer * head if a is not None else 0)) / d3)
                bad += [(s.decoder_layer, out[s.decoder_layer])] if not 0 <= out[s.decoder_layer] < s.n_units else []
        else:
            w = sum(s.n_units * _mha_params(s) for s in sets)
            out = {-1: int((p * w - self._remove_heads * head) / d3)}
            bad = [(-1, out[-1])] if not 0 <= out[-1] <= sum(s.n_units - 1 for s in mlp) else []
        if bad:
            raise InfeasibleRatioError(
                f"FLAP {self.structure}: attn_mlp_ratio={p} with remove_heads="
                f"{self.remove_heads} gives {bad[0][1]} MLP channels to remove, outside what "
                "a layer can lose"
            )
        return out

    def budget(self, sets: list[StructureSet], ratio: float | None, total_params: int) -> FlapBudget:
        """``attn_mlp_ratio`` (native knob) when set, and then ``ratio`` is not read; else ``ratio`` of all params."""
        if self.attn_mlp_ratio is not None:
            return self._native_budget(sets, total_params, self.attn_mlp_ratio)
        ratio = check_ratio(ratio)
        target = ratio * total_params
        if not sets or ratio == 0.0:
            return FlapBudget(ratio, total_params, 0.0, 0, self.structure)
        attn, mlp = self._split(sets)
        if self.structure == "UL-UM":
            b = self.uniform.budget(sets, ratio, total_params)
            over = self._overhead(sets, [self.uniform.removed(s, b.p) for s in sets])
            if over:  # aim the weights at target + the biases they bring
                b = self.uniform.budget(sets, min(ratio + over / total_params, 0.999999), total_params)
                over = self._overhead(sets, [self.uniform.removed(s, b.p) for s in sets])
            return FlapBudget(ratio, total_params, b.p, b.removed_params - over, self.structure, {"p": b.p})
        if self.structure == "UL-MM":
            per_layer = self._heads_per_layer(attn)
            attn_params = sum(per_layer * s.params_per_unit for s in attn)  # before scoring: heads alone
            mlp_params = sum(s.params_per_unit for s in mlp)

            def net(c: int) -> int:  # with c MLP channels per layer
                removed = [per_layer] * len(attn) + [c] * len(mlp)
                return attn_params + c * mlp_params - self._overhead(attn + mlp, removed)

            # the channel count closest to the target (the first of equals)
            c = min(range(min((s.n_units for s in mlp), default=1)), key=lambda c: abs(net(c) - target))
            if attn_params - self._overhead(attn, [per_layer] * len(attn)) > target + 1e-9:
                raise InfeasibleRatioError(
                    f"remove_heads={self.remove_heads} alone removes more than pruning.ratio={ratio} of all parameters"
                )
            return FlapBudget(
                ratio,
                total_params,
                0.0,
                net(c),
                self.structure,
                {"attn_units_per_layer": per_layer, "mlp_per_layer": c},
            )
        # adaptive modes: feasibility from counts (every set keeps its best unit)
        max_removed = sum(_max_removed(s) for s in sets) - self._overhead(sets, [s.n_units for s in sets])
        if target > max_removed + 1e-9:
            raise InfeasibleRatioError(
                f"pruning.ratio={ratio} is infeasible for FLAP {self.structure}: keeping one attention unit and one "
                f"MLP channel per layer, at most {max_removed / total_params:.4f} of all parameters can be removed"
            )
        if self.structure == "AL-MM":
            self._check_remove_heads(attn)
            ppu = max((s.params_per_unit for s in attn), default=0)
            if self._remove_heads * ppu > target + 1e-9:
                raise InfeasibleRatioError(
                    f"remove_heads={self.remove_heads} alone removes more than pruning.ratio={ratio} of all parameters"
                )
        return FlapBudget(ratio, total_params, 0.0, int(round(target)), self.structure)

    def _check_remove_heads(self, attn: list[StructureSet]) -> None:
        n_attn = sum(s.n_units - 1 for s in attn)
        if self._remove_heads > n_attn:
            raise InfeasibleRatioError(
                f"remove_heads={self.remove_heads} exceeds the {n_attn} attention units "
                "that can go without emptying a layer"
            )

    def _native_budget(self, sets: list[StructureSet], total_params: int, p: float) -> FlapBudget:
        """Counts from shapes alone at ``attn_mlp_ratio`` p; the removed parameters are an estimate (p of the sets'
        weights) until the plan is made."""
        if not sets or p == 0.0:
            return FlapBudget(None, total_params, p, 0, self.structure, {"attn_mlp_ratio": p})
        attn, _ = self._split(sets)
        counts: dict = {"attn_mlp_ratio": p}
        estimate = p * sum(s.n_units * s.params_per_unit for s in sets)
        if self.structure == "UL-UM":
            estimate = self._native_uniform(p).budget(sets, None, total_params).removed_params
        elif self.structure == "UL-MM":
            counts.update(
                attn_units_per_layer=self._heads_per_layer(attn), mlp_per_layer=self._native_mlp_counts(sets, p)
            )
        elif self.structure == "AL-MM":
            self._check_remove_heads(attn)
            counts.update(remove_heads=self.remove_heads, mlp_total=self._native_mlp_counts(sets, p)[-1])
        return FlapBudget(None, total_params, p, int(round(estimate)), self.structure, counts)

    # -- plan ------------------------------------------------------------------------------------------------------
    def allocate(self, sets: list[StructureSet], scores: list[torch.Tensor], budget: Budget) -> PrunePlan:
        if not isinstance(budget, FlapBudget):
            raise PruningError("FlapAllocation.allocate takes the FlapBudget its budget() made")
        spared: list = []
        p = self.attn_mlp_ratio if self.attn_mlp_ratio is not None else check_ratio(budget.target)
        if not sets or p == 0.0:
            plan = PrunePlan()
        elif self.attn_mlp_ratio is not None:
            plan, spared = self._native_plan(sets, scores, self.attn_mlp_ratio, budget.total_params)
        elif self.structure == "UL-UM":
            plan = self.uniform.allocate(
                sets, scores, Budget(budget.target, budget.total_params, budget.p, budget.removed_params)
            )
        elif self.structure == "UL-MM":
            attn, _ = self._split(sets)
            per_layer, c = self._heads_per_layer(attn), budget.counts["mlp_per_layer"]
            plan = self._lowest_per_set(sets, scores, lambda s: per_layer if s.kind in ATTENTION_KINDS else c)
        else:
            entries = [e for i, (s, sc) in enumerate(zip(sets, scores)) for e in _entries(i, s, sc)]
            entries.sort(key=lambda e: (e.score, e.set_idx, e.unit))
            if self.structure == "AL-MM":
                fixed = [e for e in entries if sets[e.set_idx].kind in ATTENTION_KINDS][: self.remove_heads]
                pool = [e for e in entries if sets[e.set_idx].kind == "mlp"]
            else:
                fixed, pool = [], entries
            plan = PrunePlan()
            for e in self._closest_prefix(sets, fixed, pool, p * budget.total_params):
                plan.add(sets[e.set_idx].kind, sets[e.set_idx].layer, [e.unit])
        plan.meta["allocation"] = {
            "type": "flap",
            "structure": self.structure,
            "target": budget.target,
            "attn_mlp_ratio": self.attn_mlp_ratio,
            "achieved": self._net(sets, plan) / budget.total_params,
            "counts": dict(budget.counts),
            "bias_params": self.bias_params,
        }
        if spared:
            plan.meta["allocation"]["spared"] = spared
        return plan

    @staticmethod
    def _lowest_per_set(sets, scores, count) -> PrunePlan:
        plan = PrunePlan()
        for i, (s, sc) in enumerate(zip(sets, scores)):
            for e in _entries(i, s, sc)[: count(s)]:
                plan.add(s.kind, s.layer, [e.unit])
        return plan

    def _native_plan(self, sets, scores, p: float, total_params: int) -> tuple[PrunePlan, list]:
        """The official counts at ``attn_mlp_ratio`` p (module docstring)."""
        if self.structure == "UL-UM":
            return self._native_uniform(p).allocate(sets, scores, Budget(None, total_params, p, 0)), []
        if self.structure == "UL-MM":
            attn, _ = self._split(sets)
            per_layer, mlp_counts = self._heads_per_layer(attn), self._native_mlp_counts(sets, p)
            return self._lowest_per_set(
                sets, scores, lambda s: per_layer if s.kind in ATTENTION_KINDS else mlp_counts[s.layer]
            ), []
        if self.structure == "AL-MM":
            n_mlp = self._native_mlp_counts(sets, p)[-1]
            entries = [e for i, (s, sc) in enumerate(zip(sets, scores)) for e in _entries(i, s, sc)]
            entries.sort(key=lambda e: (e.score, e.set_idx, e.unit))
            plan = PrunePlan()
            chosen = [e for e in entries if sets[e.set_idx].kind in ATTENTION_KINDS][: self.remove_heads] + [
                e for e in entries if sets[e.set_idx].kind == "mlp"
            ][:n_mlp]
            for e in chosen:
                plan.add(sets[e.set_idx].kind, sets[e.set_idx].layer, [e.unit])
            return plan, []
        return self._threshold_plan(sets, scores, p)

    def _threshold_plan(self, sets, scores, p: float) -> tuple[PrunePlan, list]:
        """AL-AM at ``attn_mlp_ratio`` p: FLAP's weighted threshold over every unit of every layer (lib/prune.py)."""
        pooled = sorted(
            ((float(v), i, u) for i, sc in enumerate(scores) for u, v in enumerate(sc.double().cpu())),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        weights = torch.tensor([_al_am_weight(sets[i]) for _, i, _ in pooled], dtype=torch.float64)
        cum = torch.cumsum(weights, 0)
        k = int(torch.argmin((cum - weights.sum() * (1.0 - p)).abs()))
        tau = pooled[k][0]
        plan, spared = PrunePlan(), []
        for s, sc in zip(sets, scores):
            sc = sc.double().cpu()
            gone = (sc <= tau).nonzero().flatten().tolist()
            if len(gone) == s.n_units:  # the official code would empty this layer's module: keep its best unit
                best = int(torch.argsort(sc, stable=True)[-1])
                gone.remove(best)
                spared.append({"kind": s.kind, "layer": s.layer, "unit": best})
            if gone:
                plan.add(s.kind, s.layer, gone)
        return plan, spared

    def _closest_prefix(self, sets, fixed: list[_Entry], pool: list[_Entry], target: float) -> list[_Entry]:
        """``fixed`` and then the lowest ``pool`` entries while that brings the exact removed params closer to
        target."""
        tally = Tally(sets, self.bias_params)
        for e in fixed:
            tally.take(e)
        best_k, best_removed = 0, tally.removed
        for k, e in enumerate(pool, 1):
            tally.take(e)
            if abs(tally.removed - target) < abs(best_removed - target):
                best_k, best_removed = k, tally.removed
        return fixed + pool[:best_k]
