"""The typed config: every config group's keys, types, ranges and choices, and the rules across keys and groups,
checked once before any model work. Torch-free, so a typo is reported in a fraction of a second.

What is checked, and where:

- ``validate(cfg)``: the composed config, without the model. Unknown keys (also ``+`` additions such as
  ``+pruning.ratoi=0.5``), types (``pruning.ratio=abc``; a string where a list is expected, ``method.structures=mlp``),
  ranges, choices, and the rules across keys: the operating point (a native knob and ``pruning.ratio`` at once,
  ``paper_ratio`` for a method without a paper table, neither set), a layer range that is empty or reversed, an empty
  structure list, a calibration sampler's fields, NIRVANA's KL set drawn from the calibration's own dataset,
  Search-LLM's fitness windows taking every calibration sample. ``pruning_lab.run`` calls it before Hydra's app (and
  before torch), the cell's check phase again (the Python API path).
- ``check_key(key)``: one override's key against the schema alone, before Hydra composes (a key typo in ~0.2 s).
- ``check_model(resolved, model_config)``: the rules that need the checkpoint's ``config.json`` (read without loading
  weights): a layer range inside the model, every sequence length within ``max_position_embeddings``.
- What needs the data root or torch (data files, CUDA, the recovery data's size) stays in the library and is called by
  the cell's check phase (``experiments.cell.check``).

Every mistake is one ``ConfigError`` line naming the key and what would be valid. The schema only reads the config:
it never adds a key or a default, so the resolved config a cell records, and its hash, are exactly what Hydra composed.

Why pydantic (not Hydra structured configs): a structured config is merged into the composed config, so every field
it declares would enter every cell's resolved config and change every record's hash; OmegaConf has no unions of a
string and a number (``numerical.alpha: paper | none | <float>``, ``model.device_map``) and no ``Literal`` choices;
and its errors span several lines. Pydantic validates a plain dict of the resolved config, in strict mode (no silent
coercion: ``5.0`` is not an integer, ``"0.2"`` is not a number), and each error carries the path to the key, which
``validate`` turns into one line.

The config vocabulary (structure kinds, aggregations, samplers, ...) is the library's; it is repeated here because the
library imports torch, and tests/test_config_schema.py checks that both spell it the same.
"""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from experiments.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- vocabulary
# Each choice as a Literal type (the fields below; mypy reads it) and its values as a tuple (messages, tests).

Kind = Literal["kv_group", "q_head", "mlp", "block", "hidden"]  # prunable structure kinds (pruning.structures)
KINDS = get_args(Kind)
AttentionKind = Literal["kv_group", "q_head"]
ATTENTION_KINDS = get_args(AttentionKind)
Aggregation = Literal["sum", "mean", "max", "prod", "first", "last"]  # reduce member scores (LLM-Pruner grouping)
AGGREGATIONS = get_args(Aggregation)
GqaFold = Literal["own", "official"]
GQA_FOLDS = get_args(GqaFold)
Taylor = Literal["vector", "element1", "element2", "element2_fisher"]
TAYLOR = get_args(Taylor)
LlmPrunerImportance = Literal[Taylor, "random"]
LLM_PRUNER_IMPORTANCES = get_args(LlmPrunerImportance)
LlmPrunerStrategy = Literal["block", "channel"]
LLM_PRUNER_STRATEGIES = get_args(LlmPrunerStrategy)
HiddenNorm = Literal["keep_original_dim", "official"]  # METHODS.md §1.2 rule 5
HIDDEN_NORMS = get_args(HiddenNorm)
CountRule = Literal["llm_pruner", "floor"]
COUNT_RULES = get_args(CountRule)
LAYER_KEYS = ("start_frac", "end_frac", "start", "end")
FlapStructure = Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"]
FLAP_STRUCTURES = get_args(FlapStructure)
FlapMetric = Literal["WIFV", "IFV", "WIFN"]
FLAP_METRICS = get_args(FlapMetric)
VarianceMode = Literal["exact", "official_streaming"]
VARIANCES = get_args(VarianceMode)
SurgeryMode = Literal["remove", "mask"]
SURGERY = get_args(SurgeryMode)
BipAllocation = Literal["per_layer", "global"]
BIP_ALLOCATIONS = get_args(BipAllocation)
BipVariant = Literal["interp_v1"]
BIP_VARIANTS = get_args(BipVariant)
BipPropagation = Literal["none", "mlp_jvp"]
BIP_PROPAGATE = get_args(BipPropagation)
CompInput = Literal["sequential", "dense"]
COMP_INPUTS = get_args(CompInput)
Orientation = Literal["pca", "random"]
ORIENTATIONS = get_args(Orientation)
Fusion = Literal["exact", "official"]
FUSIONS = get_args(Fusion)
SearchAttnUnit = Literal["kv_group"]
SEARCH_ATTN_UNITS = get_args(SearchAttnUnit)
SearchPreset = Literal["paper", "code", "quick", "init"]  # labels; init = generations 0 (the saliency start alone)
SEARCH_PRESETS = get_args(SearchPreset)
AdmmProjection = Literal["kept"]
ADMM_PROJECTIONS = get_args(AdmmProjection)
ShortGPTLastBlock = Literal["raw", "hf_hidden_states"]
SHORTGPT_LAST_BLOCK = get_args(ShortGPTLastBlock)
# each official code's way of drawing calibration tokens (METHODS.md §1.6), pruning.data
Sampler = Literal["llm_pruner", "nirvana", "stream", "wanda", "slicegpt", "documents", "first_docs"]
SAMPLERS: dict[Sampler, str] = {
    "llm_pruner": "random document, tokenised alone, >= L tokens, no repeats, random window (LLM-Pruner)",
    "nirvana": "as llm_pruner over the documents longer than L characters (NIRVANA get_bookcorpus)",
    "stream": "documents joined with `join`, tokenised once, random windows, overlaps allowed (FLAP, Search-LLM)",
    "wanda": "random document with more than L tokens, random window, repeats allowed (FLAP get_c4, Wanda-SP)",
    "slicegpt": "consecutive documents joined with \\n\\n until L tokens, used documents removed (SliceGPT)",
    "documents": "every document (or n_samples of them) cut into consecutive L-token windows, tails kept (ShortGPT)",
    "first_docs": "the first n_samples documents in file order, their first L tokens (parity tests)",
}
assert set(SAMPLERS) == set(get_args(Sampler)), "every sampler is described"
Order = Literal["random", "file"]  # file: documents (stream windows) in file order instead of drawn at random
ORDERS = get_args(Order)
BosMode = Literal["once", "every_window"]
BOS_MODES = get_args(BosMode)
ZeroShotTask = Literal["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
ZEROSHOT_TASKS = get_args(ZeroShotTask)
ZeroShotPreset = Literal["llm_pruner", "nirvana", "slicegpt"]
ZEROSHOT_PRESETS = get_args(ZeroShotPreset)
Dtype = Literal["float32", "float64", "bfloat16", "float16", "auto"]
DTYPES = get_args(Dtype)
AutoMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]
AUTO_MAPS = get_args(AutoMap)
LoraRole = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ROLES = get_args(LoraRole)
WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES = get_args(WandbMode)

