"""Peak memory of calibration-statistics collection vs the calibration set's hidden states (issue 6, acceptance 4).

The collector must not hold every layer's hidden states for the calibration set (what ``output_hidden_states=True``
over the whole set would cost). Peak bytes of torch CPU allocations during ``collect`` are measured with the torch
profiler (allocation events replayed in time order; the model's weights and the token ids exist before and are not
counted) and printed next to:
- all hidden states: (L + 1) · n · T · d elements (HF ``hidden_states`` for the whole set),
- one layer's activations for the set: n · T · d (what sequential mode keeps by design),
- the statistics themselves.

    python benchmarks/bench_collector_memory.py [--n-samples 256 --seq-len 256 --batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_main
from pruning.calibration import collect
from pruning.models import load_model


def peak_bytes(fn) -> tuple[int, object]:
    """Peak of live torch CPU allocation bytes while ``fn`` runs (relative to its start), and fn's result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak, result


def stats_bytes(stats) -> int:
    total = 0
    for ls in stats.layers.values():
        for st in ls.sites.values():
            total += sum(
                v.numel() * v.element_size() for v in (st._mean, st._m2, st._sq, st._abs, st._xtx) if v is not None
            )
    return total


def measure(
    n_samples: int = 256, seq_len: int = 256, batch_size: int = 8, xtx: bool = False, seed: int = 0
) -> list[dict]:
    model, _, adapter = load_model("embedded:stories260K")
    cfg = model.config
    # real tokens are not needed for a memory bound: random ids of the model's vocabulary, fixed seed
    ids = torch.randint(0, cfg.vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    item = next(model.parameters()).element_size()
    all_hidden = (len(adapter.layers) + 1) * n_samples * seq_len * cfg.hidden_size * item
    one_layer = n_samples * seq_len * cfg.hidden_size * item
    stats = ("mean", "var", "sqnorm", "block_io") + (("xtx",) if xtx else ())
    rows = []
    for mode in ("dense", "sequential"):
        t0 = time.perf_counter()
        peak, st = peak_bytes(
            partial(collect, model, ids, stats=stats, mode=mode, batch_size=batch_size, progress=False)
        )
        rows.append(
            {
                "mode": mode,
                "peak_bytes": peak,
                "stats_bytes": stats_bytes(st),
                "all_hidden_bytes": all_hidden,
                "one_layer_bytes": one_layer,
                "ratio_to_all_hidden": peak / all_hidden,
                "ratio_to_one_layer": peak / one_layer,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--xtx", action="store_true", help="also accumulate X^T X at o_proj/down_proj")
    args = ap.parse_args(argv)
    rows = measure(args.n_samples, args.seq_len, args.batch_size, args.xtx)
    mb = 2**20
    print(
        f"stories260K, calibration {args.n_samples} x {args.seq_len}, batch {args.batch_size}"
        f"{', with XtX' if args.xtx else ''}"
    )
    print(
        f"all hidden states of the set: {rows[0]['all_hidden_bytes'] / mb:.1f} MiB; one layer's: "
        f"{rows[0]['one_layer_bytes'] / mb:.1f} MiB"
    )
    for r in rows:
        print(
            f"{r['mode']:>10}: peak {r['peak_bytes'] / mb:7.2f} MiB (statistics {r['stats_bytes'] / mb:.2f} MiB)"
            f"  ratio to all hidden states {r['ratio_to_all_hidden']:.3f}, to one layer "
            f"{r['ratio_to_one_layer']:.3f}  [{r['seconds']:.1f} s]"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
