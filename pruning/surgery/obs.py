"""OBS-style closed-form multi-row compensation of o_proj / down_proj (Numerical Pruning §3.4, Theorem 3;
METHODS.md §3.7 "Compensation").

Removing input channels P of a projection y = x·Wᵀ, the remaining columns K are refitted so the output on the
calibration inputs X is preserved: with H = 2XᵀX + γI (γ = ``damp``·mean diag 2XᵀX),
    W_K ← W_K + W_P · H_PK · H_KK⁻¹        (HF layout, weight [out, in]),  W_P ← 0.
This is the paper's δW* = −H⁻¹M_p(M_pᵀH⁻¹M_p)⁻¹M_pᵀW written through the Schur complement (one k_K×k_K solve,
no D×D inverse). With γ = 0 and full-rank X the kept columns equal ``lstsq(X_K, X Wᵀ)``; γ → ∞ is plain removal.
The same solver serves Search-LLM's reformation (``compensation.solver: closed_form``).

Inputs (``comp_inputs``): ``sequential`` (default) fits layer l on inputs produced by the already pruned and
compensated layers < l (the collector's ``sequential`` pass; within one block the MLP statistics are taken before
that block's attention is compensated); ``dense`` fits every layer on the unpruned model's inputs. Surgery then
removes the zeroed columns together with their q/k/v or gate/up rows, so the compensated model is unchanged by it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pruning.calibration import collect, sequential
from pruning.errors import PruningError
from pruning.models.adapter import adapter_for
from pruning.surgery.apply import apply_plan
from pruning.surgery.compensation import removed_inputs
from pruning.surgery.plan import PrunePlan

COMP_INPUTS = ("sequential", "dense")
SITES = ("o_proj", "down_proj")


def obs_update(weight: torch.Tensor, xtx: torch.Tensor, pruned: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The compensated weight [out, in] (float64; pruned columns exactly 0) for input Gram ``xtx`` = XᵀX."""
    w = weight.detach().to("cpu", torch.float64)
    h = 2.0 * xtx.detach().to("cpu", torch.float64)
    d = w.shape[1]
    if h.shape != (d, d):
        raise PruningError(
            f"OBS compensation: XᵀX is {tuple(h.shape)}, the weight has {d} input channels; "
            "collect statistics on the model you prune"
        )
    if damp < 0:
        raise PruningError(f"compensation damping must be >= 0, got {damp}")
    if damp > 0:
        mean_diag = h.diagonal().mean()
        h = h + damp * (mean_diag if mean_diag > 0 else 1.0) * torch.eye(d, dtype=h.dtype)
    p = torch.as_tensor(pruned, dtype=torch.long).reshape(-1).cpu()
    mask = torch.ones(d, dtype=torch.bool)
    mask[p] = False
    k = mask.nonzero().flatten()
    out = w.clone()
    if p.numel() == 0:
        return out
    # W_K += W_P H_PK H_KK⁻¹  <=>  (ΔW_K)ᵀ = H_KK⁻¹ H_KP W_Pᵀ
    rhs = h[k][:, p] @ w[:, p].T
    try:
        delta = torch.linalg.solve(h[k][:, k], rhs)
    except RuntimeError:  # singular without damping: the minimum-norm least-squares solution
        delta = torch.linalg.lstsq(h[k][:, k], rhs, driver="gelsd").solution
    out[:, k] += delta.T
    out[:, p] = 0.0
    return out


def _compensate_layer(adapter, layer_idx: int, plan: PrunePlan, xtx: Mapping[str, torch.Tensor], damp: float) -> None:
    """Refit one layer's o_proj/down_proj in place (pruned columns become 0)."""
    layer = adapter.layers[layer_idx]
    for site, idx in removed_inputs(adapter, plan, layer_idx).items():
        linear: nn.Linear = getattr(adapter, site)(layer)
        if site not in xtx:
            raise PruningError(f"OBS compensation needs XᵀX at layer {layer_idx} {site}")
        new = obs_update(linear.weight, xtx[site], idx, damp)
        with torch.no_grad():
            linear.weight.copy_(new.to(linear.weight.dtype))


def obs_compensation(
    model: nn.Module,
    plan: PrunePlan,
    calib: torch.Tensor | None = None,
    comp_inputs: str = "sequential",
    damp: float = 0.01,
    xtx: Mapping | None = None,
    batch_size: int = 8,
    progress: bool = True,
    surgery: bool = True,
) -> nn.Module:
    """Compensate every layer the plan touches, then (``surgery``) remove the plan's units physically.

    ``xtx[(layer, site)]`` may supply dense-model Gram matrices (``comp_inputs='dense'``), else they are collected.
    """
    if comp_inputs not in COMP_INPUTS:
        raise PruningError(f"comp_inputs must be one of {COMP_INPUTS}, got {comp_inputs!r}")
    if plan.blocks or plan.units("hidden", -1):
        raise PruningError("OBS compensation handles head and MLP-channel plans, not blocks or hidden channels")
    adapter = adapter_for(model)
    layers = [i for i in range(len(adapter.layers)) if removed_inputs(adapter, plan, i)]
    if layers:
        stats = {"o_proj": ("xtx",), "down_proj": ("xtx",)}
        if comp_inputs == "dense":
            if xtx is None or any((i, s) not in xtx for i in layers for s in removed_inputs(adapter, plan, i)):
                if calib is None:
                    raise PruningError("OBS compensation needs the calibration batches")
                got = collect(
                    model, calib, stats=stats, layers=layers, mode="dense", batch_size=batch_size, progress=progress
                )
                xtx = {(i, s): st.xtx for i in got.layers for s, st in got[i].sites.items()}
            for i in layers:
                _compensate_layer(adapter, i, plan, {s: xtx[(i, s)] for s in SITES if (i, s) in xtx}, damp)
        else:
            if calib is None:
                raise PruningError("OBS compensation needs the calibration batches")
            for step in sequential(model, calib, stats=stats, layers=layers, batch_size=batch_size, progress=progress):
                _compensate_layer(adapter, step.layer, plan, {s: st.xtx for s, st in step.stats.sites.items()}, damp)
                step.drop(plan)  # pruned columns are already 0; this only keeps the pass honest
    return apply_plan(model, plan) if surgery else model