# ------------------------------------------------------------------------------------------------- value types

Int = Annotated[int, Field(strict=True)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # share removed: [0, 1)
Prob = Annotated[float, Field(ge=0, le=1)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
SeqLen = Annotated[int, Field(ge=2)]


Kinds = Annotated[list[Kind], Field(min_length=1)]  # a non-empty list of structure kinds


class Schema(BaseModel):
    """A config node: no unknown key, strict types, never changed by validation."""

    # defer_build: a model's validator is built on its first use, so a check costs only the groups it reads
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)

    def rules(self, at: str, root: Mapping) -> None:
        """Rules across this node's keys (``at``: its key path; ``root``: the whole resolved config)."""


def fail(key: str, value: Any, must: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}: {must}")


def show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------------------------------- the groups


class Pruning(Schema):
    ratio: Fraction | None  # share of ALL parameters removed; null: a native knob sets the cell


class Store(Schema):
    dir: str | None = None


class Layers(Schema):
    """Candidate layers [start, end) as depth fractions (index = floor(frac·L + 0.5)); start / end (integers) win."""

    start_frac: Prob = 0.0
    end_frac: Prob = 1.0
    start: NonNegInt | None = None
    end: NonNegInt | None = None

    def rules(self, at: str, root: Mapping) -> None:
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ConfigError(
                f"{at}: start={self.start} end={self.end} selects no layer (the range is [start, end)); set start < end"
            )
        if self.start is None and self.end is None and self.start_frac >= self.end_frac:
            raise ConfigError(
                f"{at}: start_frac={self.start_frac} end_frac={self.end_frac} selects no layer (the range is "
                f"[start_frac, end_frac) of the depth); set start_frac < end_frac"
            )

    def indices(self, n_layers: int) -> tuple[int, int]:
        """[start, end) before clamping to the model (pruning.allocation.layer_range clamps)."""
        s = int(self.start_frac * n_layers + 0.5) if self.start is None else self.start
        e = int(self.end_frac * n_layers + 0.5) if self.end is None else self.end
        return s, e


ALL_LAYERS = {"start_frac": 0.0, "end_frac": 1.0, "start": None, "end": None}
# LLM-Pruner's block-wise range, layers [4, 30) of 32 as depth fractions: the first and last layers stay intact at any
# depth ([1, 5) on stories260K, [4, 28) on SmolLM2's 30 layers).
LLM_PRUNER_LAYERS = {"start_frac": 0.125, "end_frac": 0.9375, "start": None, "end": None}


class Memory(Schema):
    """``method.memory`` of the gradient scorers (pruning.importance.taylor)."""

    micro_batch: PosInt | None = None
    budget: PosFloat = 0.25
    layerwise: bool = False
    offload: bool = False
    device: str | None = None

    def rules(self, at: str, root: Mapping) -> None:
        if (self.offload or self.device is not None) and not self.layerwise:
            raise ConfigError(
                f"{at}.offload and {at}.device apply to layer-wise scoring: set {at}.layerwise=true "
                f"(or offload=false device=null)"
            )


MEMORY_OPTIONS = tuple(Memory.model_fields)


class Method(Schema):
    """A method config: ``_target_`` names the factory (pruning/methods/*), the other keys are its keywords."""

    target: str = Field(alias="_target_")
    native_knob: ClassVar[str | None] = None  # the key of the paper's own ratio knob (METHODS.md §1.3)
    default_layers: ClassVar[Mapping | None] = None  # the layer range's defaults, for methods that read one

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    def knob_value(self) -> float | None:
        return None if self.native_knob is None else getattr(self, self.native_knob)

    def layer_range(self) -> Layers | None:
        """The candidate layers this method prunes (None: every layer, or no range applies)."""
        if self.default_layers is None:
            return None
        given = getattr(self, "layers", None)
        return Layers(**{**self.default_layers, **(given.model_dump() if given is not None else {})})

    def rules(self, at: str, root: Mapping) -> None:
        structures = getattr(self, "structures", None)
        if structures is not None:
            if len(set(structures)) != len(structures):
                raise fail(f"{at}.structures", structures, "list each structure kind once")
            if "kv_group" in structures and "q_head" in structures:
                raise fail(f"{at}.structures", structures, "choose one attention unit: kv_group or q_head")


class Dense(Method):
    pass


class Random(Method):
    seed: Int = 0
    structures: Kinds = ["kv_group", "mlp"]
    group_ratio: Fraction | None = None
    count_rule: CountRule = "llm_pruner"
    layers: Layers | None = None
    native_knob: ClassVar = "group_ratio"
    default_layers: ClassVar = ALL_LAYERS


class Magnitude(Method):
    p: Literal[1, 2] = 2
    aggregation: Aggregation = "mean"
    structures: Kinds = ["kv_group", "mlp"]
    group_ratio: Fraction | None = None
    gqa_fold: GqaFold = "own"
    count_rule: CountRule = "llm_pruner"
    layers: Layers | None = None
    native_knob: ClassVar = "group_ratio"
    default_layers: ClassVar = ALL_LAYERS


class Surgery(Schema):
    hidden_norm: HiddenNorm = "keep_original_dim"


class LLMPruner(Method):
    importance: LlmPrunerImportance = "element1"
    aggregation: Aggregation = "sum"
    strategy: LlmPrunerStrategy = "block"
    group_ratio: Fraction | None = None
    gqa_fold: GqaFold = "own"
    seed: Int = 0
    memory: Memory | None = None
    surgery: Surgery | None = None
    count_rule: CountRule = "llm_pruner"
    layers: Layers | None = None
    native_knob: ClassVar = "group_ratio"
    default_layers: ClassVar = LLM_PRUNER_LAYERS

    def layer_range(self) -> Layers | None:
        return None if self.strategy == "channel" else super().layer_range()  # channel: the whole hidden dimension


# Calibration pools that contain AdaPruner's objective block (pruning.data.C4_HELDOUT_DOCS): the search would be scored
# on text it calibrated on. pool -> the one to use instead.
ADAPRUNER_OVERLAPS = {"c4": "c4_search"}


class AdaPruner(LLMPruner):
    calibration_dataset: str | None = None  # the cell's calibration.dataset (interpolated by conf/method/adapruner)

    def rules(self, at: str, root: Mapping) -> None:
        super().rules(at, root)
        if self.calibration_dataset in ADAPRUNER_OVERLAPS:
            raise ConfigError(
                f"adapruner cannot calibrate on {self.calibration_dataset!r}: it contains the held-out objective "
                f"documents; use calibration.dataset={ADAPRUNER_OVERLAPS[self.calibration_dataset]} (the C4 "
                f"documents outside the objective block)"
            )


ActivationKind = Literal[AttentionKind, "mlp"]  # activation statistics score heads and MLP channels
ACTIVATION_KINDS = get_args(ActivationKind)
ActivationKinds = Annotated[list[ActivationKind], Field(min_length=1)]


class Flap(Method):
    structure: FlapStructure = "AL-AM"
    metric: FlapMetric = "WIFV"
    remove_heads: NonNegInt | None = None
    bias: bool = True
    structures: ActivationKinds = ["q_head", "mlp"]
    attn_mlp_ratio: Fraction | None = None
    count_rule: CountRule = "floor"
    variance: VarianceMode = "exact"
    surgery: SurgeryMode = "remove"
    batch_size: PosInt = 8
    progress: bool = True
    layers: Layers | None = None
    native_knob: ClassVar = "attn_mlp_ratio"
    default_layers: ClassVar = ALL_LAYERS

    def rules(self, at: str, root: Mapping) -> None:
        super().rules(at, root)
        if self.structure in ("UL-MM", "AL-MM") and self.remove_heads is None:
            raise ConfigError(
                f"{at}.structure={self.structure} needs {at}.remove_heads >= 0 (attention units removed in total "
                f"over the layers, FLAP's --remove_heads), e.g. {at}.remove_heads=5"
            )


class WandaSP(Method):
    structures: ActivationKinds = ["q_head", "mlp"]
    attn_mlp_ratio: Fraction | None = None
    count_rule: CountRule = "floor"
    batch_size: PosInt = 8
    progress: bool = True
    layers: Layers | None = None
    native_knob: ClassVar = "attn_mlp_ratio"
    default_layers: ClassVar = ALL_LAYERS


class KLSelect(Schema):
    """NIRVANA's choice of calibration seed by the KL divergence on a set from another dataset."""

    seeds: list[Int] = [0, 1, 2, 3, 4]
    dataset: str = "alpaca"
    n_samples: PosInt = 128
    seq_len: SeqLen = 64
    seed: Int = 42
    batch_size: PosInt = 16


class Nirvana(Method):
    gamma: PosFloat = 3.36
    round_to: PosInt = 8
    sparsity: Fraction | None = None
    kl_select: KLSelect | None = None
    memory: Memory | None = None
    native_knob: ClassVar = "sparsity"

    def rules(self, at: str, root: Mapping) -> None:
        super().rules(at, root)
        kl = self.kl_select or KLSelect()
        calib = root.get("calibration") or {}
        if kl.seeds and kl.dataset == calib.get("dataset"):
            other = "c4" if kl.dataset != "c4" else "alpaca"
            raise ConfigError(
                f"{at}.kl_select.dataset={kl.dataset!r} is also calibration.dataset: the KL set must come from "
                f"another dataset so it is disjoint from every candidate calibration set (e.g. "
                f"{at}.kl_select.dataset={other}), or skip the KL choice with {at}.kl_select.seeds=[]"
            )


class Numerical(Method):
    lam: Literal["inf"] | PosFloat = Field("inf", alias="lambda")  # λ of the count penalty (inf: closed form)
    damp: NonNegFloat = 0.01
    alpha: Literal["paper", "none"] | float = "paper"
    newton_iters: PosInt = 1
    project_box: bool = False
    unit_ratio: Fraction | None = None
    compensate: bool = True
    comp_inputs: CompInput = "sequential"
    comp_damp: NonNegFloat = 0.01
    structures: ActivationKinds = ["kv_group", "mlp"]
    batch_size: PosInt = 8
    progress: bool = True
    layers: Layers | None = None
    native_knob: ClassVar = "unit_ratio"
    default_layers: ClassVar = ALL_LAYERS


class ShortGPT(Method):
    n_blocks: NonNegInt | None = None
    angular: bool = False
    last_block: ShortGPTLastBlock = "raw"
    batch_size: PosInt = 8
    progress: bool = True
    structures: Annotated[list[Literal["block"]], Field(min_length=1)] = ["block"]
    layers: Layers | None = None
    native_knob: ClassVar = "n_blocks"
    default_layers: ClassVar = ALL_LAYERS


class SliceGPT(Method):
    slicing: Fraction | None = None
    round_interval: PosInt = 8
    slice_head: bool = False
    orientation: Orientation = "pca"
    fusion: Fusion = "exact"
    damp: NonNegFloat = 0.01
    seed: Int = 0
    batch_size: PosInt = 8
    progress: bool = True
    native_knob: ClassVar = "slicing"


class Search(Schema):
    """Search-LLM's evolutionary search (pruning.allocation.evolution.EvolutionarySearch)."""

    population: PosInt = 100
    mutation: NonNegInt = 50
    crossover: NonNegInt = 30
    parents: PosInt = 10
    generations: NonNegInt = 50
    prob_mask_init: Prob = 0.6
    prob_ratio_init: Prob = 0.3
    prob_mask: Prob = 0.3
    prob_ratio: Prob = 0.1
    prob_depth: Prob = 0.1
    alpha: Prob = 0.8
    eta: PosInt = 1000
    param_band: Annotated[float, Field(gt=0, lt=1)] = 0.005
    attn_step: Annotated[float, Field(gt=0, le=1)] = 0.01
    mlp_step: Annotated[float, Field(gt=0, le=1)] = 0.05
    max_tries: PosInt = 200

    def rules(self, at: str, root: Mapping) -> None:
        if self.mutation + self.crossover > self.population:
            raise ConfigError(
                f"{at}: mutation ({self.mutation}) + crossover ({self.crossover}) exceed the population "
                f"({self.population}); lower them or raise {at}.population"
            )
        if self.parents > self.population:
            raise fail(f"{at}.parents", self.parents, f"at most the population ({self.population})")


class Fitness(Schema):
    n_windows: PosInt = 5  # calibration samples held out (the tail of the batch) for the fitness PPL
    batch_size: PosInt = 8


class Admm(Schema):
    enabled: bool = True
    rho: PosFloat = 1.0
    iterations: PosInt = 30
    precondition: bool = True
    damping: NonNegFloat = 0.0
    projection: AdmmProjection = "kept"


class SearchLLM(Method):
    preset: SearchPreset = "paper"
    attn_unit: SearchAttnUnit = "kv_group"
    inheriting_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    search: Search | None = None
    fitness: Fitness | None = None
    admm: Admm | None = None
    saliency_damp: PosFloat = 0.01
    batch_size: PosInt = 8
    seed: Int = 0
    progress: bool = True
    run_dir: str | None = None
    native_knob: ClassVar = "inheriting_ratio"

    def rules(self, at: str, root: Mapping) -> None:
        super().rules(at, root)
        n_fit = (self.fitness or Fitness()).n_windows
        n = (root.get("calibration") or {}).get("n_samples")
        if isinstance(n, int) and n <= n_fit:
            raise ConfigError(
                f"{at}.fitness.n_windows={n_fit} holds out that many calibration samples for the fitness and needs "
                f"more for the statistics, but calibration.n_samples={n}; raise calibration.n_samples above {n_fit} "
                f"or lower {at}.fitness.n_windows"
            )


class LlmBip(Method):
    variant: BipVariant = "interp_v1"
    propagate: BipPropagation = "none"
    allocation_mode: BipAllocation = "per_layer"
    structures: ActivationKinds = ["kv_group", "mlp"]
    batch_size: PosInt = 8
    progress: bool = True
    count_rule: CountRule = "llm_pruner"
    layers: Layers | None = None
    default_layers: ClassVar = ALL_LAYERS


_M = "pruning.methods."
METHODS: dict[str, type[Method]] = {
    _M + "baselines.dense": Dense,
    _M + "baselines.random": Random,
    _M + "baselines.magnitude": Magnitude,
    _M + "llm_pruner.llm_pruner": LLMPruner,
    _M + "adapruner.adapruner": AdaPruner,
    _M + "flap.flap": Flap,
    _M + "wanda_sp.wanda_sp": WandaSP,
    _M + "nirvana.nirvana": Nirvana,
    _M + "numerical.numerical": Numerical,
    _M + "shortgpt.shortgpt": ShortGPT,
    _M + "slicegpt.slicegpt": SliceGPT,
    _M + "search_llm.search_llm": SearchLLM,
    _M + "llm_bip.llm_bip": LlmBip,
}


class Calibration(Schema):
    """pruning.data.calibration_spec; the data file itself is checked there (the cell's check phase)."""

    sampler: Sampler | None = None  # missing / null: llm_pruner (every record before samplers)
    dataset: str
    n_samples: PosInt | None = None
    seq_len: SeqLen
    seed: NonNegInt
    order: Order | None = None
    join: str | None = None
    paper_dataset: str | None = None

    def rules(self, at: str, root: Mapping) -> None:
        sampler, order = self.sampler or "llm_pruner", self.order or "random"
        if sampler == "first_docs" and order != "file":
            raise ConfigError(
                f"{at}.sampler=first_docs is deterministic: set {at}.order=file (or {at}.sampler=llm_pruner for a "
                f"random draw)"
            )
        if sampler == "stream" and self.join is None:
            raise ConfigError(
                f"{at}.sampler=stream needs {at}.join, the string the documents are joined with (FLAP ' ', "
                f"Search-LLM '\\n\\n')"
            )
        if sampler != "stream" and self.join is not None:
            raise fail(f"{at}.join", self.join, f"null: only sampler=stream joins documents, not {sampler}")
        if self.n_samples is None and sampler != "documents":
            raise fail(
                f"{at}.n_samples", None, "an integer >= 1 (null means every document only for sampler=documents)"
            )


class PPLProtocol(Schema):
    """One ``eval.ppl`` entry (pruning.eval.perplexity.PPLProtocol; dataset/split and its file: pruning.data)."""

    name: str
    dataset: str
    split: str
    seq_len: SeqLen
    stride: PosInt | None = None
    bos: BosMode = "once"
    batch_size: PosInt = 4
    max_windows: PosInt | None = None

    def rules(self, at: str, root: Mapping) -> None:
        tokens = self.seq_len - 1 if self.bos == "every_window" else self.seq_len
        if self.stride is not None and self.stride > tokens:
            raise fail(f"{at}.stride", self.stride, f"at most {tokens}, the text tokens of a window (more skips text)")


class ZeroShot(Schema):
    tasks: Annotated[list[ZeroShotTask], Field(min_length=1)] = list(ZEROSHOT_TASKS)
    metric_preset: ZeroShotPreset = "llm_pruner"
    limit: PosInt | None = None
    batch_size: PosInt = 8
    num_fewshot: Literal[0] = 0  # the papers' protocol; the offline data root has no training splits for shots
    max_length: SeqLen | None = None

    def rules(self, at: str, root: Mapping) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise fail(f"{at}.tasks", self.tasks, "a list naming each task once")


class Efficiency(Schema):
    seq_len: PosInt = 64
    decode_tokens: PosInt = 32
    warmup: NonNegInt = 2
    repeats: PosInt = 10
    measure: bool = True


class Eval(Schema):
    ppl: list[PPLProtocol] | None = None
    zeroshot: ZeroShot | None = None
    efficiency: Efficiency | None = None


class NoRecovery(Schema):
    name: Literal["none"]


class LoRA(Schema):
    """pruning.recovery.lora.LoRARecovery; the data file and its size are checked there."""

    name: Literal["lora"]
    data: str = "alpaca"
    train_on_inputs: bool = False
    add_eos_token: bool = False
    max_samples: PosInt | None = None
    val_size: NonNegInt = 0
    r: PosInt = 8
    alpha: PosFloat = 16
    dropout: Fraction = 0.05
    target_modules: Annotated[list[LoraRole], Field(min_length=1)] | LoraRole = list(LORA_ROLES)
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 0.0
    epochs: NonNegInt = 2
    max_steps: NonNegInt | None = None
    micro_batch_size: PosInt = 4
    grad_accum: PosInt = 16
    max_len: SeqLen = 256
    warmup_steps: NonNegInt = 100
    max_grad_norm: NonNegFloat = 1.0
    seed: Int = 42


RECOVERIES: dict[str, type[Schema]] = {"none": NoRecovery, "lora": LoRA}


class NoLogger(Schema):
    name: Literal["none"]


class WandbLogger(Schema):
    name: Literal["wandb"]
    project: str = "pruning-lab"
    entity: str | None = None
    mode: WandbMode = "offline"
    dir: str = "runs/wandb"
    group: str | None = None
    tags: list[str] = []
    job_type: str = "cell"
    run_name: str | None = None


LOGGERS: dict[str, type[Schema]] = {"none": NoLogger, "wandb": WandbLogger}

DeviceMap = (
    AutoMap
    | Annotated[str, Field(pattern=r"^\s*(cpu|disk|meta|cuda(:\d+)?)\s*$", description="cpu, disk, cuda or cuda:N")]
    | NonNegInt
    | Annotated[dict[str, str | NonNegInt], Field(min_length=1)]
)


class Model(Schema):
    name: str
    path: str
    dtype: Dtype = "auto"
    device_map: DeviceMap | None = None
    family: str | None = None  # documents the config (the adapter is chosen from config.json)
    hub_id: str | None = None
    gguf: str | None = None
    fetch: bool = False  # consent to download; not part of a cell's identity


Device = Literal["cpu", "cuda", "auto"] | Annotated[str, Field(pattern=r"^cuda:\d+$", description="cuda:N")]


class Config(Schema):
    """The top level; ``method``, ``recovery`` and ``logger`` are checked by their ``_target_`` / ``name``."""

    calibration: Calibration
    eval: Eval
    recovery: dict
    logger: dict
    model: Model
    method: dict
    pruning: Pruning
    paper_ratio: Annotated[float, Field(gt=0, lt=1)] | None = None
    seed: Int
    device: Device = "cpu"
    threads: PosInt | None = None  # torch threads; null: $SLURM_CPUS_PER_TASK or all cores
    save_model: bool = False
    force: bool = False
    progress: bool = True
    store: Store


# ------------------------------------------------------------------------------------------------------- checks


def validate(cfg: Any) -> dict:
    """Check a composed config (a Hydra ``DictConfig`` or its resolved dict) before any model work; returns the
    resolved dict, unchanged. Raises ``ConfigError`` (one line naming the key) on the first mistake."""
    resolved = resolve(cfg)
    root = parse(Config, resolved, "")
    method = parse_by(resolved.get("method"), "method", "_target_", METHODS)
    recovery = parse_by(resolved.get("recovery"), "recovery", "name", RECOVERIES)
    logger = parse_by(resolved.get("logger"), "logger", "name", LOGGERS)
    for node, at in ((root, ""), (method, "method"), (recovery, "recovery"), (logger, "logger")):
        apply_rules(node, at, resolved)
    check_operating_point(method, resolved["pruning"]["ratio"], resolved.get("paper_ratio"))  # type: ignore[arg-type]
    return resolved


def resolve(cfg: Any) -> dict:
    """The resolved config as plain Python; an interpolation that fails names its key. ``paper_ratio`` is checked
    first: every method's native knob is computed from it (``${paper_knob:...}``)."""
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return dict(cfg)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import experiments.paper_ratios  # noqa: F401  (the ${paper_knob:...} resolver)

    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)  # cfg is a DictConfig here (a plain Mapping was returned above)
    label = raw.get("paper_ratio")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 < label < 1):
        raise fail("paper_ratio", label, "a paper's row label in (0, 1), e.g. 0.2, or null")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "the config"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot resolve its value: {reason}") from None
    assert isinstance(resolved, dict)
    return resolved


