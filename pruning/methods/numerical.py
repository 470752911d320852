"""Numerical Pruning (Shen et al., AAAI 2025; METHODS.md §3.7): Newton score, global ranking, OBS compensation.

Recipe: XᵀX at the o_proj/down_proj inputs of the dense model (the collector's sequential pass without drops, so only
one layer's Gram matrices are alive at a time) -> ``newton`` scores (α-scaled for heads) -> ``GlobalRank`` over all
candidate layers (param budget by default, the paper's unit count as a switch) -> ``apply``: OBS closed-form
refit of the remaining o_proj/down_proj columns (sequential inputs by default) and physical surgery.

ρ of the relaxed problem (each module's r = (1 − ρ)·D) is the fraction of prunable parameters the budget removes
(param_budget) or the paper's unit fraction (unit_count) [ours: the paper's ρ is its unit ratio].
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pruning.allocation import Budget, Uniform
from pruning.allocation.global_rank import GlobalRank
from pruning.calibration import sequential
from pruning.errors import PruningError
from pruning.importance.newton import NewtonScorer
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.structures import StructureSet
from pruning.surgery.apply import apply_plan
from pruning.surgery.obs import COMP_INPUTS, obs_compensation
from pruning.surgery.plan import PrunePlan


@dataclass
class Numerical(ScoreAndAllocate):
    native_knob = "method.unit_ratio"

    scorer: NewtonScorer
    allocation: GlobalRank = field(default_factory=GlobalRank)
    unit_ratio: float | None = None  # native knob: the paper's ρ (Eq. 8), a fraction of units, not of params
    variable_length_calibration = True  # statistics only through pruning.calibration
    compensate: bool = True
    comp_inputs: str = "sequential"
    comp_damp: float = 0.01
    batch_size: int = 8
    progress: bool = True
    _xtx: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.comp_inputs not in COMP_INPUTS:
            raise PruningError(f"numerical.comp_inputs must be one of {COMP_INPUTS}, got {self.comp_inputs!r}")
        if not float(self.comp_damp) >= 0:
            raise PruningError(f"numerical.comp_damp must be >= 0, got {self.comp_damp}")

    def operating_point(self) -> OperatingPoint | None:
        return (
            None
            if self.unit_ratio is None
            else OperatingPoint(
                "method.unit_ratio",
                float(self.unit_ratio),
                "Numerical Pruning ρ (paper Eq. 8): fraction of units "
                "(attention units + MLP channels over all layers) pruned; η is the ρ·N-th lowest score",
            )
        )

    def budget(self, model: nn.Module, ratio: float | None) -> Budget:
        return super().budget(model, ratio if self.unit_ratio is None else self.unit_ratio)

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        prunable = sum(s.n_units * s.params_per_unit for s in sets)
        self.scorer.rho = budget.p if self.allocation.threshold == "unit_count" else budget.removed_params / prunable
        xtx: dict | None = {} if self.compensate and self.comp_inputs == "dense" else None
        self._xtx = xtx
        scores = {}
        for step in sequential(
            model,
            calib,
            stats=self.scorer.requires,
            sites=("o_proj", "down_proj"),
            layers=sorted({s.decoder_layer for s in sets}),
            batch_size=self.batch_size,
            progress=self.progress,
            prunes=False,
        ):
            self.scorer.bind({step.layer: step.stats})  # no drop: these are the dense statistics
            for i, s in enumerate(sets):
                if s.layer == step.layer:
                    scores[i] = self.scorer(s)
            if xtx is not None:
                xtx.update({(step.layer, k): st.xtx for k, st in step.stats.sites.items()})
        self.scorer.bind(None)
        plan = self.allocation.allocate(sets, [scores[i] for i in range(len(sets))], budget)
        plan.meta["newton_rho"] = self.scorer.rho
        return plan

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        plan = super().prune(model, ratio, calib)
        plan.meta["compensation"] = {
            "obs": self.compensate,
            "comp_inputs": self.comp_inputs,
            "comp_damp": self.comp_damp,
        }
        return plan

    def apply(self, model: nn.Module, plan: PrunePlan, calib=None) -> nn.Module:
        xtx, self._xtx = self._xtx, None
        if not self.compensate or plan.is_empty():
            return apply_plan(model, plan)
        return obs_compensation(
            model,
            plan,
            calib,
            comp_inputs=self.comp_inputs,
            damp=self.comp_damp,
            xtx=xtx,
            batch_size=self.batch_size,
            progress=self.progress,
        )


def numerical(
    lam: float | str = "inf",
    damp: float = 0.01,
    alpha: str | float = "paper",
    newton_iters: int = 1,
    project_box: bool = False,
    unit_ratio: float | None = None,
    compensate: bool = True,
    comp_inputs: str = "sequential",
    comp_damp: float = 0.01,
    structures=("kv_group", "mlp"),
    batch_size: int = 8,
    progress: bool = True,
    layers: dict | None = None,
    **kwargs,
) -> Numerical:
    """``layers`` ({start_frac, end_frac, start, end}; all layers by default) is the candidate layer range; the split
    across layers and kinds comes from the global ranking: the paper's unit-count threshold (Eq. 8) when the native
    ``unit_ratio`` is set, else the parameter budget of ``pruning.ratio`` [ours]. λ may be given as ``lambda`` (the
    config key; a Python keyword)."""
    if "lambda" in kwargs:
        lam = kwargs.pop("lambda")
    if kwargs:
        raise PruningError(f"unknown numerical options {sorted(kwargs)}")
    if unit_ratio is not None and not 0.0 <= float(unit_ratio) < 1.0:
        raise PruningError(f"numerical unit_ratio must be in [0, 1), got {unit_ratio}")
    return Numerical(
        name="numerical",
        scorer=NewtonScorer(lam, damp, alpha, newton_iters, project_box),
        structures=list(structures),
        allocation=GlobalRank(
            threshold="param_budget" if unit_ratio is None else "unit_count", uniform=Uniform.over(layers)
        ),
        unit_ratio=None if unit_ratio is None else float(unit_ratio),
        compensate=compensate,
        comp_inputs=comp_inputs,
        comp_damp=comp_damp,
        batch_size=batch_size,
        progress=progress,
    )
