"""SliceGPT surgery (METHODS.md §3.6): fold RMSNorm scales into the linears, rotate weights into a new basis and
slice the residual width, the parameter count in closed form, and the save format of the rotated model.

The model is converted in place into its family's ``Sliced<Family>ForCausalLM`` (its own architecture: per-layer
residual widths, shortcut matrices, weight-free norms), so the cell's model object and adapter stay valid across
the surgery. Rotations are computed in float64 and cast back to the model's dtype. Only the residual stream is
rotated: q/k/v biases (Qwen2) and per-head norms (Qwen3's q_norm/k_norm) act on head outputs and stay as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.models.adapter import adapter_for
from pruning.surgery import save
from pruning.surgery.modeling_sliced_llama import RMSN, SLICED, SLICED_PER_LAYER, SlicedWidths
from pruning.surgery.save import write_checkpoint

# what a saved config must not carry over from the source: the pruned save's list, plus the sliced widths
_DROP = save._DROP + ("embedding_dim", "shortcuts") + SLICED_PER_LAYER


# --------------------------------------------------------------------------------------------------- fusion


def _norm_scale(norm: nn.Module) -> torch.Tensor | None:
    return getattr(norm, "weight", None)


def _scale_inputs(linear: nn.Linear, scale: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.mul_(scale.to(linear.weight.dtype).unsqueeze(0))


def is_sliced(model: nn.Module) -> bool:
    return str(getattr(model.config, "model_type", "")).startswith("sliced_")


def check_sliceable(model: nn.Module) -> None:
    """Reject what this surgery cannot express before any calibration pass. q/k/v biases are fine: their rows are
    head outputs, only the weights' input columns are rotated."""
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.layers):
        if any(getattr(adapter, n)(layer).bias is not None for n in ("o_proj", "gate_proj", "up_proj", "down_proj")):
            raise PruningError(
                f"SliceGPT: layer {i} has o/gate/up/down biases (e.g. FLAP's compensation), which "
                "this surgery does not rotate; slice the unpruned or bias-free model"
            )
        if (
            len(
                {
                    adapter.q_proj(layer).in_features,
                    adapter.gate_proj(layer).in_features,
                    adapter.o_proj(layer).out_features,
                }
            )
            != 1
        ):
            raise PruningError(f"SliceGPT: layer {i} does not have a uniform residual width")
        if not adapter.widths(layer).even:
            raise PruningError(
                f"SliceGPT: layer {i} has uneven KV groups (query heads pruned one by one), which the "
                "sliced save format does not hold; slice a model with even GQA groups"
            )


def fuse_norms(model: nn.Module, center_embeddings: bool = False) -> nn.Module:
    """Fold every RMSNorm scale into the linears it feeds and convert the model into its family's sliced class
    with weight-free norms and no shortcuts yet: the function is unchanged and becomes invariant to any
    orthogonal Q on the residual stream. Tied embeddings are untied (the head absorbs the final norm's scale).

    ``center_embeddings`` reproduces the official ``fuse_modules``, which subtracts each embedding row's mean even
    for RMSNorm models: that changes the function (METHODS.md §3.6, "A known defect"), so it is off by default and
    exists for parity with the official numbers.
    """
    if is_sliced(model):
        return model
    check_sliceable(model)
    adapter = adapter_for(model)
    mean_dim = getattr(adapter.final_norm, "mean_dim", adapter.embed_tokens.weight.shape[1])
    if adapter.is_tied:
        adapter.lm_head.weight = nn.Parameter(adapter.lm_head.weight.detach().clone())
    if center_embeddings:
        w = adapter.embed_tokens.weight
        with torch.no_grad():
            w.copy_((w.double() - w.double().mean(dim=-1, keepdim=True)).to(w.dtype))
    for layer in adapter.layers:
        for norm, lins in (
            (adapter.input_norm(layer), ("q_proj", "k_proj", "v_proj")),
            (adapter.post_attention_norm(layer), ("gate_proj", "up_proj")),
        ):
            scale = _norm_scale(norm)
            for name in lins:
                if scale is not None:
                    _scale_inputs(getattr(adapter, name)(layer), scale)
        eps = adapter.input_norm(layer).variance_epsilon
        layer.input_layernorm = RMSN(mean_dim, eps)
        layer.post_attention_layernorm = RMSN(mean_dim, adapter.post_attention_norm(layer).variance_epsilon)
        layer.__class__ = SLICED[adapter.family].layer  # same modules; its forward adds the (absent) shortcuts
        layer.register_parameter("attn_shortcut_Q", None)
        layer.register_parameter("mlp_shortcut_Q", None)
    scale = _norm_scale(adapter.final_norm)
    if scale is not None:
        _scale_inputs(adapter.lm_head, scale)
    adapter.model.model.norm = RMSN(mean_dim, adapter.final_norm.variance_epsilon)
    _become_sliced(model, shortcuts=False, mean_dim=mean_dim)
    return model