def parse_by(node: Any, at: str, tag: str, classes: Mapping[str, type[Schema]]) -> Schema:
    """A node whose schema is chosen by one of its keys (``method._target_``, ``recovery.name``)."""
    if not isinstance(node, Mapping):
        raise fail(at, node, f"a config group: choose one in conf/{at}/")
    kind = node.get(tag)
    if not isinstance(kind, str) or kind not in classes:
        near = difflib.get_close_matches(str(kind), classes, n=1)
        raise fail(
            f"{at}.{tag}", kind, f"one of {', '.join(classes)}" + (f" (did you mean {near[0]}?)" if near else "")
        )
    return parse(classes[kind], node, at)


def parse(cls: type[Schema], node: Any, at: str) -> Schema:
    try:
        return cls.model_validate(node)
    except ValidationError as e:
        raise ConfigError(explain(cls, node, at, e.errors()[0])) from None


def apply_rules(node: Any, at: str, root: Mapping) -> None:
    """Each node's rules, depth first (a nested node's own mistakes are named before its parent's)."""
    if isinstance(node, Schema):
        for name, field in type(node).model_fields.items():
            key = field.alias or name
            apply_rules(getattr(node, name), f"{at}.{key}" if at else key, root)
        node.rules(at, root)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            apply_rules(item, f"{at}[{i}]", root)


