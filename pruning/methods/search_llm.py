"""Search-LLM (Shen et al., NeurIPS 2024; METHODS.md §3.9): saliency-initialised evolutionary search of per-layer
widths, then ADMM reformation of o_proj / down_proj, then surgery. Retraining-free.

Recipe:
1. The calibration batch is split: its last ``fitness.n_windows`` samples are the held-out fitness set (never used
   for statistics; never evaluated text), the rest feed the statistics.
2. ``calibration.sequential`` (no pruning in between, i.e. dense statistics, one layer's XᵀX in memory at a time)
   -> ``obs_saliency`` per KV group and MLP channel -> the importance-aware initial subnet.
3. ``EvolutionarySearch`` over per-layer kept counts and masks (Table 1 bounds, the parameter band); fitness = PPL
   of the model masked in place (``masked_in_place``: mask_plan + restore of the touched slices) on the fitness
   windows, through the shared PPL loop (``window_nll``). The history goes into ``plan.meta["search"]`` and, when a
   run directory is known, ``<run dir>/search_llm_history.json``.
4. ``apply``: ``calibration.sequential`` again, now interactive: layer l's o_proj/down_proj inputs (XᵀX) are taken
   on the outputs of the already reformed layers below, both projections are reformed by ADMM in place (pruned
   columns exactly 0), then the next layer runs; finally physical surgery (``apply_plan``).

Attention unit: KV groups (``attn_unit: kv_group``, the framework default; the paper's head-dim channels need the
RoPE pair rule and are not implemented). ``search.generations: 0`` keeps the uniform initial subnet (the
"same saliency, uniform allocation" ablation); ``admm.enabled: false`` skips reformation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pruning.allocation.evolution import Candidate, EvolutionarySearch, masked_in_place
from pruning.calibration import sequential
from pruning.errors import PruningError
from pruning.eval.perplexity import Windows, window_nll
from pruning.importance.obs_saliency import OBSSaliencyScorer
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.models.adapter import adapter_for
from pruning.surgery.admm import PROJECTIONS, admm_reform, output_error
from pruning.surgery.apply import apply_plan
from pruning.surgery.compensation import removed_inputs
from pruning.surgery.plan import PrunePlan

ATTN_UNITS = ("kv_group",)
PRESETS = ("paper", "code", "quick", "init")  # labels; init = generations 0 (the saliency start alone)
ADMM_DEFAULTS = {
    "enabled": True,
    "rho": 1.0,
    "iterations": 30,
    "precondition": True,
    "damping": 0.0,
    "projection": "kept",
}
FITNESS_DEFAULTS = {"n_windows": 5, "batch_size": 8}
HISTORY_FILE = "search_llm_history.json"


@dataclass
class SearchLLM(ScoreAndAllocate):
    native_knob = "method.inheriting_ratio"

    scorer: OBSSaliencyScorer
    allocation: EvolutionarySearch = field(default_factory=EvolutionarySearch)
    preset: str = "paper"
    inheriting_ratio: float | None = None  # native knob: share of ALL params kept (paper's "80%" = 20% removed)
    attn_unit: str = "kv_group"
    admm: dict = field(default_factory=lambda: dict(ADMM_DEFAULTS))
    fitness: dict = field(default_factory=lambda: dict(FITNESS_DEFAULTS))
    batch_size: int = 8
    progress: bool = True
    run_dir: str | None = None

    def __post_init__(self):
        if self.attn_unit not in ATTN_UNITS:
            raise PruningError(
                f"search_llm attn_unit {self.attn_unit!r} is not implemented (choices: "
                f"{', '.join(ATTN_UNITS)}; head_dim needs the RoPE pair rule, METHODS.md §1.2)"
            )
        super().__post_init__()
        if self.inheriting_ratio is not None and not 0.0 < float(self.inheriting_ratio) <= 1.0:
            raise PruningError(f"search_llm inheriting_ratio must be in (0, 1], got {self.inheriting_ratio}")
        if self.preset not in PRESETS:
            raise PruningError(f"search_llm preset must be one of {PRESETS}, got {self.preset!r}")
        unknown = sorted(set(self.admm) - set(ADMM_DEFAULTS)) + sorted(set(self.fitness) - set(FITNESS_DEFAULTS))
        if unknown:
            raise PruningError(
                f"unknown search_llm admm/fitness keys {unknown}; admm: {sorted(ADMM_DEFAULTS)}, "
                f"fitness: {sorted(FITNESS_DEFAULTS)}"
            )
        self.admm = {**ADMM_DEFAULTS, **self.admm}
        self.fitness = {**FITNESS_DEFAULTS, **self.fitness}
        if self.admm["projection"] not in PROJECTIONS:
            raise PruningError(
                f"search_llm admm.projection must be one of {PROJECTIONS}, got {self.admm['projection']!r}"
            )
        if not float(self.admm["rho"]) > 0 or int(self.admm["iterations"]) < 1:
            raise PruningError(f"search_llm admm needs rho > 0 and iterations >= 1, got {self.admm}")
        if int(self.fitness["n_windows"]) < 1 or int(self.fitness["batch_size"]) < 1:
            raise PruningError(f"search_llm fitness n_windows and batch_size must be >= 1, got {self.fitness}")

    @property
    def needs_calibration(self) -> bool:
        return True

    def operating_point(self) -> OperatingPoint | None:
        i = self.inheriting_ratio
        return (
            None
            if i is None
            else OperatingPoint(
                "method.inheriting_ratio",
                float(i),
                "Search-LLM inheriting ratio: share of ALL parameters kept "
                "(embeddings, norms and lm_head included, as get_sampled_params_numel); 1 - i is removed",
                removes_nothing_at=1.0,
            )
        )

    def check_calibration(self, n_samples: int | None, seq_len: int) -> None:
        """The last ``fitness.n_windows`` calibration samples are the held-out fitness set (``_split``): the rest
        must leave at least one for the statistics."""
        n_fit = int(self.fitness["n_windows"])
        if n_samples is not None and n_samples <= n_fit:
            raise PruningError(
                f"search_llm holds out method.fitness.n_windows={n_fit} calibration samples for the fitness and "
                f"needs more for the statistics: calibration.n_samples={n_samples} must be > {n_fit}"
            )

    def _target(self, ratio: float | None) -> float | None:
        """The removed share of all params: the same quantity as pruning.ratio, so the knob is 1 - ratio."""
        return ratio if self.inheriting_ratio is None else round(1.0 - float(self.inheriting_ratio), 12)

    # ------------------------------------------------------------------------------------------------ budget

    def _space(self, model: nn.Module, ratio: float | None):
        adapter = adapter_for(model)
        blocks = [sum(p.numel() for p in layer.parameters()) for layer in adapter.layers]
        return self.allocation.space(self.sets(model), self._target(ratio), adapter.num_params(), blocks)

    def budget(self, model: nn.Module, ratio: float | None):
        """Feasibility from the search bounds (counts only); ``removed_params``: the uniform initial subnet's."""
        adapter = adapter_for(model)
        blocks = [sum(p.numel() for p in layer.parameters()) for layer in adapter.layers]
        return self.allocation.budget(self.sets(model), self._target(ratio), adapter.num_params(), blocks)

    def _split(self, calib: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(statistics samples, held-out fitness samples): the last n_windows rows are the fitness set."""
        n_fit = int(self.fitness["n_windows"])
        if calib is None or not isinstance(calib, torch.Tensor) or calib.dim() != 2:
            raise PruningError("search_llm needs calibration token batches [n_samples, seq_len]")
        if calib.shape[0] <= n_fit:
            raise PruningError(
                f"search_llm holds out fitness.n_windows={n_fit} calibration samples for the fitness "
                f"and needs more for the statistics; calibration.n_samples is {calib.shape[0]}"
            )
        return calib[:-n_fit], calib[-n_fit:]

    # ------------------------------------------------------------------------------------------------ prune

    def scores(self, model: nn.Module, stats_ids: torch.Tensor, sets) -> dict:
        """Saliency per (kind, layer), one layer's XᵀX at a time (sequential mode without pruning = dense)."""
        out = {}
        for step in sequential(
            model,
            stats_ids,
            stats=self.scorer.requires,
            layers=sorted({s.layer for s in sets}),
            batch_size=self.batch_size,
            progress=self.progress,
            prunes=False,
        ):
            self.scorer.bind({step.layer: step.stats})
            for s in sets:
                if s.layer == step.layer:
                    out[(s.kind, s.layer)] = self.scorer(s)
        self.scorer.bind(None)
        return out

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        sp = self._space(model, ratio)  # infeasible ratio / bad settings fail here
        ratio = self._target(ratio)
        if sp.target == 0.0:
            plan = PrunePlan()
            plan.meta.update(method=self.name, target_ratio=ratio, planned_ratio=0.0)
            return plan
        stats_ids, fit_ids = self._split(calib)
        sets = self.sets(model)
        t0 = time.perf_counter()
        sal = self.scores(model, stats_ids, sets)
        t_scores = time.perf_counter() - t0
        scores = [(sal[(sp.attn_kind, i)], sal[("mlp", i)]) for i in range(sp.n_layers)]
        windows = Windows(fit_ids.long(), torch.ones(fit_ids.shape[0], dtype=torch.long))
        bs = int(self.fitness["batch_size"])
        mask_time = [0.0]

        def fitness(c: Candidate) -> float:
            t = time.perf_counter()
            with masked_in_place(model, sp.plan(c)):
                mask_time[0] += time.perf_counter() - t
                nll, n = window_nll(model, windows, bs)
                t = time.perf_counter()
            mask_time[0] += time.perf_counter() - t
            mean = nll / n
            return math.inf if mean > 700 or math.isnan(mean) else math.exp(mean)

        dense_fit = fitness(
            Candidate(sp.n_layers, tuple(tuple(range(n)) for n in sp.n_attn), tuple(tuple(range(n)) for n in sp.n_mlp))
        )
        t0 = time.perf_counter()
        best, history = self.allocation.search(sp, scores, fitness)
        history.update(
            dense_fitness=dense_fit,
            search_seconds=time.perf_counter() - t0,
            saliency_seconds=t_scores,
            mask_restore_seconds=mask_time[0],
            fitness_set={
                "samples": int(fit_ids.shape[0]),
                "seq_len": int(fit_ids.shape[1]),
                "source": "held-out tail of the calibration batch",
            },
        )
        plan = sp.plan(best)
        plan.meta.update(
            method=self.name,
            structures=list(self.structures),
            target_ratio=ratio,
            planned_ratio=sp.ratio(best),
            preset=self.preset,
            attn_unit=self.attn_unit,
            search=history,
            admm=dict(self.admm),
            allocation={"type": "evolution", "target": ratio, "achieved": sp.ratio(best), "band": sp.band},
        )
        self._write_history(history)
        return plan

    def _write_history(self, history: dict) -> None:
        run_dir = self.run_dir
        if run_dir is None:
            try:
                from hydra.core.hydra_config import HydraConfig

                run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
            except ImportError:  # pragma: no cover - hydra is a core dependency
                run_dir = None
        if run_dir is not None:
            path = Path(run_dir) / HISTORY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(history, indent=1))

    # ------------------------------------------------------------------------------------------------ apply

    def reform(self, model: nn.Module, plan: PrunePlan, calib: torch.Tensor) -> dict:
        """ADMM on every o_proj/down_proj that loses input columns, layer by layer, in place (shapes unchanged)."""
        adapter = adapter_for(model)
        stats_ids, _ = self._split(calib)
        todo = {i: removed_inputs(adapter, plan, i) for i in range(len(adapter.layers)) if i not in plan.blocks}
        todo = {i: v for i, v in todo.items() if v}
        if not todo:
            return {}
        report = {}
        a = self.admm
        layers = sorted(set(todo) | set(plan.blocks))
        for step in sequential(
            model,
            stats_ids,
            stats=("xtx",),
            sites=("o_proj", "down_proj"),
            layers=layers,
            batch_size=self.batch_size,
            progress=self.progress,
        ):
            if step.layer in plan.blocks:
                step.drop(plan)
                continue
            layer = adapter.layers[step.layer]
            for site, idx in todo[step.layer].items():
                linear = getattr(adapter, site)(layer)
                w = linear.weight.detach().clone()
                keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
                keep[idx.to(w.device)] = False
                g = step.stats[site].xtx
                z = admm_reform(
                    w,
                    g,
                    keep,
                    rho=float(a["rho"]),
                    iterations=int(a["iterations"]),
                    precondition=bool(a["precondition"]),
                    damping=float(a["damping"]),
                    projection=a["projection"],
                )
                removal = output_error(w * keep.to(w.dtype)[None, :], w, g)
                with torch.no_grad():
                    linear.weight.copy_(z.to(w.dtype))
                report[f"{step.layer}.{site}"] = {
                    "removal_error": removal,
                    "reformed_error": output_error(linear.weight, w, g),
                }
        return report

    def apply(self, model: nn.Module, plan: PrunePlan, calib=None) -> nn.Module:
        if plan.is_empty():
            return model
        if self.admm["enabled"]:
            t0 = time.perf_counter()
            report = self.reform(model, plan, calib)
            plan.meta["reformation"] = {"seconds": time.perf_counter() - t0, "layers": report}
        return apply_plan(model, plan)


def search_llm(
    preset: str = "paper",
    attn_unit: str = "kv_group",
    inheriting_ratio: float | None = None,
    search: dict | None = None,
    fitness: dict | None = None,
    admm: dict | None = None,
    saliency_damp: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | None = None,
) -> SearchLLM:
    """The evolutionary search is the allocation, over every layer."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(EvolutionarySearch)} - {"seed", "progress", "history", "evaluated"}
    unknown = sorted(set(search or {}) - known)
    if unknown:
        raise PruningError(f"unknown search_llm search keys {unknown}; choices: {sorted(known)}")
    evo = EvolutionarySearch(**(search or {}), seed=seed, progress=progress)
    return SearchLLM(
        name="search_llm",
        scorer=OBSSaliencyScorer(saliency_damp),
        structures=[attn_unit, "mlp"],
        allocation=evo,
        preset=preset,
        attn_unit=attn_unit,
        inheriting_ratio=inheriting_ratio,
        admm=dict(admm or {}),
        fitness=dict(fitness or {}),
        batch_size=batch_size,
        progress=progress,
        run_dir=run_dir,
    )
