"""Record schema 2 (allocation settings moved into the method configs): old records and old commands.

tests/fixtures/schema1_cells.json holds, for 70 commands (every method config, the paper-table and sweep presets,
and every allocation override people used), the resolved cell config and config hash that the schema-1 code
(main at 49982a5, conf/allocation present) composed, and the equivalent schema-2 command. A migrated old record
must have exactly the config and hash that today's code composes for the schema-2 command: then a sweep finds
every finished cell again and no number changes its identity.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.cell import build_method, cell_config
from experiments.migrate import MigrationError, check_overrides, migrate_store, moved_override, upgrade_record
from experiments.record import SCHEMA_VERSION, config_hash
from experiments.store import ResultsStore
from pruning.errors import ConfigKeyMoved

REPO = Path(__file__).resolve().parents[1]
CASES = json.loads((REPO / "tests" / "fixtures" / "schema1_cells.json").read_text())


def old_record(case: dict, **extra) -> dict:
    return {
        "schema": 1,
        "config": case["config"],
        "config_hash": case["config_hash"],
        "seed": 0,
        "created": "2026-11-28T00:00:00+00:00",
        "metrics": {"ppl": {"x": {"ppl": 1.0}}},
        **extra,
    }


@functools.cache
def composed(i: int) -> dict:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=CASES[i]["overrides_schema2"])
    return cell_config(cfg, uses_calibration=build_method(cfg).needs_calibration)


def _one_per_command_shape(cases):
    """The fast tier migrates the first case of each method / preset; the other ~45 (5 s of composing) run in the
    slow tier."""
    seen: set[str] = set()
    out = []
    for i, case in enumerate(cases):
        shape = next((o for o in case["overrides_schema1"] if o.startswith(("method=", "experiment="))), "")
        out.append(
            pytest.param(
                i, id=" ".join(case["overrides_schema1"]), marks=() if shape not in seen else (pytest.mark.slow,)
            )
        )
        seen.add(shape)
    return out


@pytest.mark.parametrize("i", _one_per_command_shape(CASES))
def test_migrated_record_has_the_config_and_hash_of_the_new_command(i):
    new = upgrade_record(old_record(CASES[i]))
    assert new["schema"] == SCHEMA_VERSION and "allocation" not in new["config"]
    assert new["config"] == composed(i)
    assert new["config_hash"] == config_hash(composed(i))
    assert new["migrations"] == [{"from_schema": 1, "config_hash": CASES[i]["config_hash"]}]
    assert new["metrics"] == old_record(CASES[i])["metrics"]


def test_the_allocation_moved_where_the_method_reads_it():
    by = {" ".join(c["overrides_schema1"]): c for c in CASES}
    llm = upgrade_record(old_record(by["model=stories260k method=llm_pruner pruning.ratio=0.2"]))["config"]["method"]
    assert llm["layers"] == {"start_frac": 0.125, "end_frac": 0.9375, "start": None, "end": None}
    assert llm["count_rule"] == "llm_pruner"
    wanda = upgrade_record(old_record(by["model=stories260k method=wanda_sp pruning.ratio=0.2"]))["config"]["method"]
    assert wanda["count_rule"] == "floor" and wanda["layers"]["start_frac"] == 0.0  # its own rule, not the group's
    for name in ("nirvana", "slicegpt", "search_llm"):
        method = upgrade_record(old_record(by[f"model=stories260k method={name} pruning.ratio=0.2"]))["config"][
            "method"
        ]
        assert "layers" not in method and "count_rule" not in method
    # NIRVANA ignored the allocation: two schema-1 cells that differed only there are one cell now
    a = upgrade_record(old_record(by["model=stories260k method=nirvana pruning.ratio=0.2"]))
    b = upgrade_record(old_record(by["model=stories260k method=nirvana pruning.ratio=0.2 allocation=layer_range"]))
    assert (
        a["config_hash"] == b["config_hash"] != by["model=stories260k method=nirvana pruning.ratio=0.2"]["config_hash"]
    )
    dense = by["model=stories260k method=dense"]
    assert upgrade_record(old_record(dense))["config_hash"] == dense["config_hash"]  # no allocation: same identity


def test_a_group_ratio_the_new_schema_cannot_hold_is_refused():
    case = next(c for c in CASES if c["overrides_schema1"][1:] == ["method=wanda_sp", "pruning.ratio=0.2"])
    rec = old_record(case)
    rec["config"] = dict(rec["config"], allocation=dict(rec["config"]["allocation"], group_ratio=0.3))
    with pytest.raises(MigrationError, match=r"allocation\.group_ratio=0\.3 fixed the per-layer fraction"):
        upgrade_record(rec)


def test_migrate_store_renames_keeps_everything_and_is_idempotent(tmp_path):
    store = ResultsStore(tmp_path / "store")
    by = {" ".join(c["overrides_schema1"]): c for c in CASES}
    names = [
        "model=stories260k method=llm_pruner pruning.ratio=0.2",
        "model=stories260k method=dense",
        "model=stories260k method=nirvana pruning.ratio=0.2",
        "model=stories260k method=nirvana pruning.ratio=0.2 allocation=layer_range",
    ]
    store.records_dir.mkdir(parents=True)
    for k, name in enumerate(names):  # written as the schema-1 code wrote them, under their old hashes
        rec = old_record(by[name], created=f"2026-11-28T00:00:0{k}+00:00")
        (store.records_dir / f"{rec['config_hash']}.json").write_text(json.dumps(rec))
    with pytest.warns(RuntimeWarning, match="3 records .* older schema"):
        assert len(store.records()) == 4  # readable before the rewrite, upgraded on read
    assert store.get(by[names[0]]["config_hash"]) is None  # an old name is not the cell's hash any more

    moved, left = migrate_store(store.root, log=lambda *_: None)
    assert not left and len(moved) == 4
    new = {n: upgrade_record(old_record(by[n]))["config_hash"] for n in names}
    assert sorted(p.stem for p in store.records_dir.glob("*.json")) == sorted(set(new.values()))
    assert store.get(new[names[0]])["config"]["method"]["layers"]["start_frac"] == 0.125
    assert store.get(new[names[1]])["schema"] == SCHEMA_VERSION
    kept = store.get(new[names[2]])  # the newer of the two NIRVANA records stays ...
    assert kept["created"].endswith("03+00:00") and kept["migrations"][0]["config_hash"] == by[names[3]]["config_hash"]
    (gone,) = (store.root / "superseded").glob("*.json")  # ... and the other is kept aside, not deleted
    assert gone.stem == by[names[2]]["config_hash"] and json.loads(gone.read_text())["schema"] == SCHEMA_VERSION

    assert migrate_store(store.root, log=lambda *_: None) == ({}, {})  # a second run has nothing to do
    assert len(store.records()) == 3


def test_committed_store_is_migrated():
    """Both committed stores hold schema-2 records only, each under its own hash."""
    archive = sorted((REPO / "results" / "archive" / "pre-protocols" / "store" / "records").glob("*.json"))
    current = sorted((REPO / "results" / "store" / "records").glob("*.json"))
    assert len(archive) == 153 and current
    records = archive + current
    for path in records:
        rec = json.loads(path.read_text())
        assert rec["schema"] == SCHEMA_VERSION and rec["config_hash"] == path.stem == config_hash(rec["config"])
        assert "allocation" not in rec["config"]


@pytest.mark.parametrize(
    "arg,new",
    [
        ("allocation=layer_range", "method.layers.start_frac=0.125 method.layers.end_frac=0.9375"),
        ("allocation=uniform", "drop the override"),
        ("allocation.layer_start_frac=0.2", "use method.layers.start_frac=0.2"),
        ("allocation.layer_end_frac=0.5", "use method.layers.end_frac=0.5"),
        ("allocation.layer_start=1", "use method.layers.start=1"),
        ("+allocation.layer_end=3", "use method.layers.end=3"),
        ("allocation.count_rule=floor", "use method.count_rule=floor"),
        ("allocation.group_ratio=0.25", "use method.group_ratio=0.25"),
        ("~allocation", "allocation settings are method keys now"),
    ],
)
def test_old_overrides_get_one_line_naming_the_new_key(arg, new):
    msg = moved_override(arg)
    assert msg is not None and "\n" not in msg and new in msg
    with pytest.raises(ConfigKeyMoved, match="removed"):
        check_overrides(["method=magnitude", arg])


def test_other_overrides_pass():
    check_overrides(["method=llm_pruner", "method.layers.start=1", "method.count_rule=floor", "pruning.ratio=0.2"])
    assert moved_override("method.allocation_mode=global") is None  # llm_bip's own key, not the old group


def test_old_allocation_overrides_are_not_in_the_new_conf():
    assert not (REPO / "conf" / "allocation").exists()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["method=magnitude", "method.layers.start=1", "method.layers.end=4", "method.count_rule=floor"],
        )
    method = build_method(cfg)
    assert method.allocation.layers(5) == [1, 2, 3] and method.allocation.count_rule == "floor"
    assert "allocation" not in cfg


def test_bad_layer_range_keys_fail_with_one_line():
    from pruning.errors import PruningError
    from pruning.methods.baselines import magnitude

    with pytest.raises(PruningError, match=r"unknown method.layers keys \['begin'\]; choices: start_frac, end_frac"):
        magnitude(layers={"begin": 1})
    with pytest.raises(PruningError, match="unknown count_rule 'ceil'"):
        magnitude(count_rule="ceil")