def check_operating_point(method: Method, ratio: float | None, paper_ratio: float | None) -> None:
    """Which setting defines the cell: ``pruning.ratio`` (share of ALL params) or the method's native knob
    (METHODS.md §1.3), set directly or through ``paper_ratio``."""
    knob = None if method.native_knob is None else f"method.{method.native_knob}"
    operating_point_rule(method.name, knob, method.knob_value(), ratio, paper_ratio)


def operating_point_rule(
    name: str, knob: str | None, value: float | None, ratio: float | None, paper_ratio: float | None
) -> None:
    """The rule on its parts (``knob``: the native knob's key or None; ``value``: its setting, None when unset). Both
    a knob and ``pruning.ratio`` would make the record claim a ratio the method did not use."""
    if paper_ratio is not None and value is None:
        raise ConfigError(
            f"paper_ratio={paper_ratio} has no meaning for method {name}: no paper table of its is reproduced "
            f"(experiments/paper_ratios.py); use pruning.ratio"
        )
    if value is not None:
        if ratio is not None:
            op = f"{knob}={value:g}"
            via = f"paper_ratio={paper_ratio} ({op})" if paper_ratio is not None else op
            raise ConfigError(
                f"{via} sets the operating point of this cell, so pruning.ratio={ratio} would not be used; pass "
                f"pruning.ratio=null (or drop {'paper_ratio' if paper_ratio is not None else knob})"
            )
        return
    if ratio is None and name != "dense":
        extra = f" or set {knob}" if knob else ""
        raise ConfigError(f"pruning.ratio is null: set it (share of all parameters removed){extra}")


