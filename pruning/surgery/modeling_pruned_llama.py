"""A Llama whose decoder layers keep their own head counts, MLP widths and o/down biases.

This file must stand alone (only torch + transformers imports): ``save_pretrained`` copies it next to the weights
so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works on a machine without ``pruning``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


@strict
class PrunedLlamaConfig(LlamaConfig):
    """LlamaConfig plus one entry per decoder layer; the global head/width fields describe layer 0's original shape."""

    model_type = "pruned_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_o_proj_bias: list[bool] | None = None
    layer_down_proj_bias: list[bool] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads] * n
        if self.layer_intermediate_size is None:
            self.layer_intermediate_size = [self.intermediate_size] * n
        if self.layer_o_proj_bias is None:
            self.layer_o_proj_bias = [bool(self.attention_bias)] * n
        if self.layer_down_proj_bias is None:
            self.layer_down_proj_bias = [bool(self.mlp_bias)] * n

    def validate_architecture(self):
        """Per-layer checks replace LlamaConfig's hidden_size % heads rule, which an explicit head_dim makes moot."""
        n = self.num_hidden_layers
        lists = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size",
                 "layer_o_proj_bias", "layer_down_proj_bias")
        for name in lists:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} layers")
        heads, kv = self.layer_num_attention_heads or [], self.layer_num_key_value_heads or []
        for i, (h, k) in enumerate(zip(heads, kv)):
            if k < 1 or h < 1 or h % k:
                raise ValueError(f"layer {i}: {h} query heads cannot share {k} KV heads evenly")


def _shape_layer(layer: nn.Module, config: PrunedLlamaConfig, i: int) -> None:
    """Give decoder layer ``i`` the widths the config records for it (weights are loaded afterwards)."""
    attn, mlp = layer.self_attn, layer.mlp
    d, hd = config.hidden_size, config.head_dim
    h, kv = config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i]
    inter = config.layer_intermediate_size[i]
    qkv_bias = config.attention_bias
    attn.q_proj = nn.Linear(d, h * hd, bias=qkv_bias)
    attn.k_proj = nn.Linear(d, kv * hd, bias=qkv_bias)
    attn.v_proj = nn.Linear(d, kv * hd, bias=qkv_bias)
    attn.o_proj = nn.Linear(h * hd, d, bias=qkv_bias or config.layer_o_proj_bias[i])
    attn.num_key_value_groups = h // kv
    mlp.intermediate_size = inter
    mlp.gate_proj = nn.Linear(d, inter, bias=config.mlp_bias)
    mlp.up_proj = nn.Linear(d, inter, bias=config.mlp_bias)
    mlp.down_proj = nn.Linear(inter, d, bias=config.mlp_bias or config.layer_down_proj_bias[i])


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            _shape_layer(layer, config, i)
        self.post_init()
