"""Recovery fine-tuning after pruning; ``recover`` is what the cell calls when ``recovery.name != none``."""

from __future__ import annotations

from pruning.errors import PruningError
from pruning.recovery.lora import LoRARecovery
from pruning.recovery.lora import check_recovery as _check_lora
from pruning.recovery.lora import recover as _recover_lora

RECOVERIES = {"lora": (_check_lora, _recover_lora)}


def _name(cfg) -> str:
    name = cfg.get("name", "none") if cfg is not None else "none"
    if name != "none" and name not in RECOVERIES:
        raise PruningError(f"unknown recovery {name!r}; choices: none, {', '.join(sorted(RECOVERIES))}")
    return name


def check_recovery(cfg) -> None:
    """Config values and data files, checked before the model is loaded."""
    name = _name(cfg)
    if name != "none":
        RECOVERIES[name][0](cfg)


def recover(model, tokenizer, cfg, device=None, progress: bool = True, run_dir=None) -> dict:
    """Fine-tune ``model`` in place; returns the JSON-able ``recovery`` block of the record."""
    name = _name(cfg)
    if name == "none":
        return {"name": "none"}
    return RECOVERIES[name][1](model, tokenizer, cfg, device=device, progress=progress, run_dir=run_dir)


__all__ = ["LoRARecovery", "check_recovery", "recover"]