def check_key(key: str) -> None:
    """An override's dotted key against the schema alone, before Hydra composes anything, so a typo in a key costs no
    composition. Under ``method``, ``recovery`` and ``logger`` (whose schema depends on the choice, unknown here) a
    key is refused only when no choice has it; ``validate`` on the composed config names the rest. A key below a
    value that is not a group of keys (a list, a free mapping) is left to ``validate`` too."""
    choices: dict[str, Mapping[str, type[Schema]]] = {"method": METHODS, "recovery": RECOVERIES, "logger": LOGGERS}
    nodes: list[type[Schema]] = [Config]
    path: list[str] = []
    for part in key.split("."):
        fields = {f.alias or n: f for cls in nodes for n, f in cls.model_fields.items()}
        if part not in fields:
            valid = list(dict.fromkeys(k for cls in nodes for k in fields_of(cls)))
            near = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean {'.'.join([*path, near[0]])}?)" if near else ""
            bad = ".".join([*path, part])
            if len(nodes) > 1:
                raise ConfigError(f"unknown key {bad}: no {path[0]} config has it{hint}")
            raise ConfigError(f"unknown key {bad}: {'.'.join(path) or 'the top level'} has {', '.join(valid)}{hint}")
        path.append(part)
        if len(path) == 1 and part in choices:
            nodes = list(choices[part].values())
            continue
        below = {
            model_in(cls.model_fields[n].annotation)
            for cls in nodes
            for n, f in cls.model_fields.items()
            if (f.alias or n) == part
        }
        below_node = below.pop() if len(below) == 1 else None
        if below_node is None:
            return
        nodes = [below_node]


