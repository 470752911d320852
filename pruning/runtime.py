"""Where a run computes and how it is seeded: dtype, device, device_map and seeds, decided in one place.

Policy (checked before the model is read, so a wrong combination costs one line, not a load):

- ``dtype``: ``float32`` | ``float64`` | ``bfloat16`` | ``float16`` | ``auto``. ``auto`` is ``bfloat16`` on a CUDA
  device that supports it (else ``float16``) and ``float32`` on CPU. ``float16`` on CPU is refused: torch has only
  slow reference kernels for it there, and gradient scores in fp16 underflow without loss scaling (a 5-bit
  exponent), so a CPU run would be both slow and wrong-looking; ``bfloat16`` on CPU is allowed (slow, but sound).
- ``device_map`` (model config): null (load on CPU, then move to ``device``), ``auto`` / ``balanced`` /
  ``balanced_low_0`` / ``sequential`` (accelerate spreads the layers over the visible GPUs, CPU last), ``cpu``, a
  GPU index / ``cuda:N``, or a dict ``{module name: device}`` (e.g. ``{"": 0}``). It is passed to
  ``from_pretrained`` unchanged. On a machine without CUDA, a map that names a GPU is an error; ``auto`` and
  friends fall back to the CPU (what accelerate does there; one warning line says so).
- ``seed``: ``seed_everything`` seeds Python's ``random``, NumPy and torch (CPU and every GPU) from the run's
  ``seed``. The calibration draw does not use these global generators: it is a protocol field with its own
  ``calibration.seed`` (``random.Random(seed)`` inside the sampler), recorded with every result, so changing
  ``seed`` (e.g. a random-scores baseline over seeds) never changes the calibration tokens.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping
from typing import Any

import torch

from pruning.errors import PruningError

DTYPES = ("float32", "float64", "bfloat16", "float16", "auto")
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch (all devices) from one integer; returns it."""
    import numpy as np

    try:
        seed = int(seed)
    except (TypeError, ValueError) as e:
        raise PruningError(f"seed must be an integer, got {seed!r}") from e
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNG is the one to seed: libraries draw from it
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def _is_gpu(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.strip().lower().startswith("cuda")


def check_device(device: str) -> str:
    """``cpu`` | ``cuda[:N]`` | ``auto`` -> the device to compute on (``auto``: CUDA when present)."""
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise PruningError(f"device {device!r} is not a torch device (cpu | cuda | cuda:N | auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PruningError(f"device={device!r} but CUDA is not available on this machine; use device=cpu or auto")
    return name


def normalize_device_map(device_map):
    """The ``device_map`` to hand to ``from_pretrained`` (plain Python types), or an error naming the problem."""
    if device_map is None:
        return None
    out: dict[str, Any] | str | int | torch.device
    if isinstance(device_map, Mapping):
        out = {}
        for k, v in device_map.items():
            if not isinstance(k, str):
                raise PruningError(f"device_map keys are module names (strings), got {k!r}")
            out[k] = v
        if not out:
            raise PruningError("device_map is an empty dict; use null, auto or {'': <device>}")
        values = list(out.values())
    elif isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        out = device_map.strip() if isinstance(device_map, str) else device_map
        if isinstance(out, str) and out.lower() in AUTO_MAPS:
            if not torch.cuda.is_available():
                print(
                    f"[pruning] device_map={out!r} on a machine without CUDA: the whole model loads on the CPU",
                    file=sys.stderr,
                    flush=True,
                )
            return out
        values = [out]
    else:
        raise PruningError(
            f"device_map must be null, one of {', '.join(AUTO_MAPS)}, a device (cpu, 0, cuda:0) or a "
            f"dict {{module: device}}, got {device_map!r}"
        )
    for v in values:
        if isinstance(v, str) and v.strip().lower() in ("cpu", "disk", "meta"):
            continue
        if not _is_gpu(v):
            raise PruningError(f"device_map value {v!r} is not a device (cpu, disk, a GPU index or cuda:N)")
        if not torch.cuda.is_available():
            raise PruningError(
                f"device_map places modules on GPU {v!r} but CUDA is not available on this machine; "
                "use device_map=null (CPU) or run on a GPU machine"
            )
    return out


def map_uses_gpu(device_map) -> bool:
    if device_map is None:
        return False
    if isinstance(device_map, str) and device_map.lower() in AUTO_MAPS:
        return torch.cuda.is_available()
    values = device_map.values() if isinstance(device_map, Mapping) else [device_map]
    return any(_is_gpu(v) for v in values)


def torch_dtype(dtype, on_gpu: bool = False) -> torch.dtype:
    """A dtype name (or torch dtype) -> torch dtype; ``auto`` by where the weights compute."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype).strip().lower()
    if name not in DTYPES:
        raise PruningError(f"unknown dtype {dtype!r}; choices: {', '.join(DTYPES)}")
    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def resolve_dtype(dtype, device: str = "cpu", device_map=None) -> torch.dtype:
    """The dtype of a run that computes on ``device`` (or where ``device_map`` puts the weights), or the error of an
    impossible combination (float16 on CPU)."""
    on_gpu = map_uses_gpu(device_map) if device_map is not None else str(device).startswith("cuda")
    out = torch_dtype(dtype, on_gpu)
    if out == torch.float16 and not on_gpu:
        raise PruningError(FP16_CPU)
    return out


def hardware(device: str, dtype: torch.dtype, model: torch.nn.Module | None = None) -> dict:
    """Where a cell computed, for its record: a timing or a bfloat16 number is read beside the hardware it came from,
    and the GPU test tier checks from records that a sweep job saw one GPU and that a device_map spread the layers."""
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    info: dict[str, Any] = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,  # the CUDA devices this process saw
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if model is not None:
        info["param_devices"] = sorted({str(p.device) for p in model.parameters()})
    return info


FP16_CPU = (
    "dtype float16 on CPU is not supported: torch has only slow reference fp16 kernels on the CPU and fp16 "
    "gradient scores underflow without loss scaling; use float32 (or bfloat16) on CPU, float16 on a GPU"
)


__all__ = [
    "AUTO_MAPS",
    "DTYPES",
    "FP16_CPU",
    "check_device",
    "hardware",
    "map_uses_gpu",
    "normalize_device_map",
    "resolve_dtype",
    "seed_everything",
    "torch_dtype",
]
