"""The common recipe: build structure sets, fix the budget from counts, score, allocate -> PrunePlan."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from torch import nn

from pruning.allocation import Budget, Uniform
from pruning.calibration import fixed_length
from pruning.errors import PruningError
from pruning.importance import Scorer
from pruning.models.adapter import adapter_for
from pruning.structures import KINDS, StructureSet, structure_sets
from pruning.surgery.apply import apply_plan
from pruning.surgery.plan import PrunePlan


@dataclass(frozen=True)
class OperatingPoint:
    """A paper's own ratio knob (METHODS.md §1.3), set instead of ``pruning.ratio``: then it defines the cell, and
    the record still reports the achieved fraction of all parameters beside it."""

    knob: str  # the config key, e.g. "method.group_ratio"
    value: float
    meaning: str  # what the number counts, in the paper's terms
    removes_nothing_at: float = 0.0  # the knob's value that asks for no removal (1.0 for a share *kept*)

    @property
    def removes(self) -> bool:
        """True when the setting asks for some removal, so a plan that removes nothing is a mistake."""
        return float(self.value) != self.removes_nothing_at

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "removes_nothing_at"}  # the record's fields

    def __str__(self) -> str:
        return f"{self.knob}={self.value:g}"


# (dataset, n_samples, seq_len, seed) -> token ids drawn like the run's calibration (its sampler, tokenizer and data)
CalibrationSampler = Callable[[str, int, int, int], Any]


class DrawsCalibration(ABC):
    """An optional ability: the method draws more calibration sets than the cell's one batch (NIRVANA's choice among
    candidate calibration seeds by KL). The cell checks ``isinstance(method, DrawsCalibration)`` and binds a sampler
    with the run's tokenizer before the weights load; other methods never see one."""

    @abstractmethod
    def bind_sampler(self, sampler: CalibrationSampler, calibration: Mapping) -> None:
        """Keep ``sampler`` and the run's calibration config (dataset, n_samples, seq_len, seed, sampler fields)."""


@dataclass
class ScoreAndAllocate:
    """A method that ranks units with one scorer and spreads the ratio with one allocator."""

    native_knob: ClassVar[str | None] = None  # the config key of the paper's own ratio knob, if the method has one

    name: str
    scorer: Scorer | None
    structures: list[str] = field(default_factory=lambda: ["kv_group", "mlp"])
    # Uniform here; the allocators do not share one interface (FlapAllocation, GlobalRank, NirvanaAllocation,
    # EvolutionarySearch), so a method that uses another declares this field with its own type
    allocation: Any = field(default_factory=Uniform)
    # True when every calibration read goes through pruning.calibration (collect / sequential), which accepts
    # windows of different lengths (calibration.sampler=documents); gradient scorers need one [n, L] batch.
    variable_length_calibration: ClassVar[bool] = False

    def __post_init__(self):
        unknown = [k for k in self.structures if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown structure kinds {unknown}; choices: {', '.join(KINDS)}")
        if "kv_group" in self.structures and "q_head" in self.structures:
            raise ValueError("choose one attention unit: kv_group or q_head")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.scorer is not None and self.scorer.needs_calibration)

    def operating_point(self) -> OperatingPoint | None:
        """The native knob's setting when one is set (then ``prune``/``budget`` ignore ``ratio``), else None."""
        return None

    def check_calibration(self, n_samples: int | None, seq_len: int) -> None:
        """The calibration shape against what the method needs beyond the sampler's own rules; config only, so a
        mistake fails before any data or weights are read (the cell calls it once the cell must be computed)."""

    def sets(self, model: nn.Module) -> list[StructureSet]:
        adapter = adapter_for(model)
        layers = self.allocation.layers(len(adapter.layers))
        return [s for kind in self.structures for s in structure_sets(adapter, kind, layers)]

    def budget(self, model: nn.Module, ratio: float | None) -> Budget:
        """Feasibility and unit counts from shapes alone: call before loading calibration data or scoring."""
        return self.allocation.budget(self.sets(model), ratio, adapter_for(model).num_params())

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        """Budget from shapes, then ``select`` (skipped when nothing is removed); the plan's meta says what the
        allocator achieved after rounding to whole units."""
        sets = self.sets(model)
        budget = self.budget(model, ratio)
        plan = PrunePlan()
        if budget.removed_params > 0:
            if calib is None and self.needs_calibration:
                raise PruningError(f"{self.name} needs calibration batches")
            if not self.variable_length_calibration:
                fixed_length(calib, self.name)
            plan = self.select(model, sets, budget, calib)
        plan.meta.update(
            method=self.name,
            structures=list(self.structures),
            target_ratio=ratio,
            planned_ratio=(plan.meta.get("allocation") or {}).get("achieved", budget.achieved),
        )
        return plan

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        """Score every set and allocate the budget; methods with statistics passes override this."""
        scorer = self.scorer
        if scorer is None:
            raise PruningError(f"{self.name} has no scorer: it cannot choose units to remove")
        return self.allocation.allocate(sets, [scorer(s) for s in sets], budget)

    def apply(self, model: nn.Module, plan: PrunePlan, calib=None) -> nn.Module:
        """Surgery plus the method's compensation; the baselines have none."""
        return apply_plan(model, plan)
