"""AdaPruner (Kong et al., AAAI 2025; METHODS.md §3.10, our interpretation): LLM-Pruner's block strategy and layer
range, with the calibration data and the Taylor importance/aggregation chosen by a TPE study
(``experiment=adapruner``, driven by ``experiments.adapruner``).

A trial is an ordinary LLM-Pruner cell; this factory exists only so that trials and the final cell are recorded as
``adapruner`` and so that a calibration pool overlapping the study's objective documents is refused up front.
"""

from __future__ import annotations

import dataclasses

from pruning.errors import PruningError
from pruning.methods.llm_pruner import LLMPruner, llm_pruner

# Calibration pools that contain the objective block (pruning.data.C4_HELDOUT_DOCS): the search would be scored on
# text it calibrated on.
OVERLAPS_OBJECTIVE = {"c4": "c4_search (the C4 documents outside the objective block)"}


def adapruner(
    importance: str = "element1", aggregation: str = "sum", calibration_dataset: str | None = None, **llm_pruner_kwargs
) -> LLMPruner:
    """``calibration_dataset`` is the cell's ``calibration.dataset`` (interpolated by the config), checked here
    because the method's objective, not the sampler, defines which documents are off limits."""
    if calibration_dataset in OVERLAPS_OBJECTIVE:
        raise PruningError(
            f"adapruner cannot calibrate on {calibration_dataset!r}: it contains the held-out "
            f"objective documents; use {OVERLAPS_OBJECTIVE[calibration_dataset]}"
        )
    method = llm_pruner(importance=importance, aggregation=aggregation, **llm_pruner_kwargs)
    return dataclasses.replace(method, name="adapruner")
