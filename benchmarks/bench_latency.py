"""Batch-1 CPU latency of SmolLM2-135M pruned at 50% against the dense model (issue 17; target ratio <= 0.6x).

Each method is built from its ``conf/method/<name>.yaml`` through the same Hydra config and the same
``experiments.cell`` pieces a ``python run.py model=smollm2_135m method=<name> pruning.ratio=0.5`` cell uses
(``build_method``, the cached ``calibration``, ``cached_statistics``, ``budget -> prune -> apply``), so the timed
model is the one a user gets. Timing uses ``pruning.eval.efficiency``'s own probes (``time_prefill``,
``time_decode``, ``prompt_ids``: real WikiText-2 test tokens) on one torch thread, batch 1, under
``torch.inference_mode()``:

- prefill of 128 and 512 tokens (one forward that builds the KV cache);
- decode: seconds per token over ``--decode-tokens`` greedy steps after a 128-token prompt.

Repeats are interleaved: every repeat times every model once per metric, the model order rotating by one each
repeat, so a burst of load from other jobs hits dense and pruned alike. The reported ratio is the median of the
paired per-repeat ratios pruned/dense of wall time, with their quartiles; the ratio of medians is stored too.
The same probes also read process CPU time (``clock=``), reported beside it as a ratio that other jobs taking the
core cannot inflate (on a shared box a starved run can take 30x its CPU time in wall time). MACs come from
``efficiency.count_macs`` (closed form from the actual layer shapes; for decode, per token at a 128-token
context).

    python benchmarks/bench_latency.py [--methods llm_pruner shortgpt slicegpt] [--repeats 10] [--ratio 0.5]

Writes results/bench_latency.json and results/bench_latency.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import run_main  # noqa: E402
from pruning.errors import PruningError  # noqa: E402

TARGET = 0.6
PPL_WINDOWS = 8  # a sanity PPL of each timed model on the first ppl128-lp windows (not a result, a smoke check)


def compose(model: str, method: str, ratio: float):
    """The cell config ``python run.py model=<model> method=<method> pruning.ratio=<ratio>`` would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(
            config_name="config",
            overrides=[f"model={model}", f"method={method}", f"pruning.ratio={ratio}", "progress=false"],
        )


def pruned_model(cfg, prune_threads: int | None):
    """load -> budget -> calibration -> prune -> apply, with the cell's own pieces; returns (model, tok, info)."""
    from experiments.cache import TensorCache, dir_fingerprint
    from experiments.cell import build_method, calibration, set_threads
    from pruning.calibration import cached_statistics
    from pruning.models import load_model
    from pruning.models.loading import resolve_checkpoint

    set_threads(prune_threads)
    t0 = time.perf_counter()
    method = build_method(cfg)
    model, tok, adapter = load_model(cfg.model.path, cfg.model.dtype)
    budget = method.budget(model, float(cfg.pruning.ratio))  # infeasible ratio: one error, nothing scored
    fingerprint = dir_fingerprint(resolve_checkpoint(cfg.model.path))
    calib = calibration(cfg, tok, fingerprint, progress=False)[0] if method.needs_calibration else None
    before = adapter.num_params()
    with cached_statistics(TensorCache("statistics"), {"model": fingerprint}):
        plan = method.prune(model, float(cfg.pruning.ratio), calib)
    method.apply(model, plan, calib)
    after = adapter_of(model).num_params()
    return (
        model,
        tok,
        {
            "params_before": before,
            "params_after": after,
            "achieved_ratio": 1 - after / before,
            "planned_ratio": budget.achieved,
            "prune_seconds": time.perf_counter() - t0,
            "widths": [w.as_dict() for w in adapter_of(model).all_widths()],
        },
    )


def adapter_of(model):
    from pruning.models.adapter import adapter_for

    return adapter_for(model)


def sanity_ppl(model, tok) -> float:
    from pruning.eval.perplexity import PPLProtocol, perplexity

    proto = PPLProtocol(
        name="ppl128-lp",
        dataset="wikitext2",
        split="test",
        seq_len=128,
        stride=128,
        bos="once",
        batch_size=PPL_WINDOWS,
        max_windows=PPL_WINDOWS,
    )
    return float(perplexity(model, tok, proto, progress=False)["ppl"])


def macs(model, prefill: list[int], context: int) -> dict:
    from pruning.eval.efficiency import count_macs

    out = {f"prefill_{n}": count_macs(model, n)["macs_forward"] for n in prefill}
    out["decode_per_token"] = count_macs(model, context)["macs_per_token"]
    return out


def both_clocks() -> np.ndarray:
    """Wall and process CPU time read at the same instant: efficiency.py's probes subtract readings, so one timed
    run gives both. With one torch thread CPU time is the compute the model did, which other jobs taking the core
    away (descheduling) cannot inflate; wall time is what a user waits for."""
    return np.array([time.perf_counter(), time.process_time()])


