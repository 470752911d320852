"""LLaMA-family models (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3) whose decoder layers keep their own head counts,
MLP widths and o/down biases, and whose hidden size may have been pruned (``rms_norm_mean_dim``: RMSNorm keeps
dividing by the original width, METHODS.md §1.2 rule 5).

One config/model pair per family, made by ``pruned_family`` from that family's own transformers classes, so the
family's attention (Qwen2's q/k/v biases, Qwen3's q_norm/k_norm, Mistral's sliding window, Llama-3's RoPE scaling)
is used as is and only the layer widths differ: model_type ``pruned_<family>`` (``pruned_llama``,
``pruned_qwen2``, ...). A new family is one ``FAMILIES`` row plus the module-level names of its classes at the end
of this file and of modeling_sliced_llama.py (``auto_map`` finds classes by name), and its adapter in
pruning/models.

Uneven GQA groups (query heads removed one by one, METHODS.md §1.2 rule 2): a layer's kept KV heads may serve
different numbers of query heads. ``layer_kv_group_sizes[i]`` lists, per kept KV head of layer i in order, how many
of its (contiguous) query heads remain. Such a layer's attention module keeps the family's own forward; its config
view dispatches to the registered attention function ``uneven_gqa``, which gives every query head its KV head by
``index_select`` and then calls the model's own implementation (sdpa, eager, ...) as for MHA. Even layers keep the
stock path untouched, and the KV cache holds the compact (unexpanded) keys and values.

This file must stand alone (only torch + transformers imports): ``save_pretrained`` copies it next to the weights
so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works on a machine without ``pruning``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

if TYPE_CHECKING:  # the config mixins sit in front of a family config; every family has Llama's fields
    from transformers import LlamaConfig as FamilyConfig
else:
    FamilyConfig = object


class Family(NamedTuple):
    config: type[PreTrainedConfig]
    model: type[PreTrainedModel]
    layer: type[nn.Module]


FAMILIES = {  # the family name is the base model_type; pruning.models has one adapter per entry
    "llama": Family(LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer),
    "mistral": Family(MistralConfig, MistralForCausalLM, MistralDecoderLayer),
    "qwen2": Family(Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer),
    "qwen3": Family(Qwen3Config, Qwen3ForCausalLM, Qwen3DecoderLayer),
}

PER_LAYER = (
    "layer_num_attention_heads",
    "layer_num_key_value_heads",
    "layer_intermediate_size",
    "layer_o_proj_bias",
    "layer_down_proj_bias",
    "layer_kv_group_sizes",
)
UNEVEN_GQA = "uneven_gqa"  # the registered attention function of layers with uneven KV groups


# ------------------------------------------------------------------------------------------- uneven GQA groups


class _UnevenGQAConfig:
    """The model config as one attention module sees it: the same object for every field (so later changes of the
    model config, e.g. its attention implementation, still apply), except that attention dispatches to
    ``uneven_gqa_attention``."""

    def __init__(self, config) -> None:
        self.__dict__["base"] = config

    def __getattr__(self, name: str):
        base = self.__dict__.get("base")
        if base is None:  # copy/pickle probe an instance before __init__ ran
            raise AttributeError(name)
        return getattr(base, name)

    @property
    def _attn_implementation(self) -> str:
        return UNEVEN_GQA


# Modules of a transformers model reach their submodules by attribute name, which torch types as Tensor | Module:
# the functions below take them as Any (a family's attention module, decoder layer or model).


def uneven_gqa_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
):
    """Attention with one KV head per query head picked by the layer's map, then the model's own implementation."""
    index = torch.tensor(module.kv_head_of_query, dtype=torch.long, device=key.device)
    key, value = key.index_select(1, index), value.index_select(1, index)
    eager = sys.modules[type(module).__module__].eager_attention_forward  # the family's own, as its forward passes
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(module.config.base._attn_implementation, eager)
    return fn(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(UNEVEN_GQA, uneven_gqa_attention)


def kv_group_sizes(attn: Any, head_dim: int) -> tuple[int, ...]:
    """Query heads per kept KV head of one attention module (its map if uneven, else from the weight shapes)."""
    h, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    sizes = getattr(attn, "kv_group_sizes", None)
    if sizes is None:
        return (h // kv,) * kv
    if len(sizes) != kv or sum(sizes) != h:
        raise ValueError(f"attention map {list(sizes)} does not fit {h} query heads on {kv} KV heads")
    return tuple(sizes)


def set_kv_group_sizes(attn: Any, sizes) -> None:
    """Give an attention module its query-to-KV map: ``sizes[j]`` contiguous query heads share kept KV head j.

    Even sizes restore the stock module (``num_key_value_groups`` = g, the model config); uneven ones record the map
    (``kv_group_sizes``, ``kv_head_of_query``), set g = 1 (keys/values arrive expanded) and route attention through
    ``uneven_gqa``."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every kept KV head needs at least one query head, got {list(sizes)}")
    config = attn.config
    if isinstance(config, _UnevenGQAConfig):
        config = config.base
    if len(set(sizes)) == 1:
        attn.num_key_value_groups = sizes[0]
        attn.config = config
        for name in ("kv_group_sizes", "kv_head_of_query"):
            attn.__dict__.pop(name, None)
        return
    attn.num_key_value_groups = 1
    attn.kv_group_sizes = sizes
    attn.kv_head_of_query = tuple(j for j, s in enumerate(sizes) for _ in range(s))
    attn.config = _UnevenGQAConfig(config)


