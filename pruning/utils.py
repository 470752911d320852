"""Small torch helpers that several modules need: where a model's inputs go, and eval mode for a while.

Torch-free file helpers (atomic writes, file hashes) live in ``experiments/fileio.py``, so the results store can use
them without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (a decoder layer, a linear)."""
    return next(module.parameters()).device


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (under a multi-GPU ``device_map`` not the first
    parameter's), or the first parameter's for a model without ``get_input_embeddings``."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if get_embeddings is None:
        return module_device(model)
    try:
        return get_embeddings().weight.device
    except AttributeError:  # no embedding module, or one without a weight
        return module_device(model)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, and the caller's training flag back afterwards, also on an error (dropout
    must be off while scoring or evaluating, and a LoRA run in the middle of training must stay in training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
