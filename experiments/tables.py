"""Records -> tables laid out like the papers' tables, with the published numbers beside ours.

Why a table only takes matching protocols: a PPL at seq 128 and one at seq 2048 differ by 2x on the same model, and
a 50-window PPL is not the test-set PPL. So each table names its protocols (METHODS.md §1.4/§1.5); a record's PPL
entry lands in a column only when its protocol name *and* fields (seq_len, stride, BOS, dataset, split) agree, and a
window-limited entry (or a `limit`-ed zero-shot run) gets its own column labelled "[first N windows]" / "[limit N]".
Published values come from experiments/anchors.csv for the same paper, method and ratio and sit in rows whose source
says "published (<block>)", with the full source in the footnotes; they are never averaged with ours.

Generic by construction: a new method appears as a row under its `plan.meta.method` name, a new zero-shot task
block is read from `metrics["zeroshot"]`, and rows of one method that differ in config (structures, allocation,
calibration, ...) are told apart by the differing config values in the label. Seeds are aggregated into
mean ± std (n = number of seeds); the dense row of a model is its dense evaluation per protocol column.

CLI: ``python -m experiments.tables --store DIR --table llm_pruner_t1 --out results/`` (or ``--all``) writes
``<name>.md``, ``<name>.tex`` and ``<name>.csv``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from experiments import anchors as anchors_mod
from experiments.paper_ratios import label_for
from experiments.record import NON_SEMANTIC, is_number
from experiments.store import ResultsStore, _markdown, _name

# ---------------------------------------------------------------------------------------------------------------
# Protocols and names

# Fields a PPL entry must carry for its protocol name to be believed (METHODS.md §1.4).
PPL_PROTOCOLS: dict[str, dict[str, Any]] = {
    "ppl128-lp": {"seq_len": 128, "stride": 128, "bos": "once"},
    "ppl2048-sl": {"seq_len": 2048, "stride": 2048, "bos": "once"},
    "ppl2048-lp": {"seq_len": 2048, "stride": 2048, "bos": "once"},
    "ppl2048-sg": {"seq_len": 2048, "stride": 2048, "bos": "once"},
    "ppl512-nv": {"seq_len": 512, "stride": 512},
}

# Zero-shot task ids as the anchors spell them; lm-eval's names map onto them.
TASK_ALIASES = {"arc_easy": "arc_e", "arc_challenge": "arc_c", "openbookqa": "obqa", "winogrande_xl": "winogrande"}
TASK_HEADERS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
                "arc_e": "ARC-e", "arc_c": "ARC-c", "obqa": "OBQA"}
# METHODS.md §1.5: the metric each paper's table used per task.
ZS_LP = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_e": "acc",
         "arc_c": "acc_norm", "obqa": "acc_norm"}
ZS_SG = {"piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc", "arc_e": "acc_norm", "arc_c": "acc_norm"}

# Our method names -> the anchors' method ids (ANCHORS.md "method IDs").
ANCHOR_ALIASES = {"magnitude_l2": "l2"}
# The papers' baselines prune KV groups (heads) and MLP channels; another structure set is another method
# (random decoder-layer removal is not LLM-Pruner's "random"), so its anchor id gets a suffix that matches nothing.
ANCHOR_STRUCTURES = frozenset({"kv_group", "mlp"})

DATASET_HEADERS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}


def task_id(name: str) -> str:
    name = str(name).lower()
    return TASK_ALIASES.get(name, name)


def _pct(value: float) -> float:
    """lm-eval reports fractions; the papers print percent. A value > 1 is taken as already in percent."""
    return 100.0 * value if abs(value) <= 1.0 else value


def method_name(record: Mapping) -> str:
    meta = ((record.get("plan") or {}).get("meta") or {})
    name = meta.get("method") or _name((record.get("config") or {}).get("method")) or "?"
    return str(name)


def _recovery(record: Mapping) -> str | None:
    rec = (record.get("config") or {}).get("recovery") or {}
    name = rec.get("name") if isinstance(rec, Mapping) else rec
    return None if name in (None, "none") else str(name)


def anchor_method(record: Mapping, recovered: bool = True) -> str:
    """The anchors' method id for a record: `plan.meta.anchor_method` if the method sets one, else its name with
    ANCHOR_ALIASES, `llm_pruner/<importance>` (block strategy) or `llm_pruner/channel`, a `[structures]` suffix
    when the method prunes other structures than KV groups + MLP channels, and `+<recovery>` after recovery."""
    meta = ((record.get("plan") or {}).get("meta") or {})
    base = meta.get("anchor_method")
    if not base:
        base = ANCHOR_ALIASES.get(method_name(record), method_name(record))
        mcfg = (record.get("config") or {}).get("method") or {}
        if base.startswith("llm_pruner"):   # llm_pruner_<importance>[_channel] -> the anchors' LLM-Pruner ids
            strategy = mcfg.get("strategy") or ("channel" if base.endswith("_channel") else "block")
            variant = mcfg.get("importance") or base[len("llm_pruner_"):].removesuffix("_channel")
            base = "llm_pruner/channel" if strategy == "channel" else f"llm_pruner/{variant}"
        structures = mcfg.get("structures") if isinstance(mcfg, Mapping) else None
        if isinstance(structures, list) and set(structures) != ANCHOR_STRUCTURES:
            base = f"{base}[{'+'.join(map(str, structures))}]"
    rec = _recovery(record)
    return f"{base}+{rec}" if (recovered and rec) else str(base)


# The native knobs (METHODS.md §1.3) by config key; a record made before the knob was recorded is read from its config.
NATIVE_KNOBS = ("group_ratio", "attn_mlp_ratio", "sparsity", "slicing", "n_blocks", "inheriting_ratio", "unit_ratio")


def record_operating_point(record: Mapping) -> dict | None:
    """{knob, value, meaning} when a native knob defined the cell, None when pruning.ratio did."""
    params = record.get("params") or {}
    if "operating_point" in params:
        return params["operating_point"]
    mcfg = (record.get("config") or {}).get("method") or {}
    for knob in NATIVE_KNOBS:
        if isinstance(mcfg, Mapping) and is_number(mcfg.get(knob)):
            return {"knob": f"method.{knob}", "value": float(mcfg[knob]), "meaning": None}
    return None


def paper_ratio(record: Mapping) -> float | None:
    """The ratio a paper prints for this cell: from the native knob by each paper's convention (METHODS.md §1.3),
    else `plan.meta.paper_ratio`, else the target share of all parameters."""
    op = record_operating_point(record)
    if op is not None:
        label = label_for(op["knob"], op["value"])
        if label is not None:
            return label
    meta = ((record.get("plan") or {}).get("meta") or {})
    for value in (meta.get("paper_ratio"), (record.get("params") or {}).get("target_ratio"),
                  ((record.get("config") or {}).get("pruning") or {}).get("ratio")):
        if is_number(value):
            return float(value)
    return None


def setting_label(record: Mapping) -> str:
    """What set the cell, short: "group_ratio=0.25", or "" when pruning.ratio did."""
    op = record_operating_point(record)
    return "" if op is None else f"{op['knob'].removeprefix('method.')}={float(op['value']):g}"


def calibration_label(record: Mapping) -> str | None:
    """The calibration a cell read, as a caption states it: sampler, dataset (and the paper's, when substituted),
    shape and seed; None when the method read none. Records older than the samplers used LLM-Pruner's."""
    c = record.get("calibration") or {}
    if not c.get("used"):
        return None
    ds = c.get("dataset")
    if c.get("paper_dataset") and c["paper_dataset"] != ds:
        ds = f"{ds} for {c['paper_dataset']}"
    join = f", join {json.dumps(c['join'])}" if c.get("join") is not None else ""
    order = f", {c['order']} order" if c.get("order") not in (None, "random") else ""
    return (f"{c.get('sampler') or 'llm_pruner'} sampler{join}{order}, {ds} {c.get('n_samples')}x{c.get('seq_len')}"
            f", seed {c.get('seed')}")


# ---------------------------------------------------------------------------------------------------------------
# Observations: one long-format row per (record, phase, metric value). Tables and the report both read these.

OBS_COLUMNS = ("config_hash", "created", "model", "method", "base_method", "anchor_method", "ratio", "paper_ratio",
               "setting", "calibration", "achieved", "params_before", "params_after", "seed", "phase", "kind",
               "protocol", "dataset", "split", "limit", "task", "metric", "value", "key", "protocol_ok", "note")


def _ppl_fields(key: str, entry: Mapping) -> dict:
    """Protocol fields of one PPL entry; old records without fields fall back to the label text."""
    m = re.match(r"^(?P<name>[^:]+):(?P<dataset>[^:]+):(?P<split>[^:\[]+)(?:\[:(?P<n>\d+) windows\])?$", key)
    out = {k: entry.get(k) for k in ("name", "dataset", "split", "seq_len", "stride", "bos", "max_windows")}
    if m:
        out["name"] = out["name"] or m["name"]
        out["dataset"] = out["dataset"] or m["dataset"]
        out["split"] = out["split"] or m["split"]
        if out["max_windows"] is None and m["n"]:
            out["max_windows"] = int(m["n"])
    return out


def protocol_problem(fields: Mapping) -> str | None:
    """Why an entry's fields contradict its protocol name (None when they agree or the protocol is unknown)."""
    want = PPL_PROTOCOLS.get(fields.get("name"))
    if not want:
        return None
    bad = [f"{k}={fields.get(k)!r} (protocol says {v!r})" for k, v in want.items()
           if fields.get(k) is not None and fields.get(k) != v]
    return "; ".join(bad) or None


def _zs_rows(block: Mapping) -> Iterable[dict]:
    proto = block.get("protocol") if isinstance(block.get("protocol"), Mapping) else {}
    limit = proto.get("limit")
    shots = proto.get("num_fewshot", 0) or 0
    for task, entry in block.items():
        if task in ("protocol", "average") or not isinstance(entry, Mapping):
            continue
        t_limit = entry.get("limit", limit)
        if t_limit is None and is_number(entry.get("n_docs")) and is_number(entry.get("n_docs_total")) \
                and entry["n_docs"] < entry["n_docs_total"]:
            t_limit = int(entry["n_docs"])
        for metric in ("acc", "acc_norm"):
            value = entry.get(metric, entry.get(f"{metric},none"))
            if is_number(value) and not math.isnan(value):
                yield {"kind": "zeroshot", "protocol": f"zs-{shots}shot", "task": task_id(task), "metric": metric,
                       "value": _pct(float(value)), "limit": t_limit, "key": f"{task_id(task)}/{metric}",
                       "protocol_ok": shots == 0, "note": None}
    avg = block.get("average")
    if isinstance(avg, Mapping) and is_number(avg.get("score")):
        preset = proto.get("metric_preset") or "?"
        yield {"kind": "zeroshot", "protocol": f"zs-{shots}shot", "task": "average", "metric": f"preset:{preset}",
               "value": float(avg["score"]), "limit": limit, "key": f"average/{preset}",
               "protocol_ok": shots == 0, "note": avg.get("metric")}
    elif is_number(avg):
        yield {"kind": "zeroshot", "protocol": f"zs-{shots}shot", "task": "average",
               "metric": f"preset:{block.get('metric_used', '?')}", "value": _pct(float(avg)), "limit": limit,
               "key": "average", "protocol_ok": shots == 0, "note": None}


def _numeric_leaves(prefix: str, value: Any, out: dict) -> None:
    if is_number(value):
        out[prefix] = float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _numeric_leaves(f"{prefix}/{k}" if prefix else str(k), v, out)


def _block_rows(block_name: str, block: Any) -> Iterable[dict]:
    if not isinstance(block, Mapping):
        return
    if block_name == "ppl":
        for key, entry in block.items():
            if not isinstance(entry, Mapping) or not is_number(entry.get("ppl")):
                continue
            f = _ppl_fields(str(key), entry)
            problem = protocol_problem(f)
            yield {"kind": "ppl", "protocol": f["name"], "dataset": f["dataset"], "split": f["split"],
                   "limit": f["max_windows"], "task": None, "metric": "ppl", "value": float(entry["ppl"]),
                   "key": str(key), "protocol_ok": problem is None, "note": problem}
    elif block_name == "zeroshot":
        yield from _zs_rows(block)
    else:
        leaves: dict[str, float] = {}
        _numeric_leaves("", block, leaves)
        for path, value in leaves.items():
            yield {"kind": block_name, "protocol": None, "task": None, "metric": path, "value": value,
                   "key": f"{block_name}/{path}", "protocol_ok": True, "note": None}


def _flat_config(value: Any, prefix: tuple = ()) -> dict[tuple, str]:
    out: dict[tuple, str] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(_flat_config(v, prefix + (str(k),)))
    else:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)
    return out