def family_name(model_type: str) -> str:
    """``pruned_qwen2`` / ``sliced_qwen2`` / ``qwen2`` -> ``qwen2``."""
    for prefix in ("pruned_", "sliced_"):
        if model_type.startswith(prefix):
            return model_type[len(prefix) :]
    return model_type


@dataclass(kw_only=True, repr=False)
class PerLayerWidths(FamilyConfig):
    """Fields added to a family config (placed before it in the MRO); the global head/width fields describe
    layer 0's original shape. ``head_dim`` is explicit because heads and hidden size no longer fix it (Qwen2's
    config has no such field and would derive it from hidden_size / heads)."""

    head_dim: int | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_o_proj_bias: list[bool] | None = None  # biases beyond the family's own (FLAP's compensation)
    layer_down_proj_bias: list[bool] | None = None
    layer_kv_group_sizes: list[list[int]] | None = None  # query heads per kept KV head; None: even everywhere
    rms_norm_mean_dim: int | None = None  # hidden-pruned: RMSNorm divides by this (the original hidden size)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            kv = self.num_key_value_heads  # the family's __post_init__ has replaced None (MHA) by the head count
            self.layer_num_key_value_heads = [kv if kv is not None else self.num_attention_heads] * n
        if self.layer_intermediate_size is None:
            self.layer_intermediate_size = [self.intermediate_size] * n
        if self.layer_o_proj_bias is None:
            self.layer_o_proj_bias = [False] * n
        if self.layer_down_proj_bias is None:
            self.layer_down_proj_bias = [False] * n

    def validate_architecture(self):
        """Per-layer checks replace the family's hidden_size % heads rule, which an explicit head_dim makes moot."""
        n = self.num_hidden_layers
        for name in PER_LAYER:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} layers")
        heads, kv = self.layer_num_attention_heads or [], self.layer_num_key_value_heads or []
        groups = self.layer_kv_group_sizes
        for i, (h, k) in enumerate(zip(heads, kv)):
            if groups is not None:
                if len(groups[i]) != k or sum(groups[i]) != h or min(groups[i], default=0) < 1:
                    raise ValueError(
                        f"layer {i}: KV group sizes {groups[i]} do not split {h} query heads over {k} KV heads"
                    )
            elif k < 1 or h < 1 or h % k:
                raise ValueError(f"layer {i}: {h} query heads cannot share {k} KV heads evenly")


def _linear(old: nn.Linear, n_in: int, n_out: int, extra_bias: bool = False) -> nn.Linear:
    """A projection of the new widths with the family's own bias choice (read from the freshly built one)."""
    return nn.Linear(n_in, n_out, bias=old.bias is not None or bool(extra_bias))


