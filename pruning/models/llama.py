"""Llama family adapter: Llama 1/2/3 (Llama-3's GQA and RoPE scaling are config), Vicuna, and our pruned/sliced
save formats (GQA aware). Mistral, Qwen2 and Qwen3 put their modules in the same places and subclass it."""

from __future__ import annotations

from torch import nn

from pruning.models.adapter import ADAPTERS, ModelAdapter, family_types


@ADAPTERS.register("llama")
class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = family_types("llama")

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def final_norm(self):
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def head_dim(self) -> int:
        """From the attention module: Qwen2's config has no head_dim field (it derives hidden_size // heads)."""
        return self.attn(self.layers[0]).head_dim

    def attn(self, layer):
        return layer.self_attn

    def mlp(self, layer):
        return layer.mlp

    def input_norm(self, layer):
        return layer.input_layernorm

    def post_attention_norm(self, layer):
        return layer.post_attention_layernorm

    def sync_layer(self, layer) -> None:
        w = self.widths(layer)
        self.set_kv_group_sizes(layer, w.kv_group_sizes)
        layer.mlp.intermediate_size = w.intermediate_size

    def set_layers(self, keep: list[int]) -> None:
        layers = self.layers
        kept = nn.ModuleList([layers[i] for i in keep])
        for new_idx, layer in enumerate(kept):
            self.attn(layer).layer_idx = new_idx  # KV-cache slot
        self.model.model.layers = kept
        self.config.num_hidden_layers = len(kept)
        if getattr(self.config, "layer_types", None) is not None:
            self.config.layer_types = [self.config.layer_types[i] for i in keep]