# ------------------------------------------------------------------------------------------------- the model


def read_model_config(checkpoint: str | Path) -> dict | None:
    """A checkpoint's ``config.json`` as a dict (no weights, no torch); None when it cannot be read (the loader then
    reports the broken checkpoint)."""
    try:
        out = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def check_model(resolved: Mapping, model_config: Mapping) -> None:
    """The rules that need the model: the method's layer range inside it, every sequence the cell feeds within
    ``max_position_embeddings``. ``resolved`` is the cell's config (``calibration`` only when the method reads it,
    as ``experiments.cell.cell_config`` gives it)."""
    model = resolved.get("model", {}).get("name", "the model")
    n_layers = model_config.get("num_hidden_layers")
    method = METHODS[resolved["method"]["_target_"]].model_validate(resolved["method"])
    layers = method.layer_range()
    if layers is not None and isinstance(n_layers, int):
        if layers.start is not None and layers.start >= n_layers:
            raise fail("method.layers.start", layers.start, f"a layer index below {n_layers} ({model} has {n_layers})")
        if layers.end is not None and layers.end > n_layers:
            raise fail("method.layers.end", layers.end, f"at most {n_layers} ({model} has {n_layers} layers)")
        s, e = layers.indices(n_layers)
        if s >= e:
            given = resolved["method"].get("layers") or {}
            shown = " ".join(f"{k}={show(v)}" for k, v in given.items() if v is not None) or "its default range"
            raise ConfigError(
                f"method.layers ({shown}) selects no layer of {model}'s {n_layers}: [{s}, {e}) (index = "
                f"floor(frac·L + 0.5)); widen the range"
            )
    max_pos = model_config.get("max_position_embeddings")
    if not isinstance(max_pos, int):
        return
    for key, length in lengths(resolved, method):
        if length > max_pos:
            raise ConfigError(
                f"{key}={length} exceeds {model}'s context (max_position_embeddings={max_pos}); use at most {max_pos}"
            )


