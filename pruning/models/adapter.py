"""Family adapters: where the layers, projections and norms of a model sit, and its attention layout.

Algorithms never touch ``model.model.layers[i].self_attn.q_proj`` directly; they ask the adapter (SliceGPT's
LayerAdapter/ModelAdapter idea). A family adds one short subclass; everything else is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from pruning.errors import UnsupportedModelError
from pruning.registry import Registry
from pruning.surgery.modeling_pruned_llama import kv_group_sizes, set_kv_group_sizes

ADAPTERS: Registry[type[ModelAdapter]] = Registry("model family")


@dataclass(frozen=True)
class LayerWidths:
    """Kept counts of one decoder layer, read from the weight shapes (the single source of truth)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    o_proj_bias: bool
    down_proj_bias: bool
    kv_group_sizes: tuple[int, ...] = ()  # query heads per kept KV head (uneven after single query heads went)

    @property
    def even(self) -> bool:
        return len(set(self.kv_group_sizes)) <= 1

    def as_dict(self) -> dict:
        return asdict(self)


def family_types(family: str) -> tuple[str, ...]:
    """The model_types of one family: its own and our two save formats (``pruned_<family>``, ``sliced_<family>``)."""
    return family, f"pruned_{family}", f"sliced_{family}"


class ModelAdapter(ABC):
    """Base adapter for decoder-only models with pre-norm attention + gated MLP blocks."""

    family: str = ""  # the base model_type; keys the save formats' class table
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        # A transformers causal LM whose submodules the getters reach by attribute name, which torch types as
        # `Tensor | Module`: Any here, and each getter states what it returns.
        self.model: Any = model
        self.config: Any = self.model.config

    # -- model-level getters -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @property
    @abstractmethod
    def embed_tokens(self) -> nn.Embedding: ...

    @property
    @abstractmethod
    def final_norm(self) -> Any: ...  # the family's RMSNorm (Any: torch types its .weight as Tensor | Module)

    @property
    @abstractmethod
    def lm_head(self) -> nn.Linear: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    # -- layer-level getters ---------------------------------------------------------------------------------
    @abstractmethod
    def attn(self, layer: nn.Module) -> nn.Module: ...

    @abstractmethod
    def mlp(self, layer: nn.Module) -> nn.Module: ...

    # One-line getters, a table of where each projection sits in a layer.
    # fmt: off
    def q_proj(self, layer): return self.attn(layer).q_proj
    def k_proj(self, layer): return self.attn(layer).k_proj
    def v_proj(self, layer): return self.attn(layer).v_proj
    def o_proj(self, layer): return self.attn(layer).o_proj
    def gate_proj(self, layer): return self.mlp(layer).gate_proj
    def up_proj(self, layer): return self.mlp(layer).up_proj
    def down_proj(self, layer): return self.mlp(layer).down_proj
    # fmt: on

    @abstractmethod
    def input_norm(self, layer) -> Any: ...  # the family's RMSNorm, as final_norm

    @abstractmethod
    def post_attention_norm(self, layer) -> Any: ...

    # -- layout --------------------------------------------------------------------------------------------
    def widths(self, layer: nn.Module) -> LayerWidths:
        hd = self.head_dim
        o, down = self.o_proj(layer), self.down_proj(layer)
        return LayerWidths(
            num_heads=self.q_proj(layer).out_features // hd,
            num_kv_heads=self.k_proj(layer).out_features // hd,
            intermediate_size=self.gate_proj(layer).out_features,
            o_proj_bias=o.bias is not None,
            down_proj_bias=down.bias is not None,
            kv_group_sizes=kv_group_sizes(self.attn(layer), hd),
        )

    def all_widths(self) -> list[LayerWidths]:
        return [self.widths(layer) for layer in self.layers]

    def kv_group_size(self, layer: nn.Module) -> int:
        """g of an even layer (query heads per KV head)."""
        w = self.widths(layer)
        if not w.even:
            raise ValueError(f"uneven KV groups {list(w.kv_group_sizes)} have no single group size")
        return w.num_heads // w.num_kv_heads

    def kv_head_of_query(self, layer: nn.Module) -> list[int]:
        """The kept KV head each query head reads (query heads of one KV head are contiguous, as HF repeat_kv)."""
        return [j for j, s in enumerate(self.widths(layer).kv_group_sizes) for _ in range(s)]

    def set_kv_group_sizes(self, layer: nn.Module, sizes) -> None:
        """Record a layer's query-to-KV map after surgery (even maps give back the stock attention path)."""
        set_kv_group_sizes(self.attn(layer), sizes)

    @property
    def is_tied(self) -> bool:
        """Whether lm_head shares the input embedding matrix (read from the tensors, not the config flag)."""
        return self.lm_head.weight is self.embed_tokens.weight

    def num_params(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    # -- after surgery ---------------------------------------------------------------------------------------
    @abstractmethod
    def sync_layer(self, layer: nn.Module) -> None:
        """Refresh module attributes that mirror weight shapes (e.g. GQA repeat factor)."""

    @abstractmethod
    def set_layers(self, keep: list[int]) -> None:
        """Keep only these decoder layers (original indices, in order) and renumber them."""


def adapter_class(config) -> type[ModelAdapter]:
    """The adapter class for a config, so an unsupported model is rejected before its weights are read."""
    model_type = getattr(config, "model_type", None)
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"no adapter for architecture model_type={model_type!r}; supported families: "
        f"{', '.join(ADAPTERS.names())} (and their pruned_*/sliced_* save formats)"
    )


def adapter_for(model: nn.Module) -> ModelAdapter:
    return adapter_class(model.config)(model)
