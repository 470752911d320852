"""Physical surgery on pruned structures, and the save format that reloads heterogeneous widths."""

from transformers import AutoConfig, AutoModelForCausalLM

from pruning.surgery.modeling_pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM
from pruning.surgery.modeling_sliced_llama import SlicedLlamaConfig, SlicedLlamaForCausalLM

AutoConfig.register(PrunedLlamaConfig.model_type, PrunedLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(PrunedLlamaConfig, PrunedLlamaForCausalLM, exist_ok=True)
AutoConfig.register(SlicedLlamaConfig.model_type, SlicedLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(SlicedLlamaConfig, SlicedLlamaForCausalLM, exist_ok=True)
