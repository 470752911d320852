"""Remove (or, for equivalence checks and cheap candidate evaluation, zero) the units a plan names.

Removal and masking walk the same index sets, so "physically pruned == masked dense" is a property of one
code path, not of two that happen to agree (METHODS.md §1.2). Masking zeroes the removed query heads' q rows and
o columns and the k/v rows of every KV head left without query heads; removal deletes them and records the layer's
new query-to-KV map (uneven GQA groups).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning.errors import InfeasibleRatioError, PruningError
from pruning.models.adapter import ModelAdapter, adapter_for
from pruning.structures import hidden_channels
from pruning.surgery.modeling_pruned_llama import MeanDimRMSNorm
from pruning.surgery.plan import MODEL_WIDE, PrunePlan

HIDDEN_NORMS = ("keep_original_dim", "official")  # METHODS.md §1.2 rule 5, ``surgery.hidden_norm``


def _channels(blocks: list[int], size: int) -> torch.Tensor:
    return (torch.tensor(blocks, dtype=torch.long)[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _attention_keep(
    adapter: ModelAdapter, layer_idx: int, plan: PrunePlan
) -> tuple[list[int], list[int], list[int]] | None:
    """Kept KV heads, kept query heads and the new query heads per kept KV head of one layer, or None when the plan
    leaves attention untouched. Any query head may go; a KV head goes with its group, or when its last query head
    goes (uneven GQA groups, METHODS.md §1.2 rule 2); the layer must keep one query head."""
    kv_rm, q_rm = set(plan.units("kv_group", layer_idx)), set(plan.units("q_head", layer_idx))
    if not kv_rm and not q_rm:
        return None
    w = adapter.widths(adapter.layers[layer_idx])
    bad = [u for u in kv_rm if not 0 <= u < w.num_kv_heads] + [u for u in q_rm if not 0 <= u < w.num_heads]
    if bad:
        raise ValueError(f"layer {layer_idx}: plan names units {sorted(bad)} that do not exist")
    if kv_rm and not w.even:
        raise PruningError(
            f"layer {layer_idx} has uneven KV groups {list(w.kv_group_sizes)}: its plan may remove "
            "query heads (q_head), not kv_group units"
        )
    kv_of = adapter.kv_head_of_query(adapter.layers[layer_idx])
    keep_q = [h for h in range(w.num_heads) if kv_of[h] not in kv_rm and h not in q_rm]
    keep_kv = sorted({kv_of[h] for h in keep_q})
    if not keep_q:
        raise InfeasibleRatioError(
            f"the plan empties the attention of layer {layer_idx} "
            f"({len(kv_rm)}/{w.num_kv_heads} KV groups and {len(q_rm)}/{w.num_heads} query "
            f"heads removed)"
        )
    sizes = [sum(1 for h in keep_q if kv_of[h] == j) for j in keep_kv]
    return keep_kv, keep_q, sizes


def _mlp_keep(adapter: ModelAdapter, layer_idx: int, plan: PrunePlan) -> list[int] | None:
    rm = set(plan.units("mlp", layer_idx))
    if not rm:
        return None
    n = adapter.widths(adapter.layers[layer_idx]).intermediate_size
    if any(not 0 <= u < n for u in rm):
        raise ValueError(f"layer {layer_idx}: plan names MLP channels outside [0, {n})")
    keep = [c for c in range(n) if c not in rm]
    if not keep:
        raise InfeasibleRatioError(f"the plan removes all {n} MLP channels of layer {layer_idx}")
    return keep


def validate_plan(adapter: ModelAdapter, plan: PrunePlan) -> None:
    n_layers = len(adapter.layers)
    for kind, per in plan.remove.items():
        for layer in per:
            if kind == "hidden" and layer == MODEL_WIDE:
                continue
            if not 0 <= layer < n_layers:
                raise ValueError(f"plan names {kind} units in layer {layer}, but the model has {n_layers} layers")
    for i in range(n_layers):
        _attention_keep(adapter, i, plan)
        _mlp_keep(adapter, i, plan)
    hidden, d = plan.units("hidden", MODEL_WIDE), adapter.embed_tokens.weight.shape[1]
    if any(not 0 <= c < d for c in hidden):
        raise ValueError(f"plan names hidden channels outside [0, {d})")
    if hidden and len(set(hidden)) >= d:
        raise InfeasibleRatioError(f"the plan removes all {d} hidden channels")
    if any(not 0 <= b < n_layers for b in plan.blocks):
        raise ValueError(f"plan removes blocks {plan.blocks} outside [0, {n_layers})")
    if len(set(plan.blocks)) >= n_layers:
        raise InfeasibleRatioError(f"the plan removes all {n_layers} decoder blocks")


def _select(linear: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(
        linear.weight.data.index_select(dim, keep).clone(), requires_grad=linear.weight.requires_grad
    )
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[keep].clone(), requires_grad=linear.bias.requires_grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _zero(linear: nn.Linear, dim: int, drop: torch.Tensor) -> None:
    drop = drop.to(linear.weight.device)
    with torch.no_grad():
        linear.weight.index_fill_(dim, drop, 0.0)
        if dim == 0 and linear.bias is not None:
            linear.bias.index_fill_(0, drop, 0.0)


def _complement(keep: list[int], n: int) -> list[int]:
    s = set(keep)
    return [i for i in range(n) if i not in s]


def _edit(model: nn.Module, plan: PrunePlan, remove: bool, hidden_norm: str = "keep_original_dim") -> ModelAdapter:
    """Walk the plan once: remove the kept complement's channels, or zero the dropped ones."""
    op = _select if remove else _zero

    def pick(keep: list[int], n: int) -> list[int]:
        return keep if remove else _complement(keep, n)

    adapter = adapter_for(model)
    validate_plan(adapter, plan)
    hd = adapter.head_dim
    for i, layer in enumerate(adapter.layers):
        w = adapter.widths(layer)
        att = _attention_keep(adapter, i, plan)
        if att is not None:
            keep_kv, keep_q, sizes = att
            kv, q = pick(keep_kv, w.num_kv_heads), pick(keep_q, w.num_heads)
            for proj, idx in ((adapter.q_proj(layer), q), (adapter.k_proj(layer), kv), (adapter.v_proj(layer), kv)):
                op(proj, 0, _channels(idx, hd))
            op(adapter.o_proj(layer), 1, _channels(q, hd))
            if remove:
                adapter.set_kv_group_sizes(layer, sizes)
        keep_c = _mlp_keep(adapter, i, plan)
        if keep_c is not None:
            c = torch.tensor(pick(keep_c, w.intermediate_size), dtype=torch.long)
            op(adapter.gate_proj(layer), 0, c)
            op(adapter.up_proj(layer), 0, c)
            op(adapter.down_proj(layer), 1, c)
        adapter.sync_layer(layer)
    if plan.units("hidden", MODEL_WIDE):
        _edit_hidden(model, adapter, plan.units("hidden", MODEL_WIDE), remove, hidden_norm)
    return adapter