def calibration_identity(calib: Mapping) -> dict:
    """A record's calibration config with the sampler made explicit: records written before samplers were
    selectable have no ``sampler`` / ``order`` and were all drawn with LLM-Pruner's sampler in random order, so they
    stay apart from rows drawn with another sampler."""
    return {"sampler": "llm_pruner", "order": "random", **calib}


def _identity_leaves(record: Mapping) -> dict[tuple, str]:
    """Config values that make two cells of one method different rows (seeds, eval, ratio and bookkeeping excluded;
    calibration only when the method used it)."""
    cfg = dict(record.get("config") or {})
    for key in (*NON_SEMANTIC, "eval", "recovery", "device", "threads", "paper_ratio"):
        cfg.pop(key, None)
    if isinstance(cfg.get("pruning"), Mapping):
        cfg["pruning"] = {k: v for k, v in cfg["pruning"].items() if k != "ratio"}
    calib_used = (record.get("calibration") or {}).get("used")
    if not calib_used:
        cfg.pop("calibration", None)
    if isinstance(cfg.get("method"), Mapping):   # a native knob is the row's `setting` column, not a variant
        cfg["method"] = {k: v for k, v in cfg["method"].items() if k not in NATIVE_KNOBS}
    if calib_used and isinstance(cfg.get("calibration"), Mapping):
        cfg["calibration"] = calibration_identity(cfg["calibration"])
    model = cfg.pop("model", None)
    leaves = _flat_config(cfg)
    if isinstance(model, Mapping):   # the model is its own row key; its variants (dtype, fingerprint) still count
        leaves.update({("model",) + k: v for k, v in _flat_config(model).items() if k != ("name",)})
    return {k: v for k, v in leaves.items() if k and k[-1] not in ("seed", "progress")}


