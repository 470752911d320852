"""Wall time saved by sweep caching: the results store and the calibration / statistics caches (issue 17).

Every step is ``python run.py -m ...`` in a subprocess, exactly as a user types it, on stories260K with
``threads=1``, a temporary results store (``store.dir``), a temporary ``$PRUNING_CACHE`` (calibration ids and dense
statistics, experiments/cache.py ``TensorCache``) and a temporary Hydra sweep dir:

1. ``cold``:    sweep A (default ``method=llm_pruner,flap pruning.ratio=0.2,0.3 eval=quick``), empty store and cache.
2. ``rerun``:   sweep A again, same store and cache: every cell is a store hit (nothing loaded or evaluated).
3. ``warm``:    sweep B (new ratios, same methods and calibration), a fresh store but A's cache: the calibration
                ids and FLAP's dense statistics are cache hits; the dense baseline and every pruned cell are computed.
4. ``cleared``: sweep B with a fresh store and a fresh cache (what B costs without caching).

Steps 3 and 4 alternate for ``--repeats`` rounds so load from other jobs hits both. Ratios: rerun / cold and
warm / cleared (medians), in wall time and in the child processes' CPU time. Hits are read back from the records
(``calibration.cached``, ``calibration.statistics``) and from run.py's "already complete: skipped" lines, so the
numbers say what was actually reused.

    python benchmarks/bench_sweep_cache.py [--methods llm_pruner flap] [--ratios 0.2 0.3] [--new-ratios 0.25 0.35]
    python benchmarks/bench_sweep_cache.py --quick        # flap only, one ratio per sweep (for tests)

Writes results/bench_sweep_cache.json and results/bench_sweep_cache.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run_main  # noqa: E402
from pruning.errors import PruningError  # noqa: E402

SKIPPED = "already complete: skipped"


def sweep_args(methods: list[str], ratios: list[float], eval_name: str, model: str) -> list[str]:
    return [
        "-m",
        f"model={model}",
        f"method={','.join(methods)}",
        f"pruning.ratio={','.join(map(str, ratios))}",
        f"eval={eval_name}",
        "threads=1",
        "progress=false",
    ]


def env_for(cache: Path) -> dict:
    return dict(
        os.environ,
        PRUNING_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
    )


def startup_floor(cache: Path) -> float:
    """Wall time of a process that only imports what run.py imports for a cell: no cache can save this part."""
    t0, c0 = time.perf_counter(), children_cpu()
    subprocess.run([sys.executable, "-c", "import run, experiments.cell"], cwd=REPO, env=env_for(cache), check=True)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": children_cpu() - c0}


def children_cpu() -> float:
    """User + system CPU seconds of finished child processes: unlike wall time, not inflated while other jobs
    have the cores (on a shared box a low-priority process can wait minutes for a few seconds of CPU)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_sweep(args: list[str], store: Path, cache: Path, sweep_dir: Path) -> dict:
    """One ``python run.py -m ...`` process; returns wall seconds, the cells it reported and the cells it skipped."""
    env = env_for(cache)
    cmd = [sys.executable, "run.py", *args, f"store.dir={store}", f"hydra.sweep.dir={sweep_dir}"]
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("record: ")]
    return {"wall_s": wall, "cpu_s": cpu, "cells": len(lines), "store_hits": sum(SKIPPED in ln for ln in lines)}


def cache_hits(store: Path) -> dict:
    """What the pruned cells of a store reused from the TensorCache, read from their records."""
    from experiments.store import ResultsStore

    calib = stats = stats_hit = pruned = 0
    phases: dict[str, float] = {}
    for rec in ResultsStore(store).records():
        for k, v in rec.get("timings", {}).items():
            phases[k] = phases.get(k, 0.0) + float(v)
        c = rec.get("calibration")
        if not c or not c.get("used"):
            continue
        pruned += 1
        calib += bool(c.get("cached"))
        for entry in c.get("statistics") or []:
            stats += 1
            stats_hit += bool(entry.get("cached"))
    return {
        "calibrated_cells": pruned,
        "calibration_hits": calib,
        "statistics_requests": stats,
        "statistics_hits": stats_hit,
        "phase_seconds": phases,
    }


def shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def fresh(tmp: Path, name: str) -> Path:
    path = tmp / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="stories260k")
    p.add_argument("--methods", nargs="+", default=["llm_pruner", "flap"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3], help="sweep A")
    p.add_argument("--new-ratios", nargs="+", type=float, default=[0.25, 0.35], help="sweep B")
    p.add_argument("--eval", default="quick", help="eval preset of sweep A")
    p.add_argument("--new-eval", default=None, help="eval preset of sweep B (default: --eval)")
    p.add_argument("--repeats", type=int, default=2, help="alternating warm/cleared rounds of sweep B")
    p.add_argument("--quick", action="store_true", help="flap only, one ratio per sweep, one round (tests)")
    p.add_argument("--out", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/bench_sweep_cache.py", *(argv if argv is not None else sys.argv[1:])])
    if args.quick:
        args.methods, args.ratios, args.new_ratios, args.repeats = ["flap"], [0.2], [0.3], 1
    new_eval = args.new_eval or args.eval
    if args.repeats < 1:
        raise PruningError("bench_sweep_cache: --repeats must be >= 1")
    if set(args.ratios) & set(args.new_ratios) and new_eval == args.eval:
        raise PruningError(
            "bench_sweep_cache: sweep B must differ from A (--new-ratios or --new-eval), "
            "else its cells are store hits, not cache hits"
        )
    for group, names in (("method", args.methods), ("eval", [args.eval, new_eval]), ("model", [args.model])):
        missing = [n for n in names if not (REPO / "conf" / group / f"{n}.yaml").is_file()]
        if missing:
            raise PruningError(f"bench_sweep_cache: unknown {group} {missing} (see conf/{group}/)")

    a = sweep_args(args.methods, args.ratios, args.eval, args.model)
    b = sweep_args(args.methods, args.new_ratios, new_eval, args.model)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_sweep_cache.") as tmp:
        tmp = Path(tmp)
        cache_a, store_a = fresh(tmp, "cache_a"), fresh(tmp, "store_a")
        print("cold:    python run.py " + " ".join(a), flush=True)
        cold = run_sweep(a, store_a, cache_a, tmp / "hydra_cold")
        cold.update(cache_hits(store_a))
        print(f"  {cold['wall_s']:.1f} s", flush=True)
        rerun = run_sweep(a, store_a, cache_a, tmp / "hydra_rerun")
        print(f"rerun:   {rerun['wall_s']:.1f} s, {rerun['store_hits']}/{rerun['cells']} store hits", flush=True)
        floor = startup_floor(cache_a)
        print(f"floor:   {floor['wall_s']:.1f} s (python -c 'import run, experiments.cell')", flush=True)
        warm, cleared = [], []
        for r in range(args.repeats):
            order = (("warm", warm), ("cleared", cleared)) if r % 2 == 0 else (("cleared", cleared), ("warm", warm))
            for label, runs in order:
                store = fresh(tmp, f"store_{label}")
                cache = cache_a if label == "warm" else fresh(tmp, "cache_cleared")
                res = run_sweep(b, store, cache, tmp / f"hydra_{label}_{r}")
                res.update(cache_hits(store))
                runs.append(res)
                print(
                    f"{label}:{' ' * (8 - len(label))}{res['wall_s']:.1f} s, calibration hits "
                    f"{res['calibration_hits']}/{res['calibrated_cells']}, statistics hits "
                    f"{res['statistics_hits']}/{res['statistics_requests']}",
                    flush=True,
                )

    med = lambda runs, k="wall_s": statistics.median(r[k] for r in runs)  # noqa: E731
    result = {
        "benchmark": "sweep caching wall time",
        "model": args.model,
        "sweep_a": "python run.py " + " ".join(a),
        "sweep_b": "python run.py " + " ".join(b),
        "cold": cold,
        "rerun": rerun,
        "warm": warm,
        "cleared": cleared,
        "startup_floor_s": floor["wall_s"],
        "startup_floor_cpu_s": floor["cpu_s"],
        "ratio_rerun_over_cold": rerun["wall_s"] / cold["wall_s"],
        "ratio_warm_over_cleared": med(warm) / med(cleared),
        "ratio_rerun_over_cold_cpu": rerun["cpu_s"] / cold["cpu_s"],
        "ratio_warm_over_cleared_cpu": med(warm, "cpu_s") / med(cleared, "cpu_s"),
        "saved_s_rerun": cold["wall_s"] - rerun["wall_s"],
        "saved_s_warm": med(cleared) - med(warm),
        "repeats": args.repeats,
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": {"python": platform.python_version()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result["json"] = shown(args.out / "bench_sweep_cache.json")
    (args.out / "bench_sweep_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "bench_sweep_cache.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    def row(label: str, what: str, runs: list[dict]) -> str:
        walls = [x["wall_s"] for x in runs]
        x = runs[0]
        hits = (
            f"{x['calibration_hits']}/{x['calibrated_cells']} calib, {x['statistics_hits']}/"
            f"{x['statistics_requests']} stats"
            if "calibration_hits" in x
            else "-"
        )
        cpu = statistics.median(x["cpu_s"] for x in runs)
        return (
            f"| {label} | {what} | {statistics.median(walls):.1f} ({', '.join(f'{w:.1f}' for w in walls)}) "
            f"| {cpu:.1f} | {x['store_hits']}/{x['cells']} | {hits} |"
        )

    return "\n".join(
        [
            f"# Sweep caching: wall time of `python run.py -m` sweeps ({r['model']}, threads=1)",
            "",
            (
                f"Generated by `{r['command']}` on {r['date']} ({r['cpu_count']} cores, load average "
                f"{r['loadavg_before'][0]:.2f} before / {r['loadavg_after'][0]:.2f} after; shared machine)."
            ),
            "",
            f"Sweep A: `{r['sweep_a']}`",
            f"Sweep B: `{r['sweep_b']}`",
            "",
            (
                "Each run is one `run.py -m` process (interpreter start, imports and Hydra included) with its own "
                "temporary store (`store.dir`) and `$PRUNING_CACHE` (which also holds the GGUF -> HF conversion of a "
                "GGUF model such as SmolLM2, so a fresh cache converts it again). Hits are read from the records."
            ),
            "",
            (
                "| run | what | wall s, median (runs) | CPU s | store hits / cells "
                "| cache hits (calibration ids, statistics) |"
            ),
            "|---|---|---:|---:|---:|---|",
            row("cold", "A, empty store and cache", [r["cold"]]),
            row("rerun", "A again, same store", [r["rerun"]]),
            row("warm", "B, fresh store, A's cache", r["warm"]),
            row("cleared", "B, fresh store, fresh cache", r["cleared"]),
            "",
            (
                f"Re-running a finished sweep: **{r['ratio_rerun_over_cold']:.3f}x** the cold wall time "
                f"({r['saved_s_rerun']:.1f} s saved). A new sweep on the same calibration: "
                f"**{r['ratio_warm_over_cleared']:.3f}x** the wall time with caches cleared "
                f"({r['saved_s_warm']:.1f} s saved)."
            ),
            (
                "In CPU time of the run.py processes (user + system; not inflated while other jobs hold the cores): "
                f"rerun / cold {r['ratio_rerun_over_cold_cpu']:.3f}x, "
                f"warm / cleared {r['ratio_warm_over_cleared_cpu']:.3f}x."
            ),
            (
                "Floor: starting Python and importing what a cell imports (`python -c 'import run, experiments.cell'`) "
                f"took {r['startup_floor_s']:.1f} s ({r['startup_floor_cpu_s']:.1f} s CPU); "
                "no cache can save that part. The rerun spent "
                f"{r['rerun']['wall_s'] - r['startup_floor_s']:.1f} s beyond it (Hydra's sweep set-up, config hashing, "
                "store lookups)."
            ),
            f"Raw numbers: `{r['json']}`.",
            "",
        ]
    )


if __name__ == "__main__":
    run_main(main)
