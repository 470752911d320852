"""Search-LLM's evolutionary architecture search (METHODS.md §3.9 "Allocation", paper §3.3, Alg. 1, Table 1).

A candidate keeps, per decoder layer, a set of attention units (KV groups by default) and a set of MLP channels,
plus a depth d (the first d blocks are kept). Its parameter count is exact (the framework's meaning of
``pruning.ratio``: a fraction of ALL parameters), and every candidate that is evaluated lies in the band
[R − band, R + band] and inside the paper's bounds (Table 1, picked by the inheriting ratio 1 − R):

    per-layer kept fraction of attention units γ_attn ∈ [lo, 1] on a 0.01 grid, rounded down to whole units;
    per-layer kept fraction of MLP channels γ_mlp ∈ [lo, 1] on a ``mlp_step`` (0.05) grid, rounded down;
    depth ∈ [⌊frac·L⌋, L] (LLaMA-7B's row as fractions of L).

Search: the importance-aware initial subnet (same γ in every layer, the top-saliency units kept) → N mutants
(ratios with P⁰_s, masks with P⁰_m) → top k parents; each later generation: N_m mutants of random parents
(P_d, P_s, P_m), N_c crossovers (per layer, (γ_attn, γ_mlp, masks) from either parent; depth from the first;
ours), the rest mutants with the initial probabilities; top k of parents ∪ children survive (so the best fitness
never rises). Fitness (lower is better) is a callable, usually PPL on held-out calibration windows of the model
masked in place (``masked_in_place``). One seeded ``numpy`` generator drives every draw: same seed, same search.

Mask mutation (Alg. 1) is sampled exactly, not by looping: "draw random γN-subsets until the overlap with the
parent is ≥ α·N, at most η times" has the distribution "with probability 1 − (1 − p)^η a subset drawn from the
overlap-truncated hypergeometric law, else the parent", p the one-draw success probability. The overlap target is
α·min(|S|, k) (ours: α·N is unreachable whenever γ < α). When the draw fails but the size must change, the
parent is shrunk or grown by saliency (drop its lowest-scored units, add the best pruned ones; ours).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from pruning.allocation import Budget, check_ratio
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.models.adapter import adapter_for
from pruning.structures import BUILDERS, StructureSet
from pruning.surgery.apply import mask_plan
from pruning.surgery.plan import PrunePlan

# Table 1 (LLaMA-7B): inheriting ratio -> (depth_min as a fraction of L, γ_attn lower bound, γ_mlp lower bound).
# The 70% row's γ_attn bound is printed 0.3 (0.7 likely); used as printed (METHODS.md §4).
TABLE1 = {
    0.9: (1.0, 0.9, 0.6),
    0.8: (1.0, 0.8, 0.4),
    0.7: (30 / 32, 0.3, 0.2),
    0.6: (28 / 32, 0.6, 0.1),
    0.5: (28 / 32, 0.6, 0.1),
}


def table1_row(inheriting: float) -> float:
    """The Table 1 row for a target inheriting ratio: the nearest one (ties: the lower row, the wider space)."""
    return min(TABLE1, key=lambda r: (abs(r - inheriting), r))


@dataclass(frozen=True)
class Candidate:
    depth: int
    attn: tuple[tuple[int, ...], ...]  # kept attention units per layer (sorted)
    mlp: tuple[tuple[int, ...], ...]  # kept MLP channels per layer (sorted)

    def summary(self) -> dict:
        return {"depth": self.depth, "attn_keep": [len(a) for a in self.attn], "mlp_keep": [len(m) for m in self.mlp]}


@dataclass
class SearchSpace:
    row: float  # Table 1 row (inheriting ratio)
    n_layers: int
    n_attn: list[int]  # attention units per layer
    n_mlp: list[int]
    attn_counts: list[list[int]]  # allowed kept counts per layer (ascending)
    mlp_counts: list[list[int]]
    depths: list[int]
    attn_unit_params: list[int]
    mlp_unit_params: list[int]
    block_params: list[int]
    total_params: int
    target: float
    band: float
    attn_kind: str = "kv_group"

    def removed(self, c: Candidate) -> int:
        r = sum(self.block_params[i] for i in range(c.depth, self.n_layers))
        for i in range(c.depth):
            r += (self.n_attn[i] - len(c.attn[i])) * self.attn_unit_params[i]
            r += (self.n_mlp[i] - len(c.mlp[i])) * self.mlp_unit_params[i]
        return r

    def ratio(self, c: Candidate) -> float:
        return self.removed(c) / self.total_params

    def in_band(self, c: Candidate) -> bool:
        return abs(self.ratio(c) - self.target) <= self.band + 1e-12

    def in_bounds(self, c: Candidate) -> bool:
        return c.depth in self.depths and all(
            len(c.attn[i]) in self.attn_counts[i] and len(c.mlp[i]) in self.mlp_counts[i] for i in range(self.n_layers)
        )

    def plan(self, c: Candidate) -> PrunePlan:
        plan = PrunePlan()
        for i in range(c.depth):
            drop_a = sorted(set(range(self.n_attn[i])) - set(c.attn[i]))
            drop_m = sorted(set(range(self.n_mlp[i])) - set(c.mlp[i]))
            if drop_a:
                plan.add(self.attn_kind, i, drop_a)
            if drop_m:
                plan.add("mlp", i, drop_m)
        if c.depth < self.n_layers:
            plan.add("block", None, range(c.depth, self.n_layers))
        return plan

    def describe(self) -> dict:
        return {
            "table1_row": self.row,
            "attn_counts": self.attn_counts,
            "mlp_counts": self.mlp_counts,
            "depths": self.depths,
            "band": self.band,
            "attn_unit": self.attn_kind,
        }


def _grid(lo: float, step: float) -> list[float]:
    n = int(round((1.0 - lo) / step))
    return [min(1.0, lo + k * step) for k in range(n + 1)]


def _count(gamma: float, n: int) -> int:
    return max(1, int(gamma * n + 1e-9))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def mutate_mask(
    parent: tuple[int, ...],
    n: int,
    k: int,
    p_mask: float,
    alpha: float,
    eta: int,
    rng: np.random.Generator,
    scores: torch.Tensor | None = None,
) -> tuple[int, ...]:
    """Alg. 1 M(S, P_m, γ, α, η) with k = γN kept units, sampled exactly (module docstring)."""
    s = len(parent)
    if s == k and rng.random() > p_mask:
        return parent
    t = math.ceil(alpha * min(s, k) - 1e-9)
    lo, hi = max(t, k - (n - s), 0), min(s, k)
    success = 0.0
    if lo <= hi:
        logs = np.array([_log_comb(s, o) + _log_comb(n - s, k - o) for o in range(lo, hi + 1)]) - _log_comb(n, k)
        p_one = float(np.exp(logs).sum())
        success = 1.0 - (1.0 - min(p_one, 1.0)) ** int(eta)
    if rng.random() < success:
        w = np.exp(logs - logs.max())
        o = lo + int(rng.choice(len(w), p=w / w.sum()))
        comp = np.setdiff1d(np.arange(n), np.asarray(parent, dtype=np.int64))
        pick = np.concatenate(
            [rng.choice(np.asarray(parent, dtype=np.int64), o, replace=False), rng.choice(comp, k - o, replace=False)]
        )
        return tuple(sorted(int(i) for i in pick))
    if s == k:
        return parent
    sc = scores if scores is not None else torch.zeros(n, dtype=torch.float64)
    if k < s:  # drop the parent's lowest-saliency units
        kept = sorted(parent, key=lambda u: (float(sc[u]), u))[s - k :]
    else:  # add the best pruned units
        out = sorted(set(range(n)) - set(parent), key=lambda u: (-float(sc[u]), u))
        kept = list(parent) + out[: k - s]
    return tuple(sorted(kept))


@contextmanager
def masked_in_place(model: nn.Module, plan: PrunePlan):
    """Zero the plan's units with ``mask_plan`` and afterwards copy back exactly the rows/columns it touched.

    No model copy: the saved state is the touched slices only (whole o/down weights for a removed block), and the
    restore writes the original values bit for bit.
    """
    adapter = adapter_for(model)
    saved = []

    def save(param, dim, idx):
        saved.append((param, dim, idx, param.data.index_select(dim, idx).clone()))

    for i, layer in enumerate(adapter.layers):
        for kind in ("kv_group", "q_head", "mlp"):
            units = plan.units(kind, i)
            if not units:
                continue
            sset = BUILDERS[kind](adapter, i)
            for m in sset.members:
                linear = getattr(adapter, m.name)(layer)
                idx = m.index[torch.tensor(units, dtype=torch.long)].reshape(-1).to(linear.weight.device)
                save(linear.weight, m.dim, idx)
                if m.dim == 0 and linear.bias is not None:
                    save(linear.bias, 0, idx)
            if kind == "q_head":  # masking also zeroes the k/v rows of a KV head whose last query head goes
                for linear in (adapter.k_proj(layer), adapter.v_proj(layer)):
                    for p in (linear.weight, linear.bias):
                        if p is not None:
                            save(p, 0, torch.arange(p.shape[0], device=p.device))
    for b in plan.blocks:
        for linear in (adapter.o_proj(adapter.layers[b]), adapter.down_proj(adapter.layers[b])):
            for p in (linear.weight, linear.bias):
                if p is not None:
                    save(p, 0, torch.arange(p.shape[0], device=p.device))
    try:
        mask_plan(model, plan)
        yield model
    finally:
        with torch.no_grad():
            for param, dim, idx, values in reversed(saved):
                param.data.index_copy_(dim, idx, values)


@dataclass
class EvolutionarySearch:
    """The allocation of ``method=search_llm``: config of the search; ``space``/``initial``/``search`` run it."""

    population: int = 100
    mutation: int = 50
    crossover: int = 30
    parents: int = 10
    generations: int = 50
    prob_mask_init: float = 0.6  # P⁰_m
    prob_ratio_init: float = 0.3  # P⁰_s
    prob_mask: float = 0.3  # P_m
    prob_ratio: float = 0.1  # P_s
    prob_depth: float = 0.1  # P_d
    alpha: float = 0.8
    eta: int = 1000
    param_band: float = 0.005
    attn_step: float = 0.01
    mlp_step: float = 0.05
    max_tries: int = 200  # draws per population slot until a candidate lands in the band
    seed: int = 0
    progress: bool = True
    history: dict = field(default_factory=dict, repr=False)
    evaluated: list = field(default_factory=list, repr=False)  # (candidate, fitness) in evaluation order

    def __post_init__(self):
        counts = {"population": self.population, "parents": self.parents, "eta": self.eta, "max_tries": self.max_tries}
        bad = [k for k, v in counts.items() if int(v) != v or v < 1]
        bad += [
            k
            for k in ("mutation", "crossover", "generations")
            if int(getattr(self, k)) != getattr(self, k) or getattr(self, k) < 0
        ]
        if bad:
            raise PruningError(
                f"search_llm search settings {bad} must be integers (population, parents, eta and "
                f"max_tries >= 1; mutation, crossover, generations >= 0)"
            )
        if self.mutation + self.crossover > self.population:
            raise PruningError(
                f"search_llm: mutation ({self.mutation}) + crossover ({self.crossover}) exceed the "
                f"population ({self.population})"
            )
        if self.parents > self.population:
            raise PruningError(f"search_llm: parents ({self.parents}) exceed the population ({self.population})")
        probs = {
            k: getattr(self, k)
            for k in ("prob_mask_init", "prob_ratio_init", "prob_mask", "prob_ratio", "prob_depth", "alpha")
        }
        if any(not 0.0 <= v <= 1.0 for v in probs.values()):
            raise PruningError(f"search_llm probabilities and alpha must lie in [0, 1]: {probs}")
        if not 0.0 < self.param_band < 1.0 or not 0 < self.mlp_step <= 1 or not 0 < self.attn_step <= 1:
            raise PruningError("search_llm param_band, mlp_step and attn_step must lie in (0, 1]")

    def layers(self, n_layers: int) -> list[int]:
        """The search covers every layer (Search-LLM has no layer range; the cell's allocation is ignored)."""
        return list(range(n_layers))

    # -------------------------------------------------------------------------------------------- search space

    def space(
        self, sets: list[StructureSet], ratio: float | None, total_params: int, block_params: list[int]
    ) -> SearchSpace:
        """Bounds from Table 1 and feasibility from counts alone (before any statistics are collected)."""
        ratio = check_ratio(ratio)
        attn = sorted((s for s in sets if s.kind in ("kv_group", "q_head")), key=lambda s: s.decoder_layer)
        mlp = sorted((s for s in sets if s.kind == "mlp"), key=lambda s: s.decoder_layer)
        n = len(block_params)
        if [s.layer for s in attn] != list(range(n)) or [s.layer for s in mlp] != list(range(n)):
            raise PruningError("search_llm needs one attention set and one MLP set for every layer")
        row = table1_row(1.0 - ratio)
        depth_frac, lo_a, lo_m = TABLE1[row]
        attn_counts = [sorted({_count(g, s.n_units) for g in _grid(lo_a, self.attn_step)}) for s in attn]
        mlp_counts = [sorted({_count(g, s.n_units) for g in _grid(lo_m, self.mlp_step)}) for s in mlp]
        depths = list(range(max(1, math.floor(depth_frac * n + 1e-9)), n + 1))
        sp = SearchSpace(
            row,
            n,
            [s.n_units for s in attn],
            [s.n_units for s in mlp],
            attn_counts,
            mlp_counts,
            depths,
            [s.params_per_unit for s in attn],
            [s.params_per_unit for s in mlp],
            list(block_params),
            total_params,
            ratio,
            float(self.param_band),
            attn[0].kind,
        )
        smallest = Candidate(
            depths[0], tuple(tuple(range(c[0])) for c in attn_counts), tuple(tuple(range(c[0])) for c in mlp_counts)
        )
        most = sp.ratio(smallest)
        if most < ratio - self.param_band:
            raise InfeasibleRatioError(
                f"pruning.ratio={ratio} is outside Search-LLM's search space (Table 1 row {row:.0%} inheriting: "
                f"γ_attn ≥ {lo_a}, γ_mlp ≥ {lo_m}, depth ≥ {depths[0]}): it can remove at most {most:.4f} of all "
                f"parameters"
            )
        return sp

    def budget(self, sets, ratio, total_params, block_params) -> Budget:
        """Counts only; ``p`` is the Table 1 row's pruning fraction, ``removed_params`` the uniform initial subnet's."""
        sp = self.space(sets, ratio, total_params, block_params)
        init = self.initial(sp, None)
        return Budget(ratio, total_params, 1.0 - sp.row, sp.removed(init))

    def initial(self, sp: SearchSpace, scores: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Candidate:
        """The importance-aware initial subnet: one (γ_attn, γ_mlp) for every layer, closest to the target, top
        saliency kept per layer (``scores[layer] = (attn scores, mlp scores)``; None: the first units)."""
        _depth_frac, lo_a, lo_m = TABLE1[sp.row]

        def uniform_counts(ga: float, gm: float) -> list[tuple[int, int]]:
            return [(_count(ga, sp.n_attn[i]), _count(gm, sp.n_mlp[i])) for i in range(sp.n_layers)]

        def distance(g: tuple[float, float]) -> tuple[float, float, float]:  # to the target; ties: larger γ first
            counts = uniform_counts(*g)
            c = Candidate(
                sp.n_layers, tuple(tuple(range(a)) for a, _ in counts), tuple(tuple(range(m)) for _, m in counts)
            )
            return abs(sp.ratio(c) - sp.target), -g[0], -g[1]

        grid = [(ga, gm) for ga in _grid(lo_a, self.attn_step) for gm in _grid(lo_m, self.mlp_step)]
        counts = uniform_counts(*min(grid, key=distance))

        def top(score, n, k):
            if score is None:
                return tuple(range(k))
            order = torch.argsort(-score.double(), stable=True)[:k]
            return tuple(sorted(int(u) for u in order))

        return Candidate(
            sp.n_layers,
            tuple(top(scores and scores[i][0], sp.n_attn[i], a) for i, (a, _) in enumerate(counts)),
            tuple(top(scores and scores[i][1], sp.n_mlp[i], m) for i, (_, m) in enumerate(counts)),
        )

    # -------------------------------------------------------------------------------------------- operators

    def mutate(
        self, c: Candidate, sp: SearchSpace, scores, rng, p_mask: float, p_ratio: float, p_depth: float
    ) -> Candidate:
        depth = int(rng.choice(sp.depths)) if rng.random() < p_depth else c.depth
        attn, mlp = [], []
        for i in range(sp.n_layers):
            ka = int(rng.choice(sp.attn_counts[i])) if rng.random() < p_ratio else len(c.attn[i])
            km = int(rng.choice(sp.mlp_counts[i])) if rng.random() < p_ratio else len(c.mlp[i])
            sa, sm = scores[i] if scores else (None, None)
            attn.append(mutate_mask(c.attn[i], sp.n_attn[i], ka, p_mask, self.alpha, self.eta, rng, sa))
            mlp.append(mutate_mask(c.mlp[i], sp.n_mlp[i], km, p_mask, self.alpha, self.eta, rng, sm))
        return Candidate(depth, tuple(attn), tuple(mlp))

    def cross(self, a: Candidate, b: Candidate, sp: SearchSpace, rng) -> Candidate:
        pick = rng.random(sp.n_layers) < 0.5
        return Candidate(
            a.depth,
            tuple(b.attn[i] if pick[i] else a.attn[i] for i in range(sp.n_layers)),
            tuple(b.mlp[i] if pick[i] else a.mlp[i] for i in range(sp.n_layers)),
        )

    def _draw(self, make: Callable[[], Candidate], fallback: Candidate | None, sp: SearchSpace) -> Candidate | None:
        """Draw until the candidate lies in the band (the paper drops out-of-range candidates); else ``fallback``."""
        for _ in range(self.max_tries):
            c = make()
            if sp.in_band(c):
                return c
        return fallback

    # -------------------------------------------------------------------------------------------- the search

    def search(self, sp: SearchSpace, scores, fitness: Callable[[Candidate], float]) -> tuple[Candidate, dict]:
        from tqdm.auto import tqdm

        rng = np.random.default_rng(int(self.seed))
        cache: dict[Candidate, float] = {}
        self.evaluated = []
        t_eval = 0.0

        def fit(c: Candidate) -> float:
            nonlocal t_eval
            if c not in cache:
                t0 = time.perf_counter()
                cache[c] = float(fitness(c))
                t_eval += time.perf_counter() - t0
                self.evaluated.append((c, cache[c]))
            return cache[c]

        def rank(cands) -> list[Candidate]:
            uniq = list(dict.fromkeys(cands))  # first occurrence order: deterministic ties
            return sorted(uniq, key=lambda c: (fit(c), uniq.index(c)))

        def pick(pool: list[Candidate]) -> Candidate:
            return pool[int(rng.integers(len(pool)))]

        init = self.initial(sp, scores)
        init_fit = fit(init)
        history: dict[str, Any] = {
            "space": sp.describe(),
            "settings": {k: v for k, v in asdict(self).items() if k not in ("history", "evaluated", "progress")},
            "initial": {
                **init.summary(),
                "fitness": init_fit,
                "removed_ratio": sp.ratio(init),
                "in_band": sp.in_band(init),
            },
            "generations": [],
        }
        if self.generations == 0:  # the initialisation ablation is the uniform subnet as it is: its achieved
            if not sp.in_band(init):  # ratio (history.initial, the record's params) says how far off the band it is
                warnings.warn(
                    f"search_llm: the uniform initial subnet removes {sp.ratio(init):.4f}, outside "
                    f"{sp.target} ± {sp.band}; kept as it is (generations 0)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            best, parents = init, [init]
        else:
            parents = [init] if sp.in_band(init) else []
            bar = tqdm(range(self.generations), desc="search_llm evolution", unit="gen", disable=not self.progress)
            for g in bar:
                drawn: list[Candidate | None] = []
                if g == 0:
                    for _ in range(self.population):
                        make = partial(
                            self.mutate, init, sp, scores, rng, self.prob_mask_init, self.prob_ratio_init, 0.0
                        )
                        drawn.append(self._draw(make, None, sp))
                else:
                    for _ in range(self.mutation):
                        p = pick(parents)
                        make = partial(
                            self.mutate, p, sp, scores, rng, self.prob_mask, self.prob_ratio, self.prob_depth
                        )
                        drawn.append(self._draw(make, p, sp))
                    for _ in range(self.crossover):
                        a, b = pick(parents), pick(parents)
                        drawn.append(self._draw(partial(self.cross, a, b, sp, rng), a, sp))
                    for _ in range(self.population - self.mutation - self.crossover):
                        p = pick(parents)
                        make = partial(
                            self.mutate, p, sp, scores, rng, self.prob_mask_init, self.prob_ratio_init, self.prob_depth
                        )
                        drawn.append(self._draw(make, p, sp))
                children = [c for c in drawn if c is not None]
                if not children and not parents:
                    raise PruningError(
                        f"search_llm: no candidate within {sp.target} ± {sp.band} of all parameters "
                        f"after {self.max_tries} draws per slot; widen search.param_band"
                    )
                n_before = len(cache)
                child_fit = [fit(c) for c in children]
                parents = rank(parents + children)[: self.parents]
                best = parents[0]
                entry = {
                    "generation": g,
                    "best": cache[best],
                    "children_mean": float(np.mean(child_fit)),
                    "children_min": float(np.min(child_fit)),
                    "new_evaluations": len(cache) - n_before,
                    "best_removed_ratio": sp.ratio(best),
                    **{f"best_{k}": v for k, v in best.summary().items()},
                }
                history["generations"].append(entry)
                bar.set_postfix(best=f"{cache[best]:.3f}", evals=len(cache))
            bar.close()
        history["best"] = {
            **best.summary(),
            "fitness": cache[best],
            "removed_ratio": sp.ratio(best),
            "attn_ratio": [len(a) / n for a, n in zip(best.attn, sp.n_attn)],
            "mlp_ratio": [len(m) / n for m, n in zip(best.mlp, sp.n_mlp)],
        }
        history["n_evaluations"] = len(cache)
        history["eval_seconds"] = t_eval
        others = [sp.ratio(c) for c, _ in self.evaluated if c is not init] or [sp.ratio(init)]
        history["candidates_removed_ratio"] = [min(others), max(others)]
        self.history = history
        return best, history
