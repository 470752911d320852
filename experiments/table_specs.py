"""The paper tables as data: which protocols and tasks each table shows, in which columns, with which notes.

A table takes a record's entry only when its protocol name and fields agree (experiments/observations.py); its
published rows come from experiments/anchors.csv for the same paper and blocks. Adding a table is adding a
``TableSpec`` to ``TABLES``; ``experiments/tables.py`` builds it and ``experiments/render.py`` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Zero-shot task ids (as the anchors spell them) -> column headers.
TASK_HEADERS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_e": "ARC-e",
    "arc_c": "ARC-c",
    "obqa": "OBQA",
}
# METHODS.md §1.5: the metric each paper's table used per task.
ZS_LP = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_e": "acc",
    "arc_c": "acc_norm",
    "obqa": "acc_norm",
}
ZS_SG = {"piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc", "arc_e": "acc_norm", "arc_c": "acc_norm"}


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
    paper: tuple[str, ...]  # anchors' `paper` values
    blocks: tuple[str, ...]  # anchors' blocks that hold this table
    anchor_model: str  # published rows shown for this model unless ours is one of the anchors' models
    ppl: tuple[PPLCol, ...] = ()
    zs: Mapping[str, str] = field(default_factory=dict)  # task -> metric, in column order
    zs_protocol: str = "zs-lp"
    avg_header: str | None = None
    layout: str = "rows"  # rows: method x ratio; ratio_pivot: ratios as columns (one PPL column)
    notes: tuple[str, ...] = ()
    cells: str = "native"  # native: cells set by each paper's own knob | ratio: set by pruning.ratio
    methods: tuple[str, ...] = ()  # the paper's rows: fnmatch patterns on our method names (empty: every method)
    cell_protocol: PPLCol | None = None  # a cell enters only if evaluated under this PPL protocol (default: ppl[0])


# the structured baselines every paper reports beside its own rows
BASELINES = ("random", "magnitude*")

W2_128 = PPLCol("WikiText-2", "ppl128-lp", "wikitext2", "test")
PTB_128 = PPLCol("PTB", "ppl128-lp", "ptb", "validation")
RATIO_NOTE = (
    "ratio: ours = fraction of all parameters removed (target; achieved beside it); published = the "
    "paper's own label, whose meaning differs per paper (METHODS.md §1.3)."
)
NATIVE_NOTE = (
    "ratio: the paper's own row label; setting: the native knob that defined our cell (its meaning "
    "below), as the paper's code reads it; achieved: the share of ALL our model's parameters removed."
)
KNOB_MEANINGS = {
    "group_ratio": (
        "LLM-Pruner --pruning_ratio p: floor of the KV-group share and p of the MLP channels removed in "
        "every layer of [4, 30) (scaled to depth); on LLaMA-7B p = 0.25 removes 19.52% of the parameters, "
        'the papers\' "20%" row'
    ),
    "attn_mlp_ratio": (
        "FLAP / Wanda-SP --pruning_ratio: share of attention+MLP weights as their code counts them "
        "(query heads weighed as MHA heads; int(p·n) units per kind and layer in the uniform modes)"
    ),
    "slicing": "SliceGPT --sparsity: fraction of the hidden dimension sliced",
    "sparsity": "NIRVANA sparsity: share of attention+MLP parameters",
    "n_blocks": "ShortGPT: decoder blocks removed",
    "inheriting_ratio": "Search-LLM inheriting ratio r: share of all parameters kept; the row label is 1 - r",
    "unit_ratio": "Numerical Pruning rho (Eq. 8): fraction of units (heads + MLP channels) pruned",
}

TABLES: dict[str, TableSpec] = {
    "llm_pruner_t1": TableSpec(
        name="llm_pruner_t1",
        title="LLM-Pruner Table 1: PPL (seq 128) and 7-task zero-shot accuracy",
        paper=("LLM-Pruner",),
        blocks=("A1",),
        anchor_model="LLaMA-7B",
        ppl=(W2_128, PTB_128),
        zs=ZS_LP,
        avg_header="Average",
        methods=(*BASELINES, "llm_pruner_*"),
        notes=(
            (
                "PPL: ppl128-lp (WikiText-2 test, PTB validation, 128-token windows, one BOS). Zero-shot: zs-lp, "
                "0-shot, % (acc: BoolQ, PIQA, WinoGrande, ARC-e; acc_norm: HellaSwag, ARC-c, OBQA); Average = plain "
                "mean of the 7."
            ),
            NATIVE_NOTE,
        ),
    ),
    "search_llm_t2": TableSpec(
        name="search_llm_t2",
        title="Search-LLM Table 2: PPL (seq 2048) and 7-task zero-shot accuracy by ratio",
        paper=("Search-LLM",),
        blocks=("B1",),
        anchor_model="LLaMA-7B",
        ppl=(PPLCol("WikiText-2", "ppl2048-sl", "wikitext2", "test"), PPLCol("PTB", "ppl2048-sl", "ptb", "validation")),
        zs=ZS_LP,
        avg_header="Average",
        methods=(*BASELINES, "llm_pruner_*", "slicegpt", "flap", "search_llm"),
        notes=(
            (
                "PPL: ppl2048-sl (WikiText-2 test, PTB validation, 2048-token windows, one BOS). Zero-shot: zs-lp "
                "as in LLM-Pruner Table 1. Search-LLM labels its rows by inheriting ratio r; written here as 1 - r."
            ),
            NATIVE_NOTE,
        ),
    ),
    "slicegpt_t1": TableSpec(
        name="slicegpt_t1",
        title="SliceGPT main table: WikiText-2 PPL (seq 2048) and 5-task zero-shot average",
        paper=("SliceGPT",),
        blocks=("E1",),
        anchor_model="LLaMA-2-7B",
        ppl=(PPLCol("WikiText-2", "ppl2048-sg", "wikitext2", "test"),),
        zs=ZS_SG,
        avg_header="Avg (5)",
        methods=("slicegpt",),
        notes=(
            (
                "PPL: ppl2048-sg (WikiText-2 test, 2048-token windows, mean of per-window NLL). Zero-shot: SliceGPT's "
                "5 tasks (acc_norm: PIQA, HellaSwag, ARC-e, ARC-c; acc: WinoGrande), %. SliceGPT's ratio is the sliced "
                "fraction of the hidden size, not of the parameters."
            ),
            NATIVE_NOTE,
        ),
    ),
    "ratio_sweep": TableSpec(
        name="ratio_sweep",
        title="Every method by pruning ratio: WikiText-2 and PTB PPL (seq 128)",
        paper=(),
        blocks=(),
        anchor_model="LLaMA-7B",
        ppl=(W2_128, PTB_128),
        notes=(
            (
                "PPL: ppl128-lp (WikiText-2 test, PTB validation, 128-token windows, one BOS). n = calibration seeds "
                "(methods that read no calibration data run once). The common axis of this table is pruning.ratio, "
                "the share of ALL parameters removed, for every method (not the papers' own knobs; those are in the "
                "paper tables). Published numbers: see the paper tables."
            ),
            RATIO_NOTE,
        ),
        cells="ratio",
    ),
    "flap_lm": TableSpec(
        name="flap_lm",
        title="FLAP language-modelling table: WikiText-2 PPL (seq 128) by pruning ratio",
        paper=("FLAP",),
        blocks=("D1",),
        anchor_model="LLaMA-7B",
        ppl=(W2_128,),
        layout="ratio_pivot",
        methods=(*BASELINES, "llm_pruner_*", "wanda_sp", "flap"),
        notes=(
            "PPL: ppl128-lp on WikiText-2 test. Columns are the papers' ratio labels; 0 is the dense model.",
            NATIVE_NOTE,
        ),
    ),
    "flap_zs": TableSpec(
        name="flap_zs",
        title="FLAP zero-shot table: 7-task zero-shot accuracy",
        paper=("FLAP",),
        blocks=("D2",),
        anchor_model="LLaMA-7B",
        zs=ZS_LP,
        avg_header="Average",
        cell_protocol=W2_128,  # the cells of FLAP's tables: seq-128 PPL beside the zero-shot
        methods=(*BASELINES, "llm_pruner_*", "wanda_sp", "flap"),
        notes=(
            "Zero-shot: zs-lp, 0-shot, % (acc: BoolQ, PIQA, WinoGrande, ARC-e; acc_norm: HellaSwag, ARC-c, OBQA).",
            NATIVE_NOTE,
        ),
    ),
}
