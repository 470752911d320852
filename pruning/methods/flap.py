"""FLAP (An et al., AAAI 2024; METHODS.md §3.3): fluctuation metric, standardised global allocation, bias
compensation. Retraining-free.

Recipe: dense-mode statistics at the o_proj/down_proj inputs (mean, variance) -> ``fluctuation`` channel metric ->
``FlapAllocation`` (UL-UM | UL-MM | AL-MM | AL-AM) -> surgery plus the bias b += W[:, P]·x̄_P.

Attention units are single query heads by default (``structures=[q_head, mlp]``), as FLAP's code removes heads on an
MHA model: a KV head leaves with its last query head, so GQA groups become uneven (FLAP's own code masks q, k and v
with one head mask, which is wrong under GQA, FLAP issue #14; ``structures=[kv_group, mlp]`` prunes whole groups).
Counts follow the FLAP repository (``count_rule: floor``, int(p·n) units per kind and layer in the uniform modes).

Variance (``variance``): ``exact`` (default, the unbiased variance over all calibration tokens) or
``official_streaming`` (FLAP's per-sample streaming update, ``importance.activation.streaming_fluctuation``; one
collector pass per calibration sample), for parity with the official code (METHODS.md §3.3 "Estimator").

Operating point: ``attn_mlp_ratio`` (native, FLAP's ``--pruning_ratio``: a share of the attention+MLP weights as
its code counts them on the MHA form, with the official per-mode counts; see ``pruning.allocation.flap``), or
``pruning.ratio`` (a share of all parameters, exact accounting including the added biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pruning.allocation import Budget, Uniform
from pruning.allocation.flap import FlapAllocation
from pruning.calibration import collect
from pruning.errors import PruningError
from pruning.importance.activation import VARIANCES, FluctuationScorer, streaming_fluctuation
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.models.adapter import adapter_for
from pruning.structures import StructureSet
from pruning.surgery.apply import apply_plan, mask_plan
from pruning.surgery.compensation import SURGERY, bias_compensation
from pruning.surgery.plan import PrunePlan

ATTN_MLP_RATIO_MEANING = (
    "FLAP --pruning_ratio p: share of the attention+MLP weights removed as the FLAP code counts "
    "them on the MHA form (a query head 4·d·d_h, an MLP channel 3·d); UL-UM and Wanda-SP remove "
    "int(p·n) query heads and MLP channels per layer, AL-AM thresholds the pooled standardised "
    "scores to keep (1-p) of the weights"
)


def attn_mlp_ratio_point(p: float | None) -> OperatingPoint | None:
    """FLAP's (and its Wanda-SP baseline's) own knob."""
    return None if p is None else OperatingPoint("method.attn_mlp_ratio", float(p), ATTN_MLP_RATIO_MEANING)


@dataclass
class Flap(ScoreAndAllocate):
    native_knob = "method.attn_mlp_ratio"
    variable_length_calibration = True  # statistics only through pruning.calibration

    scorer: FluctuationScorer
    allocation: FlapAllocation = field(default_factory=FlapAllocation)
    bias: bool = True  # FLAP's compensation
    surgery: str = "remove"  # remove | mask (FLAP's --unstr: zeroed, shapes kept)
    variance: str = "exact"  # exact | official_streaming (FLAP's BiasGPT estimator)
    batch_size: int = 8
    progress: bool = True
    _means: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.surgery not in SURGERY:
            raise PruningError(f"flap surgery must be one of {SURGERY}, got {self.surgery!r}")
        if self.variance not in VARIANCES:
            raise PruningError(f"flap variance must be one of {VARIANCES}, got {self.variance!r}")

    def operating_point(self) -> OperatingPoint | None:
        return attn_mlp_ratio_point(self.allocation.attn_mlp_ratio)

    def sets(self, model: nn.Module):
        # the allocator counts the biases compensation will add: d params per o_proj/down_proj that loses units
        self.allocation.bias_params = adapter_for(model).config.hidden_size if self.bias else 0
        return super().sets(model)

    def select(self, model: nn.Module, sets: list[StructureSet], budget: Budget, calib) -> PrunePlan:
        want = tuple(dict.fromkeys(self.scorer.requires + (("mean",) if self.bias else ())))
        layers = sorted({s.decoder_layer for s in sets})
        stats = collect(
            model,
            calib,
            stats=want,
            sites=("o_proj", "down_proj"),
            layers=layers,
            mode="dense",
            batch_size=self.batch_size,
            progress=self.progress,
        )
        fluctuation = None
        if self.variance == "official_streaming" and "var" in self.scorer.requires:
            fluctuation = streaming_fluctuation(model, calib, layers, progress=self.progress)
        self.scorer.bind(stats, fluctuation)
        scores = [self.allocation.unit_scores(s, self.scorer.channel_scores(s)) for s in sets]
        plan = self.allocation.allocate(sets, scores, budget)
        self.scorer.bind(None)
        if self.bias:  # keep only the means (what apply needs), keyed by (layer, site)
            self._means = {(i, site): st.mean for i, ls in stats.layers.items() for site, st in ls.sites.items()}
        return plan

    def apply(self, model: nn.Module, plan: PrunePlan, calib=None) -> nn.Module:
        if not self.bias:
            return (apply_plan if self.surgery == "remove" else mask_plan)(model, plan)
        if plan.is_empty():
            return model
        means, self._means = self._means, None
        if means is None:  # plan from elsewhere (e.g. a saved plan): the means come from the unpruned model
            if calib is None:
                raise PruningError(
                    "flap.apply needs the calibration means: call prune on this model first, or pass "
                    "the calibration batches"
                )
            layers = sorted({layer for per in plan.remove.values() for layer, units in per.items() if units})
            stats = collect(
                model,
                calib,
                stats=("mean",),
                sites=("o_proj", "down_proj"),
                layers=layers,
                batch_size=self.batch_size,
                progress=self.progress,
            )
            means = {(i, site): st.mean for i, ls in stats.layers.items() for site, st in ls.sites.items()}
        return bias_compensation(model, plan, means, surgery=self.surgery)


def flap(
    structure: str = "AL-AM",
    metric: str = "WIFV",
    remove_heads: int | None = None,
    bias: bool = True,
    structures=("q_head", "mlp"),
    attn_mlp_ratio: float | None = None,
    count_rule: str = "floor",
    variance: str = "exact",
    surgery: str = "remove",
    batch_size: int = 8,
    progress: bool = True,
    layers: dict | None = None,
) -> Flap:
    """``layers`` ({start_frac, end_frac, start, end}; all layers by default) is the candidate layer range, also of
    UL-UM's uniform spreading under ``count_rule`` (FLAP's int(p·n) by default); FLAP's own mode is ``structure``."""
    uniform = Uniform.over(layers, count_rule=count_rule)
    alloc = FlapAllocation(
        structure=structure, remove_heads=remove_heads, uniform=uniform, attn_mlp_ratio=attn_mlp_ratio
    )
    return Flap(
        name="flap",
        scorer=FluctuationScorer(metric),
        structures=list(structures),
        allocation=alloc,
        bias=bias,
        surgery=surgery,
        variance=variance,
        batch_size=batch_size,
        progress=progress,
    )
