"""Peak memory of gradient (Taylor) scoring as a multiple of the weights' bytes (issue 4, acceptance 4).

For each model and Taylor variant this runs ``GradientScorer.fit`` exactly as ``method=llm_pruner`` does (block
strategy on LLM-Pruner's layer range, LLM-Pruner's 10 x 64 calibration, seed 42) and prints what the result record
stores under ``plan.meta.scoring.memory``:

- ``peak``: all torch tensor bytes live at the peak of scoring (weights + activations + gradients + buffers) /
  weight bytes. Measured: torch's CPU allocator reports every alloc/free to the profiler (``profile_memory=True``);
  the running sum in time order gives the peak (``torch.cuda.max_memory_allocated`` on GPU).
- ``state``: weights + what the scoring design itself keeps alive at once (gradients, Fisher buffer, per-channel
  accumulators) / weight bytes, accounted from tensor sizes. Activations excluded: they scale with n·T·(d, V), not
  with the scoring design.
- ``official``: the same batch scored the official way (every parameter requires grad, all gradients, and for
  element2* the ``acc_grad`` Fisher buffer, alive together), measured the same way, for comparison.

Rows: ``one-pass`` (the default: one backward over all samples, gradients folded and freed by hooks) and
``micro_batch=1`` (one sample per backward, a chunk's gradients held within ``budget`` = 0.25 of the weights).

    python benchmarks/bench_taylor_memory.py [--models stories260k smollm2_135m] [--variants element1 element2]

SmolLM2-135M is measured when ``conf/model/smollm2_135m.yaml`` exists and its GGUF is in the data root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run_main  # noqa: E402
from pruning import data  # noqa: E402
from pruning.importance.taylor import TAYLOR, lm_loss, peak_memory, taylor_scorer, weight_bytes  # noqa: E402
from pruning.methods.llm_pruner import llm_pruner  # noqa: E402
from pruning.models import load_model  # noqa: E402
from pruning.utils import input_device  # noqa: E402


def model_path(name: str) -> str | None:
    if name == "stories260k":
        return "embedded:stories260K"
    cfg_file = ROOT / "conf" / "model" / f"{name}.yaml"
    if not cfg_file.is_file():
        return None
    from omegaconf import OmegaConf

    return str(OmegaConf.load(cfg_file).model.path)


def loaded_models(names):
    """(name, model, tokenizer, adapter) for each model that this machine has; the others are skipped with a line."""
    for name in names:
        path = model_path(name)
        if path is None:
            print(f"[skip] {name}: conf/model/{name}.yaml not found", file=sys.stderr)
            continue
        try:
            model, tok, adapter = load_model(path)
        except Exception as e:  # noqa: BLE001 - e.g. the GGUF is not in this data root
            print(f"[skip] {name}: {e}", file=sys.stderr)
            continue
        yield name, model, tok, adapter


def official_style(model, calib, variant: str) -> dict:
    """hf_prune.py's order: (element2*) per-sample passes into acc_grad, then one batch backward; all kept."""
    device = input_device(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    acc = {}
    try:
        with peak_memory(device) as mem, torch.enable_grad():
            if variant.startswith("element2"):
                n = calib.shape[0]
                for i in range(n):
                    lm_loss(model, calib[i : i + 1]).backward()
                    for p in model.parameters():
                        g2 = p.grad * p.grad / n
                        acc[id(p)] = acc[id(p)] + g2 if id(p) in acc else g2
                        p.grad = None
            lm_loss(model, calib).backward()
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        acc.clear()
    return mem


def run(models: list[str], variants: list[str], n_samples: int, seq_len: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, model, tok, adapter in loaded_models(models):
        calib = data.calibration_batches(tok, "c4", n_samples, seq_len, 42, progress=False)
        wb = weight_bytes(model)
        with torch.no_grad():
            model(calib[:1])  # warm-up: lazily built buffers are not scoring memory
        for variant in variants:
            method = llm_pruner(importance=variant)
            sets = method.sets(model)
            off = official_style(model, calib, variant)
            for label, kw in (("one-pass", {}), ("micro_batch=1", {"micro_batch": 1})):
                t0 = time.perf_counter()
                meta = taylor_scorer(variant, **kw).fit(model, calib, sets)
                mem = meta["memory"]
                rows.append(
                    {
                        "model": name,
                        "params": adapter.num_params(),
                        "weight_MB": round(wb / 2**20, 1),
                        "variant": variant,
                        "regime": label,
                        "passes": meta["backward_passes"],
                        "chunks": meta["chunks"],
                        "peak": mem["peak_ratio"],
                        "state": mem["state_ratio"],
                        "official": round((wb + off["peak_extra_bytes"]) / wb, 3),
                        "seconds": round(time.perf_counter() - t0, 1),
                        "method": mem["method"],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del model
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "smollm2_135m"])
    ap.add_argument("--variants", nargs="+", default=list(TAYLOR), choices=TAYLOR)
    ap.add_argument("--n-samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = run(args.models, args.variants, args.n_samples, args.seq_len, args.threads)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    import pandas as pd

    df = pd.DataFrame(rows).drop(columns=["method"])
    print(
        f"calibration c4 {args.n_samples} x {args.seq_len}, seed 42; ratios = bytes / weight bytes; "
        f"memory: {rows[0]['method']}"
    )
    print(df.to_string(index=False))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
