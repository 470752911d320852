"""Benchmarks: bad options fail before any model is loaded, SliceGPT's MACs include its shortcut matmuls, and the
one run-all command (tiny sizes) writes json/md whose ratios agree with the raw numbers and with MACs re-derived
from the recorded layer widths."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import STORIES
from pruning import data
from pruning.errors import PruningError

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form_per_token(c, seq: int) -> int:
    """SliceGPT model MACs per token, written from the sliced config's width lists (not from the modules)."""
    hd, total = c.head_dim, c.head_input_dim * c.vocab_size
    for i in range(c.num_hidden_layers):
        a, m, o = c.layer_attn_input_dim[i], c.layer_mlp_input_dim[i], c.layer_mlp_output_dim[i]
        h, kv, inter = c.layer_num_attention_heads[i], c.layer_num_key_value_heads[i], c.layer_intermediate_size[i]
        total += a * h * hd + 2 * a * kv * hd + h * hd * m  # q, k, v, o
        total += 2 * m * inter + inter * o  # gate, up, down
        total += a * m + m * o  # the two residual shortcut matrices
        total += 2 * h * hd * seq  # Q K^T and A V
    return total


def test_sliced_macs_count_shortcuts(stories):
    from pruning.eval.efficiency import count_macs
    from pruning.methods.slicegpt import slicegpt

    model, tok, _ = stories
    calib = data.calibration_batches(tok, "c4", 8, 64, 0, progress=False)
    method = slicegpt(slicing=0.25, progress=False)
    plan = method.prune(model, 0.0, calib)
    method.apply(model, plan, calib)
    c = model.config
    assert c.model_type == "sliced_llama" and c.shortcuts
    for seq in (1, 64):
        got = count_macs(model, seq)
        assert got["macs_per_token"] == closed_form_per_token(c, seq)
        assert got["macs_forward"] == closed_form_per_token(c, seq) * seq


def test_bad_options_fail_before_loading():
    from benchmarks import bench_latency, bench_sweep_cache
    from benchmarks.__main__ import main as run_all

    t0 = time.perf_counter()
    with pytest.raises(PruningError, match="ratio"):
        bench_latency.main(["--ratio", "1.5"])
    with pytest.raises(PruningError, match="unknown method"):
        bench_latency.main(["--methods", "no_such_method"])
    with pytest.raises(PruningError, match="repeats"):
        bench_latency.main(["--repeats", "0"])
    with pytest.raises(PruningError, match="must differ"):
        bench_sweep_cache.main(["--ratios", "0.2", "--new-ratios", "0.2"])
    with pytest.raises(PruningError, match="unknown eval"):
        bench_sweep_cache.main(["--eval", "no_such_eval"])
    with pytest.raises(SystemExit) as e:
        run_all(["--only", "no_such_benchmark"])
    assert e.value.code == 2
    assert time.perf_counter() - t0 < 5  # nothing was loaded or run


def test_each_benchmark_writes_a_json_of_its_own():
    """The runner reads each entry's rows from its json: two entries writing one file (Qwen's latency run over
    SmolLM2's, say) would show one model's numbers under the other's command. Checked on the arguments the runner
    passes, full and quick, without running anything."""
    from benchmarks.__main__ import BENCHMARKS

    out = Path("/out")
    jsons = [b.json for b in BENCHMARKS.values()]
    assert len(set(jsons)) == len(jsons)
    for name, b in BENCHMARKS.items():
        for args in (b.full(out), b.quick(out)):
            if "--json" in args:
                written = Path(args[args.index("--json") + 1])
            else:
                written = Path(args[args.index("--out") + 1]) / Path(b.json).name
            assert written == out / b.json, name


def run_all_quick(tmp_path: Path, *args: str) -> dict:
    """``python -m benchmarks ... --quick``: the runner starts each benchmark script in a process of its own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PRUNING_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_summary(tmp_path)


def read_summary(out: Path) -> dict:
    """benchmarks.json and benchmarks.md as the runner wrote them: every row's ratio is printed with its command."""
    summary = json.loads((out / "benchmarks.json").read_text())
    md = (out / "benchmarks.md").read_text()
    assert summary["rows"], md
    for row in summary["rows"]:
        assert isinstance(row["ratio"], float) and row["ratio"] > 0 and row["pass"] in (True, False)
        assert f"**{row['ratio']:.3f}x**" in md and row["command"] in md
    return summary


