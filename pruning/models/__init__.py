"""Model families: adapters (where things are) and loading. One short module per family."""

from pruning.models.adapter import ADAPTERS, LayerWidths, ModelAdapter, adapter_class, adapter_for, family_types
from pruning.models.llama import LlamaAdapter
from pruning.models.loading import load_model
from pruning.models.mistral import MistralAdapter
from pruning.models.qwen2 import Qwen2Adapter
from pruning.models.qwen3 import Qwen3Adapter

__all__ = [
    "ADAPTERS",
    "LayerWidths",
    "LlamaAdapter",
    "MistralAdapter",
    "ModelAdapter",
    "Qwen2Adapter",
    "Qwen3Adapter",
    "adapter_class",
    "adapter_for",
    "family_types",
    "load_model",
]