def _shape_layer(layer: Any, config, i: int) -> None:
    """Give decoder layer ``i`` the widths the config records for it (weights are loaded afterwards)."""
    attn, mlp = layer.self_attn, layer.mlp
    d, hd = config.hidden_size, config.head_dim
    h, kv = config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i]
    inter = config.layer_intermediate_size[i]
    attn.q_proj = _linear(attn.q_proj, d, h * hd)
    attn.k_proj = _linear(attn.k_proj, d, kv * hd)
    attn.v_proj = _linear(attn.v_proj, d, kv * hd)
    attn.o_proj = _linear(attn.o_proj, h * hd, d, config.layer_o_proj_bias[i])
    groups = config.layer_kv_group_sizes
    set_kv_group_sizes(attn, groups[i] if groups is not None else [h // kv] * kv)
    mlp.intermediate_size = inter
    mlp.gate_proj = _linear(mlp.gate_proj, d, inter)
    mlp.up_proj = _linear(mlp.up_proj, d, inter)
    mlp.down_proj = _linear(mlp.down_proj, inter, d, config.layer_down_proj_bias[i])


class MeanDimRMSNorm(LlamaRMSNorm):
    """RMSNorm over a pruned hidden size that divides Σx² by ``mean_dim`` (the original width), not by the kept
    width: the physically pruned model then equals the dense model with those channels zeroed (SliceGPT's RMSN).
    The same computation as every family's RMSNorm (Mistral, Qwen2 and Qwen3 copy Llama's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, mean_dim: int | None = None) -> None:
        super().__init__(hidden_size, eps)
        self.mean_dim = int(mean_dim or hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).sum(-1, keepdim=True) / self.mean_dim
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, mean_dim={self.mean_dim}"


def _use_mean_dim_norms(model: Any, mean_dim: int) -> None:
    """Swap every residual-stream RMSNorm for a MeanDimRMSNorm of the same width (weights are loaded afterwards).
    Qwen3's q_norm/k_norm act on head_dim, which hidden pruning leaves alone."""
    inner = model.model
    for layer in inner.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            old = getattr(layer, name)
            setattr(layer, name, MeanDimRMSNorm(old.weight.shape[0], old.variance_epsilon, mean_dim))
    inner.norm = MeanDimRMSNorm(inner.norm.weight.shape[0], inner.norm.variance_epsilon, mean_dim)


def pruned_family(name: str, family: Family) -> tuple[type[PerLayerWidths], type[PreTrainedModel]]:
    """(config class, model class) of ``pruned_<name>``, subclasses of the family's own."""
    stem = family.model.__name__[: -len("ForCausalLM")]
    config_cls: type = strict(
        type(
            f"Pruned{stem}Config",
            (PerLayerWidths, family.config),
            {"model_type": f"pruned_{name}", "__module__": __name__},
        )
    )

    def __init__(self, config) -> None:
        family.model.__init__(self, config)
        for i, layer in enumerate(self.model.layers):
            _shape_layer(layer, config, i)
        if config.rms_norm_mean_dim and config.rms_norm_mean_dim != config.hidden_size:
            _use_mean_dim_norms(self, config.rms_norm_mean_dim)
        self.post_init()

    model_cls = type(
        f"Pruned{stem}ForCausalLM",
        (family.model,),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )
    # type() cannot state the bases it was given: these are subclasses of the family's config and model
    return cast(type[PerLayerWidths], config_cls), cast(type[PreTrainedModel], model_cls)


PRUNED = {name: pruned_family(name, fam) for name, fam in FAMILIES.items()}
PrunedLlamaConfig, PrunedLlamaForCausalLM = PRUNED["llama"]
PrunedMistralConfig, PrunedMistralForCausalLM = PRUNED["mistral"]
PrunedQwen2Config, PrunedQwen2ForCausalLM = PRUNED["qwen2"]
PrunedQwen3Config, PrunedQwen3ForCausalLM = PRUNED["qwen3"]