@pytest.mark.slow
def test_run_all_sweep_cache_quick(tmp_path):
    summary = run_all_quick(tmp_path, "--only", "sweep_cache")
    assert set(summary["entries"]) == {"sweep_cache"} and summary["entries"]["sweep_cache"]["status"] == "ok"
    r = json.loads((tmp_path / "bench_sweep_cache.json").read_text())
    assert (tmp_path / "bench_sweep_cache.md").is_file()
    # the rerun was all store hits; the warm sweep hit calibration ids and FLAP's statistics; cleared hit nothing
    assert r["rerun"]["store_hits"] == r["rerun"]["cells"] == r["cold"]["cells"] == 1  # one flap cell
    assert r["cold"]["store_hits"] == 0
    (warm,), (cleared,) = r["warm"], r["cleared"]
    assert warm["calibration_hits"] == warm["calibrated_cells"] == 1
    assert warm["statistics_hits"] == warm["statistics_requests"] >= 1
    assert cleared["calibration_hits"] == cleared["statistics_hits"] == 0 and cleared["statistics_requests"] >= 1
    assert r["ratio_rerun_over_cold"] == pytest.approx(r["rerun"]["wall_s"] / r["cold"]["wall_s"])
    assert r["ratio_warm_over_cleared"] == pytest.approx(warm["wall_s"] / cleared["wall_s"])
    assert all(0 < x["cpu_s"] for x in (r["cold"], r["rerun"], warm, cleared))
    assert r["ratio_rerun_over_cold_cpu"] == pytest.approx(r["rerun"]["cpu_s"] / r["cold"]["cpu_s"])
    assert r["ratio_warm_over_cleared_cpu"] == pytest.approx(warm["cpu_s"] / cleared["cpu_s"])
    rows = summary["rows"]
    assert [x["ratio"] for x in rows] == pytest.approx([r["ratio_rerun_over_cold"], r["ratio_warm_over_cleared"]])


def test_latency_quick_in_process(tmp_path, monkeypatch):
    """The runner's quick latency settings, run here, then the runner's table rebuilt from the json it wrote."""
    from benchmarks import bench_latency
    from benchmarks.__main__ import BENCHMARKS
    from benchmarks.__main__ import main as run_all

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    assert bench_latency.main(BENCHMARKS["latency"].quick(tmp_path)) == 0
    assert run_all(["--rebuild", "--out", str(tmp_path)]) == 0
    check_latency(tmp_path, read_summary(tmp_path))


@pytest.mark.slow
def test_run_all_latency_quick(tmp_path):  # ~7 s on an idle 2-core box: pruning + timing stories260K
    check_latency(tmp_path, run_all_quick(tmp_path, "--only", "latency"))


def check_latency(tmp_path: Path, summary: dict) -> None:
    r = json.loads((tmp_path / "bench_latency.json").read_text())
    assert r["torch_threads"] == 1 and r["methods"] == ["llm_pruner"]
    info = r["models"]["llm_pruner"]
    assert info["params_after"] < info["params_before"] and abs(info["achieved_ratio"] - 0.5) < 0.05
    from pruning.models import load_model

    c = load_model(STORIES)[0].config
    d, hd = c.hidden_size, c.head_dim

    def macs(widths, seq):  # per-layer widths as recorded after surgery; tied embedding -> lm_head d x V
        per_token = d * c.vocab_size + sum(
            2 * d * w["num_heads"] * hd
            + 2 * d * w["num_kv_heads"] * hd
            + 3 * d * w["intermediate_size"]
            + 2 * w["num_heads"] * hd * seq
            for w in widths
        )
        return per_token * seq

    dense_w = [
        {
            "num_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads,
            "intermediate_size": c.intermediate_size,
        }
    ] * c.num_hidden_layers
    s = r["summary"]
    for n in r["prefill"]:
        key = f"prefill_{n}"
        assert s["dense"][key]["macs"] == macs(dense_w, n)
        assert s["llm_pruner"][key]["macs"] == macs(info["widths"], n)
        assert s["llm_pruner"][key]["macs_ratio"] == pytest.approx(macs(info["widths"], n) / macs(dense_w, n))
    for key, row in s["llm_pruner"].items():  # interleaved: one paired ratio per repeat, per metric
        dense_raw, raw = s["dense"][key]["raw_seconds"], row["raw_seconds"]
        assert len(raw) == len(dense_raw) == r["repeats"] == 2
        assert row["ratio_paired"]["median"] == pytest.approx(
            statistics.median([p / q for p, q in zip(raw, dense_raw)])
        )
        cpu, dense_cpu = row["raw_cpu_seconds"], s["dense"][key]["raw_cpu_seconds"]
        assert all(x > 0 for x in cpu + dense_cpu)
        assert row["ratio_paired_cpu"]["median"] == pytest.approx(
            statistics.median([p / q for p, q in zip(cpu, dense_cpu)])
        )
    assert len(summary["rows"]) == 3 and all(x["benchmark"] == "latency" for x in summary["rows"])
