"""SliceGPT's rotated LLaMA-family model (METHODS.md §3.6): weight-free RMSNorms that divide by the original width,
per-layer residual widths, and shortcut matrices Q_lᵀ·Q_{l+1} on the residual path where consecutive bases differ.

Per layer l the residual stream enters with width ``a_l`` (``layer_attn_input_dim``), is carried into the MLP's
basis by ``attn_shortcut_Q`` [a_l, m_l] and leaves through ``mlp_shortcut_Q`` [m_l, o_l]:
    h = x·S_attn + Attn(RMSN(x));  y = h·S_mlp + MLP(RMSN(h)).
The norm scales were folded into the following linears, so the norms hold no weights and the embeddings and
lm_head are never tied. One config/layer/model triple per family of ``modeling_pruned_llama.FAMILIES``
(model_type ``sliced_<family>``), built on the family's own classes: rotation changes only the residual basis, so
Qwen2's q/k/v biases (rows of outputs that do not live in the residual stream) and Qwen3's q_norm/k_norm (over
head_dim) are kept as they are.

This file must stand alone (torch + transformers + its sibling modeling_pruned_llama.py, which
``save_pretrained`` copies with it): ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
without ``pruning``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedModel

from .modeling_pruned_llama import FAMILIES, Family, FamilyConfig

if TYPE_CHECKING:  # the model mixin sits in front of a family's ForCausalLM
    FamilyModel = PreTrainedModel
else:
    FamilyModel = nn.Module

SLICED_PER_LAYER = (
    "layer_attn_input_dim",
    "layer_mlp_input_dim",
    "layer_mlp_output_dim",
    "layer_num_attention_heads",
    "layer_num_key_value_heads",
    "layer_intermediate_size",
)


@dataclass(kw_only=True, repr=False)
class SlicedWidths(FamilyConfig):
    """Fields added to a family config: the original hidden_size and layer 0's original head/MLP counts stay in
    the family's fields; the sliced widths are per layer."""

    head_dim: int | None = None
    rms_norm_mean_dim: int | None = None  # the norms divide Σx² by this (the original hidden size)
    embedding_dim: int | None = None  # width of the embeddings = layer 0's attention input
    layer_attn_input_dim: list[int] | None = None  # a_l
    layer_mlp_input_dim: list[int] | None = None  # m_l
    layer_mlp_output_dim: list[int] | None = None  # o_l (= a_{l+1}; the last one is lm_head's input width)
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    shortcuts: bool = True  # False: identity residual (fused but not yet rotated)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, d = self.num_hidden_layers, self.hidden_size
        self.tie_word_embeddings = False
        if self.head_dim is None:
            self.head_dim = d // self.num_attention_heads
        self.rms_norm_mean_dim = self.rms_norm_mean_dim or d
        self.embedding_dim = self.embedding_dim or d
        for name, default in (
            ("layer_attn_input_dim", d),
            ("layer_mlp_input_dim", d),
            ("layer_mlp_output_dim", d),
            ("layer_num_attention_heads", self.num_attention_heads),
            ("layer_num_key_value_heads", self.num_key_value_heads),
            ("layer_intermediate_size", self.intermediate_size),
        ):
            if getattr(self, name) is None:
                setattr(self, name, [default] * n)

    def validate_architecture(self):
        n = self.num_hidden_layers
        for name in SLICED_PER_LAYER:
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
        return self.layer_mlp_output_dim[-1] if self.layer_mlp_output_dim else self.embedding_dim or self.hidden_size


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


def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    """New widths, the family's own bias choice (read from the freshly built projection)."""
    return nn.Linear(n_in, n_out, bias=old.bias is not None)


