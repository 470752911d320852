"""Shared fixtures: the real embedded stories260K model (no mocks), offline environment."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

STORIES = "embedded:stories260K"


@pytest.fixture(scope="session")
def stories_text_ids():
    """A fixed real batch: TinyStories-like text plus WikiText, so both in- and out-of-domain tokens are checked."""
    from pruning.models import load_model

    _, tok, _ = load_model(STORIES)
    texts = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
             " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor ."]
    ids = [tok(t, return_tensors="pt").input_ids[0][:24] for t in texts]
    return torch.stack(ids)


@pytest.fixture
def stories():
    """A fresh (model, tokenizer, adapter) per test: surgery mutates the model in place."""
    from pruning.models import load_model

    return load_model(STORIES)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