def _fmt_leaf(value: str) -> str:
    try:
        v = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(v, list):
        return "+".join(str(x) for x in v)
    text = "null" if v is None else str(v)
    return text if len(text) <= 16 else text[:8] + "…"   # content hashes: a prefix tells them apart


def _variant_labels(records: Sequence[Mapping], bases: Sequence[str]) -> list[str]:
    """Per record, the differing config values within its (model, method) group, e.g. "structures=block"."""
    leaves = [_identity_leaves(r) for r in records]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((_name((r.get("config") or {}).get("model")), bases[i]), []).append(i)
    labels = [""] * len(records)
    for idx in groups.values():
        paths = sorted({p for i in idx for p in leaves[i]})
        # a value missing from some records (older schema) does not split rows; two different values do
        varying = [p for p in paths if len({leaves[i][p] for i in idx if p in leaves[i]}) > 1]
        if not varying:
            continue
        lasts = [p[-1] for p in varying]
        names = {p: (p[-1] if lasts.count(p[-1]) == 1 else ".".join(p)) for p in varying}
        for i in idx:
            labels[i] = ", ".join(f"{names[p]}={_fmt_leaf(leaves[i].get(p, 'null'))}" for p in varying)
    return labels


def seed_key(record: Mapping) -> str | None:
    """What makes two runs of one row repeats: the run seed, plus the calibration seed when calibration was read
    (a calibration-seed sweep at one run seed is n repeats, not one overwritten cell)."""
    cfg = record.get("config") or {}
    if cfg.get("seed") is None:
        return None
    calib = record.get("calibration") or {}
    return f"{cfg['seed']}/{calib.get('seed')}" if calib.get("used") else str(cfg["seed"])


def observations(records: Iterable[Mapping]) -> pd.DataFrame:
    """Long format: one row per metric value of every record and phase (pruned, dense, prerecovery).

    `method` is the display label (method name, "+<recovery>" for recovered rows, "[differing config]" when one
    method ran with several configs); dense-phase rows are labelled "dense" at ratio 0 with no seed, so the dense
    baseline embedded in every cell and a method=dense record land in one row.
    """
    records = [r for r in records if isinstance(r, Mapping)]
    bases = [method_name(r) for r in records]
    variants = _variant_labels(records, bases)
    rows: list[dict] = []
    for rec, base, variant in zip(records, bases, variants):
        cfg = rec.get("config") or {}
        params = rec.get("params") or {}
        model = _name(cfg.get("model"))
        ratio = params.get("target_ratio")
        ratio = float(ratio) if is_number(ratio) else paper_ratio(rec)
        achieved = params.get("achieved_ratio")
        is_dense = base == "dense"
        rec_name = _recovery(rec)
        suffix = f" [{variant}]" if variant else ""
        common = {"config_hash": rec.get("config_hash"), "created": rec.get("created"), "model": model,
                  "params_before": params.get("before"), "seed": seed_key(rec)}
        metrics = rec.get("metrics") or {}
        blocks: dict[str, dict[str, Any]] = {"pruned": {}, "dense": {}, "prerecovery": {}}
        for name, block in metrics.items():
            phase, _, head = name.partition("_") if name.startswith(("dense_", "prerecovery_")) else ("", "", name)
            blocks[phase or "pruned"][head] = block
        if is_dense:                      # a dense record's own metrics are the dense phase
            blocks["dense"] = {**blocks["pruned"], **blocks["dense"]}
            blocks["pruned"] = {}
        for phase, heads in blocks.items():
            if phase == "dense":
                ident = dict(method="dense", base_method="dense", anchor_method="dense", ratio=0.0, paper_ratio=0.0,
                             setting=None, calibration=None, achieved=0.0, params_after=params.get("before"),
                             seed=None)
            else:
                recovered = phase == "pruned" and rec_name is not None
                label = base + (f"+{rec_name}" if recovered else "") + suffix
                ident = dict(method=label, base_method=base, anchor_method=anchor_method(rec, recovered),
                             ratio=ratio, paper_ratio=paper_ratio(rec), setting=setting_label(rec),
                             calibration=calibration_label(rec),
                             achieved=float(achieved) if is_number(achieved) else None,
                             params_after=params.get("after"), seed=seed_key(rec))
            for head, block in heads.items():
                for row in _block_rows(head, block):
                    rows.append({**common, **ident, "phase": phase, "dataset": None, "split": None, **row})
    return pd.DataFrame(rows, columns=list(OBS_COLUMNS))


