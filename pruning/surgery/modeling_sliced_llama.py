"""SliceGPT's rotated Llama (METHODS.md §3.6): weight-free RMSNorms that divide by the original width, per-layer
residual widths, and shortcut matrices Q_lᵀ·Q_{l+1} on the residual path where consecutive bases differ.

Per layer l the residual stream enters with width ``a_l`` (``layer_attn_input_dim``), is carried into the MLP's
basis by ``attn_shortcut_Q`` [a_l, m_l] and leaves through ``mlp_shortcut_Q`` [m_l, o_l]:
    h = x·S_attn + Attn(RMSN(x));  y = h·S_mlp + MLP(RMSN(h)).
The norm scales were folded into the following linears, so the norms hold no weights and the embeddings and
lm_head are never tied. This file must stand alone (torch + transformers only): ``save_pretrained`` copies it next
to the weights so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without ``pruning``.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


@strict
class SlicedLlamaConfig(LlamaConfig):
    """LlamaConfig (original hidden_size, layer 0's original head/MLP counts) plus the sliced widths per layer."""

    model_type = "sliced_llama"
    rms_norm_mean_dim: int | None = None           # the norms divide Σx² by this (the original hidden size)
    embedding_dim: int | None = None               # width of the embeddings = layer 0's attention input
    layer_attn_input_dim: list[int] | None = None  # a_l
    layer_mlp_input_dim: list[int] | None = None   # m_l
    layer_mlp_output_dim: list[int] | None = None  # o_l (= a_{l+1}; the last one is lm_head's input width)
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    shortcuts: bool = True                         # False: identity residual (fused but not yet rotated)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, d = self.num_hidden_layers, self.hidden_size
        self.tie_word_embeddings = False
        self.rms_norm_mean_dim = self.rms_norm_mean_dim or d
        self.embedding_dim = self.embedding_dim or d
        for name, default in (("layer_attn_input_dim", d), ("layer_mlp_input_dim", d), ("layer_mlp_output_dim", d),
                              ("layer_num_attention_heads", self.num_attention_heads),
                              ("layer_num_key_value_heads", self.num_key_value_heads),
                              ("layer_intermediate_size", self.intermediate_size)):
            if getattr(self, name) is None:
                setattr(self, name, [default] * n)

    def validate_architecture(self):
        n = self.num_hidden_layers
        for name in ("layer_attn_input_dim", "layer_mlp_input_dim", "layer_mlp_output_dim",
                     "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} layers")
        a, o = self.layer_attn_input_dim or [], self.layer_mlp_output_dim or []
        if a and self.embedding_dim is not None and a[0] != self.embedding_dim:
            raise ValueError(f"embedding_dim {self.embedding_dim} != layer 0 input width {a[0]}")
        for i in range(1, len(a)):
            if a[i] != o[i - 1]:
                raise ValueError(f"layer {i} input width {a[i]} != layer {i - 1} output width {o[i - 1]}")
        if not self.shortcuts and any(w != self.hidden_size for w in (a + o + (self.layer_mlp_input_dim or []))):
            raise ValueError("sliced widths need shortcut matrices (shortcuts=True)")

    @property
    def head_input_dim(self) -> int:
        return self.layer_mlp_output_dim[-1] if self.layer_mlp_output_dim else self.embedding_dim


class RMSN(nn.Module):
    """Weight-free RMSNorm x·rsqrt(Σx²/mean_dim + eps): with mean_dim the original width it commutes with any
    orthogonal change of basis, and slicing trailing principal directions is the same as zeroing them."""

    def __init__(self, mean_dim: int, eps: float = 1e-6):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.variance_epsilon}"


class SlicedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: SlicedLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        i, hd = layer_idx, config.head_dim
        a, m, o = config.layer_attn_input_dim[i], config.layer_mlp_input_dim[i], config.layer_mlp_output_dim[i]
        h, kv, inter = (config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i],
                        config.layer_intermediate_size[i])
        attn, mlp = self.self_attn, self.mlp
        attn.q_proj = nn.Linear(a, h * hd, bias=config.attention_bias)
        attn.k_proj = nn.Linear(a, kv * hd, bias=config.attention_bias)
        attn.v_proj = nn.Linear(a, kv * hd, bias=config.attention_bias)
        attn.o_proj = nn.Linear(h * hd, m, bias=config.attention_bias)
        attn.num_key_value_groups = h // kv
        mlp.intermediate_size = inter
        mlp.gate_proj = nn.Linear(m, inter, bias=config.mlp_bias)
        mlp.up_proj = nn.Linear(m, inter, bias=config.mlp_bias)
        mlp.down_proj = nn.Linear(inter, o, bias=config.mlp_bias)
        self.input_layernorm = RMSN(config.rms_norm_mean_dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSN(config.rms_norm_mean_dim, config.rms_norm_eps)
        if config.shortcuts:
            self.attn_shortcut_Q = nn.Parameter(torch.empty(a, m))
            self.mlp_shortcut_Q = nn.Parameter(torch.empty(m, o))
        else:
            self.attn_shortcut_Q = self.mlp_shortcut_Q = None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs)
        if self.attn_shortcut_Q is not None:
            residual = residual @ self.attn_shortcut_Q
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.mlp_shortcut_Q is not None:
            residual = residual @ self.mlp_shortcut_Q
        return residual + hidden_states


class SlicedLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlicedLlamaConfig
    _tied_weights_keys = {}

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__(config)
        inner = self.model
        inner.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_dim, inner.padding_idx)
        inner.layers = nn.ModuleList(SlicedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        inner.norm = RMSN(config.rms_norm_mean_dim, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.head_input_dim, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SlicedLlamaDecoderLayer) and module.attn_shortcut_Q is not None:
            with torch.no_grad():   # identity-like start; real checkpoints overwrite it
                module.attn_shortcut_Q.copy_(torch.eye(*module.attn_shortcut_Q.shape))
                module.mlp_shortcut_Q.copy_(torch.eye(*module.mlp_shortcut_Q.shape))
