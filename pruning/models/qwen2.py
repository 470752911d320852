"""Qwen2 / Qwen2.5: Llama's layout plus biases on q/k/v. A bias entry belongs to its projection's output row, so
it leaves with that row (``surgery.apply``), is counted in the unit's parameters (``structures``) and is kept as is
by SliceGPT's rotation (which only turns the residual-stream columns)."""

from pruning.models.adapter import ADAPTERS, family_types
from pruning.models.llama import LlamaAdapter


@ADAPTERS.register("qwen2")
class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = family_types("qwen2")