# ---------------------------------------------------------------------------------------------------------------
# Table specifications


@dataclass(frozen=True)
class PPLCol:
    header: str
    protocol: str
    dataset: str
    split: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    paper: tuple[str, ...]          # anchors' `paper` values
    blocks: tuple[str, ...]         # anchors' blocks that hold this table
    anchor_model: str               # published rows shown for this model unless ours is one of the anchors' models
    ppl: tuple[PPLCol, ...] = ()
    zs: Mapping[str, str] = field(default_factory=dict)     # task -> metric, in column order
    zs_protocol: str = "zs-lp"
    avg_header: str | None = None
    layout: str = "rows"            # rows: method x ratio; ratio_pivot: ratios as columns (one PPL column)
    notes: tuple[str, ...] = ()
    cells: str = "native"           # native: cells set by each paper's own knob | ratio: set by pruning.ratio


W2_128 = PPLCol("WikiText-2", "ppl128-lp", "wikitext2", "test")
PTB_128 = PPLCol("PTB", "ppl128-lp", "ptb", "validation")
RATIO_NOTE = ("ratio: ours = fraction of all parameters removed (target; achieved beside it); published = the "
              "paper's own label, whose meaning differs per paper (METHODS.md §1.3).")
NATIVE_NOTE = ("ratio: the paper's own row label; setting: the native knob that defined our cell (its meaning "
               "below), as the paper's code reads it; achieved: the share of ALL our model's parameters removed.")
KNOB_MEANINGS = {
    "group_ratio": "LLM-Pruner --pruning_ratio p: floor of the KV-group share and p of the MLP channels removed in "
                   "every layer of [4, 30) (scaled to depth); on LLaMA-7B p = 0.25 removes 19.52% of the parameters, "
                   "the papers' \"20%\" row",
    "attn_mlp_ratio": "FLAP / Wanda-SP --pruning_ratio: share of attention+MLP weights as their code counts them "
                      "(query heads weighed as MHA heads; int(p·n) units per kind and layer in the uniform modes)",
    "slicing": "SliceGPT --sparsity: fraction of the hidden dimension sliced",
    "sparsity": "NIRVANA sparsity: share of attention+MLP parameters",
    "n_blocks": "ShortGPT: decoder blocks removed",
    "inheriting_ratio": "Search-LLM inheriting ratio r: share of all parameters kept; the row label is 1 - r",
    "unit_ratio": "Numerical Pruning rho (Eq. 8): fraction of units (heads + MLP channels) pruned",
}

TABLES: dict[str, TableSpec] = {
    "llm_pruner_t1": TableSpec(
        name="llm_pruner_t1", title="LLM-Pruner Table 1: PPL (seq 128) and 7-task zero-shot accuracy",
        paper=("LLM-Pruner",), blocks=("A1",), anchor_model="LLaMA-7B", ppl=(W2_128, PTB_128), zs=ZS_LP,
        avg_header="Average",
        notes=("PPL: ppl128-lp (WikiText-2 test, PTB validation, 128-token windows, one BOS). Zero-shot: zs-lp, "
               "0-shot, % (acc: BoolQ, PIQA, WinoGrande, ARC-e; acc_norm: HellaSwag, ARC-c, OBQA); Average = plain "
               "mean of the 7.", NATIVE_NOTE)),
    "search_llm_t2": TableSpec(
        name="search_llm_t2", title="Search-LLM Table 2: PPL (seq 2048) and 7-task zero-shot accuracy by ratio",
        paper=("Search-LLM",), blocks=("B1",), anchor_model="LLaMA-7B",
        ppl=(PPLCol("WikiText-2", "ppl2048-sl", "wikitext2", "test"), PPLCol("PTB", "ppl2048-sl", "ptb", "validation")),
        zs=ZS_LP, avg_header="Average",
        notes=("PPL: ppl2048-sl (WikiText-2 test, PTB validation, 2048-token windows, one BOS). Zero-shot: zs-lp as in "
               "LLM-Pruner Table 1. Search-LLM labels its rows by inheriting ratio r; written here as 1 - r.",
               NATIVE_NOTE)),
    "slicegpt_t1": TableSpec(
        name="slicegpt_t1", title="SliceGPT main table: WikiText-2 PPL (seq 2048) and 5-task zero-shot average",
        paper=("SliceGPT",), blocks=("E1",), anchor_model="LLaMA-2-7B",
        ppl=(PPLCol("WikiText-2", "ppl2048-sg", "wikitext2", "test"),), zs=ZS_SG, avg_header="Avg (5)",
        notes=("PPL: ppl2048-sg (WikiText-2 test, 2048-token windows, mean of per-window NLL). Zero-shot: SliceGPT's "
               "5 tasks (acc_norm: PIQA, HellaSwag, ARC-e, ARC-c; acc: WinoGrande), %. SliceGPT's ratio is the sliced "
               "fraction of the hidden size, not of the parameters.", NATIVE_NOTE)),
    "ratio_sweep": TableSpec(
        name="ratio_sweep", title="Every method by pruning ratio: WikiText-2 and PTB PPL (seq 128)",
        paper=(), blocks=(), anchor_model="LLaMA-7B", ppl=(W2_128, PTB_128),
        notes=("PPL: ppl128-lp (WikiText-2 test, PTB validation, 128-token windows, one BOS). n = calibration seeds "
               "(methods that read no calibration data run once). The common axis of this table is pruning.ratio, "
               "the share of ALL parameters removed, for every method (not the papers' own knobs; those are in the "
               "paper tables). Published numbers: see the paper tables.", RATIO_NOTE), cells="ratio"),
    "flap_lm": TableSpec(
        name="flap_lm", title="FLAP language-modelling table: WikiText-2 PPL (seq 128) by pruning ratio",
        paper=("FLAP",), blocks=("D1",), anchor_model="LLaMA-7B", ppl=(W2_128,), layout="ratio_pivot",
        notes=("PPL: ppl128-lp on WikiText-2 test. Columns are the papers' ratio labels; 0 is the dense model.",
               NATIVE_NOTE)),
    "flap_zs": TableSpec(
        name="flap_zs", title="FLAP zero-shot table: 7-task zero-shot accuracy",
        paper=("FLAP",), blocks=("D2",), anchor_model="LLaMA-7B", zs=ZS_LP, avg_header="Average",
        notes=("Zero-shot: zs-lp, 0-shot, % (acc: BoolQ, PIQA, WinoGrande, ARC-e; acc_norm: HellaSwag, ARC-c, OBQA).",
               NATIVE_NOTE)),
}


