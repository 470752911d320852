"""Qwen3 (dense): Llama's layout plus q_norm/k_norm, RMSNorms over head_dim shared by every head. Removing heads
or KV groups leaves them as they are, and so does SliceGPT (they act inside heads, not on the residual stream)."""

from pruning.models.adapter import ADAPTERS, family_types
from pruning.models.llama import LlamaAdapter


@ADAPTERS.register("qwen3")
class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = family_types("qwen3")
