"""NIRVANA (Ai et al., arXiv 2509.14230; METHODS.md §3.2): NTK-informed saliency |w·∂f/∂w| on the model output,
per-KV-group and per-neuron L1 sums, global thresholds with the attention/MLP ratio γ, kept MLP widths rounded to
``round_to``, and the choice of calibration set by the KL divergence of the pruned model's next-token distribution
from the dense one. No compensation.

KL selection (``kl_select.seeds``, default 5 candidates): each seed draws a calibration set of the run's calibration
shape; each is scored and allocated; the plan whose masked model is closest to the dense model in
D_KL(P_dense ‖ Q_pruned) (vocab sum, token mean) on a separate evaluation set wins. That set comes from another
dataset than the calibration (default Alpaca vs C4, 128 × 64, seed 42, as ``compute_influence_loss``), so it is
disjoint from every candidate and from the evaluated text. Candidate sets and the KL set are drawn through a sampler
the cell binds (``bind_sampler``: the run's ``calibration.sampler``, NIRVANA's own by default, as the official code
draws both with ``get_examples``); with ``seeds: []`` the run's own calibration batch is used and no KL is computed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.allocation.nirvana import NirvanaAllocation
from pruning.errors import PruningError
from pruning.importance.ntk import NTKScorer, kl_to_reference, next_token_logprobs
from pruning.importance.taylor import MEMORY_OPTIONS
from pruning.methods.base import CalibrationSampler, DrawsCalibration, OperatingPoint, ScoreAndAllocate
from pruning.surgery.apply import apply_plan
from pruning.surgery.plan import PrunePlan

KL_DEFAULTS = {
    "seeds": [0, 1, 2, 3, 4],
    "dataset": "alpaca",
    "n_samples": 128,
    "seq_len": 64,
    "seed": 42,
    "batch_size": 16,
}


@dataclass
class Nirvana(ScoreAndAllocate, DrawsCalibration):
    native_knob = "method.sparsity"

    scorer: NTKScorer
    allocation: NirvanaAllocation = field(default_factory=NirvanaAllocation)
    kl_select: dict = field(default_factory=lambda: dict(KL_DEFAULTS))
    sampler: CalibrationSampler | None = None
    calibration: dict | None = None  # the run's calibration config: dataset, n_samples, seq_len, seed

    def operating_point(self) -> OperatingPoint | None:
        s = self.allocation.sparsity
        return (
            None
            if s is None
            else OperatingPoint(
                "method.sparsity",
                float(s),
                "NIRVANA sparsity: share of attention+MLP parameters removed (embeddings "
                "and lm_head excluded), split between KV groups and MLP neurons by gamma",
            )
        )

    def bind_sampler(self, sampler: CalibrationSampler, calibration: Mapping) -> None:
        """Give the method a way to draw more calibration sets (the cell calls this with the run's tokenizer)."""
        self.sampler, self.calibration = sampler, dict(calibration)

    def _plan(self, model: nn.Module, ratio: float | None, calib: torch.Tensor) -> PrunePlan:
        scoring = self.scorer.fit(model, calib, self.sets(model))
        try:
            plan = super().prune(model, ratio, calib)
        finally:
            self.scorer.reset()
        plan.meta["scoring"] = scoring
        return plan

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        budget = self.budget(model, ratio)  # an impossible ratio fails before any backward pass
        if budget.removed_params == 0:
            return super().prune(model, ratio, calib)
        seeds = list(self.kl_select.get("seeds") or [])
        if not seeds:
            if calib is None:
                raise PruningError("nirvana needs calibration token batches")
            return self._plan(model, ratio, calib)
        if self.sampler is None or self.calibration is None:
            raise PruningError(
                "nirvana kl_select.seeds needs a calibration sampler: call "
                "method.bind_sampler(sampler, calibration_cfg) (run.py does), or set "
                "method.kl_select.seeds=[]"
            )
        c, k = self.calibration, self.kl_select
        if k["dataset"] == c["dataset"]:
            raise PruningError(
                f"nirvana kl_select.dataset ({k['dataset']}) must differ from calibration.dataset so "
                f"the KL set is disjoint from every candidate calibration set"
            )
        kl_ids = self.sampler(k["dataset"], int(k["n_samples"]), int(k["seq_len"]), int(k["seed"]))
        bs = int(k.get("batch_size", 16))
        dense = next_token_logprobs(model, kl_ids, bs)
        results = []
        for seed in seeds:
            plan = self._plan(
                model, ratio, self.sampler(c["dataset"], int(c["n_samples"]), int(c["seq_len"]), int(seed))
            )
            pruned = apply_plan(copy.deepcopy(model), plan)
            results.append((kl_to_reference(pruned, kl_ids, dense, bs), int(seed), plan))
            del pruned
        best = min(results, key=lambda r: (r[0], r[1]))
        plan = best[2]
        plan.meta["kl_select"] = {
            "seeds": [r[1] for r in results],
            "kl": [r[0] for r in results],
            "chosen_seed": best[1],
            "kl_set": {kk: k[kk] for kk in ("dataset", "n_samples", "seq_len", "seed")},
            "calibration": {
                "sampler": c.get("sampler") or "llm_pruner",
                **{kk: c[kk] for kk in ("dataset", "n_samples", "seq_len")},
            },
        }
        return plan


def nirvana(
    gamma: float = 3.36,
    round_to: int = 8,
    sparsity: float | None = None,
    kl_select: dict | None = None,
    memory: dict | None = None,
) -> Nirvana:
    """NIRVANA allocates with its own global thresholds over all layers (γ, round_to)."""
    kl = dict(KL_DEFAULTS)
    unknown = set(kl_select or {}) - set(KL_DEFAULTS)
    if unknown:
        raise PruningError(f"unknown nirvana kl_select options {sorted(unknown)}; choices: {', '.join(KL_DEFAULTS)}")
    kl.update(kl_select or {})
    memory = dict(memory or {})
    if set(memory) - set(MEMORY_OPTIONS):
        raise PruningError(
            f"unknown nirvana memory options {sorted(set(memory) - set(MEMORY_OPTIONS))}; choices: "
            f"{', '.join(MEMORY_OPTIONS)}"
        )
    try:
        alloc = NirvanaAllocation(gamma=float(gamma), round_to=int(round_to), sparsity=sparsity)
    except (TypeError, ValueError) as e:
        raise PruningError(f"bad nirvana setting: {e}") from e
    return Nirvana(
        name="nirvana", scorer=NTKScorer(**memory), structures=["kv_group", "mlp"], allocation=alloc, kl_select=kl
    )
