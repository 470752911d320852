"""ShortGPT (Men et al. 2024; METHODS.md §3.5): delete the decoder blocks with the lowest Block Influence.

Recipe: dense-mode ``block_io`` statistics (per-token cosine of each block's input and output, accumulated over
every token of every calibration window; with ``calibration=shortgpt`` whole documents in windows, tails kept) ->
``block_influence`` -> the uniform allocator over the block set (the n lowest-BI blocks, ties to the lower index,
n chosen so the removed fraction of all parameters is closest to ``pruning.ratio``; ``n_blocks`` fixes n) ->
block surgery (layers renumbered, ``num_hidden_layers`` updated). One shot, no compensation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pruning.allocation import Budget, Uniform, check_ratio
from pruning.calibration import LAST_BLOCK_OUTPUT, collect
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.importance.activation import BlockInfluenceScorer
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.models.adapter import adapter_for
from pruning.structures import StructureSet
from pruning.surgery.plan import PrunePlan


@dataclass
class ShortGPT(ScoreAndAllocate):
    native_knob = "method.n_blocks"
    variable_length_calibration = True  # statistics only through pruning.calibration

    scorer: BlockInfluenceScorer
    n_blocks: int | None = None  # native knob: remove exactly this many blocks (ShortGPT's n_prune_layers)
    last_block: str = "raw"  # raw | hf_hidden_states (the official code's final-norm quirk)
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.structures != ["block"]:
            raise PruningError(f"shortgpt removes whole blocks; structures must be [block], got {self.structures}")
        if self.last_block not in ("raw", "hf_hidden_states"):
            raise PruningError(f"shortgpt last_block must be raw or hf_hidden_states, got {self.last_block!r}")
        if self.n_blocks is not None and int(self.n_blocks) < 0:
            raise PruningError(f"shortgpt n_blocks must be >= 0, got {self.n_blocks}")

    def operating_point(self) -> OperatingPoint | None:
        return (
            None
            if self.n_blocks is None
            else OperatingPoint(
                "method.n_blocks",
                int(self.n_blocks),
                "ShortGPT n_prune_layers: decoder blocks removed (lowest Block Influence first)",
            )
        )

    def budget(self, model: nn.Module, ratio: float | None) -> Budget:
        sets = self.sets(model)
        total = adapter_for(model).num_params()
        (blocks,) = sets
        if self.n_blocks is None:
            most = (blocks.n_units - 1) * blocks.params_per_unit / total
            if check_ratio(ratio) > most + 1e-9:
                raise InfeasibleRatioError(
                    f"pruning.ratio={ratio} would remove every candidate block: shortgpt can "
                    f"remove at most {blocks.n_units - 1} of {blocks.n_units} blocks "
                    f"({most:.4f} of all parameters)"
                )
            return self.allocation.budget(sets, ratio, total)
        if self.n_blocks >= blocks.n_units:
            raise InfeasibleRatioError(
                f"shortgpt n_blocks={self.n_blocks} would remove all {blocks.n_units} candidate blocks"
            )
        # the ratio whose closest whole-block count is n_blocks
        b = self.allocation.budget(sets, self.n_blocks * blocks.params_per_unit / total, total)
        b.target = ratio
        return b

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        last = LAST_BLOCK_OUTPUT[1] if self.last_block == "hf_hidden_states" else LAST_BLOCK_OUTPUT[0]
        stats = collect(
            model,
            calib,
            stats=("block_io",),
            sites=(),
            layers=sets[0].unit_layers,
            mode="dense",
            batch_size=self.batch_size,
            progress=self.progress,
            block_last_output=last,
        )
        self.scorer.bind(stats)
        scores = [self.scorer(s) for s in sets]
        plan = self.allocation.allocate(sets, scores, budget)
        self.scorer.bind(None)
        plan.meta["block_influence"] = {int(l): float(v) for l, v in zip(sets[0].unit_layers, scores[0])}
        # the official code's importances: Σ_t (1 − cos) over every calibration token (same order as the means)
        plan.meta["block_influence_sum"] = {
            int(l): stats[l].block_io.n - stats[l].block_io.cos_sum for l in sets[0].unit_layers
        }
        plan.meta["calibration_tokens"] = stats.n_tokens
        return plan

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        plan = super().prune(model, ratio, calib)
        plan.meta["n_blocks"] = len(plan.blocks)
        return plan


def shortgpt(
    n_blocks: int | None = None,
    angular: bool = False,
    last_block: str = "raw",
    batch_size: int = 8,
    progress: bool = True,
    structures=("block",),
    layers: dict | None = None,
) -> ShortGPT:
    """``layers`` ({start_frac, end_frac, start, end}) restricts the candidate blocks (all layers by default)."""
    return ShortGPT(
        name="shortgpt",
        scorer=BlockInfluenceScorer(angular=angular),
        structures=list(structures),
        allocation=Uniform.over(layers),
        n_blocks=None if n_blocks is None else int(n_blocks),
        last_block=last_block,
        batch_size=batch_size,
        progress=progress,
    )
