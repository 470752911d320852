"""LLM-Pruner (Ma et al., NeurIPS 2023; METHODS.md §3.1): Taylor importance + LLM-Pruner's local, uniform allocation
on a layer range + physical surgery. No compensation; recovery is LoRA (``recovery=lora``), off by default.

Strategies:
- ``block`` (the paper's tables): KV groups (each scored with its *own* g query heads, METHODS.md "GQA scoring
  quirk") and MLP channels in layers [⌊0.125·L + ½⌋, ⌊0.9375·L + ½⌋): [4, 30) on 32 layers, [1, 5) on the tiny
  model. Counts follow the official MetaPruner rule on the k_proj root: ⌊(C − int(C(1−p)))/d_h⌋ KV groups with
  C = H_kv·d_h, and I − int(I(1−p)) MLP channels per layer; p is chosen so the share of all parameters removed
  is closest to ``pruning.ratio``, or set directly with ``group_ratio`` (paper presets: 0.25).
- ``channel``: the hidden dimension of the whole model (embedding, every RMSNorm, all projections, lm_head);
  the layer range does not apply. ``surgery.hidden_norm``: ``keep_original_dim`` (default; RMSNorm keeps dividing
  by the original width, so the pruned model equals the masked one) or ``official`` (stock RMSNorm over the kept
  channels, as LLM-Pruner's code does). A tied lm_head stays tied to the sliced embedding.

Importance: ``element1`` (default, official ``param_first``), ``element2`` (``param_mix``), ``element2_fisher``
(``param_second``), ``vector``, or ``random`` (LLM-Pruner's ``--pruner_type random``, for like-for-like baselines).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pruning.allocation import Uniform
from pruning.errors import PruningError
from pruning.importance import AGGREGATIONS, GQA_FOLDS, RandomScorer
from pruning.importance.taylor import MEMORY_OPTIONS, TAYLOR, GradientScorer, check_memory_options, taylor_scorer
from pruning.methods.base import OperatingPoint, ScoreAndAllocate
from pruning.models.adapter import adapter_for
from pruning.surgery.apply import HIDDEN_NORMS, apply_plan
from pruning.surgery.plan import PrunePlan

STRATEGIES = {"block": ("kv_group", "mlp"), "channel": ("hidden",)}
IMPORTANCES = TAYLOR + ("random",)
# LLM-Pruner's block-wise range, layers [4, 30) of 32 as depth fractions (index = floor(frac·L + 0.5)): the first and
# last layers stay intact at any depth ([1, 5) on stories260K, [4, 28) on SmolLM2's 30 layers).
LAYERS = {"start_frac": 0.125, "end_frac": 0.9375, "start": None, "end": None}


GROUP_RATIO_MEANING = (
    "LLM-Pruner --pruning_ratio p: in every layer of the range, floor((C - int(C(1-p))) / d_h) KV "
    "groups (C = k_proj channels) and I - int(I(1-p)) MLP channels are removed"
)


def group_ratio_point(allocation) -> OperatingPoint | None:
    """LLM-Pruner's own knob (also its random / L2 baselines, which run through the same MetaPruner)."""
    p = getattr(allocation, "group_ratio", None)
    return None if p is None else OperatingPoint("method.group_ratio", float(p), GROUP_RATIO_MEANING)


