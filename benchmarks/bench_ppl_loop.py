"""Overhead of the PPL eval loop over a bare forward loop, on SmolLM2-135M (issue 16; target ratio <= 1.15x).

Both loops see the same token windows (the ppl128-lp WikiText-2 windows, first ``--windows``) in the same batches
under ``torch.inference_mode()``; the bare loop only runs ``model(input_ids=batch, use_cache=False)``, the eval
loop is ``pruning.eval.perplexity.perplexity`` (data read + token-cache lookup + forward + NLL + progress
accounting). Repeats alternate eval/bare so drift in machine load hits both; the ratio is median eval time over
median bare time (= bare tokens/s over eval tokens/s), with the paired per-repeat ratios reported too.

    python benchmarks/bench_ppl_loop.py [--windows 48 --batch-size 16 --repeats 5 --threads N]

Writes results/bench_ppl_loop.json and results/bench_ppl_loop.md.
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

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks import run_main  # noqa: E402
from pruning.data import ppl_text  # noqa: E402
from pruning.eval.perplexity import PPLProtocol, perplexity, token_windows  # noqa: E402
from pruning.models import load_model  # noqa: E402

TARGET = 1.15


def model_path() -> str:
    """The same spec ``python run.py model=smollm2_135m`` loads."""
    return OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml").model.path


def bare_loop(model, windows: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size], use_cache=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=48, help="first N ppl128-lp WikiText-2 windows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "results")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. all cores)")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/bench_ppl_loop.py", *(argv if argv is not None else sys.argv[1:])])
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    model, tok, _ = load_model(model_path())
    load_s = time.perf_counter() - t0
    proto = PPLProtocol(
        name="ppl128-lp",
        dataset="wikitext2",
        split="test",
        seq_len=128,
        stride=128,
        bos="once",
        batch_size=args.batch_size,
        max_windows=args.windows,
    )
    ids = torch.tensor(tok(ppl_text(proto.dataset, proto.split)).input_ids)  # the loop's own tokenisation
    windows = token_windows(ids, proto).input_ids
    n_tokens = windows.numel()

    # Warm-up: fills the eval loop's token cache (tokenising the whole text is not loop cost) and the allocator.
    ref = perplexity(model, tok, proto, progress=False)
    bare_loop(model, windows, args.batch_size)

    # Wall time is what a user waits for; process CPU time is reported too because on a shared machine it is
    # less sensitive to being descheduled by other jobs.
    eval_s, bare_s, eval_cpu, bare_cpu, ppls = [], [], [], [], []
    load_before = os.getloadavg()
    for r in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        ppls.append(perplexity(model, tok, proto, progress=False)["ppl"])
        eval_s.append(time.perf_counter() - t)
        eval_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        bare_loop(model, windows, args.batch_size)
        bare_s.append(time.perf_counter() - t)
        bare_cpu.append(time.process_time() - c)
        print(
            f"repeat {r}: eval {n_tokens / eval_s[-1]:.0f} tok/s, bare {n_tokens / bare_s[-1]:.0f} tok/s, "
            f"ratio {eval_s[-1] / bare_s[-1]:.3f}",
            flush=True,
        )
    assert all(x == ref["ppl"] for x in ppls), "the eval loop is not deterministic"

    ratio = statistics.median(eval_s) / statistics.median(bare_s)
    paired = [e / b for e, b in zip(eval_s, bare_s)]
    result = {
        "benchmark": "ppl eval loop vs bare forward loop",
        "model": "smollm2_135m",
        "model_path": model_path(),
        "protocol": proto.to_record(),
        "n_windows": int(windows.shape[0]),
        "tokens_per_pass": n_tokens,
        "repeats": args.repeats,
        "eval_loop": {"seconds": eval_s, "median_tokens_per_s": n_tokens / statistics.median(eval_s)},
        "bare_loop": {"seconds": bare_s, "median_tokens_per_s": n_tokens / statistics.median(bare_s)},
        "ratio_median": ratio,
        "ratio_paired": paired,
        "ratio_paired_median": statistics.median(paired),
        "eval_cpu_seconds": eval_cpu,
        "bare_cpu_seconds": bare_cpu,
        "ratio_cpu_median": statistics.median(eval_cpu) / statistics.median(bare_cpu),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "ppl": ref["ppl"],
        "model_load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ppl_loop.json").write_text(json.dumps(result, indent=1) + "\n")
    e, b = result["eval_loop"]["median_tokens_per_s"], result["bare_loop"]["median_tokens_per_s"]
    md = f"""# PPL eval loop vs bare forward loop (SmolLM2-135M, CPU)

Generated by `{command}` on {result["date"]} ({result["torch_threads"]} torch threads, load average
{load_before[0]:.2f} before / {result["loadavg_after"][0]:.2f} after; the machine is shared, so absolute tokens/s move
with other jobs, the ratio much less).

Same {result["n_windows"]} ppl128-lp WikiText-2 test windows ({n_tokens:,} tokens) in batches of {args.batch_size},
both under `torch.inference_mode()`, {args.repeats} alternating repeats, medians:

| loop | tokens/s (median) | seconds per pass (median) |
|---|---:|---:|
| bare `model(input_ids=batch)` | {b:,.0f} | {statistics.median(bare_s):.2f} |
| `pruning.eval.perplexity` | {e:,.0f} | {statistics.median(eval_s):.2f} |

Ratio (eval time / bare time): **{ratio:.3f}x** (paired per-repeat median {result["ratio_paired_median"]:.3f}x,
process CPU time {result["ratio_cpu_median"]:.3f}x; target <= {TARGET}x: {"met" if result["meets_target"] else "NOT met"}).
PPL on these windows: {ref["ppl"]:.4f}.
Raw numbers: `results/bench_ppl_loop.json`.
"""  # noqa: E501 - the generated Markdown's own line
    (args.out / "bench_ppl_loop.md").write_text(md)
    print(md)
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    run_main(main)