# ---------------------------------------------------------------------------------------------------------------
# Building a table


def limit_suffix(limit: Any, kind: str) -> str:
    if limit is None or (isinstance(limit, float) and math.isnan(limit)):
        return ""
    return f" [first {int(limit)} windows]" if kind == "ppl" else f" [limit {int(limit)}]"


def _assign_columns(obs: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Keep the observations that belong in this table, with the column header each one goes to."""
    parts = []
    good = obs[obs["protocol_ok"].astype(bool)]
    ppl = good[good["kind"] == "ppl"]
    for col in spec.ppl:
        hit = ppl[(ppl["protocol"] == col.protocol) & (ppl["dataset"] == col.dataset) & (ppl["split"] == col.split)]
        if len(hit):
            hit = hit.assign(column=[col.header + limit_suffix(lim, "ppl") for lim in hit["limit"]],
                             base_column=col.header)
            parts.append(hit)
    if spec.zs:
        zs = good[(good["kind"] == "zeroshot") & good["task"].isin(list(spec.zs))]
        zs = zs[[spec.zs.get(t) == m for t, m in zip(zs["task"], zs["metric"])]]
        if len(zs):
            zs = zs.assign(column=[TASK_HEADERS.get(t, t) + limit_suffix(lim, "zs")
                                   for t, lim in zip(zs["task"], zs["limit"])],
                           base_column=[TASK_HEADERS.get(t, t) for t in zs["task"]])
            parts.append(zs)
            if spec.avg_header:   # the papers' plain mean, only when every task of the table is present
                key = ["config_hash", "phase", "method", "limit"]
                for _, g in zs.groupby(key, dropna=False, sort=False):
                    if set(g["task"]) == set(spec.zs):
                        first = g.iloc[[0]].copy()
                        first["task"], first["metric"], first["value"] = "average", "mean", g["value"].mean()
                        first["column"] = spec.avg_header + limit_suffix(first["limit"].iloc[0], "zs")
                        first["base_column"] = spec.avg_header
                        parts.append(first)
    if not parts:
        return pd.DataFrame(columns=[*OBS_COLUMNS, "column", "base_column"])
    return pd.concat(parts, ignore_index=True)


def _column_order(spec: TableSpec, present: Iterable[str]) -> list[str]:
    bases = [c.header for c in spec.ppl] + [TASK_HEADERS.get(t, t) for t in spec.zs]
    bases += [spec.avg_header] if spec.avg_header else []
    present = list(dict.fromkeys(present))

    def key(col: str):
        base = next((i for i, b in enumerate(bases) if col == b or col.startswith(b + " [")), len(bases))
        n = re.search(r"\[(?:first|limit) (\d+)", col)
        return base, 0 if n is None else 1, int(n.group(1)) if n else 0
    return sorted(present, key=key)


@dataclass
class PaperTable:
    """A rendered paper table: `frame` (means; identity columns first), `std` (same shape, NaN when n < 2),
    `printed` (published values as printed), the value columns, notes and the footnote sources."""

    spec: TableSpec
    frame: pd.DataFrame
    std: pd.DataFrame
    printed: pd.DataFrame
    value_columns: list[str]
    sources: dict[str, str]
    excluded: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)    # knob meanings and calibration, read from the records

    @property
    def n_ours(self) -> int:
        return int((self.frame["source"] == "ours").sum()) if len(self.frame) else 0

    def display(self) -> pd.DataFrame:
        """All cells as strings: ours as mean or "mean ± std", published exactly as printed."""
        out = self.frame.copy().astype(object)
        for i in range(len(out)):
            published = out.iloc[i]["source"] != "ours"
            for col in self.value_columns:
                v = self.frame.iloc[i][col]
                if published:
                    text = self.printed.iloc[i][col]
                    out.iat[i, out.columns.get_loc(col)] = text if isinstance(text, str) else ""
                elif v is None or (isinstance(v, float) and math.isnan(v)):
                    out.iat[i, out.columns.get_loc(col)] = ""
                else:
                    s = self.std.iloc[i][col]
                    out.iat[i, out.columns.get_loc(col)] = f"{v:.2f}" if pd.isna(s) else f"{v:.2f} ± {s:.2f}"
            for col in ("ratio", "achieved"):
                if col in out.columns:
                    v = self.frame.iloc[i][col]
                    if published and col == "ratio":
                        text = self.printed.iloc[i].get("ratio", "")
                    elif pd.isna(v):
                        text = ""
                    else:
                        text = fmt_ratio(v) if col == "ratio" else f"{v:.4f}"
                    out.iat[i, out.columns.get_loc(col)] = text
            if "setting" in out.columns and (published or not isinstance(self.frame.iloc[i]["setting"], str)):
                out.iat[i, out.columns.get_loc("setting")] = ""
            if "n" in out.columns:
                n = self.frame.iloc[i]["n"]
                out.iat[i, out.columns.get_loc("n")] = "" if pd.isna(n) else str(int(n))
            if published:
                out.iat[i, out.columns.get_loc("source")] = "published (" + self.frame.iloc[i]["block"] + ")"
        return out.drop(columns=["block"])

    def footnotes(self) -> list[str]:
        notes = list(self.spec.notes) + list(self.provenance)
        notes += [f"published ({b}): {s}" for b, s in self.sources.items()]
        notes += [f"excluded: {e}" for e in self.excluded]
        return notes

    def to_markdown(self) -> str:
        lines = [f"### {self.spec.title}", "", _markdown(self.display()), ""]
        lines += [f"- {n}" for n in self.footnotes()]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        df = self.display()
        cols = list(df.columns)
        body = [" & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
        body += [" & ".join(latex_escape(str(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
        notes = " ".join(latex_escape(n) for n in self.footnotes())
        return "\n".join([
            r"\begin{table}[t]", r"\centering", r"\small",
            rf"\caption{{{latex_escape(self.spec.title)}}}", rf"\label{{tab:{self.spec.name}}}",
            r"\begin{tabular}{" + "".join("l" if c in _TEXT_COLUMNS else "r" for c in cols) + "}", r"\toprule",
            *body, r"\bottomrule",
            r"\end{tabular}", rf"\par\footnotesize {notes}", r"\end{table}", ""])

    def to_csv(self) -> str:
        """Numbers, not text: means, `<col> std`, and the full source ("ours" / "published (block: source)")."""
        df = self.frame.copy()
        df["n"] = df["n"].astype("Int64")
        for col in self.value_columns:
            df[f"{col} std"] = self.std[col]
        df["source"] = [s if s == "ours" else anchors_mod.published_label(b, self.sources.get(b, ""))
                        for s, b in zip(self.frame["source"], self.frame["block"])]
        return df.to_csv(index=False)

    def summary(self, ratios: Sequence[float]) -> str:
        """The README view of a rows table: per model, one row per method of ours (recovery variants left out),
        each PPL column at each ratio as "mean ± std" and n, methods ordered by their first column at the first
        ratio (best first), the dense value in the heading."""
        f = self.frame
        ours = f[(f["source"] == "ours") & ~f["method"].astype(str).str.contains(r"\+\w+$")]
        out = []
        for model, g in ours.groupby("model", sort=True):
            cols = [c for c in self.value_columns if g[c].notna().any()]
            names = [c.split(" [")[0] for c in cols]       # the subset goes to the heading when it is shared
            short = {c: n if names.count(n) == 1 else c for c, n in zip(cols, names)}
            dense = g[g["method"] == "dense"]
            head = ", ".join(f"{short[c]} {dense.iloc[0][c]:.2f}" for c in cols) if len(dense) else "not run"
            out += [f"**{model}** (dense: {head}; n = calibration seeds)", "",
                    "| method | " + " | ".join(f"{100 * r:g}%: {short[c]}" if j < len(cols) else f"{100 * r:g}%: n"
                                             for r in ratios for j, c in enumerate(cols + ["n"])) + " |",
                    "|---" * (1 + len(ratios) * (len(cols) + 1)) + "|"]
            g = g[g["method"] != "dense"]

            def cell(method, ratio):
                hit = g[(g["method"] == method) & ((g["ratio"] - ratio).abs() < 1e-9)]
                return None if hit.empty else hit.index[0]

            def rank(method):
                i = cell(method, ratios[0])
                return (i is None, 0.0 if i is None else float(f.loc[i, cols[0]]), method)
            for method in sorted(dict.fromkeys(g["method"]), key=rank):
                parts = [str(method)]
                for r in ratios:
                    i = cell(method, r)
                    for c in cols:
                        v, sd = (None, None) if i is None else (f.loc[i, c], self.std.loc[i, c])
                        parts.append("–" if v is None or pd.isna(v) else
                                     f"{v:,.1f}" + ("" if pd.isna(sd) else f" ± {sd:,.1f}"))
                    parts.append("–" if i is None else str(int(f.loc[i, "n"])))
                out.append("| " + " | ".join(parts) + " |")
            out.append("")
        return "\n".join(out)

    def write(self, out_dir: str | Path, formats: Sequence[str] = ("md", "tex", "csv")) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        writers = {"md": self.to_markdown, "tex": self.to_latex, "csv": self.to_csv}
        paths = []
        for fmt in formats:
            p = out / f"{self.spec.name}.{fmt}"
            p.write_text(writers[fmt](), encoding="utf-8")
            paths.append(p)
        return paths


_TEXT_COLUMNS = ("model", "method", "source", "protocol")


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}" if round(r, 2) == r else f"{r:g}"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "±": r"$\pm$",
                  "↓": r"$\downarrow$", "→": r"$\to$", "–": "--", "≤": r"$\le$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _aggregate(cells: pd.DataFrame, id_cols: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and std over seeds per row identity and column; per seed the newest record wins (a rerun replaces)."""
    cells = cells.sort_values("created", kind="stable")
    seedkey = cells["seed"].astype(object).where(cells["seed"].notna(), "none").astype(str)
    cells = cells.assign(_seed=seedkey)
    last = cells.groupby([*id_cols, "column", "_seed"], dropna=False, sort=False).tail(1)
    grouped = last.groupby([*id_cols, "column"], dropna=False, sort=False)["value"]
    mean = grouped.mean().unstack("column")
    std = grouped.std(ddof=1).unstack("column")
    return mean, std


def _published_rows(spec: TableSpec, anchors: pd.DataFrame) -> pd.DataFrame:
    """Published records of this table's blocks mapped onto the table's (full-protocol) columns."""
    a = anchors[anchors["block"].isin(spec.blocks) & anchors["paper"].isin(spec.paper)]
    rows = []
    for r in a.itertuples(index=False):
        col = None
        if r.metric == "ppl":
            col = next((c.header for c in spec.ppl if c.protocol == r.protocol and c.dataset == r.task), None)
        elif r.protocol == spec.zs_protocol and r.task in spec.zs and r.metric == spec.zs[r.task]:
            col = TASK_HEADERS.get(r.task, r.task)
        elif r.protocol == spec.zs_protocol and r.task == "avg7" and spec.avg_header and len(spec.zs) == 7:
            col = spec.avg_header
        if col is not None:
            rows.append({"block": r.block, "model": r.model, "method": r.method, "ratio": r.ratio_value,
                         "ratio_text": r.ratio, "column": col, "value": r.value_num, "printed": r.value})
    return pd.DataFrame(rows, columns=["block", "model", "method", "ratio", "ratio_text", "column", "value",
                                       "printed"])


def build_table(records: Iterable[Mapping] | pd.DataFrame, spec: TableSpec | str, published: str = "matched",
                anchors: pd.DataFrame | None = None) -> PaperTable:
    """One paper table from records (or from `observations(records)`).

    published: "matched" (published rows for the (method, ratio) pairs we have, plus dense), "all" (every row of
    the paper's table) or "none".
    """
    spec = TABLES[spec] if isinstance(spec, str) else spec
    if published not in ("matched", "all", "none"):
        raise ValueError(f"published must be matched, all or none, got {published!r}")
    obs = records if isinstance(records, pd.DataFrame) else observations(records)
    excluded = sorted({f"{m} {k}: {n}" for m, k, n, ok in zip(obs["method"], obs["key"], obs["note"],
                                                              obs["protocol_ok"]) if not ok and n})
    obs = obs.assign(setting=obs["setting"].fillna("").astype(str))
    native = obs["setting"] != ""
    keep = (obs["phase"] == "dense") | (native if spec.cells == "native" else ~native)
    cells = _assign_columns(obs[keep], spec)
    id_cols = ["model", "method", "anchor_method", "ratio"] + (["setting"] if spec.cells == "native" else [])

    if spec.layout == "ratio_pivot":
        cells = cells.assign(protocol_label=[f"{p}" + limit_suffix(lim, "ppl") for p, lim in
                                             zip(cells["protocol"], cells["limit"])])
        cells = cells.assign(column=[_ratio_header(r) for r in cells["ratio"]])
        id_cols = ["model", "method", "anchor_method", "protocol_label"]
    provenance = _provenance_notes(cells, spec)

    ours_rows: list[dict] = []
    ours_std: list[dict] = []
    if len(cells):
        mean, std = _aggregate(cells, id_cols)
        counts = cells.groupby(id_cols, dropna=False, sort=False)["seed"].agg(
            lambda s: max(1, s.dropna().nunique()))
        ach = cells.groupby(id_cols, dropna=False, sort=False)["achieved"].mean()
        pratio = cells.groupby(id_cols, dropna=False, sort=False)["paper_ratio"].first()
        for idx in mean.index:
            ident = dict(zip(id_cols, idx))
            row = {**ident, "achieved": ach.get(idx), "n": counts.get(idx), "source": "ours", "block": "",
                   "_paper_ratio": pratio.get(idx)}
            row.update(mean.loc[idx].to_dict())
            ours_rows.append(row)
            ours_std.append(std.loc[idx].to_dict())

    # Published rows for the same (method, ratio): the anchors' model matching ours if any, else the table's model.
    anchors = anchors_mod.load_anchors() if anchors is None else anchors
    pub = _published_rows(spec, anchors if published != "none" else anchors.iloc[:0])
    ours_models = {anchors_mod.model_key(r["model"]) for r in ours_rows}
    pub_models = {anchors_mod.model_key(m) for m in pub["model"]}
    wanted = (ours_models & pub_models) or {anchors_mod.model_key(spec.anchor_model)}
    pub = pub[pub["model"].map(anchors_mod.model_key).isin(wanted)]
    if published == "matched":
        if spec.layout == "ratio_pivot":
            have = {r["anchor_method"] for r in ours_rows}
            pub = pub[pub["method"].isin(have)]
        else:
            have = {(r["anchor_method"], round(float(r["_paper_ratio"] if r["_paper_ratio"] is not None
                                                     else r["ratio"]), 4)) for r in ours_rows}
            pub = pub[[(m, round(float(x), 4)) in have for m, x in zip(pub["method"], pub["ratio"])]]

    pub_rows, pub_std, pub_printed = [], [], []
    if len(pub):
        if spec.layout == "ratio_pivot":
            pub = pub.assign(column=[_ratio_header(r) for r in pub["ratio"]], protocol_label=spec.ppl[0].protocol)
            keys = ["block", "model", "method", "protocol_label"]
        else:
            keys = ["block", "model", "method", "ratio", "ratio_text"]
        for k, g in pub.groupby(keys, sort=False):
            ident = dict(zip(keys, k))
            row = {"model": ident["model"], "method": ident["method"], "anchor_method": ident["method"],
                   "achieved": None, "n": None, "source": "published", "block": ident["block"]}
            printed = {}
            if spec.layout == "ratio_pivot":
                row["protocol_label"] = ident["protocol_label"]
            else:
                row["ratio"] = ident["ratio"]
                printed["ratio"] = ident["ratio_text"]
            for c, v, p in zip(g["column"], g["value"], g["printed"]):
                row[c], printed[c] = v, p
            pub_rows.append(row)
            pub_std.append({})
            pub_printed.append(printed)

    all_rows = ours_rows + pub_rows
    value_cols = _column_order(spec, [c for r in all_rows for c in r if c not in _ID_KEYS]) \
        if spec.layout != "ratio_pivot" else sorted({c for r in all_rows for c in r if c not in _ID_KEYS},
                                                    key=_ratio_sort)
    if spec.layout == "ratio_pivot":
        lead = ["model", "method", "protocol_label", "n", "source", "block"]
    elif spec.cells == "native":
        lead = ["model", "method", "ratio", "setting", "achieved", "n", "source", "block"]
    else:
        lead = ["model", "method", "ratio", "achieved", "n", "source", "block"]
    frame = pd.DataFrame(all_rows, columns=[*lead, *value_cols, "anchor_method", "_paper_ratio"])
    std = pd.DataFrame(ours_std + pub_std, columns=value_cols)
    printed = pd.DataFrame([{} for _ in ours_rows] + pub_printed, columns=[*value_cols, "ratio"])
    order = _row_order(frame, spec)
    frame = frame.iloc[order].drop(columns=["anchor_method", "_paper_ratio"]).reset_index(drop=True)
    std = std.iloc[order].reset_index(drop=True)
    printed = printed.iloc[order].reset_index(drop=True)
    if spec.layout == "ratio_pivot":
        frame = frame.rename(columns={"protocol_label": "protocol"})
    used_blocks = sorted(set(frame.loc[frame["source"] == "published", "block"]))
    srcs = anchors_mod.sources(anchors[anchors["block"].isin(used_blocks)]) if used_blocks else {}
    return PaperTable(spec, frame, std, printed, value_cols, srcs, excluded, provenance)


def _provenance_notes(cells: pd.DataFrame, spec: TableSpec) -> list[str]:
    """Caption lines built from the records themselves: what each native knob means, and which calibration
    (sampler, data, shape, seeds) each method of ours read, so a row can be put beside the paper's."""
    ours = cells[cells["phase"] != "dense"]
    notes = []
    knobs = sorted({str(x).split("=")[0] for x in ours["setting"].dropna() if str(x)})
    notes += [f"setting {k}: {KNOB_MEANINGS.get(k, 'native knob')}" for k in knobs]
    calib: dict[str, set] = {}
    for m, c, seed in zip(ours["base_method"], ours["calibration"], ours["seed"]):
        if isinstance(c, str):
            calib.setdefault(f"{m}: {c.rsplit(', seed', 1)[0]}", set()).add(str(seed).split("/")[-1])
    notes += [f"calibration, {k} (calibration seeds {', '.join(sorted(v))})" for k, v in sorted(calib.items())]
    no_calib = sorted({m for m, c in zip(ours["base_method"], ours["calibration"]) if not isinstance(c, str)})
    if no_calib:
        notes.append(f"no calibration data read: {', '.join(no_calib)}")
    return notes


_ID_KEYS = {"model", "method", "anchor_method", "ratio", "setting", "achieved", "n", "source", "block",
            "_paper_ratio", "protocol_label"}


def _ratio_header(r: float) -> str:
    return "dense" if r == 0 else f"{100 * r:g}%"


def _ratio_sort(col: str) -> float:
    return 0.0 if col == "dense" else float(col.rstrip("%"))


def _row_order(frame: pd.DataFrame, spec: TableSpec) -> list[int]:
    """Ratio, then method (dense first), ours before the published row of the same (method, ratio)."""
    def key(i: int):
        r = frame.iloc[i]
        ratio = 0.0 if spec.layout == "ratio_pivot" else (r["ratio"] if pd.notna(r["ratio"]) else math.inf)
        method = str(r["anchor_method"])
        return (ratio, method != "dense", method, r["source"] != "ours", str(r["model"]), str(r["method"]))
    return sorted(range(len(frame)), key=key)


def build_tables(records: Iterable[Mapping], names: Sequence[str] | None = None,
                 published: str = "matched") -> dict[str, PaperTable]:
    """Every requested table (default: all), sharing one observation frame."""
    obs = observations(records)
    anchors = anchors_mod.load_anchors()
    return {n: build_table(obs, TABLES[n], published, anchors) for n in (names or list(TABLES))}


def protocols_present(obs: pd.DataFrame) -> list[str]:
    keys = obs.loc[obs["kind"].isin(["ppl", "zeroshot"]), "key"]
    return sorted({k if "/" not in k else "zeroshot:" + k.split("/")[0] for k in keys})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pruning-lab tables",
                                     description="Paper-style tables (Markdown, LaTeX, CSV) from a results store.")
    parser.add_argument("--store", type=Path, default=None,
                        help="store directory (default: $PRUNING_STORE or runs/store)")
    parser.add_argument("--table", action="append", choices=sorted(TABLES), help="table to write (repeatable)")
    parser.add_argument("--all", action="store_true", help="write every table that has rows of ours")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    parser.add_argument("--format", default="md,tex,csv", help="comma list of md, tex, csv")
    parser.add_argument("--published", choices=("matched", "all", "none"), default="matched",
                        help="published rows: for our (method, ratio) pairs (default), the whole paper table, or none")
    parser.add_argument("--summary", metavar="RATIOS", default=None,
                        help="print (and write <table>_summary.md) the README view of each rows table at these "
                             "comma-separated ratios, e.g. 0.2,0.5")
    args = parser.parse_args(argv)
    if not args.table and not args.all:
        parser.error("give --table NAME (repeatable) or --all")
    formats = [f for f in args.format.split(",") if f]
    bad = [f for f in formats if f not in ("md", "tex", "csv")]
    if bad:
        parser.error(f"unknown format(s) {bad}; choose from md, tex, csv")

    store = ResultsStore(args.store)
    records = store.records()
    if not records:
        print(f"no records in {store.records_dir}", file=sys.stderr)
        return 1
    names = sorted(TABLES) if args.all else args.table
    tables = build_tables(records, names, args.published)
    missing = []
    for name, table in tables.items():
        if table.n_ours == 0:
            missing.append(name)
            continue
        paths = table.write(args.out, formats)
        print(table.to_markdown())
        if args.summary and table.spec.layout == "rows":
            text = table.summary([float(r) for r in args.summary.split(",")])
            paths.append(args.out / f"{name}_summary.md")
            paths[-1].write_text(text, encoding="utf-8")
            print(text)
        print("wrote " + ", ".join(str(p) for p in paths) + "\n")
    if missing:
        obs = observations(records)
        print(f"no rows of ours for {', '.join(missing)}: no record has these tables' protocols. Protocols in the "
              f"store: {', '.join(protocols_present(obs)) or 'none'}", file=sys.stderr)
    return 1 if (missing and not args.all) or len(missing) == len(tables) else 0


if __name__ == "__main__":
    sys.exit(main())