@dataclass
class LLMPruner(ScoreAndAllocate):
    native_knob = "method.group_ratio"

    scorer: GradientScorer | RandomScorer
    importance: str = "element1"
    strategy: str = "block"
    hidden_norm: str = "keep_original_dim"

    def operating_point(self) -> OperatingPoint | None:
        return group_ratio_point(self.allocation)

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        budget = self.budget(model, ratio)  # an impossible ratio fails before any backward pass
        gradient = self.scorer if isinstance(self.scorer, GradientScorer) and budget.removed_params > 0 else None
        scoring = None
        if gradient is not None:
            if calib is None:
                raise PruningError(f"llm_pruner importance={self.importance} needs calibration token batches")
            scoring = gradient.fit(model, calib, self.sets(model))
        try:
            plan = super().prune(model, ratio, calib)
        finally:
            if gradient is not None:
                gradient.reset()
        adapter = adapter_for(model)
        plan.meta.update(
            importance=self.importance,
            aggregation=getattr(self.scorer, "aggregation", None),
            gqa_fold=getattr(self.scorer, "gqa_fold", None),
            strategy=self.strategy,
            layers=self.allocation.layers(len(adapter.layers))
            if self.strategy == "block"
            else "all (hidden dimension)",
        )
        if self.strategy == "channel":
            plan.meta.update(hidden_norm=self.hidden_norm, tied_embeddings=adapter.is_tied)
        if scoring is not None:
            plan.meta["scoring"] = scoring
        return plan

    def apply(self, model: nn.Module, plan: PrunePlan, calib=None) -> nn.Module:
        return apply_plan(model, plan, hidden_norm=self.hidden_norm)


def llm_pruner(
    importance: str = "element1",
    aggregation: str = "sum",
    strategy: str = "block",
    group_ratio: float | None = None,
    gqa_fold: str = "own",
    seed: int = 0,
    memory: dict | None = None,
    surgery: dict | None = None,
    count_rule: str = "llm_pruner",
    layers: dict | None = None,
) -> LLMPruner:
    """The same fraction p of KV groups and MLP channels in every layer of ``layers`` ({start_frac, end_frac, start,
    end}; default LLM-Pruner's [4, 30) of 32 as depth fractions), counted by ``count_rule``; ``group_ratio`` (if
    set) fixes p.

    ``memory``: ``micro_batch`` (null = one backward over all samples, as the official code), ``budget``
    (fraction of the weights' bytes a chunk's held gradients/Fisher may take), ``layerwise`` (backward one decoder
    layer at a time; same scores), ``offload`` / ``device`` (layer-wise only); see ``pruning.importance.taylor``.
    """
    if importance not in IMPORTANCES:
        raise PruningError(f"unknown llm_pruner importance {importance!r}; choices: {', '.join(IMPORTANCES)}")
    if aggregation not in AGGREGATIONS:
        raise PruningError(f"unknown llm_pruner aggregation {aggregation!r}; choices: {', '.join(AGGREGATIONS)}")
    if strategy not in STRATEGIES:
        raise PruningError(f"unknown llm_pruner strategy {strategy!r}; choices: {', '.join(STRATEGIES)}")
    hidden_norm = (surgery or {}).get("hidden_norm", "keep_original_dim")
    if hidden_norm not in HIDDEN_NORMS:
        raise PruningError(f"unknown surgery.hidden_norm {hidden_norm!r}; choices: {', '.join(HIDDEN_NORMS)}")
    memory = dict(memory or {})
    unknown = set(memory) - set(MEMORY_OPTIONS)
    if unknown:
        raise PruningError(f"unknown llm_pruner memory options {sorted(unknown)}; choices: {', '.join(MEMORY_OPTIONS)}")
    if importance == "random":
        check_memory_options(**memory)  # checked even when unused, so a typo'd value never passes silently
    if group_ratio is not None and not 0.0 <= float(group_ratio) < 1.0:
        raise PruningError(f"llm_pruner group_ratio must be in [0, 1), got {group_ratio}")
    allocation = Uniform.over(
        layers, default=LAYERS, count_rule=count_rule, group_ratio=None if group_ratio is None else float(group_ratio)
    )
    if gqa_fold not in GQA_FOLDS:
        raise PruningError(f"unknown llm_pruner gqa_fold {gqa_fold!r}; choices: {', '.join(GQA_FOLDS)}")
    scorer = (
        RandomScorer(seed)
        if importance == "random"
        else taylor_scorer(importance, aggregation=aggregation, gqa_fold=gqa_fold, **memory)
    )
    name = f"llm_pruner_{importance}" + ("_channel" if strategy == "channel" else "")
    return LLMPruner(
        name=name,
        scorer=scorer,
        structures=list(STRATEGIES[strategy]),
        allocation=allocation,
        importance=importance,
        strategy=strategy,
        hidden_norm=hidden_norm,
    )