def lengths(resolved: Mapping, method: Method) -> list[tuple[str, int]]:
    """(key, tokens in one forward) for every sequence the cell feeds the model."""
    out = []
    calib = resolved.get("calibration")
    if calib:
        out.append(("calibration.seq_len", calib["seq_len"]))
    if isinstance(method, Nirvana) and (method.kl_select or KLSelect()).seeds:
        out.append(("method.kl_select.seq_len", (method.kl_select or KLSelect()).seq_len))
    ev = resolved.get("eval") or {}
    for i, p in enumerate(ev.get("ppl") or []):
        out.append((f"eval.ppl[{i}].seq_len", p["seq_len"]))
    if (ev.get("zeroshot") or {}).get("max_length") is not None:
        out.append(("eval.zeroshot.max_length", ev["zeroshot"]["max_length"]))
    if ev.get("efficiency") is not None:
        eff = Efficiency.model_validate(ev["efficiency"])
        out.append(("eval.efficiency.seq_len + decode_tokens", eff.seq_len + eff.decode_tokens))
    rec = resolved.get("recovery") or {}
    if rec.get("name", "none") != "none":
        out.append(("recovery.max_len", LoRA.model_validate(rec).max_len))
    return out


# ------------------------------------------------------------------------------------------------ one line


def explain(cls: type[Schema], node: Any, at: str, error: Mapping) -> str:
    """One pydantic error as one line: the key, its value and what would be valid."""
    loc = list(error["loc"])
    ann, meta, used = locate(cls, loc)
    keys = loc[:used]
    key = join(at, keys)
    if error["type"] == "extra_forbidden":
        name = str(loc[used]) if used < len(loc) else str(loc[-1])
        valid = fields_of(model_in(ann) or cls)
        near = difflib.get_close_matches(name, valid, n=1)
        where = key or "the top level"
        if at == "method" and not keys and isinstance(node, Mapping):
            where = f"method {str(node.get('_target_')).rsplit('.', 1)[-1]}"
        return (
            f"unknown key {join(at, [*keys, name])}: {where} has "
            + (", ".join(valid) if valid else "no keys")
            + (f" (did you mean {join(at, [*keys, near[0]])}?)" if near else "")
        )
    if error["type"] == "missing":
        return f"{key} is missing: set it to {describe(ann, meta)}"
    value = value_at(node, keys)
    hint = ""
    if isinstance(value, str) and get_origin(strip(ann)) is list and model_in(get_args(strip(ann))[0]) is None:
        hint = f" (a list: write {key}=[{value}])"
    return f"{key}={show(value)}: must be {describe(ann, meta)}{hint}"