def time_interleaved(
    models: dict, prompts: dict, decode_prompt: torch.Tensor, decode_tokens: int, repeats: int, warmup: int
) -> dict:
    """{model: {metric: [(wall, cpu) seconds per repeat]}}; every repeat times all models, order rotated per repeat."""
    from pruning.eval.efficiency import time_decode, time_prefill

    names = list(models)
    metrics = [f"prefill_{n}" for n in prompts] + ["decode_per_token"]
    times = {m: {k: [] for k in metrics} for m in names}

    def one(model, record: dict | None):
        for n, ids in prompts.items():
            t = time_prefill(model, ids, clock=both_clocks)
            if record is not None:
                record[f"prefill_{n}"].append(t.tolist())
        t = time_decode(model, decode_prompt, decode_tokens, clock=both_clocks)
        if record is not None:
            record["decode_per_token"].append(t.tolist())

    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                one(models[name], None)
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                one(models[name], times[name])
            last = f"prefill_{max(prompts)}"
            print(
                f"repeat {r + 1}/{repeats}: {last} wall/cpu ms "
                + ", ".join(
                    f"{name} {times[name][last][-1][0] * 1e3:.0f}/{times[name][last][-1][1] * 1e3:.0f}"
                    for name in names
                ),
                flush=True,
            )
    return times


