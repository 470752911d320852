"""Physical surgery on pruned structures, and the save formats that reload heterogeneous widths: one pruned and
one sliced config/model pair per model family, registered with the Auto classes here."""

from transformers import AutoConfig, AutoModelForCausalLM

from pruning.surgery.modeling_pruned_llama import PRUNED
from pruning.surgery.modeling_sliced_llama import SLICED

for _config, _model in [*PRUNED.values(), *((s.config, s.model) for s in SLICED.values())]:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
