"""Typed eval-config blocks: a Hydra node or dict becomes a dataclass, and unknown keys are an error."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pruning.errors import PruningError


def config_block(cls, block: Any, where: str):
    if isinstance(block, DictConfig):
        block = OmegaConf.to_container(block, resolve=True)
    if isinstance(block, cls):
        return block
    if not isinstance(block, dict):
        raise PruningError(f"{where} must be a mapping, got {type(block).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise PruningError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    return cls(**block)
