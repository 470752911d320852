"""Efficiency of a (pruned) model: parameters, MACs, prefill/decode latency, throughput and peak memory.

MACs are counted in closed form from the layers' actual weight shapes (read through the adapter, so
heterogeneous per-layer widths after surgery are counted as they are), for one forward pass over ``seq_len``
tokens at batch 1:

    per layer   sum over q,k,v,o,gate,up,down of in_features * out_features   (per token)
              + the SliceGPT shortcut matrices' sizes, when the layer has them  (per token)
              + 2 * H_l * d_h * seq_len                                       (per token: Q K^T and A V over the
                                                                               full seq_len x seq_len score matrix,
                                                                               as dense attention kernels compute it)
    lm_head     in_features * out_features                                    (per token)

Embedding lookups, norms, RoPE, SiLU, softmax and residual adds are element-wise and not counted. ``macs_forward``
is the total for the seq_len-token pass (LLM-Pruner's "#MACs" comes from ptflops on a 64-token input, which is
why ``seq_len`` defaults to 64: the formula gives 423.93 G for LLaMA-7B against their 424.02 G, the rest being
element-wise ops ptflops counts); ``macs_per_token`` is that total / seq_len.

Timings are wall-clock at batch 1 with ``torch.inference_mode``: ``warmup`` untimed runs, then ``repeats`` timed
runs; each metric reports the median with the inter-quartile range and min/max, because on a shared machine the
mean is dominated by a few preempted runs. Prefill = one forward over ``seq_len`` prompt tokens (building the KV
cache, as generation does). Decode = ``decode_tokens`` single-token steps with the KV cache after that prompt,
per-token time = step total / decode_tokens. Throughput = tokens / median time of each repeat.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` over one prefill (weights included). CPU: the RSS delta:
Linux's peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` before each prefill and
``peak - RSS before`` is the activation/workspace peak; ``peak_mib`` = parameter+buffer bytes + that delta, so it
is comparable to the CUDA figure. (tracemalloc cannot see torch's allocations, so it is not used.) The allocator
keeps some freed pages, so the CPU delta is a lower bound for small tensors; it is reported per repeat anyway.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pruning.errors import PruningError
from pruning.eval.blocks import config_block
from pruning.models.adapter import adapter_for
from pruning.utils import eval_mode, input_device

MIB = 2**20
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class EfficiencyConfig:
    """The ``eval.efficiency`` block; recorded with the numbers."""

    seq_len: int = 64  # MACs and prefill length (LLM-Pruner's ptflops input length)
    decode_tokens: int = 32  # single-token decode steps per repeat, after a seq_len prompt
    warmup: int = 2
    repeats: int = 10
    measure: bool = True  # false: parameters and MACs only (no timing), e.g. for a quick config check

    def __post_init__(self) -> None:
        for name, lo in (("seq_len", 1), ("decode_tokens", 1), ("warmup", 0), ("repeats", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise PruningError(f"efficiency: {name} must be an int >= {lo}, got {v!r}")

    @classmethod
    def from_cfg(cls, block: Any) -> EfficiencyConfig:
        return config_block(cls, block, "eval.efficiency")


# ----------------------------------------------------------------------------------------------------- MACs


def count_macs(model, seq_len: int) -> dict[str, Any]:
    """Closed-form MACs of one batch-1 forward over ``seq_len`` tokens, from the current layer shapes."""
    adapter = adapter_for(model)
    hd = adapter.head_dim
    per_layer = []
    for layer in adapter.layers:
        proj = sum(getattr(adapter, p)(layer).in_features * getattr(adapter, p)(layer).out_features for p in _PROJ)
        # SliceGPT's residual shortcut matrices (a x m, m x o) are matmuls on every token too
        shortcuts = (getattr(layer, "attn_shortcut_Q", None), getattr(layer, "mlp_shortcut_Q", None))
        proj += sum(q.numel() for q in shortcuts if q is not None)
        heads = adapter.widths(layer).num_heads
        attn = 2 * heads * hd * seq_len
        per_layer.append({"projections_per_token": proj, "attention_per_token": attn})
    head = adapter.lm_head.in_features * adapter.lm_head.out_features
    linear = sum(r["projections_per_token"] for r in per_layer)
    attn = sum(r["attention_per_token"] for r in per_layer)
    per_token = linear + attn + head
    return {
        "macs_forward": per_token * seq_len,
        "macs_per_token": per_token,
        # "mac_breakdown", not "macs_...": readers that look for the headline by the substring "macs" find only
        # the two totals above
        "mac_breakdown": {
            "seq_len": seq_len,
            "projections_per_token": linear,
            "attention_per_token": attn,
            "lm_head_per_token": head,
            "per_layer": per_layer,
        },
    }


# ------------------------------------------------------------------------------------------------- timing


def spread(xs: list[float]) -> dict[str, float]:
    """Median with quartiles and range (``statistics.quantiles`` inclusive method)."""
    xs = sorted(xs)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {
        "median": statistics.median(xs),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """``n`` real tokens (WikiText-2 test text, the PPL text) so timing runs on natural inputs; [1, n]."""
    from pruning.data import ppl_text

    text = ppl_text("wikitext2", "test")
    ids: list[int] = []
    chars = 4 * n + 64
    while len(ids) < n and chars < 4 * len(text):
        ids = tokenizer(text[:chars]).input_ids
        chars *= 2
    if len(ids) < n:
        raise PruningError(f"efficiency: the WikiText-2 test text has only {len(ids)} tokens, fewer than seq_len={n}")
    return torch.tensor([ids[:n]], dtype=torch.long)


def _prefill(model, ids):
    return model(input_ids=ids, use_cache=True)


def time_prefill(model, ids: torch.Tensor, clock=time.perf_counter) -> float:
    """``clock``: wall time by default; any clock whose readings subtract (benchmarks/bench_latency.py also reads
    process CPU time at the same points, which a shared machine's descheduling does not inflate)."""
    device = ids.device
    _sync(device)
    t0 = clock()
    _prefill(model, ids)
    _sync(device)
    return clock() - t0


def time_decode(model, ids: torch.Tensor, steps: int, clock=time.perf_counter) -> float:
    """Seconds per decoded token: ``steps`` greedy single-token steps with the KV cache after prefilling ``ids``."""
    out = _prefill(model, ids)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    device = ids.device
    _sync(device)
    t0 = clock()
    for _ in range(steps):
        out = model(input_ids=nxt.to(device), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return (clock() - t0) / steps


# ------------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def weights_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def peak_prefill_memory(model, ids: torch.Tensor) -> dict[str, Any] | None:
    """One prefill's peak memory in MiB (see module docstring); None when the platform gives no way to measure."""
    device = ids.device
    w = weights_bytes(model) / MIB
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _prefill(model, ids)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / MIB
        return {"peak_mib": peak, "weights_mib": w, "activation_mib": peak - w}
    gc.collect()
    if not _reset_peak_rss():
        return None
    before = _status_kib("VmRSS")
    _prefill(model, ids)
    hwm = _status_kib("VmHWM")
    if before is None or hwm is None:
        return None
    delta = max(hwm - before, 0) / 1024
    return {"peak_mib": w + delta, "weights_mib": w, "activation_mib": delta, "peak_rss_mib": hwm / 1024}


# ------------------------------------------------------------------------------------------------- entry


def efficiency(model, tokenizer, cfg: Any, device=None, progress: bool = True) -> dict[str, Any]:
    """The ``efficiency`` block of a result record."""
    from tqdm.auto import tqdm

    cfg = EfficiencyConfig.from_cfg(cfg)
    adapter = adapter_for(model)
    dtype = next(model.parameters()).dtype
    out: dict[str, Any] = {
        "params": adapter.num_params(),
        **count_macs(model, cfg.seq_len),
        "protocol": {
            **asdict(cfg),
            "batch_size": 1,
            "device": str(input_device(model)),
            "dtype": str(dtype),
            "torch_threads": torch.get_num_threads(),
            "memory_method": None,
        },
    }
    if not cfg.measure:
        return out
    ids = prompt_ids(tokenizer, cfg.seq_len).to(torch.device(device) if device is not None else input_device(model))
    prefill, decode, mem = [], [], []
    with eval_mode(model), torch.inference_mode():
        for _ in range(cfg.warmup):
            time_prefill(model, ids)
            time_decode(model, ids, min(cfg.decode_tokens, 4))
        for _ in tqdm(
            range(cfg.repeats), desc=f"efficiency seq_len={cfg.seq_len}", unit="repeat", disable=not progress, delay=1.0
        ):
            prefill.append(time_prefill(model, ids))
            decode.append(time_decode(model, ids, cfg.decode_tokens))
            m = peak_prefill_memory(model, ids)
            if m is not None:
                mem.append(m)
    out["prefill_latency_s"] = spread(prefill)
    out["decode_latency_s_per_token"] = spread(decode)
    out["prefill_tokens_per_s"] = spread([cfg.seq_len / t for t in prefill])
    out["decode_tokens_per_s"] = spread([1.0 / t for t in decode])
    if mem:
        out["memory"] = {k: mem[0][k] if k == "weights_mib" else spread([m[k] for m in mem]) for k in mem[0]}
        out["protocol"]["memory_method"] = (
            "torch.cuda.max_memory_allocated"
            if ids.device.type == "cuda"
            else "weights + RSS delta (VmHWM reset via /proc/self/clear_refs)"
        )
    return out


def efficiency_table(block: dict[str, Any], dense: dict[str, Any] | None = None):
    """Printable table (median [q1, q3]); with ``dense`` (a different block) a dense column and the ratio."""
    import pandas as pd

    compare = dense is not None and dense is not block
    rows = []

    def add(name: str, get, fmt):
        try:
            p = get(block)
            d = get(dense) if compare else None
        except (KeyError, TypeError):  # e.g. measure: false has no timings
            return
        row = {"metric": name, "value": fmt(p)}
        if compare:
            row = {
                "metric": name,
                "dense": fmt(d),
                "pruned": fmt(p),
                "pruned/dense": f"{_scalar(p) / _scalar(d):.3f}" if _scalar(d) else "-",
            }
        rows.append(row)

    def stat(scale: float = 1.0, digits: int = 3):
        return lambda s: (
            f"{s['median'] * scale:.{digits}f} [{s['q1'] * scale:.{digits}f}, {s['q3'] * scale:.{digits}f}]"
        )

    seq = block["mac_breakdown"]["seq_len"]
    add("params", lambda b: b["params"], lambda v: f"{v:,}")
    add("MACs / token", lambda b: b["macs_per_token"], lambda v: f"{v:,}")
    add(f"MACs (forward, {seq} tok)", lambda b: b["macs_forward"], lambda v: f"{v / 1e9:.4g} G")
    add(f"prefill ms ({seq} tok)", lambda b: b["prefill_latency_s"], stat(1e3))
    add("decode ms / token", lambda b: b["decode_latency_s_per_token"], stat(1e3))
    add("prefill tokens/s", lambda b: b["prefill_tokens_per_s"], stat(1.0, 1))
    add("decode tokens/s", lambda b: b["decode_tokens_per_s"], stat(1.0, 1))
    add("peak memory MiB", lambda b: b["memory"]["peak_mib"], stat(1.0, 2))
    return pd.DataFrame(rows)


def _scalar(v: Any) -> float:
    return float(v["median"]) if isinstance(v, dict) else float(v)
