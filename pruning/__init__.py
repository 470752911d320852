"""Structured pruning for LLaMA-family models.

Importing the package registers the pruned-model format with transformers' Auto classes, so a saved pruned
model reloads with ``AutoModelForCausalLM.from_pretrained(dir)``.
"""

import pruning.surgery  # noqa: F401
from pruning.models import adapter_for, load_model

__all__ = ["adapter_for", "load_model"]
