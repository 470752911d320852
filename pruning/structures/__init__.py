"""Prunable groups: the weights that must leave together (METHODS.md §1.1-1.2), declared once.

A ``StructureSet`` is every unit of one kind in one layer. Each ``Member`` says which channels of one weight belong
to each unit, as an index tensor ``[n_units, k]`` along ``dim`` (0 = rows/outputs, 1 = columns/inputs). Scorers
reduce members to one score per unit; surgery and masking remove or zero exactly these channels. A bias entry is
part of its projection's row (``Member.bias``: Qwen2's q/k/v biases): it leaves with the row and counts in the
unit's parameters; scorers read the weights only, as the papers do.

Kinds:
- ``kv_group``: one KV head with its g query heads (k, v, q rows; o columns). Keeps the q/kv ratio.
- ``q_head``: one query head (q rows, o columns); ``partition`` is the KV head it reads. Any query head may go
  (uneven GQA groups, METHODS.md §1.2 rule 2); a KV head whose last query head goes leaves with it, so that
  removal also frees the KV head's k and v rows (``group_params``; ``removed_params`` counts it exactly).
  LLM-Pruner's count rule takes the same number from every KV group, FLAP's code any heads.
- ``mlp``: one SwiGLU channel (gate row, up row, down column).
- ``block``: a whole decoder layer (members are whole tensors; ``layer`` is None and units are layer indices).
- ``hidden``: one residual-stream channel of the whole model (LLM-Pruner's channel strategy, METHODS.md §1.1 and
  §1.2 rule 5): embedding column, every RMSNorm entry, q/k/v/gate/up input column, o/down output row, lm_head
  column. ``layer`` is None; a tied lm_head is the embedding member itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.models.adapter import ModelAdapter

KINDS = ("kv_group", "q_head", "mlp", "block", "hidden")


@dataclass
class Member:
    name: str  # e.g. "q_proj"; used by "first"/"last" aggregations and for messages
    weight: torch.Tensor  # the module's nn.Parameter
    dim: int  # 0 rows, 1 columns
    index: torch.Tensor  # [n_units, k] channel indices along dim
    bias: torch.Tensor | None = None  # rows (dim 0) only: entry r leaves with row r (Qwen2's q/k/v biases)

    @property
    def params_per_unit(self) -> int:
        """Weights (and bias entries) one unit owns in this member."""
        k = self.index.shape[1]
        per_channel = self.weight.numel() // self.weight.shape[self.dim]
        return k * per_channel + (k if self.bias is not None else 0)


@dataclass
class StructureSet:
    kind: str
    layer: int | None
    n_units: int
    members: list[Member]
    params_per_unit: int
    partition: torch.Tensor | None = None  # q_head: the KV head each query head reads
    group_params: int = 0  # q_head: params of one KV head's k and v rows, freed with its last query head
    unit_params: list[list[torch.Tensor]] = field(default_factory=list)  # block: each unit's (whole) parameters
    unit_layers: list[int] = field(default_factory=list)  # block: the decoder layer of each unit
    count_channels: int = 1  # root channels per unit for LLM-Pruner's count rule (a KV group: its d_h k_proj rows)

    @property
    def decoder_layer(self) -> int:
        """The layer of a per-layer set (heads, KV groups, MLP channels); block and hidden sets are model-wide."""
        if self.layer is None:
            raise ValueError(f"a {self.kind} set is model-wide: it has no decoder layer")
        return self.layer


def _blocks_of(start: int, n: int, size: int) -> torch.Tensor:
    """Index rows [n, size] of ``n`` consecutive blocks of ``size`` channels starting at block ``start``."""
    return (torch.arange(start, start + n)[:, None] * size + torch.arange(size)[None, :]).long()


def _rows(name: str, linear: nn.Linear, index: torch.Tensor) -> Member:
    return Member(name, linear.weight, 0, index, linear.bias)


def removed_params(sset: StructureSet, units) -> int:
    """Parameters removing ``units`` of one set frees: their own, plus for query heads the k/v rows of every KV head
    left without a query head."""
    units = sorted({int(u) for u in units})
    n = len(units) * sset.params_per_unit
    if sset.partition is not None and units:
        gone = torch.bincount(sset.partition[units], minlength=int(sset.partition.max()) + 1)
        n += int((gone == torch.bincount(sset.partition)).sum()) * sset.group_params
    return n


def _unit_params(members: list[Member]) -> int:
    """Params one unit removes: 2(g+1)·d·d_h for a KV group, 2·d·d_h per query head, 3·d per MLP channel
    (METHODS.md §1.1), plus its bias entries ((g+2)·d_h resp. d_h with Qwen2's q/k/v biases)."""
    return sum(m.params_per_unit for m in members)


def kv_groups(adapter: ModelAdapter, layer_idx: int) -> StructureSet:
    layer = adapter.layers[layer_idx]
    w, hd = adapter.widths(layer), adapter.head_dim
    if not w.even:
        raise PruningError(
            f"layer {layer_idx} has uneven KV groups {list(w.kv_group_sizes)} (query heads were "
            "removed one by one): prune its attention by q_head units"
        )
    g = w.num_heads // w.num_kv_heads
    kv_idx = _blocks_of(0, w.num_kv_heads, hd)
    q_idx = _blocks_of(0, w.num_kv_heads, g * hd)  # a group's g query heads are contiguous (HF repeat_kv)
    members = [
        _rows("q_proj", adapter.q_proj(layer), q_idx),
        _rows("k_proj", adapter.k_proj(layer), kv_idx),
        _rows("v_proj", adapter.v_proj(layer), kv_idx),
        Member("o_proj", adapter.o_proj(layer).weight, 1, q_idx),
    ]
    return StructureSet(
        "kv_group", layer_idx, w.num_kv_heads, members, params_per_unit=_unit_params(members), count_channels=hd
    )


def q_heads(adapter: ModelAdapter, layer_idx: int) -> StructureSet:
    layer = adapter.layers[layer_idx]
    w, hd = adapter.widths(layer), adapter.head_dim
    q_idx = _blocks_of(0, w.num_heads, hd)
    members = [
        _rows("q_proj", adapter.q_proj(layer), q_idx),
        Member("o_proj", adapter.o_proj(layer).weight, 1, q_idx),
    ]
    kv_idx = _blocks_of(0, w.num_kv_heads, hd)
    kv = [_rows("k_proj", adapter.k_proj(layer), kv_idx), _rows("v_proj", adapter.v_proj(layer), kv_idx)]
    return StructureSet(
        "q_head",
        layer_idx,
        w.num_heads,
        members,
        params_per_unit=_unit_params(members),
        partition=torch.tensor(adapter.kv_head_of_query(layer), dtype=torch.long),
        group_params=_unit_params(kv),
    )


def mlp_channels(adapter: ModelAdapter, layer_idx: int) -> StructureSet:
    layer = adapter.layers[layer_idx]
    n = adapter.widths(layer).intermediate_size
    idx = torch.arange(n)[:, None]
    members = [
        _rows("gate_proj", adapter.gate_proj(layer), idx),
        _rows("up_proj", adapter.up_proj(layer), idx),
        Member("down_proj", adapter.down_proj(layer).weight, 1, idx),
    ]
    return StructureSet("mlp", layer_idx, n, members, params_per_unit=_unit_params(members))


def blocks(adapter: ModelAdapter, layers: list[int] | None = None) -> StructureSet:
    """Candidate decoder layers as one set; a unit is a whole layer (params_per_unit: their mean size)."""
    layers = list(range(len(adapter.layers))) if layers is None else list(layers)
    unit_params: list[list[torch.Tensor]] = [list(adapter.layers[i].parameters()) for i in layers]
    sizes = [sum(p.numel() for p in ps) for ps in unit_params]
    return StructureSet(
        "block",
        None,
        len(layers),
        [],
        params_per_unit=sum(sizes) // max(len(sizes), 1),
        unit_params=unit_params,
        unit_layers=layers,
    )


def hidden_channels(adapter: ModelAdapter) -> StructureSet:
    """Every residual channel, members in execution order ("first" = embedding, "last" = lm_head)."""
    d = adapter.embed_tokens.weight.shape[1]
    idx = torch.arange(d)[:, None]
    members = [Member("embed_tokens", adapter.embed_tokens.weight, 1, idx)]
    biases = 0
    for i, layer in enumerate(adapter.layers):
        members.append(Member(f"layers.{i}.input_norm", adapter.input_norm(layer).weight, 0, idx))
        members += [
            Member(f"layers.{i}.{n}", getattr(adapter, n)(layer).weight, 1, idx) for n in ("q_proj", "k_proj", "v_proj")
        ]
        members.append(Member(f"layers.{i}.o_proj", adapter.o_proj(layer).weight, 0, idx))
        members.append(Member(f"layers.{i}.post_attention_norm", adapter.post_attention_norm(layer).weight, 0, idx))
        members += [
            Member(f"layers.{i}.{n}", getattr(adapter, n)(layer).weight, 1, idx) for n in ("gate_proj", "up_proj")
        ]
        members.append(Member(f"layers.{i}.down_proj", adapter.down_proj(layer).weight, 0, idx))
        biases += (adapter.o_proj(layer).bias is not None) + (adapter.down_proj(layer).bias is not None)
    members.append(Member("final_norm", adapter.final_norm.weight, 0, idx))
    if adapter.lm_head.weight is not adapter.embed_tokens.weight:
        members.append(Member("lm_head", adapter.lm_head.weight, 1, idx))
    per_unit = sum(m.weight.numel() // m.weight.shape[m.dim] for m in members) + biases
    return StructureSet("hidden", None, d, members, params_per_unit=per_unit)


BUILDERS = {"kv_group": kv_groups, "q_head": q_heads, "mlp": mlp_channels}


def structure_sets(adapter: ModelAdapter, kind: str, layers: list[int] | None = None) -> list[StructureSet]:
    """All sets of one kind, one per layer (or the single block set)."""
    if kind == "block":
        return [blocks(adapter, layers)]
    if kind == "hidden":  # model-wide: a layer range does not apply
        return [hidden_channels(adapter)]
    if kind not in BUILDERS:
        raise ValueError(f"unknown structure kind {kind!r}; choices: {', '.join(KINDS)}")
    return [BUILDERS[kind](adapter, i) for i in (range(len(adapter.layers)) if layers is None else layers)]
