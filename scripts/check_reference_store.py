"""Which cells of the reference presets are in a store: the committed records must be what the committed presets
compose today (same config hash), or `scripts/reference_runs.sh` would recompute them and the tables would mix code
versions. Composes every sweep cell with Hydra's compose API and `experiments.cell.check` (no weights loaded).

    python scripts/check_reference_store.py --store results/store experiment=llm_pruner_table1 [model=stories260k]
Exit status 1 when a composed cell is missing from the store.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from hydra import compose, initialize_config_dir

import experiments.paper_ratios  # noqa: F401  (the ${paper_knob:...} resolver)
from pruning_lab.run import CONF


def sweep_overrides(argv: list[str]) -> list[list[str]]:
    """Every cell of `run.py -m <argv>`: the command's own comma lists and the preset's sweeper params."""
    listed = [o for o in argv if "," in o and "[" not in o]
    base = [o for o in argv if o not in listed]
    cells = []
    for combo in itertools.product(
        *[[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in listed]
    ):
        cells += _preset_cells(base + list(combo))
    return cells


def _preset_cells(base: list[str]) -> list[list[str]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=base, return_hydra_config=True)
    sweeper = str(cfg.hydra.sweeper.get("_target_", ""))
    if not sweeper.endswith("BasicSweeper"):
        raise SystemExit(
            f"error: {' '.join(base)} sweeps with {sweeper.rsplit('.', 1)[-1]}, whose cells come from its search, not "
            "a grid that can be composed here; check its trial cells by hash in the store instead"
        )
    params = dict(cfg.hydra.sweeper.get("params") or {})
    axes = []
    for key, values in params.items():
        if any(o.lstrip("+").startswith(f"{key.lstrip('+')}=") for o in base):
            continue  # the command line fixes this axis
        axes.append([f"{key}={v.strip()}" for v in str(values).split(",")])
    return [base + list(combo) for combo in itertools.product(*axes)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("overrides", nargs="+")
    args = ap.parse_args()
    from experiments.cell import check
    from experiments.store import ResultsStore

    store = ResultsStore(args.store)
    missing = 0
    for overrides in sweep_overrides(args.overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        cell = check(cfg)
        hit = store.get(cell.config_hash) is not None
        missing += not hit
        print(f"{'ok     ' if hit else 'MISSING'} {cell.config_hash}  {' '.join(overrides)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