def summarize(times: dict, macs_by: dict, dense: str = "dense") -> dict:
    from pruning.eval.efficiency import spread

    out = {}
    for name, per in times.items():
        out[name] = {}
        for metric, pairs in per.items():
            wall, cpu = [p[0] for p in pairs], [p[1] for p in pairs]
            row = {
                "seconds": spread(wall),
                "cpu_seconds": spread(cpu),
                "raw_seconds": wall,
                "raw_cpu_seconds": cpu,
                "macs": macs_by[name][metric],
            }
            if name != dense:
                d_wall = [p[0] for p in times[dense][metric]]
                d_cpu = [p[1] for p in times[dense][metric]]
                row["ratio_paired"] = spread([p / d for p, d in zip(wall, d_wall)])
                row["ratio_paired_cpu"] = spread([p / d for p, d in zip(cpu, d_cpu)])
                row["ratio_of_medians"] = statistics.median(wall) / statistics.median(d_wall)
                row["macs_ratio"] = macs_by[name][metric] / macs_by[dense][metric]
                row["meets_target"] = row["ratio_paired"]["median"] <= TARGET
            out[name][metric] = row
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    names = [n for n in s if n != "dense"]
    lines = [
        (
            f"# Batch-1 latency: {result['model']} pruned at {result['ratio']:.0%} vs dense "
            f"(CPU, {result['torch_threads']} torch thread(s))"
        ),
        "",
        (
            f"Generated by `{result['command']}` on {result['date']} ({result['torch_threads']} torch thread(s), "
            f"{result['cpu_count']} cores, load average {result['loadavg_before'][0]:.2f} before / "
            f"{result['loadavg_after'][0]:.2f} after; the machine is shared, so absolute times move with other jobs, "
            "the interleaved ratios much less)."
        ),
        "",
        (
            f"Prompts: the first {' / '.join(map(str, result['prefill']))} real WikiText-2 test tokens; "
            f"decode: seconds per token over "
            f"{result['decode_tokens']} greedy steps with the KV cache after a {result['decode_prompt']}-token "
            f"prompt. {result['repeats']} interleaved repeats (model order rotated per repeat) after "
            f"{result['warmup']} warm-up rounds. Ratio = median of the paired per-repeat pruned/dense ratios "
            f"[q1, q3] of wall time (the target applies to it); the CPU-time ratio pairs the process CPU time of "
            "the same runs (one thread, so it is the model's compute, not inflated when other jobs take the core); "
            f"MACs ratio from the closed-form count of the actual layer shapes. Target <= {TARGET}x. "
            f"Methods: each `conf/method/<name>.yaml` at `pruning.ratio={result['ratio']}`, pruned as a "
            "`python run.py` cell prunes."
        ),
        "",
        (
            "| model | params (achieved ratio) | metric | wall ms, median [q1, q3] | wall ratio [q1, q3] "
            "| CPU-time ratio [q1, q3] | MACs ratio | target |"
        ),
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name in ["dense", *names]:
        info = result["models"][name]
        for metric, row in s[name].items():
            sec = row["seconds"]
            ms = f"{sec['median'] * 1e3:.1f} [{sec['q1'] * 1e3:.1f}, {sec['q3'] * 1e3:.1f}]"
            if name == "dense":
                ratio, cpu, mr, ok = "1", "1", "1", ""
            else:
                rp, rc = row["ratio_paired"], row["ratio_paired_cpu"]
                ratio = f"**{rp['median']:.3f}** [{rp['q1']:.3f}, {rp['q3']:.3f}]"
                cpu = f"{rc['median']:.3f} [{rc['q1']:.3f}, {rc['q3']:.3f}]"
                mr, ok = f"{row['macs_ratio']:.3f}", "met" if row["meets_target"] else "NOT met"
            lines.append(
                f"| {name} | {info['params_after']:,} ({info['achieved_ratio']:.3f}) | {metric} | {ms} "
                f"| {ratio} | {cpu} | {mr} | {ok} |"
            )
    lines += [
        "",
        f"Sanity PPL of each timed model (first {PPL_WINDOWS} ppl128-lp WikiText-2 windows, not a result): "
        + ", ".join(f"{n} {result['models'][n]['sanity_ppl']:.2f}" for n in ["dense", *names])
        + ".",
        f"Raw numbers: `{result['json']}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m", help="a conf/model/ name")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["llm_pruner", "shortgpt", "slicegpt"],
        help="conf/method/ names; llm_pruner is the headline",
    )
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--prefill", nargs="+", type=int, default=[128, 512])
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (batch-1 latency: 1)")
    p.add_argument("--prune-threads", type=int, default=None, help="torch threads while pruning (default: all)")
    p.add_argument("--out", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/bench_latency.py", *(argv if argv is not None else sys.argv[1:])])
    for name in ("repeats", "decode_tokens", "decode_prompt", "threads"):
        if getattr(args, name) < 1:
            raise PruningError(f"bench_latency: --{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.prefill) or not 0 < args.ratio < 1:
        raise PruningError("bench_latency: --prefill lengths must be >= 1 and 0 < --ratio < 1")
    unknown = [m for m in args.methods if not (REPO / "conf/method" / f"{m}.yaml").is_file()]
    if unknown or not (REPO / "conf/model" / f"{args.model}.yaml").is_file():
        raise PruningError(f"bench_latency: unknown method(s) {unknown} or model {args.model!r} (see conf/)")

    from pruning.eval.efficiency import prompt_ids
    from pruning.models import load_model

    cfgs = {m: compose(args.model, m, args.ratio) for m in args.methods}
    first = next(iter(cfgs.values()))
    models, info = {}, {}
    t0 = time.perf_counter()
    models["dense"], tok, adapter = load_model(first.model.path, first.model.dtype)
    info["dense"] = {
        "params_after": adapter.num_params(),
        "achieved_ratio": 0.0,
        "load_seconds": time.perf_counter() - t0,
    }
    for m, cfg in cfgs.items():
        print(f"pruning {args.model} with {m} at {args.ratio} ...", flush=True)
        models[m], _, info[m] = pruned_model(cfg, args.prune_threads)
        print(
            f"  {info[m]['params_before']:,} -> {info[m]['params_after']:,} params "
            f"({info[m]['achieved_ratio']:.3f}) in {info[m]['prune_seconds']:.0f} s",
            flush=True,
        )
    torch.set_num_threads(args.threads)
    for name, model in models.items():
        model.eval()
        info[name]["sanity_ppl"] = sanity_ppl(model, tok)
    prompts = {n: prompt_ids(tok, n) for n in args.prefill}
    decode_prompt = prompt_ids(tok, args.decode_prompt)
    macs_by = {name: macs(model, args.prefill, args.decode_prompt) for name, model in models.items()}

    # a marker a wrapper can wait for: from here to the end only the timing runs (e.g. to pause other jobs)
    print(f"timing {', '.join(models)}: {args.warmup} warm-up + {args.repeats} repeats ...", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    times = time_interleaved(models, prompts, decode_prompt, args.decode_tokens, args.repeats, args.warmup)
    summary = summarize(times, macs_by)
    headline = args.methods[0]
    result = {
        "benchmark": "batch-1 latency, pruned vs dense",
        "model": args.model,
        "model_path": str(first.model.path),
        "ratio": args.ratio,
        "methods": args.methods,
        "headline_method": headline,
        "headline": {metric: summary[headline][metric]["ratio_paired"]["median"] for metric in summary[headline]},
        "target": TARGET,
        "meets_target": {m: {k: v["meets_target"] for k, v in summary[m].items()} for m in args.methods},
        "prefill": args.prefill,
        "decode_prompt": args.decode_prompt,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing_seconds": time.perf_counter() - t0,
        "models": info,
        "summary": summary,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    js = (args.out / "bench_latency.json").resolve()
    result["json"] = str(js.relative_to(REPO)) if js.is_relative_to(REPO) else str(js)
    (args.out / "bench_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "bench_latency.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    run_main(main)
