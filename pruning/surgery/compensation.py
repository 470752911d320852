"""Compensation applied with surgery: FLAP's bias (METHODS.md §3.3 "Compensation").

Removing input channels P of o_proj (or down_proj) drops W[:, P]·x_P from its output. FLAP replaces it with its
calibration expectation: b ← b + W[:, P]·x̄_P. Computed from the original weights before the columns go, then
added as a bias (created when the projection has none; the adapter's widths() and the pruned_llama save format
carry per-layer o_proj/down_proj bias flags, METHODS.md §1.2 rule 7).

``removed_inputs`` is the single place that maps a plan's units to the o_proj/down_proj input channels they own
(through the structure declarations), used here and by the collector's sequential ``drop``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.models.adapter import ModelAdapter, adapter_for
from pruning.structures import BUILDERS
from pruning.surgery.apply import apply_plan, mask_plan
from pruning.surgery.plan import PrunePlan

_OUTPUT_OF = {"kv_group": "o_proj", "q_head": "o_proj", "mlp": "down_proj"}
SURGERY = ("remove", "mask")


def removed_inputs(adapter: ModelAdapter, plan: PrunePlan, layer_idx: int) -> dict[str, torch.Tensor]:
    """The o_proj / down_proj input channels (original numbering) whose units the plan removes in one layer."""
    out: dict[str, list[torch.Tensor]] = {}
    for kind, site in _OUTPUT_OF.items():
        units = plan.units(kind, layer_idx)
        if not units:
            continue
        (member,) = [m for m in BUILDERS[kind](adapter, layer_idx).members if m.name == site]
        out.setdefault(site, []).append(member.index[torch.tensor(units, dtype=torch.long)].reshape(-1))
    return {site: torch.unique(torch.cat(parts)) for site, parts in out.items()}


def add_bias(linear: nn.Linear, delta: torch.Tensor) -> None:
    """b ← b + delta, creating a zero bias first when the projection has none."""
    w = linear.weight
    delta = delta.to(device=w.device, dtype=w.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad
        )
    with torch.no_grad():
        linear.bias.add_(delta)


def bias_deltas(
    model: nn.Module, plan: PrunePlan, means: Mapping[tuple[int, str], torch.Tensor]
) -> list[tuple[nn.Linear, torch.Tensor]]:
    """W[:, P]·x̄_P (float64) for every o_proj/down_proj that loses input channels; blocks that go are skipped.

    ``means[(layer, site)]`` is the calibration mean of that projection's input over the original channels.
    """
    adapter = adapter_for(model)
    out = []
    for i, layer in enumerate(adapter.layers):
        if i in plan.blocks:
            continue
        for site, idx in removed_inputs(adapter, plan, i).items():
            if (i, site) not in means:
                raise PruningError(f"bias compensation needs the calibration mean of layer {i} {site} input")
            linear = getattr(adapter, site)(layer)
            mean = means[(i, site)].to(torch.float64)
            if mean.shape[0] != linear.in_features:
                raise PruningError(
                    f"layer {i} {site}: calibration mean has {mean.shape[0]} channels, the "
                    f"projection {linear.in_features}; collect statistics on the model you prune"
                )
            w = linear.weight.detach().to(torch.float64)
            idx = idx.to(w.device)
            out.append((linear, w[:, idx] @ mean.to(w.device)[idx]))
    return out


def bias_compensation(
    model: nn.Module, plan: PrunePlan, means: Mapping[tuple[int, str], torch.Tensor], surgery: str = "remove"
) -> nn.Module:
    """Surgery (``remove``: physical, ``mask``: zeroing, FLAP's ``--unstr``) plus FLAP's bias, in place."""
    if surgery not in SURGERY:
        raise PruningError(f"surgery must be one of {SURGERY}, got {surgery!r}")
    deltas = bias_deltas(model, plan, means)  # from the original weights, before any column goes
    (apply_plan if surgery == "remove" else mask_plan)(model, plan)
    for linear, delta in deltas:  # module objects survive surgery (only their weights change)
        add_bias(linear, delta)
    return model