class SlicedLayer(nn.Module):
    """Mixin placed before a family's decoder layer: sliced widths, weight-free norms and the shortcuts."""

    self_attn: Any  # the family's attention and MLP modules, built by the family layer's __init__
    mlp: Any
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    attn_shortcut_Q: nn.Parameter | None
    mlp_shortcut_Q: nn.Parameter | None

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        i, hd = layer_idx, config.head_dim
        a, m, o = config.layer_attn_input_dim[i], config.layer_mlp_input_dim[i], config.layer_mlp_output_dim[i]
        h, kv, inter = (
            config.layer_num_attention_heads[i],
            config.layer_num_key_value_heads[i],
            config.layer_intermediate_size[i],
        )
        attn, mlp = self.self_attn, self.mlp
        attn.q_proj = _linear(attn.q_proj, a, h * hd)
        attn.k_proj = _linear(attn.k_proj, a, kv * hd)
        attn.v_proj = _linear(attn.v_proj, a, kv * hd)
        attn.o_proj = _linear(attn.o_proj, h * hd, m)
        attn.num_key_value_groups = h // kv
        mlp.intermediate_size = inter
        mlp.gate_proj = _linear(mlp.gate_proj, m, inter)
        mlp.up_proj = _linear(mlp.up_proj, m, inter)
        mlp.down_proj = _linear(mlp.down_proj, inter, o)
        self.input_layernorm = RMSN(config.rms_norm_mean_dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSN(config.rms_norm_mean_dim, config.rms_norm_eps)
        if config.shortcuts:
            self.attn_shortcut_Q = nn.Parameter(torch.empty(a, m))
            self.mlp_shortcut_Q = nn.Parameter(torch.empty(m, o))
        else:
            self.attn_shortcut_Q = self.mlp_shortcut_Q = None

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.attn_shortcut_Q is not None:
            residual = residual @ self.attn_shortcut_Q
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.mlp_shortcut_Q is not None:
            residual = residual @ self.mlp_shortcut_Q
        return residual + hidden_states


class SlicedModel(FamilyModel):
    """Mixin placed before a family's ForCausalLM: sliced embeddings/head, sliced layers, weight-free final norm."""

    _tied_weights_keys: dict[str, str] = {}  # noqa: RUF012 - transformers' own attribute (a plain dict there)
    _sliced_layer: type
    model: Any  # the family's decoder stack (embed_tokens, layers, norm), built by the family model's __init__

    def __init__(self, config):
        super().__init__(config)
        inner = self.model
        inner.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_dim, inner.padding_idx)
        inner.layers = nn.ModuleList(self._sliced_layer(config, i) for i in range(config.num_hidden_layers))
        inner.norm = RMSN(config.rms_norm_mean_dim, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.head_input_dim, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SlicedLayer) and module.attn_shortcut_Q is not None and module.mlp_shortcut_Q is not None:
            with torch.no_grad():  # identity-like start; real checkpoints overwrite it
                module.attn_shortcut_Q.copy_(torch.eye(*module.attn_shortcut_Q.shape))
                module.mlp_shortcut_Q.copy_(torch.eye(*module.mlp_shortcut_Q.shape))


class Sliced(NamedTuple):
    """The classes of one family's sliced format."""

    config: type[SlicedWidths]
    layer: type[nn.Module]
    model: type[PreTrainedModel]


def sliced_family(name: str, family: Family) -> Sliced:
    stem = family.model.__name__[: -len("ForCausalLM")]
    config_cls: type = strict(
        type(
            f"Sliced{stem}Config",
            (SlicedWidths, family.config),
            {"model_type": f"sliced_{name}", "__module__": __name__},
        )
    )
    # type() cannot state the bases it was given: the classes below are the family's config, layer and model
    layer_cls = type(f"Sliced{stem}DecoderLayer", (SlicedLayer, family.layer), {"__module__": __name__})
    model_cls = type(
        f"Sliced{stem}ForCausalLM",
        (SlicedModel, family.model),
        {"config_class": config_cls, "_sliced_layer": layer_cls, "__module__": __name__},
    )
    return Sliced(cast(type[SlicedWidths], config_cls), layer_cls, cast(type[PreTrainedModel], model_cls))


SLICED = {name: sliced_family(name, fam) for name, fam in FAMILIES.items()}
SlicedLlamaConfig, SlicedLlamaDecoderLayer, SlicedLlamaForCausalLM = SLICED["llama"]
SlicedMistralConfig, SlicedMistralDecoderLayer, SlicedMistralForCausalLM = SLICED["mistral"]
SlicedQwen2Config, SlicedQwen2DecoderLayer, SlicedQwen2ForCausalLM = SLICED["qwen2"]
SlicedQwen3Config, SlicedQwen3DecoderLayer, SlicedQwen3ForCausalLM = SLICED["qwen3"]
