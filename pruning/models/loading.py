"""Load a model + tokenizer by name or path, rejecting unsupported or broken checkpoints before heavy work."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import pruning.surgery  # noqa: F401  (registers pruned_llama with the Auto classes)
from pruning.errors import CheckpointError
from pruning.models.adapter import adapter_class

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = {"stories260K": ASSETS / "stories260K"}


def resolve_checkpoint(path: str) -> Path:
    """``embedded:<name>`` names a checkpoint shipped in the package; anything else is a directory."""
    if path.startswith("embedded:"):
        name = path.split(":", 1)[1]
        if name not in EMBEDDED:
            raise CheckpointError(f"unknown embedded checkpoint {name!r}; choices: {', '.join(EMBEDDED)}")
        return EMBEDDED[name]
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p} (give a local HF checkpoint directory, "
                              f"or embedded:stories260K)")
    return p


def read_config(ckpt: Path):
    from transformers import AutoConfig

    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint: config.json is missing")
    try:
        json.loads(cfg_file.read_text())
        return AutoConfig.from_pretrained(ckpt)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint config {cfg_file}: {str(e).splitlines()[0]}") from e


def load_model(path: str, dtype: str = "float32", device_map: str | dict | None = None):
    """Return (model, tokenizer, adapter). ``device_map`` (e.g. "auto") spreads big models over several GPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()     # our own bars cover long work; loading a checkpoint is not
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    adapter_cls = adapter_class(config)        # unsupported family -> one clear error, weights never read
    weights = list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: no *.safetensors or *.bin weight files")
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype), device_map=device_map)
    except Exception as e:  # safetensors/pickle/shape errors all mean the files on disk are unusable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"corrupt checkpoint {ckpt}: {msg}") from e
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model.eval()
    return model, tokenizer, adapter_cls(model)