# The helpers below edit a transformers model's modules, reached by attribute name (which torch types as
# Tensor | Module): they take the model or a decoder layer as Any.


def _become_sliced(model: Any, shortcuts: bool, mean_dim: int | None = None) -> None:
    """Swap in the family's sliced class and a config read from the current shapes (never from stale fields)."""
    old = model.config
    config = sliced_config(model, shortcuts, mean_dim or old.rms_norm_mean_dim)
    config._attn_implementation = old._attn_implementation
    model.__class__ = SLICED[adapter_for(model).family].model
    model.config = model.model.config = config


def sliced_config(model: nn.Module, shortcuts: bool, mean_dim: int) -> SlicedWidths:
    adapter = adapter_for(model)
    base = {k: v for k, v in adapter.config.to_dict().items() if k not in _DROP}
    widths = adapter.all_widths()
    layers = list(adapter.layers)
    base.update(
        hidden_size=mean_dim,
        num_hidden_layers=len(layers),
        tie_word_embeddings=False,
        num_attention_heads=widths[0].num_heads,
        num_key_value_heads=widths[0].num_kv_heads,
        intermediate_size=widths[0].intermediate_size,
        head_dim=adapter.head_dim,
    )
    if base.get("layer_types") is not None:
        base["layer_types"] = list(base["layer_types"])[: len(layers)]
    return SLICED[adapter.family].config(
        **base,
        rms_norm_mean_dim=mean_dim,
        embedding_dim=adapter.embed_tokens.weight.shape[1],
        shortcuts=shortcuts,
        layer_attn_input_dim=[adapter.q_proj(l).in_features for l in layers],
        layer_mlp_input_dim=[adapter.gate_proj(l).in_features for l in layers],
        layer_mlp_output_dim=[adapter.down_proj(l).out_features for l in layers],
        layer_num_attention_heads=[w.num_heads for w in widths],
        layer_num_key_value_heads=[w.num_kv_heads for w in widths],
        layer_intermediate_size=[w.intermediate_size for w in widths],
    )


def refresh_config(model: nn.Module) -> None:
    """After rotation/slicing: the config follows the new shapes (shortcuts present)."""
    _become_sliced(model, shortcuts=True)


# ------------------------------------------------------------------------------------------ rotation/slicing


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=like.weight.device, dtype=like.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(like.weight.requires_grad)
    return new


def rotate_inputs(linear: nn.Linear, Q: torch.Tensor, width: int) -> nn.Linear:
    """Input columns into the basis Q (x_rot = x·Q), keeping the leading ``width`` directions: W·Q[:, :width]."""
    W = linear.weight.detach().double() @ Q[:, :width].to(linear.weight.device, torch.float64)
    return _linear(W.to(linear.weight.dtype), linear.bias, linear)


def rotate_outputs(linear: nn.Linear, Q: torch.Tensor, width: int) -> nn.Linear:
    """Output rows into the basis Q, keeping ``width`` rows: Q[:, :width]ᵀ·W (bias likewise)."""
    Qs = Q[:, :width].to(linear.weight.device, torch.float64)
    W = Qs.T @ linear.weight.detach().double()
    b = None if linear.bias is None else (linear.bias.detach().double() @ Qs).to(linear.bias.dtype)
    return _linear(W.to(linear.weight.dtype), b, linear)


