"""Model families: adapters (where things are) and loading."""

from pruning.models.adapter import ADAPTERS, LayerWidths, ModelAdapter, adapter_class, adapter_for
from pruning.models.llama import LlamaAdapter
from pruning.models.loading import load_model

__all__ = ["ADAPTERS", "LayerWidths", "ModelAdapter", "LlamaAdapter", "adapter_class", "adapter_for", "load_model"]
