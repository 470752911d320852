"""Run every benchmark (each in its own process) and write the ratios to results/benchmarks.{md,json}.

    python -m benchmarks                                 # all of them (tens of minutes on a busy 2-core box)
    python -m benchmarks --only latency sweep_cache      # a subset; the other rows keep their last measurement
    python -m benchmarks --quick                         # stories260K-sized smoke run, into runs/benchmarks_quick/
    python -m benchmarks --rebuild                       # only rewrite results/benchmarks.md from the jsons

Each benchmark script writes its own ``<out>/bench_<name>.json`` (and .md); this runner only launches the scripts
with the settings below, checks that each wrote a fresh json, and reads the headline ratio back from it, so a
number in the table is always the one the script recorded. A benchmark that misses its target still counts as
run (exit 0); one that crashes or writes no json is an error (exit 1). Scripts that are absent (e.g. a benchmark
still being written) are skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HEADLINE_MODEL = "smollm2_135m"
QWEN = "qwen25_coder_05b"  # the second real model (issue 26); its rows live under results/<QWEN>/


@dataclass
class Bench:
    script: str
    full: Callable[[Path], list[str]]  # args for the measured run, given the output dir
    quick: Callable[[Path], list[str]]  # args for a smoke run
    json: str
    rows: Callable[[Any], list[dict]]  # the loaded JSON (a dict, or a list) -> table rows


def _row(benchmark: str, compared: str, ratio: float, target: str, passed: bool | None, detail: str = "") -> dict:
    return {
        "benchmark": benchmark,
        "compared": compared,
        "ratio": float(ratio),
        "detail": detail,
        "target": target,
        "pass": passed,
    }


def _ppl_rows(r: dict) -> list[dict]:
    return [
        _row(
            "ppl_loop",
            f"PPL eval wall time / bare HF forward loop ({r['model']}, {r['tokens_per_pass']:,} "
            f"tokens, {r['torch_threads']} threads)",
            r["ratio_median"],
            f"<= {r['target']}",
            r["ratio_median"] <= r["target"],
            f"paired median {r['ratio_paired_median']:.3f}",
        )
    ]


def _pick_model(rows: list[dict]) -> str:
    models = [r["model"] for r in rows]
    return HEADLINE_MODEL if HEADLINE_MODEL in models else models[0]


def _taylor_rows(rows: list) -> list[dict]:
    model = _pick_model(rows)
    mine = [r for r in rows if r["model"] == model and r["variant"] == "element1"] or [
        r for r in rows if r["model"] == model
    ]
    default = next((r for r in mine if r["regime"] == "one-pass"), mine[0])
    best = min(mine, key=lambda r: r["peak"])
    out = [
        _row(
            "taylor_memory",
            f"Taylor ({default['variant']}) scoring peak / weight bytes, {model}, default ({default['regime']})",
            default["peak"],
            "<= 1.5",
            default["peak"] <= 1.5,
            f"state {default['state']:.2f}, official way {default['official']:.2f}",
        )
    ]
    if best is not default:
        out.append(
            _row(
                "taylor_memory",
                f"Taylor ({best['variant']}) scoring peak / weight bytes, {model}, best setting ({best['regime']})",
                best["peak"],
                "<= 1.5",
                best["peak"] <= 1.5,
                f"state {best['state']:.2f}",
            )
        )
    return out


def _layerwise_rows(r: dict) -> list[dict]:
    rows = r["rows"]
    model = _pick_model(rows)
    return [
        _row(
            "layerwise_memory",
            f"Taylor scoring peak / weight bytes, {model}, method.memory.layerwise=true, "
            f"calibration {x['calibration']}",
            x["peak_ratio"],
            "<= 1.5",
            x["peak_ratio"] <= 1.5,
            f"layer-wise / whole-model peak {x['lw_over_whole_peak']:.3f}",
        )
        for x in rows
        if x["model"] == model and x["mode"] == "layer-wise"
    ]


def _latency_rows(r: dict) -> list[dict]:
    out = []
    for method in r["methods"]:
        info = r["models"][method]
        for metric, s in r["summary"][method].items():
            what = metric.replace("prefill_", "prefill ").replace("decode_per_token", "decode / token")
            rp = s["ratio_paired"]
            out.append(
                _row(
                    "latency",
                    f"{what} latency, {r['model']} {method} at {r['ratio']:.0%} "
                    f"(achieved {info['achieved_ratio']:.3f}) / dense, batch 1, {r['torch_threads']} thread(s)",
                    rp["median"],
                    f"<= {r['target']}",
                    s["meets_target"],
                    f"wall [q1 {rp['q1']:.3f}, q3 {rp['q3']:.3f}]; CPU time "
                    f"{s['ratio_paired_cpu']['median']:.3f}; MACs ratio {s['macs_ratio']:.3f}",
                )
            )
    return out


def _sweep_rows(r: dict) -> list[dict]:
    return [
        _row(
            "sweep_cache",
            f"{r['model']}, `{r['sweep_a'].split(' -m ')[1]}`: re-run of the finished sweep (all "
            "store hits) / cold sweep, wall time",
            r["ratio_rerun_over_cold"],
            "< 1",
            r["ratio_rerun_over_cold"] < 1,
            f"{r['saved_s_rerun']:.1f} s saved; CPU time {r['ratio_rerun_over_cold_cpu']:.3f}; "
            f"process start floor {r['startup_floor_s']:.1f} s",
        ),
        _row(
            "sweep_cache",
            f"{r['model']}: new sweep (other ratios), same calibration (calibration ids + "
            "statistics cache hits) / the same with caches cleared, wall time",
            r["ratio_warm_over_cleared"],
            "< 1",
            r["ratio_warm_over_cleared"] < 1,
            f"{r['saved_s_warm']:.1f} s saved; CPU time {r['ratio_warm_over_cleared_cpu']:.3f}",
        ),
    ]


def _typo_rows(r: dict) -> list[dict]:
    return [
        _row(
            "typo_latency",
            f"a typo's error line ({x['command']}) / `python -c pass`, wall time",
            x["ratio_to_python_c_pass"],
            f"< {r['target_s']:g} s absolute",
            x["under_target"],
            f"{x['median_wall_s']:.3f} s wall (max {x['max_wall_s']:.3f}), {x['median_cpu_s']:.3f} s CPU",
        )
        for x in r["rows"]
        if x["under_target"] is not None
    ]


BENCHMARKS: dict[str, Bench] = {
    "ppl_loop": Bench(
        "benchmarks/bench_ppl_loop.py",
        lambda out: ["--out", str(out)],
        lambda out: ["--windows", "4", "--batch-size", "4", "--repeats", "2", "--out", str(out)],
        "bench_ppl_loop.json",
        _ppl_rows,
    ),
    "taylor_memory": Bench(
        "benchmarks/bench_taylor_memory.py",
        lambda out: ["--variants", "element1", "--json", str(out / "bench_taylor_memory.json")],
        lambda out: [
            "--models",
            "stories260k",
            "--variants",
            "element1",
            "--json",
            str(out / "bench_taylor_memory.json"),
        ],
        "bench_taylor_memory.json",
        _taylor_rows,
    ),
    "layerwise_memory": Bench(
        "benchmarks/bench_layerwise_memory.py",
        lambda out: ["--out", str(out)],
        lambda out: ["--models", "stories260k", "--shapes", "4x32", "--out", str(out)],
        "bench_layerwise_memory.json",
        _layerwise_rows,
    ),
    "latency": Bench(
        "benchmarks/bench_latency.py",
        lambda out: ["--out", str(out)],
        lambda out: [
            "--model",
            "stories260k",
            "--methods",
            "llm_pruner",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--prefill",
            "32",
            "64",
            "--decode-tokens",
            "4",
            "--out",
            str(out),
        ],
        "bench_latency.json",
        _latency_rows,
    ),
    "typo_latency": Bench(
        "benchmarks/typo_latency.py",
        lambda out: ["--out", str(out)],
        lambda out: ["--repeats", "2", "--out", str(out)],
        "bench_typo_latency.json",
        _typo_rows,
    ),
    "sweep_cache": Bench(
        "benchmarks/bench_sweep_cache.py",
        lambda out: ["--out", str(out)],
        lambda out: ["--quick", "--out", str(out)],
        "bench_sweep_cache.json",
        _sweep_rows,
    ),
    # the same sweeps on the table model, where a calibration-statistics pass costs minutes, not seconds
    "sweep_cache_smollm2": Bench(
        "benchmarks/bench_sweep_cache.py",
        lambda out: [
            "--model",
            "smollm2_135m",
            "--methods",
            "flap",
            "--ratios",
            "0.2",
            "--new-ratios",
            "0.3",
            "--repeats",
            "1",
            "--out",
            str(out / "sweep_cache_smollm2"),
        ],
        lambda out: ["--quick", "--out", str(out / "sweep_cache_smollm2")],
        "sweep_cache_smollm2/bench_sweep_cache.json",
        _sweep_rows,
    ),
    # the memory and latency benchmarks again on the second real family, 4.7x SmolLM2's size (Qwen2: q/k/v biases,
    # GQA 14/2, untied head), written under results/qwen25_coder_05b/ so SmolLM2's rows stay
    "taylor_memory_qwen": Bench(
        "benchmarks/bench_taylor_memory.py",
        lambda out: [
            "--models",
            QWEN,
            "--variants",
            "element1",
            "--json",
            str(out / QWEN / "bench_taylor_memory.json"),
        ],
        lambda out: [
            "--models",
            "stories260k",
            "--variants",
            "element1",
            "--json",
            str(out / QWEN / "bench_taylor_memory.json"),
        ],
        f"{QWEN}/bench_taylor_memory.json",
        _taylor_rows,
    ),
    "layerwise_memory_qwen": Bench(
        "benchmarks/bench_layerwise_memory.py",
        lambda out: ["--models", QWEN, "--shapes", "10x64", "32x128", "--out", str(out / QWEN)],
        lambda out: ["--models", "stories260k", "--shapes", "4x32", "--out", str(out / QWEN)],
        f"{QWEN}/bench_layerwise_memory.json",
        _layerwise_rows,
    ),
    "latency_qwen": Bench(
        "benchmarks/bench_latency.py",
        # LLM-Pruner cannot reach 50% of all parameters here (untied embedding + head = 43% of them, never pruned;
        # layers 3..22 only): it gets its own row at the largest ratio it can reach, below. ShortGPT and SliceGPT
        # take the ratio sweep's CPU-size calibration (their full ones are far slower at this size); the pruned shapes,
        # so the timed work, depend only on the ratio
        lambda out: ["--model", QWEN, "--methods", "shortgpt_cpu", "slicegpt_cpu", "--out", str(out / QWEN)],
        lambda out: BENCHMARKS["latency"].quick(out / QWEN),
        f"{QWEN}/bench_latency.json",
        _latency_rows,
    ),
    "latency_qwen_llm_pruner": Bench(
        "benchmarks/bench_latency.py",
        lambda out: [
            "--model",
            QWEN,
            "--methods",
            "llm_pruner",
            "--ratio",
            "0.44",
            "--out",
            str(out / QWEN / "latency_llm_pruner"),
        ],
        lambda out: BENCHMARKS["latency"].quick(out / QWEN / "latency_llm_pruner"),
        f"{QWEN}/latency_llm_pruner/bench_latency.json",
        _latency_rows,
    ),
}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = (
            next(
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            )
            or cpu
        )
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "host": platform.node()}


def shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_one(name: str, bench: Bench, out: Path, quick: bool) -> dict:
    args = (bench.quick if quick else bench.full)(out)
    command = " ".join(["python", bench.script, *[shown(Path(a)) if a.startswith("/") else a for a in args]])
    entry = {
        "command": command,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "quick": quick,
    }
    if not (REPO / bench.script).is_file():
        return dict(entry, status="absent")
    print(f"\n=== {name}: {command}", flush=True)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, bench.script, *args],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled"),
    )
    js = out / bench.json
    fresh = js.is_file() and js.stat().st_mtime >= t0
    entry.update(wall_s=time.time() - t0, returncode=proc.returncode, status="ok" if fresh else "error")
    if not fresh:
        print(f"=== {name}: no fresh {shown(js)} (exit {proc.returncode})", file=sys.stderr, flush=True)
    return entry


def untracked(js: Path) -> dict | None:
    """A benchmark json written by running its script by hand: its own command/date/load when it records them."""
    if not js.is_file():
        return None
    r = json.loads(js.read_text())
    r = r if isinstance(r, dict) else {}
    mtime = dt.datetime.fromtimestamp(js.stat().st_mtime, dt.UTC).isoformat(timespec="seconds")
    return {
        "command": r.get("command", f"(by hand; see {js.name})"),
        "started": r.get("date", mtime),
        "loadavg_start": r.get("loadavg_before"),
        "status": "ok",
        "quick": r.get("quick", False),
    }


def table(entries: dict, out: Path, mach: dict) -> tuple[list[dict], str]:
    rows: list[dict] = []
    lines = [
        "# Benchmarks",
        "",
        (
            f"Written by `python -m benchmarks` (this page: {', '.join(f'{k}: {v}' for k, v in mach.items())}). "
            "Each row is read from the json its benchmark wrote; the date, the load average and the machine are "
            "those of that benchmark's run (the machine is shared, so absolute times move; the ratios are paired "
            "or interleaved)."
        ),
        "",
        "| benchmark | what is compared | measured ratio | detail | target | pass | command | date | load avg | cpu |",
        "|---|---|---:|---|---|---|---|---|---:|---|",
    ]
    for name, bench in BENCHMARKS.items():
        e = entries.get(name) or untracked(out / bench.json)
        if e is None or e.get("status") == "absent":
            why = "not run yet" if (REPO / bench.script).is_file() else "script not present"
            lines.append(f"| {name} | {why} | | | | | `python {bench.script}` | | |")
            continue
        js = out / bench.json
        if e.get("status") != "ok" or not js.is_file():
            lines.append(
                f"| {name} | ERROR (exit {e.get('returncode')}, no json) | | | | FAIL | `{e['command']}` "
                f"| {e['started']} | {e['loadavg_start'][0]:.2f} |"
            )
            continue
        try:
            measured = bench.rows(json.loads(js.read_text()))
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a json from an older script version
            lines.append(
                f"| {name} | unreadable {js.name} ({type(exc).__name__}: {exc}); rerun it | | | | FAIL "
                f"| `{e['command']}` | {e['started']} | |"
            )
            continue
        for r in measured:
            load = e["loadavg_start"][0] if e.get("loadavg_start") else None
            r = dict(r, command=e["command"], date=e["started"], loadavg_start=load, quick=e.get("quick", False))
            rows.append(r)
            verdict = "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
            label = f"{name} (quick)" if r["quick"] else name
            cpu = (e.get("machine") or {}).get("cpu", "?")
            lines.append(
                f"| {label} | {r['compared']} | **{r['ratio']:.3f}x** | {r['detail']} | {r['target']} "
                f"| {verdict} | `{r['command']}` | {r['date']} | "
                f"{'?' if load is None else f'{load:.2f}'} | {cpu} |"
            )
    details = [
        shown(out / b.json.replace(".json", ".md"))
        for b in BENCHMARKS.values()
        if (out / b.json.replace(".json", ".md")).is_file()
    ]
    lines += ["", "Per-benchmark details: `" + "`, `".join(details) + "`; raw rows: `benchmarks.json`.", ""]
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pruning-lab bench", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these; keep the others' last rows")
    p.add_argument("--quick", action="store_true", help="tiny sizes (stories260K) for a smoke test")
    p.add_argument("--rebuild", action="store_true", help="run nothing; rewrite benchmarks.md from the jsons")
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default results/, or runs/benchmarks_quick/ with --quick)"
    )
    args = p.parse_args(argv)
    out = (args.out or (REPO / "runs" / "benchmarks_quick" if args.quick else REPO / "results")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "benchmarks.json"
    previous = json.loads(summary.read_text()).get("entries", {}) if summary.is_file() else {}
    mach = machine()
    start = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "loadavg": os.getloadavg()}
    entries = dict(previous)

    def write() -> str:  # after every benchmark, so an interrupted run keeps what it measured
        rows, md = table(entries, out, mach)
        summary.write_text(
            json.dumps({"machine": mach, "last_run": start, "entries": entries, "rows": rows}, indent=1) + "\n"
        )
        (out / "benchmarks.md").write_text(md)
        return md

    md = write()
    for name in [] if args.rebuild else args.only or list(BENCHMARKS):
        entries[name] = {**run_one(name, BENCHMARKS[name], out, args.quick), "machine": mach}
        md = write()
    print("\n" + md)
    ran = [] if args.rebuild else [entries[n] for n in args.only or list(BENCHMARKS)]
    return 1 if any(e.get("status") == "error" for e in ran) else 0


if __name__ == "__main__":
    sys.exit(main())