def locate(cls: type[Schema], loc: list) -> tuple[Any, list, int]:
    """The annotation of the deepest config key in a pydantic error location, its constraints, and how many ``loc``
    elements are keys (the rest name union members, or the unknown key itself)."""
    ann: Any = cls
    meta: list = []
    used = 0
    for part in loc:
        model = model_in(ann)
        if model is not None and isinstance(part, str):
            field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
            if field is None:
                break
            ann, meta = field.annotation, list(field.metadata)
        elif isinstance(part, int) and get_origin(strip(ann)) is list:
            ann, meta = get_args(strip(ann))[0], []
        else:
            break
        used += 1
    return ann, meta, used


def strip(ann: Any) -> Any:
    """The annotation without ``| None`` and ``Annotated``, when one type is left."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return strip(args[0])
    if get_origin(ann) is Annotated:
        return strip(get_args(ann)[0])
    return ann


def model_in(ann: Any) -> type[Schema] | None:
    base = strip(ann)
    return base if isinstance(base, type) and issubclass(base, Schema) else None


def fields_of(cls: type[Schema]) -> list[str]:
    return [f.alias or n for n, f in cls.model_fields.items() if not (f.alias or n).startswith("_")]


def join(at: str, keys: list) -> str:
    out = at
    for k in keys:
        out = f"{out}[{k}]" if isinstance(k, int) else (f"{out}.{k}" if out else str(k))
    return out


def value_at(node: Any, keys: list) -> Any:
    for k in keys:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def describe(ann: Any, meta: list | tuple = ()) -> str:
    """What a config value of this annotation may be, in words."""
    origin = get_origin(ann)
    if origin is Annotated:
        base, *extra = get_args(ann)
        said = next((e.description for e in extra if getattr(e, "description", None)), None)
        more = [m for e in extra for m in getattr(e, "metadata", [e])]
        return said or describe(base, [*meta, *more])
    if origin in (Union, types.UnionType):
        args = get_args(ann)
        parts = [describe(a, meta) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(ann))
    if origin is list:
        (item,) = get_args(ann)
        least = any(getattr(m, "min_length", 0) for m in meta)
        inner = describe(item)
        inner = inner.removeprefix("one of ") if get_origin(item) is Literal else inner
        return f"a {'non-empty ' if least else ''}list of {inner}"
    if origin is dict:
        return "a mapping {module: device}"
    if isinstance(ann, type) and issubclass(ann, Schema):
        return f"a mapping with keys {', '.join(fields_of(ann))}"
    if ann is bool:
        return "true or false"
    if ann is str:
        pattern = next((m.pattern for m in meta if getattr(m, "pattern", None)), None)
        return "a string" if pattern is None else f"a string matching {pattern}"
    if ann in (int, float):
        return ("an integer" if ann is int else "a number") + bounds(meta)
    return getattr(ann, "__name__", str(ann))


def bounds(meta: list | tuple) -> str:
    """The bounds of pydantic interval constraints in words: " in [0, 1)", " >= 1", ..."""
    lo: tuple[str, Any] | None = None
    hi: tuple[str, Any] | None = None
    for m in meta:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                if sign.startswith(">"):
                    lo = (sign, v)
                else:
                    hi = (sign, v)
    if lo and hi:
        return f" in {'[' if lo[0] == '>=' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == '<=' else ')'}"
    bound = lo or hi
    if bound:
        sign, v = bound
        return f" {sign} {v:g}"
    return ""
