"""Mistral (7B v0.1/v0.3): Llama's layout with GQA 4:1 and a sliding attention window, which is config only and
survives pruning and saving untouched."""

from pruning.models.adapter import ADAPTERS, family_types
from pruning.models.llama import LlamaAdapter


@ADAPTERS.register("mistral")
class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = family_types("mistral")
