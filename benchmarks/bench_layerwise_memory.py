"""Peak memory of gradient scoring layer by layer vs one whole-model backward (issue 13, acceptance 3).

For each model and calibration shape this runs ``GradientScorer.fit`` twice on the same batch, as
``method=llm_pruner`` does (block strategy on LLM-Pruner's layer range, C4, seed 42): once with one backward
through the whole model (the default) and once with ``method.memory.layerwise=true``. The peak is the one the
record stores under ``plan.meta.scoring.memory``, measured by ``pruning.importance.taylor.peak_memory`` (the same
probe as ``bench_taylor_memory.py``: torch's CPU allocator events replayed in time order; ``max_memory_allocated``
on CUDA). Reported per row: weights, peak total (weights + activations + gradients + buffers), peak above the
weights, and layer-wise / whole-model ratios of both.

The scores of the two runs are compared too (they must be equal: same gradients, same folding).

    python benchmarks/bench_layerwise_memory.py [--models stories260k smollm2_135m] [--shapes 10x64 32x128]

Writes results/bench_layerwise_memory.json and .md. stories260K is the largest stories model in the data root
(stories15M exists only on the hub); SmolLM2-135M is measured when its GGUF is in the data root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run_main  # noqa: E402
from benchmarks.bench_taylor_memory import loaded_models  # noqa: E402
from pruning import data  # noqa: E402
from pruning.importance.taylor import TAYLOR, taylor_scorer, weight_bytes  # noqa: E402
from pruning.methods.llm_pruner import llm_pruner  # noqa: E402

MB = 2**20


def shape(text: str) -> tuple[int, int]:
    n, t = text.lower().split("x")
    return int(n), int(t)


def measure(model, calib, sets, variant: str, layerwise: bool) -> tuple[dict, torch.Tensor]:
    sc = taylor_scorer(variant, layerwise=layerwise)
    t0 = time.perf_counter()
    meta = sc.fit(model, calib, sets)
    seconds = time.perf_counter() - t0
    scores = torch.cat([sc(s) for s in sets])
    return dict(meta, wall=seconds), scores


def run(models: list[str], shapes: list[str], variants: list[str], threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, model, tok, adapter in loaded_models(models):
        wb = weight_bytes(model)
        sets = llm_pruner().sets(model)
        layers = sorted({s.layer for s in sets})
        for shp in shapes:
            n, t = shape(shp)
            calib = data.calibration_batches(tok, "c4", n, t, 42, progress=False)
            with torch.no_grad():
                model(calib[:1])  # warm-up: lazily built buffers are not scoring memory
            for variant in variants:
                whole, s_whole = measure(model, calib, sets, variant, False)
                lw, s_lw = measure(model, calib, sets, variant, True)
                rel = float((s_whole - s_lw).abs().max() / s_whole.abs().max())
                for label, meta in (("whole-model", whole), ("layer-wise", lw)):
                    mem = meta["memory"]
                    extra = mem["peak_extra_bytes"]
                    rows.append(
                        {
                            "model": name,
                            "params": adapter.num_params(),
                            "layers": len(adapter.layers),
                            "scored_layers": f"[{layers[0]}, {layers[-1] + 1})",
                            "calibration": f"{n}x{t}",
                            "variant": variant,
                            "mode": label,
                            "weight_MB": round(wb / MB, 2),
                            "peak_MB": round((wb + extra) / MB, 2),
                            "peak_above_weights_MB": round(extra / MB, 2),
                            "peak_ratio": mem["peak_ratio"],
                            "state_ratio": mem["state_ratio"],
                            "backward_passes": meta["backward_passes"],
                            "seconds": round(meta["wall"], 2),
                            "max_rel_score_diff": rel,
                            "method": mem["method"],
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                w, lrow = rows[-2], rows[-1]
                for r in (w, lrow):
                    r["lw_over_whole_peak"] = round(lrow["peak_MB"] / w["peak_MB"], 3)
                    r["lw_over_whole_above_weights"] = round(
                        lrow["peak_above_weights_MB"] / w["peak_above_weights_MB"], 3
                    )
        del model
    return rows


def markdown(rows: list[dict], command: str, threads: int, raw: str = "results/bench_layerwise_memory.json") -> str:
    lines = [
        "# Gradient scoring memory: layer by layer vs one whole-model backward",
        "",
        (
            f"Generated by `{command}` on {datetime.now(UTC).isoformat(timespec='seconds')} "
            f"({threads} torch thread(s), CPU, float32)."
        ),
        "",
        (
            "LLM-Pruner block strategy (KV groups + MLP channels on its layer range), C4 calibration with seed 42. "
            "Peak = all torch tensor bytes live at the peak of `GradientScorer.fit` (weights + activations + "
            "gradients + buffers), measured from torch's CPU allocator events "
            f"({rows[0]['method']}). Ratios in the last two columns: layer-wise / whole-model."
        ),
        "",
        (
            "| model (layers, scored) | calibration | variant | mode | weights MB | peak MB (× weights) "
            "| above weights MB | passes | s | lw/whole peak | lw/whole above weights |"
        ),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['layers']}, {r['scored_layers']}) | {r['calibration']} | {r['variant']} "
            f"| {r['mode']} | {r['weight_MB']:.2f} | {r['peak_MB']:.2f} ({r['peak_ratio']:.2f}×) "
            f"| {r['peak_above_weights_MB']:.2f} | {r['backward_passes']} | {r['seconds']:.1f} "
            f"| {r['lw_over_whole_peak']:.3f} | {r['lw_over_whole_above_weights']:.3f} |"
        )
    worst = max(r["max_rel_score_diff"] for r in rows)
    lines += [
        "",
        (
            f"Scores: layer-wise vs whole-model, max relative difference over all rows: {worst:.1e} "
            "(float32; equal to ~1e-15 in float64, `tests/test_layerwise.py`)."
        ),
        f"Raw numbers: `{raw}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "smollm2_135m"])
    ap.add_argument("--shapes", nargs="+", default=["10x64", "32x128"], help="calibration n_samples x seq_len")
    ap.add_argument("--variants", nargs="+", default=["element1"], choices=TAYLOR)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="where the .json and .md go")
    args = ap.parse_args(argv)
    rows = run(args.models, args.shapes, args.variants, args.threads)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    command = " ".join(["python benchmarks/bench_layerwise_memory.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_layerwise_memory.json").write_text(
        json.dumps(
            {
                "benchmark": "gradient scoring memory, layer-wise vs whole-model",
                "command": command,
                "threads": args.threads,
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=1,
        )
    )
    js = (args.out / "bench_layerwise_memory.json").resolve()
    md = markdown(rows, command, args.threads, str(js.relative_to(ROOT)) if js.is_relative_to(ROOT) else str(js))
    (args.out / "bench_layerwise_memory.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    run_main(main)