def rotate_embeddings(model: Any, Q: torch.Tensor, width: int) -> None:
    emb = adapter_for(model).embed_tokens
    E = emb.weight.detach().double() @ Q[:, :width].to(emb.weight.device, torch.float64)
    new = nn.Embedding(E.shape[0], width, emb.padding_idx, device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(E)
    model.model.embed_tokens = new


def rotate_attention_inputs(layer: Any, Q: torch.Tensor, width: int) -> None:
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, rotate_inputs(getattr(attn, name), Q, width))


def rotate_attention_output(layer: Any, Q: torch.Tensor, width: int) -> None:
    layer.self_attn.o_proj = rotate_outputs(layer.self_attn.o_proj, Q, width)


def rotate_mlp_inputs(layer: Any, Q: torch.Tensor, width: int) -> None:
    for name in ("gate_proj", "up_proj"):
        setattr(layer.mlp, name, rotate_inputs(getattr(layer.mlp, name), Q, width))


def rotate_mlp_output(layer: Any, Q: torch.Tensor, width: int) -> None:
    layer.mlp.down_proj = rotate_outputs(layer.mlp.down_proj, Q, width)


def rotate_head(model: Any, Q: torch.Tensor, width: int) -> None:
    model.lm_head = rotate_inputs(model.lm_head, Q, width)


def set_shortcut(layer: Any, name: str, matrix: torch.Tensor) -> None:
    """``attn_shortcut_Q`` / ``mlp_shortcut_Q`` (a parameter, so it is counted and saved like any weight)."""
    dtype = layer.self_attn.o_proj.weight.dtype
    device = layer.self_attn.o_proj.weight.device
    setattr(layer, name, nn.Parameter(matrix.detach().to(device, dtype), requires_grad=False))


# ------------------------------------------------------------------------------------------------- counting


def fixed_params(model: nn.Module) -> int:
    """Parameters that rotation and slicing leave as they are: attention parameters other than the four
    projection weights, i.e. q/k/v biases (Qwen2) and per-head norms (Qwen3's q_norm/k_norm)."""
    adapter = adapter_for(model)
    total = 0
    for layer in adapter.layers:
        moving = {id(getattr(adapter, n)(layer).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        total += sum(p.numel() for p in adapter.attn(layer).parameters() if id(p) not in moving)
    return total


def sliced_num_params(
    vocab: int,
    head_dim: int,
    heads: list[int],
    kv_heads: list[int],
    inter: list[int],
    attn_in: list[int],
    mlp_in: list[int],
    mlp_out: list[int],
    fixed: int = 0,
) -> int:
    """Closed form of the rotated model's parameters (METHODS.md §1.1 plus §3.6 shortcuts; norms hold none):
    V·a_0 + Σ_l [a_l·d_h·(H_l+2H_kv,l) + H_l·d_h·m_l + a_l·m_l + 2·I_l·m_l + I_l·o_l + m_l·o_l] + V·o_L + fixed
    (``fixed_params``: q/k/v biases, q/k norms)."""
    total = vocab * attn_in[0] + vocab * mlp_out[-1] + fixed
    for h, kv, i, a, m, o in zip(heads, kv_heads, inter, attn_in, mlp_in, mlp_out):
        total += a * head_dim * (h + 2 * kv) + h * head_dim * m + a * m + 2 * i * m + i * o + m * o
    return total


# ------------------------------------------------------------------------------------------------------ save


def save_sliced(model: nn.Module, out_dir: str | Path, tokenizer=None, meta: dict | None = None) -> Path:
    """Write atomically a directory that reloads with ``AutoModelForCausalLM.from_pretrained`` after
    ``import pruning`` (registered classes) and with ``trust_remote_code=True`` without it (modeling file +
    ``auto_map``). A crash leaves either the previous directory or the complete new one."""
    if not is_sliced(model):
        raise PruningError("save_sliced expects a SliceGPT-rotated model; use pruning.surgery.save.save_pruned")
    adapter = adapter_for(model)
    config = sliced_config(model, adapter.config.shortcuts, adapter.config.rms_norm_mean_dim)
    classes = SLICED[adapter.family]
    with torch.device("meta"):
        clean = classes.model(config)
    clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        clean.generation_config = generation_config
    classes.config.register_for_auto_class()
    classes.model.register_for_auto_class("AutoModelForCausalLM")
    return write_checkpoint(clean, out_dir, tokenizer, meta)
