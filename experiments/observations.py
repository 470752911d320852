"""Records -> tidy observations: one long-format row per (record, phase, metric value), with the labels the tables
and the report group by (method and its config variant, anchor id, ratio and the paper's ratio, native setting,
calibration, seed).

Why a metric lands in a column only when its protocol agrees: a PPL at seq 128 and one at seq 2048 differ by 2x on
the same model, and a 50-window PPL is not the test-set PPL. So each entry keeps its protocol name *and* fields
(seq_len, stride, BOS, dataset, split) and ``protocol_ok`` says whether they agree with the name (METHODS.md
§1.4/§1.5); a window-limited entry (or a ``limit``-ed zero-shot run) keeps its ``limit``.

Generic by construction: a new method appears under its ``plan.meta.method`` name, a new zero-shot task block is read
from ``metrics["zeroshot"]``, and rows of one method that differ in config (structures, layer range, calibration,
...) are told apart by the differing config values in the label. Torch-free (pandas only).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from experiments.paper_ratios import label_for
from experiments.record import NON_SEMANTIC, is_number
from experiments.store import _name

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
# Our method names -> the anchors' method ids (ANCHORS.md "method IDs").
ANCHOR_ALIASES = {"magnitude_l2": "l2"}
# The papers' baselines prune KV groups (heads) and MLP channels; another structure set is another method
# (random decoder-layer removal is not LLM-Pruner's "random"), so its anchor id gets a suffix that matches nothing.
ANCHOR_STRUCTURES = frozenset({"kv_group", "mlp"})


def task_id(name: str) -> str:
    name = str(name).lower()
    return TASK_ALIASES.get(name, name)


def _pct(value: float) -> float:
    """lm-eval reports fractions; the papers print percent. A value > 1 is taken as already in percent."""
    return 100.0 * value if abs(value) <= 1.0 else value


def method_name(record: Mapping) -> str:
    meta = (record.get("plan") or {}).get("meta") or {}
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
    meta = (record.get("plan") or {}).get("meta") or {}
    base = meta.get("anchor_method")
    if not base:
        base = ANCHOR_ALIASES.get(method_name(record), method_name(record))
        mcfg = (record.get("config") or {}).get("method") or {}
        if base.startswith("llm_pruner"):  # llm_pruner_<importance>[_channel] -> the anchors' LLM-Pruner ids
            strategy = mcfg.get("strategy") or ("channel" if base.endswith("_channel") else "block")
            variant = mcfg.get("importance") or base[len("llm_pruner_") :].removesuffix("_channel")
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
    meta = (record.get("plan") or {}).get("meta") or {}
    for value in (
        meta.get("paper_ratio"),
        (record.get("params") or {}).get("target_ratio"),
        ((record.get("config") or {}).get("pruning") or {}).get("ratio"),
    ):
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
    n = "all " if c.get("n_samples") is None else c["n_samples"]  # None: every document (ShortGPT's full config)
    return f"{c.get('sampler') or 'llm_pruner'} sampler{join}{order}, {ds} {n}x{c.get('seq_len')}, seed {c.get('seed')}"


# ---------------------------------------------------------------------------------------------------------------
# Observations: one long-format row per (record, phase, metric value). Tables and the report both read these.

OBS_COLUMNS = (
    "config_hash",
    "created",
    "model",
    "method",
    "base_method",
    "anchor_method",
    "ratio",
    "paper_ratio",
    "setting",
    "calibration",
    "achieved",
    "params_before",
    "params_after",
    "seed",
    "phase",
    "kind",
    "protocol",
    "dataset",
    "split",
    "limit",
    "task",
    "metric",
    "value",
    "key",
    "protocol_ok",
    "note",
    "unit",
)


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
    name = fields.get("name")
    want = PPL_PROTOCOLS.get(name) if isinstance(name, str) else None
    if not want:
        return None
    bad = [
        f"{k}={fields.get(k)!r} (protocol says {v!r})"
        for k, v in want.items()
        if fields.get(k) is not None and fields.get(k) != v
    ]
    return "; ".join(bad) or None


def _zs_rows(block: Mapping, block_name: str) -> Iterable[dict]:
    proto = block.get("protocol")
    if not isinstance(proto, Mapping):
        proto = {}
    limit = proto.get("limit")
    shots = proto.get("num_fewshot", 0) or 0
    for task, entry in block.items():
        if task in ("protocol", "average") or not isinstance(entry, Mapping):
            continue
        t_limit = entry.get("limit", limit)
        if (
            t_limit is None
            and is_number(entry.get("n_docs"))
            and is_number(entry.get("n_docs_total"))
            and entry["n_docs"] < entry["n_docs_total"]
        ):
            t_limit = int(entry["n_docs"])
        for metric in ("acc", "acc_norm"):
            value = entry.get(metric, entry.get(f"{metric},none"))
            if is_number(value) and not math.isnan(value):
                yield {
                    "kind": "zeroshot",
                    "protocol": f"zs-{shots}shot",
                    "task": task_id(task),
                    "metric": metric,
                    "value": _pct(float(value)),
                    "limit": t_limit,
                    "key": f"{task_id(task)}/{metric}",
                    "protocol_ok": shots == 0,
                    "note": None,
                    "unit": f"{block_name}/{task}/{metric}",
                }
    avg = block.get("average")
    if isinstance(avg, Mapping) and is_number(avg.get("score")):
        preset = proto.get("metric_preset") or "?"
        yield {
            "kind": "zeroshot",
            "protocol": f"zs-{shots}shot",
            "task": "average",
            "metric": f"preset:{preset}",
            "value": float(avg["score"]),
            "limit": limit,
            "key": f"average/{preset}",
            "protocol_ok": shots == 0,
            "note": avg.get("metric"),
            "unit": f"{block_name}/average",
        }
    elif is_number(avg):
        yield {
            "kind": "zeroshot",
            "protocol": f"zs-{shots}shot",
            "task": "average",
            "metric": f"preset:{block.get('metric_used', '?')}",
            "value": _pct(float(avg)),
            "limit": limit,
            "key": "average",
            "protocol_ok": shots == 0,
            "note": None,
            "unit": None,  # an average stored as a bare number (older records): no task rows behind it
        }


def _numeric_leaves(prefix: str, value: Any, out: dict) -> None:
    if is_number(value):
        out[prefix] = float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _numeric_leaves(f"{prefix}/{k}" if prefix else str(k), v, out)


def _block_rows(head: str, block: Any, block_name: str) -> Iterable[dict]:
    """Rows of one metric block; ``head`` is its kind (ppl, zeroshot, ...), ``block_name`` its key in the record,
    which the rows keep as their ``unit`` address (experiments/uncertainty.py) for PPL and zero-shot values."""
    if not isinstance(block, Mapping):
        return
    if head == "ppl":
        for key, entry in block.items():
            if not isinstance(entry, Mapping) or not is_number(entry.get("ppl")):
                continue
            f = _ppl_fields(str(key), entry)
            problem = protocol_problem(f)
            yield {
                "kind": "ppl",
                "protocol": f["name"],
                "dataset": f["dataset"],
                "split": f["split"],
                "limit": f["max_windows"],
                "task": None,
                "metric": "ppl",
                "value": float(entry["ppl"]),
                "key": str(key),
                "protocol_ok": problem is None,
                "note": problem,
                "unit": f"{block_name}/{key}",
            }
    elif head == "zeroshot":
        yield from _zs_rows(block, block_name)
    else:
        leaves: dict[str, float] = {}
        _numeric_leaves("", block, leaves)
        for path, value in leaves.items():
            yield {
                "kind": head,
                "protocol": None,
                "task": None,
                "metric": path,
                "value": value,
                "key": f"{head}/{path}",
                "protocol_ok": True,
                "note": None,
                "unit": None,
            }


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
    if isinstance(cfg.get("method"), Mapping):  # a native knob is the row's `setting` column, not a variant
        cfg["method"] = {k: v for k, v in cfg["method"].items() if k not in NATIVE_KNOBS}
    if calib_used and isinstance(cfg.get("calibration"), Mapping):
        cfg["calibration"] = calibration_identity(cfg["calibration"])
    model = cfg.pop("model", None)
    leaves = _flat_config(cfg)
    if isinstance(model, Mapping):  # the model is its own row key; its variants (dtype, fingerprint) still count
        leaves.update({("model",) + k: v for k, v in _flat_config(model).items() if k != ("name",)})
    study = record.get("study")  # an AdaPruner study's final cell vs the same method set by hand
    leaves[("study",)] = json.dumps(f"{len(study.get('trials') or [])} trials" if study else "none")
    return {k: v for k, v in leaves.items() if k and k[-1] not in ("seed", "progress")}


def without_study_trials(records: Iterable[Mapping]) -> list[Mapping]:
    """``records`` (mappings only) minus the trials of every AdaPruner study whose final record is among them."""
    records = [r for r in records if isinstance(r, Mapping)]
    trials = study_trial_hashes(records)
    return [r for r in records if r.get("config_hash") not in trials]


def study_trial_hashes(records: Iterable[Mapping]) -> set[str]:
    """The config hashes of the trials of every AdaPruner study whose final record is among ``records``: search
    steps, summarised by that final cell (its record["study"])."""
    return {
        str(t["config_hash"])
        for r in records
        if isinstance(r, Mapping) and isinstance(r.get("study"), Mapping)
        for t in r["study"].get("trials") or []
        if t.get("config_hash")
    }


NULL_READS_AS = {"n_samples": "all"}  # a calibration without a sample count reads every document


def _fmt_leaf(value: str, name: str = "") -> str:
    try:
        v = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(v, list):
        return "+".join(str(x) for x in v) or "none"  # e.g. NIRVANA's kl_select.seeds=[]: no seed search
    text = NULL_READS_AS.get(name, "null") if v is None else str(v)
    if isinstance(v, str) and (not v.isprintable() or v.strip() != v):  # e.g. a join string "\n\n" or " "
        text = json.dumps(v)
    return text if len(text) <= 16 else text[:8] + "…"  # content hashes: a prefix tells them apart


def _variant_labels(records: Sequence[Mapping], bases: Sequence[str]) -> list[str]:
    """Per record, the differing config values within its (model, method) group, e.g. "structures=block"."""
    leaves = [_identity_leaves(r) for r in records]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((_name((r.get("config") or {}).get("model")), bases[i]), []).append(i)
    labels = [""] * len(records)
    varying_in: dict[tuple, list[tuple]] = {}
    for key, idx in groups.items():
        paths = sorted({p for i in idx for p in leaves[i]})
        # a value missing from some records (older schema) does not split rows; two different values do
        varying_in[key] = [p for p in paths if len({leaves[i][p] for i in idx if p in leaves[i]}) > 1]
    for (model, base), idx in groups.items():
        varying = varying_in[(model, base)]
        if not varying:
            # a single variant on this model still names what tells the method's variants apart on another model
            # (Qwen's one Search-LLM cell is the initialisation, as the labelled SmolLM2 rows beside it show)
            varying = sorted(
                {p for (_, b), ps in varying_in.items() if b == base for p in ps if p[0] != "model"}
                & {p for i in idx for p in leaves[i]}
            )
        if not varying:
            continue
        lasts = [p[-1] for p in varying]
        names = {p: (p[-1] if lasts.count(p[-1]) == 1 else ".".join(p)) for p in varying}
        for i in idx:
            labels[i] = ", ".join(f"{names[p]}={_fmt_leaf(leaves[i].get(p, 'null'), p[-1])}" for p in varying)
    return labels


def seed_key(record: Mapping) -> str | None:
    """What makes two runs of one row repeats: the run seed, plus the calibration seed when calibration was read
    and its draw depends on it (a calibration-seed sweep at one run seed is n repeats, not one overwritten cell).
    A draw in file order (ShortGPT's first documents, consecutive stream windows) or of the first documents is the
    same for every seed: those cells are one run, not n repeats with zero spread."""
    cfg = record.get("config") or {}
    if cfg.get("seed") is None:
        return None
    calib = record.get("calibration") or {}
    seeded = calib.get("used") and calib.get("order") != "file" and calib.get("sampler") != "first_docs"
    return f"{cfg['seed']}/{calib.get('seed')}" if seeded else str(cfg["seed"])


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
        common = {
            "config_hash": rec.get("config_hash"),
            "created": rec.get("created"),
            "model": model,
            "params_before": params.get("before"),
            "seed": seed_key(rec),
        }
        metrics = rec.get("metrics") or {}
        blocks: dict[str, dict[str, tuple[str, Any]]] = {"pruned": {}, "dense": {}, "prerecovery": {}}
        for name, block in metrics.items():
            phase, _, head = name.partition("_") if name.startswith(("dense_", "prerecovery_")) else ("", "", name)
            blocks[phase or "pruned"][head] = (name, block)
        if is_dense:  # a dense record's own metrics are the dense phase
            blocks["dense"] = {**blocks["pruned"], **blocks["dense"]}
            blocks["pruned"] = {}
        for phase, heads in blocks.items():
            if phase == "dense":
                ident = dict(
                    method="dense",
                    base_method="dense",
                    anchor_method="dense",
                    ratio=0.0,
                    paper_ratio=0.0,
                    setting=None,
                    calibration=None,
                    achieved=0.0,
                    params_after=params.get("before"),
                    seed=None,
                )
            else:
                recovered = phase == "pruned" and rec_name is not None
                label = base + (f"+{rec_name}" if recovered else "") + suffix
                ident = dict(
                    method=label,
                    base_method=base,
                    anchor_method=anchor_method(rec, recovered),
                    ratio=ratio,
                    paper_ratio=paper_ratio(rec),
                    setting=setting_label(rec),
                    calibration=calibration_label(rec),
                    achieved=float(achieved) if is_number(achieved) else None,
                    params_after=params.get("after"),
                    seed=seed_key(rec),
                )
            for head, (block_name, block) in heads.items():
                for row in _block_rows(head, block, block_name):
                    rows.append({**common, **ident, "phase": phase, "dataset": None, "split": None, **row})
    return pd.DataFrame(rows, columns=list(OBS_COLUMNS))


def limit_suffix(limit: Any, kind: str) -> str:
    """The subset a value was measured on, for its column header: " [first N windows]" (PPL) or " [limit N]"."""
    if limit is None or (isinstance(limit, float) and math.isnan(limit)):
        return ""
    return f" [first {int(limit)} windows]" if kind == "ppl" else f" [limit {int(limit)}]"


def newest_per_seed(obs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One observation per (group, seed): the newest record's (a rerun of a cell replaces it); ``by`` names the
    group columns, and observations without a seed form one seed of their own."""
    obs = obs.sort_values("created", kind="stable")
    seed = obs["seed"].astype(object).where(obs["seed"].notna(), "none").astype(str)
    return obs.assign(_seed=seed).groupby([*by, "_seed"], dropna=False, sort=False).tail(1)


def protocols_present(obs: pd.DataFrame) -> list[str]:
    keys = obs.loc[obs["kind"].isin(["ppl", "zeroshot"]), "key"]
    return sorted({k if "/" not in k else "zeroshot:" + k.split("/")[0] for k in keys})
