#!/usr/bin/env bash
# Reproduces everything in results/: the CPU size of every experiment preset on SmolLM2-135M (the table model) and
# stories260K (the quick one), then the tables, from the records in results/store.
#   bash scripts/reference_runs.sh            # all (hours on 2 CPU cores; finished cells are store hits)
#   bash scripts/reference_runs.sh tables     # only re-render the tables from the committed records
#   bash scripts/reference_runs.sh gpu        # on a CUDA machine: the Qwen cells a 2-core CPU cannot finish
# SmolLM2's ratio sweep runs at 20% and 50% with calibration seed 0 only (CPU budget); stories260K runs every ratio 10-50%.
# The records before the paper protocols (every method at pruning.ratio with LLM-Pruner's sampler) are kept in
# results/archive/pre-protocols/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
PY=${PYTHON:-python}
STORE=results/store
run() { "$PY" run.py -m "$@" store.dir=$STORE progress=false; }
# Qwen2.5-Coder-0.5B one cell at a time on every core: NIRVANA's scoring alone peaks at 12.4 GB, so two do not fit 24 GiB
qrun() { run "$@" model=qwen25_coder_05b hydra/launcher=basic threads=null; }

MODE=${1:-all}
if [[ $MODE == gpu ]]; then
  # numerical's 128 x 2048 calibration (~5 h on 2 cores), search_llm (~80 h), search_llm_code (~230 h):
  # results/README.md. device is part of a cell's identity, so these are rows of their own beside the CPU cells.
  qrun experiment=ratio_sweep pruning.ratio=0.2 calibration.seed=0 method=numerical,search_llm,search_llm_code \
    device=cuda
elif [[ $MODE != tables ]]; then
  # SmolLM2-135M, the table model: each paper preset at its paper's own operating point (native knob) and
  # calibration sampler, CPU size (the store holds exactly these cells: scripts/check_reference_store.py)
  run experiment=llm_pruner_table1
  run experiment=flap_table
  run experiment=slicegpt_table
  run experiment=search_llm_table2
  # every method at 20% and 50% of ALL parameters (the cross-method axis), calibration seed 0 (CPU budget)
  run experiment=ratio_sweep pruning.ratio=0.2,0.5 calibration.seed=0
  # Qwen2.5-Coder-0.5B (fetched on first use; partial: see results/README.md)
  qrun experiment=ratio_sweep pruning.ratio=0.2 calibration.seed=0
  # at 50% without LLM-Pruner (at most 44.1% here) and Search-LLM (at most 49.4%): each stops in one line
  qrun experiment=ratio_sweep pruning.ratio=0.5 calibration.seed=0 \
    method=random,magnitude,nirvana_cpu,flap,wanda_sp,shortgpt_cpu,slicegpt_cpu,numerical_cpu,llm_bip
  qrun experiment=ratio_sweep pruning.ratio=0.2 calibration.seed=0 \
    method=magnitude_l1,llm_pruner_element2,llm_pruner_vector   # the variants outside the sweep's list
  qrun experiment=ratio_sweep pruning.ratio=0.2 calibration.seed=0 method=nirvana,slicegpt,shortgpt  # full configs
  qrun experiment=ratio_sweep pruning.ratio=0.2 calibration.seed=0 method=adapruner  # its default choices, no study
  qrun experiment=adapruner_cpu   # the study at CPU size (12 trials), its final cell at 20%
  qrun experiment=ratio_sweep pruning.ratio=0.2 calibration.seed=1,2 \
    method=llm_pruner,nirvana_cpu,llm_bip,wanda_sp,slicegpt_cpu   # the seed spread of the leading rows
  qrun experiment=slicegpt_table
  qrun experiment=llm_pruner_table1
  qrun experiment=flap_table
  qrun experiment=search_llm_table2
  # stories260K, the quick one: every preset and the whole ratio sweep (10-50%, seeds 0-2)
  run experiment=llm_pruner_table1 model=stories260k
  run experiment=flap_table model=stories260k
  run experiment=slicegpt_table model=stories260k
  run experiment=search_llm_table2 model=stories260k
  run experiment=ratio_sweep model=stories260k
fi
"$PY" -m experiments.tables --store $STORE --all --costs --out results/   # + prune_time.md
"$PY" -m experiments.tables --store $STORE --table ratio_sweep --summary 0.2,0.5 --out results/   # the README view
"$PY" scripts/readme_table.py                                                                   # into README.md