def apply_plan(model: nn.Module, plan: PrunePlan, hidden_norm: str | None = None) -> nn.Module:
    """Physically remove the plan's units (in place) and update each layer's own counts and the config.

    ``hidden_norm`` (default: the plan's ``meta["hidden_norm"]``, else keep_original_dim) only matters when hidden
    channels go: keep_original_dim makes the result equal the masked model, official slices stock RMSNorms.
    """
    hidden_norm = hidden_norm or plan.meta.get("hidden_norm", "keep_original_dim")
    if hidden_norm not in HIDDEN_NORMS:
        raise ValueError(f"unknown surgery.hidden_norm {hidden_norm!r}; choices: {', '.join(HIDDEN_NORMS)}")
    adapter = _edit(model, plan, remove=True, hidden_norm=hidden_norm)
    if plan.blocks:
        adapter.set_layers([i for i in range(len(adapter.layers)) if i not in set(plan.blocks)])
    return model


def mask_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Zero the plan's units in place, shapes unchanged: the reference that surgery must match."""
    adapter = _edit(model, plan, remove=False)
    for b in plan.blocks:  # a block whose output projections are zero is the identity on the residual stream
        layer = adapter.layers[b]
        for proj in (adapter.o_proj(layer), adapter.down_proj(layer)):
            with torch.no_grad():
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
    return model


def _edit_hidden(model: nn.Module, adapter: ModelAdapter, drop: list[int], remove: bool, hidden_norm: str) -> None:
    """Remove (or zero) residual channels in every member of the ``hidden`` structure (METHODS.md §1.2 rule 5).

    keep_original_dim swaps each RMSNorm for a MeanDimRMSNorm that still divides by the width before this pruning,
    so removal equals masking; a tied lm_head is re-pointed at the sliced embedding so the tie survives.
    """
    sset = hidden_channels(adapter)
    d = sset.n_units
    tied = adapter.lm_head.weight is adapter.embed_tokens.weight
    drop_t = torch.tensor(sorted(set(drop)), dtype=torch.long)
    keep_t = torch.tensor(_complement(sorted(set(drop)), d), dtype=torch.long)
    owner: dict[int, Any] = {}  # the Linear, Embedding or RMSNorm that holds each weight
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            owner.setdefault(id(w), mod)  # a tied weight belongs to the embedding (visited first)
    norms = []
    for m in sset.members:
        mod = owner[id(m.weight)]
        if isinstance(mod, nn.Linear):
            (_select if remove else _zero)(mod, m.dim, keep_t if remove else drop_t)
            continue
        w = mod.weight
        if not remove:
            with torch.no_grad():
                w.index_fill_(m.dim, drop_t.to(w.device), 0.0)
            continue
        mod.weight = nn.Parameter(
            w.data.index_select(m.dim, keep_t.to(w.device)).clone(), requires_grad=w.requires_grad
        )
        if isinstance(mod, nn.Embedding):
            mod.embedding_dim = len(keep_t)
        else:
            norms.append(mod)
    if not remove:
        return
    if tied:
        adapter.lm_head.weight = adapter.embed_tokens.weight
        adapter.lm_head.in_features = len(keep_t)
    if hidden_norm == "keep_original_dim":
        names = {id(mod): name for name, mod in model.named_modules()}
        for mod in norms:
            mean_dim = getattr(mod, "mean_dim", d)
            new = MeanDimRMSNorm(len(keep_t), mod.variance_epsilon, mean_dim)
            new.weight = mod.weight
            parent, _, child = names[id(mod)].rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        adapter.config.rms_norm_mean_dim = getattr(norms[0], "mean_dim", d) if norms else d
    adapter.config.hidden_size = len(keep_t)
