"""Save a (possibly heterogeneous) pruned model so ``AutoModelForCausalLM.from_pretrained`` reloads it.

Uniform widths that the family's own config class (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config) describes
save as a plain checkpoint of that family. Anything else (per-layer widths, uneven GQA groups, added o/down biases, a
hidden size kept dividing by its original width, or head counts LlamaConfig rejects because hidden_size % heads != 0)
saves as ``pruned_<family>``: registered with the Auto classes on ``import pruning``, and carried as a standalone
modeling file + ``auto_map`` for ``trust_remote_code=True`` elsewhere.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import PreTrainedModel

from pruning.models.adapter import adapter_for
from pruning.surgery.modeling_pruned_llama import FAMILIES, PER_LAYER, PRUNED, MeanDimRMSNorm

_DROP = (
    "auto_map",
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "quantization_config",
    "rms_norm_mean_dim",
) + PER_LAYER


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _plain_fits(config, model: nn.Module, cls: type) -> bool:
    """Whether the family's stock class built from ``config`` has exactly the model's tensors (built on meta)."""
    with torch.device("meta"):
        return _shapes(cls(config)) == _shapes(model)


def export_config(model: nn.Module):
    """The config that describes the model's current shapes (read from the weights, never from stale fields)."""
    adapter = adapter_for(model)
    family = FAMILIES[adapter.family]
    widths = adapter.all_widths()
    base = {k: v for k, v in adapter.config.to_dict().items() if k not in _DROP}
    base["num_hidden_layers"] = len(widths)
    base["tie_word_embeddings"] = adapter.is_tied  # the tensors decide: a surgery that unties them saves two
    if base.get("layer_types") is not None:
        base["layer_types"] = list(base["layer_types"])[: len(widths)]
    base["hidden_size"] = adapter.embed_tokens.weight.shape[1]  # hidden-channel pruning shrinks it
    base["head_dim"] = adapter.head_dim  # explicit: Qwen2 would otherwise derive it from hidden / heads
    mean_dim = next(
        (
            m.mean_dim
            for m in model.modules()  # ...and may keep the norms' original divisor
            if isinstance(m, MeanDimRMSNorm) and m.mean_dim != base["hidden_size"]
        ),
        None,
    )
    heads = [w.num_heads for w in widths]
    kv = [w.num_kv_heads for w in widths]
    inter = [w.intermediate_size for w in widths]
    o_bias = [w.o_proj_bias and not base.get("attention_bias") for w in widths]  # beyond the family's own
    d_bias = [w.down_proj_bias and not base.get("mlp_bias") for w in widths]
    even = all(w.even for w in widths)
    groups = None if even else [list(w.kv_group_sizes) for w in widths]  # uneven GQA: the query-to-KV map
    if widths:
        base.update(num_attention_heads=heads[0], num_key_value_heads=kv[0], intermediate_size=inter[0])
    uniform = (
        len(set(heads)) == 1
        and len(set(kv)) == 1
        and len(set(inter)) == 1
        and even
        and not any(o_bias)
        and not any(d_bias)
        and mean_dim is None
    )
    if uniform:
        try:
            plain = family.config(**base)
        except (ValueError, TypeError, StrictDataclassError):  # e.g. LlamaConfig: hidden_size % heads != 0
            plain = None
        if plain is not None and _plain_fits(plain, model, family.model):
            return plain
    return PRUNED[adapter.family][0](
        **base,
        layer_num_attention_heads=heads,
        layer_num_key_value_heads=kv,
        layer_intermediate_size=inter,
        layer_o_proj_bias=o_bias,
        layer_down_proj_bias=d_bias,
        layer_kv_group_sizes=groups,
        rms_norm_mean_dim=mean_dim,
    )


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer=None, meta: dict | None = None) -> Path:
    """Write atomically: a crash leaves either the previous directory or the complete new one.

    SliceGPT-rotated models (``sliced_<family>``) have their own format: they are handed to ``save_sliced``."""
    from pruning.surgery.slicing import is_sliced, save_sliced

    if is_sliced(model):
        return save_sliced(model, out_dir, tokenizer, meta)
    out_dir = Path(out_dir)
    config = export_config(model)
    name = adapter_for(model).family
    is_plain = type(config) is FAMILIES[name].config
    config_cls, model_cls = PRUNED[name]
    cls = FAMILIES[name].model if is_plain else model_cls
    with torch.device("meta"):
        clean = cls(config)
    clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        clean.tie_weights()
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        clean.generation_config = generation_config
    if not is_plain:
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class("AutoModelForCausalLM")
    return write_checkpoint(clean, out_dir, tokenizer, meta)


def write_checkpoint(clean: PreTrainedModel, out_dir: str | Path, tokenizer=None, meta: dict | None = None) -> Path:
    """``save_pretrained`` into a temp dir beside ``out_dir``, then rename: a crash leaves the old dir or the new."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        clean.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta is not None:
            (tmp / "pruning_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
