"""A Llama whose decoder layers keep their own head counts, MLP widths and o/down biases, and whose hidden size
may have been pruned (``rms_norm_mean_dim``: RMSNorm keeps dividing by the original width, METHODS.md §1.2 rule 5).

This file must stand alone (only torch + transformers imports): ``save_pretrained`` copies it next to the weights
so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works on a machine without ``pruning``.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@strict
class PrunedLlamaConfig(LlamaConfig):
    """LlamaConfig plus one entry per decoder layer; the global head/width fields describe layer 0's original shape."""

    model_type = "pruned_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_o_proj_bias: list[bool] | None = None
    layer_down_proj_bias: list[bool] | None = None
    rms_norm_mean_dim: int | None = None   # hidden-pruned: RMSNorm divides by this (the original hidden size)

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


class MeanDimRMSNorm(LlamaRMSNorm):
    """RMSNorm over a pruned hidden size that divides Σx² by ``mean_dim`` (the original width), not by the kept
    width: the physically pruned model then equals the dense model with those channels zeroed (SliceGPT's RMSN)."""

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


def _use_mean_dim_norms(model: LlamaForCausalLM, mean_dim: int) -> None:
    """Swap every RMSNorm for a MeanDimRMSNorm of the same width (weights are loaded afterwards)."""
    inner = model.model
    for layer in inner.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            old = getattr(layer, name)
            setattr(layer, name, MeanDimRMSNorm(old.weight.shape[0], old.variance_epsilon, mean_dim))
    inner.norm = MeanDimRMSNorm(inner.norm.weight.shape[0], inner.norm.variance_epsilon, mean_dim)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            _shape_layer(layer, config, i)
        if config.rms_norm_mean_dim and config.rms_norm_mean_dim != config.hidden_size:
            _use_mean_dim_norms(self, config.rms_norm_mean_dim)
        self.post_init()
