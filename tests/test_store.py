"""Results store and record: atomic and concurrent writes, completeness, flattening, hashing, CLI. No model needed."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from experiments import store as store_mod
from experiments.record import (
    NON_SEMANTIC,
    SCHEMA_VERSION,
    config_hash,
    git_info,
    make_record,
    package_versions,
    to_jsonable,
)
from experiments.store import ResultsStore, flatten_metrics

LABEL = "ppl128-lp:wikitext2:test"
LABEL2 = "ppl2048:wikitext2:test"


def _cfg(**over) -> dict:
    cfg = {
        "seed": 0,
        "model": {"name": "stories260k", "path": None},
        "method": {"name": "magnitude", "importance": "l2"},
        "pruning": {"ratio": 0.2},
        "calibration": {"dataset": "wikitext2", "n_samples": 8, "seq_len": 128, "seed": 0},
        "store": {"dir": "/tmp/somewhere"},
        "logger": {"name": "none"},
        "force": False,
        "progress": True,
    }
    cfg.update(over)
    return cfg


def _ppl_block(value: float, seq_len: int = 128) -> dict:
    return {"ppl": value, "dataset": "wikitext2", "split": "test", "seq_len": seq_len, "stride": seq_len, "bos": True}


def _record(cfg: dict, ppl: float, dense: float, before: int = 1000, after: int = 800) -> dict:
    return make_record(
        cfg,
        metrics={"ppl": {LABEL: _ppl_block(ppl)}, "dense_ppl": {LABEL: _ppl_block(dense)}},
        params={"before": before, "after": after},
        timings={"total": 12.5, "prune": 3.0},
    )


def _listing(store: ResultsStore) -> list[str]:
    return sorted(os.listdir(store.records_dir)) if store.records_dir.exists() else []


# ---------------------------------------------------------------------------------------------------- hashing


def test_config_hash_ignores_non_semantic_keys_and_tracks_semantic_ones():
    base = _cfg()
    h = config_hash(base)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)

    changed_bookkeeping = _cfg(
        store={"dir": "/elsewhere"},
        logger={"name": "wandb"},
        force=True,
        progress=False,
        hydra={"run": {"dir": "outputs/x"}},
    )
    assert config_hash(changed_bookkeeping) == h
    without_bookkeeping = {k: v for k, v in base.items() if k not in NON_SEMANTIC}
    assert config_hash(without_bookkeeping) == h
    assert config_hash(dict(reversed(list(base.items())))) == h  # key order is not identity

    assert config_hash(_cfg(pruning={"ratio": 0.5})) != h
    assert config_hash(_cfg(seed=1)) != h
    nested = _cfg()
    nested["calibration"] = {**nested["calibration"], "n_samples": 16}
    assert config_hash(nested) != h


def test_config_hash_is_sha256_of_canonical_json():
    cfg = {"b": 1, "a": {"y": [1, 2], "x": "s"}, "logger": "wandb"}
    canonical = json.dumps({"a": {"x": "s", "y": [1, 2]}, "b": 1}, sort_keys=True, separators=(",", ":"))
    assert config_hash(cfg) == hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- record


def test_make_record_fields_and_json_round_trip():
    np = pytest.importorskip("numpy")
    cfg = _cfg()
    rec = make_record(
        cfg,
        metrics={"ppl": {LABEL: {"ppl": np.float32(42.5), "seq_len": np.int64(128)}}, "x": np.float64(0.5)},
        params={"before": np.int64(1000), "after": 800},
        timings={"total": 1.5},
        extra={"status": "ok"},
    )
    assert rec["schema"] == SCHEMA_VERSION
    assert rec["config"] == cfg
    assert rec["config_hash"] == config_hash(cfg)
    assert rec["seed"] == 0
    assert rec["created"].endswith("+00:00")
    assert rec["status"] == "ok"
    assert rec["versions"]["python"].count(".") == 2
    assert rec["versions"]["pandas"] is not None and rec["versions"]["lm_eval"] is not None
    assert set(rec["git"]) == {"sha", "dirty"}
    # numpy scalars became Python values, so the record equals its own JSON round trip
    assert type(rec["metrics"]["ppl"][LABEL]["ppl"]) is float
    assert type(rec["params"]["before"]) is int
    assert type(rec["metrics"]["x"]) is float
    assert json.loads(json.dumps(rec)) == rec
    with pytest.raises(ValueError, match="config_hash"):
        make_record(cfg, metrics={}, params={}, timings={}, extra={"config_hash": "x"})


def test_to_jsonable_converts_torch_and_rejects_unknown():
    torch = pytest.importorskip("torch")
    assert to_jsonable({"a": torch.tensor(2.5), "b": (1, torch.tensor([1, 2]))}) == {"a": 2.5, "b": [1, [1, 2]]}
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"a": object()})


def test_package_versions_and_git_info(tmp_path):
    versions = package_versions()
    assert {
        "torch",
        "transformers",
        "peft",
        "lm_eval",
        "datasets",
        "hydra-core",
        "numpy",
        "pandas",
        "wandb",
        "python",
    } <= set(versions)
    assert versions["torch"] and versions["torch"].startswith("2.")
    assert git_info(tmp_path) == {"sha": None, "dirty": None}  # not a repository
    here = git_info(Path(__file__).resolve().parents[1])
    if here["sha"] is not None:  # a source checkout
        assert len(here["sha"]) == 40 and isinstance(here["dirty"], bool)


# ---------------------------------------------------------------------------------------------------- store writes


def test_write_get_has(tmp_path):
    store = ResultsStore(tmp_path)
    rec = _record(_cfg(), 50.0, 40.0)
    h = rec["config_hash"]
    assert not store.has(h) and store.get(h) is None
    path = store.write(rec)
    assert path == tmp_path / "records" / f"{h}.json"
    assert store.has(h)
    assert store.get(h) == rec
    assert _listing(store) == [f"{h}.json"]
    assert not store.has("0" * 16)


def test_failed_serialisation_leaves_no_file_and_keeps_old_record(tmp_path):
    store = ResultsStore(tmp_path)
    bad = {"schema": SCHEMA_VERSION, "config_hash": "a" * 16, "padding": "x" * 200_000, "metrics": {"oops": object()}}
    with pytest.raises(TypeError):
        store.write(bad)
    assert _listing(store) == []  # neither a record nor a temp file
    assert not store.has("a" * 16)

    good = _record(_cfg(), 50.0, 40.0)
    store.write(good)
    bad["config_hash"] = good["config_hash"]
    with pytest.raises(TypeError):
        store.write(bad)
    assert _listing(store) == [f"{good['config_hash']}.json"]
    assert store.get(good["config_hash"]) == good  # the earlier complete record survived


def test_write_rejects_records_the_store_could_not_find_again(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(ValueError, match="schema"):
        store.write({"config_hash": "a" * 16})
    with pytest.raises(ValueError, match="hash"):
        store.write({"schema": SCHEMA_VERSION, "config_hash": "../escape"})
    assert _listing(store) == []


def test_torn_and_temp_files_are_not_records(tmp_path):
    store = ResultsStore(tmp_path)
    good = _record(_cfg(), 50.0, 40.0)
    store.write(good)
    (store.records_dir / ("b" * 16 + ".json")).write_text('{"schema": 1, "config_hash": "bbbb')  # torn by a kill
    (store.records_dir / ("c" * 16 + ".json")).write_text('{"config_hash": "cccc"}')  # parses, but no schema
    (store.records_dir / f".{'d' * 16}.x1y2.tmp").write_text('{"schema": 1')  # a writer's leftover temp file
    assert not store.has("b" * 16) and not store.has("c" * 16) and not store.has("d" * 16)
    with pytest.warns(RuntimeWarning) as caught:
        recs = store.records()
    assert [r["config_hash"] for r in recs] == [good["config_hash"]]
    # the torn file and the schema-less one are named; the temp file is silently ignored
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "b" * 16 + ".json" in messages[0] and "c" * 16 + ".json" in messages[1]


def _writer(root: str, worker: int, n: int, shared: int, barrier) -> None:
    """Write n records (the first `shared` collide across workers) and, between writes, read the colliding ones:
    a reader must never see a file that exists but is incomplete."""
    store = ResultsStore(root)
    barrier.wait()
    for i in range(n):
        h = f"{i:016x}" if i < shared else f"{worker:08x}{i:08x}"
        payload = f"w{worker}-i{i}-" * 20_000  # ~200 KB so that a torn write would be visible
        store.write(
            {
                "schema": SCHEMA_VERSION,
                "config_hash": h,
                "worker": worker,
                "payload": payload,
                "digest": hashlib.sha256(payload.encode()).hexdigest(),
            }
        )
        for j in range(shared):
            hj = f"{j:016x}"
            if store.path(hj).exists():
                rec = store.get(hj)
                if rec is None or hashlib.sha256(rec["payload"].encode()).hexdigest() != rec["digest"]:
                    os._exit(3)


def test_concurrent_writers_leave_only_complete_records(tmp_path):
    workers, n, shared = 4, 20, 5
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n, shared, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers

    store = ResultsStore(tmp_path)
    names = _listing(store)
    assert all(name.endswith(".json") and not name.startswith(".") for name in names)  # no temp files left
    assert len(names) == workers * (n - shared) + shared
    recs = store.records()
    assert len(recs) == len(names)
    for rec in recs:
        assert hashlib.sha256(rec["payload"].encode()).hexdigest() == rec["digest"]
        assert rec["payload"].startswith(f"w{rec['worker']}-")
        assert store.has(rec["config_hash"])


# ---------------------------------------------------------------------------------------------------- table


def test_table_flattens_two_records(tmp_path):
    store = ResultsStore(tmp_path)
    r1 = _record(_cfg(), 50.0, 40.0, before=1000, after=800)
    r2 = _record(
        _cfg(pruning={"ratio": 0.5}, method={"_target_": "pruning.methods.wanda_sp"}),
        90.0,
        40.0,
        before=1000,
        after=500,
    )
    r2["metrics"]["ppl"][LABEL2] = _ppl_block(70.0, 2048)
    r2["metrics"]["zeroshot"] = {"arc_easy": {"acc": 0.25, "acc_norm": 0.26, "harness": "0.4.13", "bos": True}}
    r2["metrics"]["efficiency"] = {"macs": 1.5e6, "latency_ms": {"p50": 3.0}}
    r1["created"], r2["created"] = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    store.write(r2)
    store.write(r1)

    df = store.table()
    assert list(df.columns) == [
        "model",
        "method",
        "ratio",
        "achieved_ratio",
        "params_before",
        "params_after",
        LABEL,
        f"dense {LABEL}",
        LABEL2,
        "zeroshot/arc_easy/acc",
        "zeroshot/arc_easy/acc_norm",
        "efficiency/macs",
        "efficiency/latency_ms/p50",
        "wall_s",
        "config_hash",
        "created",
    ]
    assert len(df) == 2
    first, second = df.iloc[0], df.iloc[1]  # oldest first
    assert first["config_hash"] == r1["config_hash"] and second["config_hash"] == r2["config_hash"]
    assert (first["model"], first["method"], first["ratio"]) == ("stories260k", "magnitude", 0.2)
    assert second["method"] == "wanda_sp" and second["ratio"] == 0.5
    assert first["achieved_ratio"] == pytest.approx(0.2) and second["achieved_ratio"] == pytest.approx(0.5)
    assert (first["params_before"], first["params_after"]) == (1000, 800)
    assert first[LABEL] == 50.0 and first[f"dense {LABEL}"] == 40.0 and second[LABEL] == 90.0
    assert second[LABEL2] == 70.0 and math.isnan(first[LABEL2])
    assert second["zeroshot/arc_easy/acc_norm"] == 0.26 and second["efficiency/latency_ms/p50"] == 3.0
    assert first["wall_s"] == 12.5

    picked = store.table(columns=["method", "ppl*"])
    assert list(picked.columns) == ["method", LABEL, LABEL2]
    with pytest.raises(KeyError, match="nonexistent"):
        store.table(columns=["nonexistent"])


def test_flatten_metrics_generic_blocks():
    flat = flatten_metrics(
        {
            "dense_ppl": {"a:b:c": {"ppl": None, "seq_len": 128}},
            "lora_recovered_ppl": {"x": {"ppl": 9.0}},
            "efficiency": {"params": 10, "flag": True, "note": "str"},
            "score": 1.5,
        }
    )
    assert flat == {"dense a:b:c": None, "lora recovered x": 9.0, "efficiency/params": 10, "score": 1.5}


def test_empty_table_has_the_fixed_columns(tmp_path):
    df = ResultsStore(tmp_path).table()
    assert len(df) == 0 and list(df.columns)[:2] == ["model", "method"] and "config_hash" in df.columns


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_table(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    r1 = _record(_cfg(), 50.0, 40.0)
    r2 = _record(_cfg(pruning={"ratio": 0.5}), 91.25, 40.0, after=500)
    store.write(r1)
    store.write(r2)

    assert store_mod.main(["--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "model" in header and LABEL in header and f"dense {LABEL}" in header
    assert r1["config_hash"] in out and r2["config_hash"] in out and "91.25" in out
    assert len(out.strip().splitlines()) == 3

    assert store_mod.main(["--store", str(tmp_path), "--format", "csv", "--columns", "ratio,config_hash"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "ratio,config_hash" and len(lines) == 3

    assert store_mod.main(["--store", str(tmp_path), "--format", "json", "--columns", LABEL]) == 0
    assert sorted(r[LABEL] for r in json.loads(capsys.readouterr().out)) == [50.0, 91.25]

    assert store_mod.main(["--store", str(tmp_path), "--format", "markdown", "--columns", "ratio"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["| ratio |", "|---|"]

    assert store_mod.main(["--store", str(tmp_path), "--columns", "nope"]) == 2
    assert "no column matches 'nope'" in capsys.readouterr().err


def test_cli_empty_store(tmp_path, capsys):
    assert store_mod.main(["--store", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"no records in {tmp_path / 'empty' / 'records'}"


def test_default_store_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_STORE", str(tmp_path / "s"))
    assert store_mod.default_store_dir() == tmp_path / "s"
    assert ResultsStore().root == tmp_path / "s"
    monkeypatch.delenv("PRUNING_STORE")
    assert store_mod.default_store_dir().parts[-2:] == ("runs", "store")


def test_flatten_record_prefers_the_recorded_target_ratio():
    rec = make_record(_cfg(), metrics={}, params={"before": 10, "after": 6, "target_ratio": 0.35}, timings={})
    row = store_mod.flatten_record(rec)
    assert row["ratio"] == 0.35 and row["achieved_ratio"] == pytest.approx(0.4) and row["wall_s"] is None
