"""What each paper means by its row labels ("20%"), in terms of its own knob (METHODS.md §1.3), both ways.

A paper table's column is a label, not a setting: LLM-Pruner's "20%" is ``--pruning_ratio 0.25`` (19.52% of LLaMA-7B's
parameters), Search-LLM's "80%" keeps 80% of the parameters, SliceGPT's "25%" slices a quarter of the hidden size.
``knob_for(family, label)`` gives the setting a preset runs (the config resolver ``${paper_knob:<family>,<label>}``
used by each method's config, so ``paper_ratio=0.2`` puts every method at its paper's 20% operating point), and
``label_for(knob, value)`` the label a table prints for a cell. Torch-free, so tables and config checks load fast.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

# LLaMA-7B, the papers' model: d, heads, head_dim, MLP width, LLM-Pruner's layer range [4, 30), parameter count.
LLAMA_7B: dict[str, Any] = {
    "d": 4096,
    "heads": 32,
    "d_h": 128,
    "inter": 11008,
    "layers": (4, 30),
    "params": 6_738_415_616,
}
# LLM-Pruner's own p for a label where the authors printed one (README / scripts/llama_prune.sh: 0.25 is "20%").
LLM_PRUNER_P = {0.2: 0.25}


def llm_pruner_share(p: float) -> float:
    """The share of LLaMA-7B's parameters LLM-Pruner's p removes on layers [4, 30) under its count rule
    (p = 0.25: 6,738,415,616 -> 5,422,977,024, i.e. 19.52%)."""
    m = LLAMA_7B
    n_layers = m["layers"][1] - m["layers"][0]
    kv_channels = m["heads"] * m["d_h"]
    heads = (kv_channels - int(kv_channels * (1 - p))) // m["d_h"]
    channels = m["inter"] - int(m["inter"] * (1 - p))
    return n_layers * (heads * 4 * m["d"] * m["d_h"] + channels * 3 * m["d"]) / m["params"]


def llm_pruner_p(label: float) -> float:
    """p for a label: the authors' own where printed, else the p on a 0.01 grid whose LLaMA-7B share is closest
    (derived: 0.5 -> 0.65, which removes 50.11%)."""
    if round(label, 6) in LLM_PRUNER_P:
        return LLM_PRUNER_P[round(label, 6)]
    grid = [k / 100 for k in range(1, 100)]
    return min(grid, key=lambda p: (abs(llm_pruner_share(p) - label), p))


def _same(x: float) -> float:
    return x


def _complement(x: float) -> float:
    return round(1.0 - x, 12)


# method family -> (its native knob, label -> knob value, knob value -> label)
FAMILIES = {
    "llm_pruner": ("group_ratio", llm_pruner_p, lambda p: round(llm_pruner_share(p), 2)),
    "flap": ("attn_mlp_ratio", _same, _same),
    "slicegpt": ("slicing", _same, _same),
    "nirvana": ("sparsity", _same, _same),
    "numerical": ("unit_ratio", _same, _same),
    "search_llm": ("inheriting_ratio", _complement, _complement),
}
KNOB_FAMILY = {knob: family for family, (knob, _, _) in FAMILIES.items()}


def knob_for(family: str, label: float | None) -> float | None:
    """The native knob value a paper means by ``label`` (None -> None: no paper label, pruning.ratio rules)."""
    if label is None:
        return None
    if family not in FAMILIES:
        raise ValueError(f"no paper operating point for method family {family!r}; families: {', '.join(FAMILIES)}")
    return float(FAMILIES[family][1](float(label)))


def label_for(knob: str, value: float) -> float | None:
    """The label a paper prints for a native knob setting (``method.group_ratio`` or ``group_ratio``)."""
    family = KNOB_FAMILY.get(knob.removeprefix("method."))
    return None if family is None else round(float(FAMILIES[family][2](float(value))), 6)


OmegaConf.register_new_resolver("paper_knob", knob_for, replace=True)
