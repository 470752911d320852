"""The typed config (experiments/schema.py): every file in conf/ composes into a config the schema accepts, and each
kind of mistake is refused with one line naming the key and what would be valid. In process, no model, no torch work
(the subprocess CLI table is tests/test_cli_mistakes.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import schema
from experiments.errors import ConfigError
from pruning_lab import run

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ("method", "eval", "calibration", "model", "recovery", "logger")
GROUP_FILES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STORIES = json.loads((REPO / "pruning" / "assets" / "stories260K" / "config.json").read_text())


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(str(CONF), version_base="1.3", job_name="test_schema"):
        yield


@pytest.mark.parametrize(("group", "name"), GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_every_group_file_validates(hydra_conf, group, name):
    resolved = schema.validate(compose("config", overrides=[f"{group}={name}"]))
    if group == "method":
        assert resolved["method"]["_target_"] in schema.METHODS
    assert set(resolved) >= {"method", "eval", "calibration", "model", "pruning"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_validates(preset):
    """The first cell of the preset's sweep; every cell of its grid is the slow test below."""
    cells = run.compose_cells([f"experiment={preset}"], multirun=True)
    _job, cfg = next(cells)
    cells.close()
    schema.validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_cell_of_every_preset_validates(preset):
    cells = list(run.compose_cells([f"experiment={preset}"], multirun=True))
    assert len(cells) >= 1
    for _job, cfg in cells:
        schema.validate(cfg)


def test_the_schema_reads_and_never_changes_the_config(hydra_conf):
    """No key or default is added: the resolved config (and so every record's hash) is what Hydra composed."""
    from omegaconf import OmegaConf

    cfg = compose("config", overrides=["method=flap"])
    assert schema.validate(cfg) == OmegaConf.to_container(cfg, resolve=True)


# ------------------------------------------------------------------------------------------ bad values, in process


@pytest.fixture(scope="module")
def bases() -> dict[str, dict]:
    """The resolved default config of a few methods, to which each case applies one mistake."""
    names = ("llm_pruner", "magnitude", "flap", "search_llm_quick", "nirvana", "shortgpt")
    with initialize_config_dir(str(CONF), version_base="1.3", job_name="test_schema"):
        return {m: schema.validate(compose("config", overrides=[f"method={m}"])) for m in names}


DELETE = object()

# (method, key, value, words the one line must hold); the key is always among them
BAD = [
    ("llm_pruner", "pruning.ratio", "abc", ["pruning.ratio='abc'", "[0, 1)"]),
    ("llm_pruner", "pruning.ratio", 1.0, ["pruning.ratio=1.0", "[0, 1)"]),
    ("llm_pruner", "pruning.ratio", -0.1, ["pruning.ratio=-0.1"]),
    ("llm_pruner", "pruning.ratio", True, ["pruning.ratio=true"]),
    ("llm_pruner", "pruning.ratoi", 0.5, ["unknown key pruning.ratoi", "did you mean pruning.ratio"]),
    ("llm_pruner", "calibration.seq_len", "abc", ["calibration.seq_len='abc'", "an integer >= 2"]),
    ("llm_pruner", "calibration.seq_len", 1.5, ["calibration.seq_len=1.5", "an integer"]),
    ("llm_pruner", "calibration.n_samples", 0, ["calibration.n_samples=0", ">= 1"]),
    ("llm_pruner", "calibration.sampler", "bookcorpus", ["calibration.sampler='bookcorpus'", "slicegpt"]),
    ("llm_pruner", "calibration.order", "sorted", ["calibration.order='sorted'", "random, file"]),
    ("llm_pruner", "calibration.dataset", DELETE, ["calibration.dataset is missing"]),
    ("llm_pruner", "calibration.foo", 1, ["unknown key calibration.foo", "seq_len"]),
    ("llm_pruner", "threads", -1, ["threads=-1", "an integer >= 1 or null"]),
    ("llm_pruner", "threads", 0, ["threads=0"]),
    ("llm_pruner", "threads", "abc", ["threads='abc'"]),
    ("llm_pruner", "threads", 1.5, ["threads=1.5"]),
    ("llm_pruner", "seed", 1.0, ["seed=1.0", "an integer"]),
    ("llm_pruner", "device", "gpu", ["device='gpu'", "cpu, cuda, auto or cuda:N"]),
    ("llm_pruner", "save_model", "yes", ["save_model='yes'", "true or false"]),
    ("llm_pruner", "paper_ratio", 2, ["paper_ratio=2", "(0, 1)"]),
    ("llm_pruner", "store.foo", 1, ["unknown key store.foo", "store has dir"]),
    ("llm_pruner", "model.dtype", "float8", ["model.dtype='float8'", "bfloat16"]),
    ("llm_pruner", "eval.foo", 1, ["unknown key eval.foo", "ppl, zeroshot, efficiency"]),
    ("llm_pruner", "eval.ppl", "wikitext2", ["eval.ppl='wikitext2'", "a list"]),
    ("llm_pruner", "eval.zeroshot", {"tasks": ["boolq", "mmlu"]}, ["eval.zeroshot.tasks[1]='mmlu'", "piqa"]),
    ("llm_pruner", "eval.zeroshot", {"tasks": []}, ["eval.zeroshot.tasks=[]", "non-empty"]),
    ("llm_pruner", "logger.name", "tensorboard", ["logger.name='tensorboard'", "none, wandb"]),
    ("llm_pruner", "recovery.name", "qlora", ["recovery.name='qlora'", "did you mean lora"]),
    ("llm_pruner", "method.importance", "taylor", ["method.importance='taylor'", "element1"]),
    ("llm_pruner", "method.structurs", ["mlp"], ["unknown key method.structurs", "method llm_pruner has"]),
    ("llm_pruner", "method.memory.budget", 0, ["method.memory.budget=0", "> 0"]),
    ("llm_pruner", "method.memory.offload", True, ["method.memory.offload", "layerwise=true"]),
    (
        "llm_pruner",
        "method.group_ratio",
        0.3,
        ["method.group_ratio=0.3 sets the operating point", "pruning.ratio=null"],
    ),
    ("llm_pruner", "method.layers.start_frac", 1.5, ["method.layers.start_frac=1.5", "[0, 1]"]),
    ("magnitude", "method.structures", "mlp", ["method.structures='mlp'", "write method.structures=[mlp]"]),
    ("magnitude", "method.structures", [], ["method.structures=[]", "non-empty list"]),
    ("magnitude", "method.structures", ["mlp", "mlp"], ["method.structures=['mlp', 'mlp']", "once"]),
    ("magnitude", "method.structures", ["kv_group", "q_head"], ["method.structures", "one attention unit"]),
    ("magnitude", "method.structures", ["mlpp"], ["method.structures[0]='mlpp'", "kv_group"]),
    ("magnitude", "method.p", 3, ["method.p=3", "one of 1, 2"]),
    ("magnitude", "method.layers", {"start": 3, "end": 1}, ["method.layers: start=3 end=1 selects no layer"]),
    ("magnitude", "method.layers", {"start": 2, "end": 2}, ["method.layers: start=2 end=2", "start < end"]),
    ("magnitude", "method.layers", {"start_frac": 0.8, "end_frac": 0.2}, ["method.layers: start_frac=0.8"]),
    ("magnitude", "method.layers", {"end": -1}, ["method.layers.end=-1", ">= 0"]),
    ("flap", "method.structures", ["block"], ["method.structures[0]='block'", "kv_group, q_head, mlp"]),
    ("flap", "method.structure", "UL-MM", ["method.structure=UL-MM needs method.remove_heads"]),
    ("flap", "method.metric", "wifv", ["method.metric='wifv'", "WIFV"]),
    ("search_llm_quick", "calibration.n_samples", 5, ["method.fitness.n_windows=5", "calibration.n_samples=5"]),
    ("search_llm_quick", "method.search", {"population": 4, "mutation": 3, "crossover": 3}, ["method.search:"]),
    ("nirvana", "calibration.dataset", "alpaca", ["method.kl_select.dataset='alpaca' is also calibration.dataset"]),
    ("shortgpt", "method.n_blocks", -1, ["method.n_blocks=-1", ">= 0"]),
]


def put(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for k in parents:
        config = config[k]
    if value is DELETE:
        del config[last]
    else:
        config[last] = value


@pytest.mark.parametrize(
    ("method", "key", "value", "words"),
    BAD,
    ids=[f"{m}:{k}=" + ("<deleted>" if v is DELETE else repr(v)) for m, k, v, _ in BAD],
)
def test_each_mistake_is_one_line_naming_the_key(bases, method, key, value, words):
    config = copy.deepcopy(bases[method])
    put(config, key, value)
    with pytest.raises(ConfigError) as e:
        schema.validate(config)
    msg = str(e.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


def test_a_mistake_of_every_sweep_cell_names_the_cell():
    with pytest.raises(ConfigError, match=r"pruning.ratio='abc'.*\(sweep cell: pruning.ratio=abc\)"):
        run.check_command(["-m", "pruning.ratio=0.2,abc"])


# ------------------------------------------------------------------------------------- key typos, before Hydra


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("pruning.ratoi", ["pruning has ratio", "did you mean pruning.ratio"]),
        ("treads", ["the top level has", "did you mean threads"]),
        ("method.structurs", ["no method config has it", "did you mean method.structures"]),
        ("method.memory.budgt", ["method.memory has", "did you mean method.memory.budget"]),
        ("method.layers.strat", ["method.layers has start_frac", "did you mean method.layers.start"]),
        ("recovery.rr", ["no recovery config has it"]),
        ("calibration.seqlen", ["did you mean calibration.seq_len"]),
        ("eval.zeroshot.taks", ["eval.zeroshot has tasks"]),
    ],
)
def test_an_unknown_key_is_refused_from_the_schema_alone(key, words):
    with pytest.raises(ConfigError) as e:
        schema.check_key(key)
    assert str(e.value).startswith(f"unknown key {key}:")
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize(
    "key", ["pruning.ratio", "method.structures", "method.lambda", "method._target_", "recovery.r", "model.device_map"]
)
def test_a_known_key_passes_the_schema_alone(key):
    schema.check_key(key)


# ------------------------------------------------------------------------------------------- rules with the model


def cell(bases, method: str, **changes) -> dict:
    config = copy.deepcopy(bases[method])
    for key, value in changes.items():
        put(config, key.replace("__", "."), value)
    return config


@pytest.mark.parametrize(
    ("method", "changes", "words"),
    [
        ("magnitude", {"method__layers": {"start": 5}}, ["method.layers.start=5", "below 5", "stories260k"]),
        ("magnitude", {"method__layers": {"start": 1, "end": 9}}, ["method.layers.end=9", "at most 5"]),
        (
            "magnitude",
            {"method__layers": {"start_frac": 0.5, "end_frac": 0.55}},
            ["selects no layer of stories260k's 5: [3, 3)"],
        ),
        ("magnitude", {"calibration__seq_len": 4096}, ["calibration.seq_len=4096", "max_position_embeddings=2048"]),
        (
            "llm_pruner",
            {"eval__ppl": [{"name": "x", "dataset": "wikitext2", "split": "test", "seq_len": 4096}]},
            ["eval.ppl[0].seq_len=4096", "2048"],
        ),
        ("llm_pruner", {"eval__zeroshot": {"max_length": 3000}}, ["eval.zeroshot.max_length=3000"]),
    ],
)
def test_what_needs_the_model_config(bases, method, changes, words):
    config = cell(bases, method, **changes)
    schema.validate(config)  # nothing wrong without the model
    with pytest.raises(ConfigError) as e:
        schema.check_model(config, STORIES)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_a_range_and_lengths_inside_the_model_pass(bases):
    schema.check_model(cell(bases, "magnitude", method__layers={"start": 1, "end": 5}), STORIES)
    schema.check_model(cell(bases, "llm_pruner", calibration__seq_len=2048), STORIES)


# ------------------------------------------------------------------------------------------------- vocabulary


def test_the_schema_vocabulary_is_the_library_s():
    """The schema is torch-free, so it cannot import these names; they must agree with the library's own."""
    from pruning import allocation, data, importance, runtime, structures
    from pruning.allocation import flap as flap_allocation
    from pruning.importance import activation, bip, taylor
    from pruning.methods import llm_bip, llm_pruner, search_llm, slicegpt
    from pruning.surgery import admm, apply, compensation, obs

    pairs = [
        (schema.KINDS, structures.KINDS),
        (schema.AGGREGATIONS, importance.AGGREGATIONS),
        (schema.GQA_FOLDS, importance.GQA_FOLDS),
        (schema.TAYLOR, taylor.TAYLOR),
        (schema.MEMORY_OPTIONS, taylor.MEMORY_OPTIONS),
        (schema.ATTENTION_KINDS, activation.ATTENTION_KINDS),
        (schema.VARIANCES, activation.VARIANCES),
        (schema.HIDDEN_NORMS, apply.HIDDEN_NORMS),
        (schema.COUNT_RULES, allocation.COUNT_RULES),
        (schema.LAYER_KEYS, allocation.LAYER_KEYS),
        (schema.ALL_LAYERS, allocation.ALL_LAYERS),
        (schema.LLM_PRUNER_LAYERS, llm_pruner.LAYERS),
        (schema.FLAP_STRUCTURES, flap_allocation.STRUCTURES),
        (schema.SURGERY, compensation.SURGERY),
        (schema.COMP_INPUTS, obs.COMP_INPUTS),
        (schema.ADMM_PROJECTIONS, admm.PROJECTIONS),
        (schema.BIP_ALLOCATIONS, llm_bip.ALLOCATIONS),
        (schema.BIP_VARIANTS, bip.VARIANTS),
        (schema.BIP_PROPAGATE, bip.PROPAGATE),
        (schema.ORIENTATIONS, slicegpt.ORIENTATIONS),
        (schema.FUSIONS, slicegpt.FUSIONS),
        (schema.SEARCH_ATTN_UNITS, search_llm.ATTN_UNITS),
        (schema.SEARCH_PRESETS, search_llm.PRESETS),
        (schema.ORDERS, data.ORDERS),
        (schema.DTYPES, runtime.DTYPES),
        (schema.AUTO_MAPS, runtime.AUTO_MAPS),
        (tuple(schema.Calibration.model_fields), data.CALIB_FIELDS),
    ]
    for ours, theirs in pairs:
        assert ours == theirs
    assert set(schema.SAMPLERS) == set(data.SAMPLERS)


# ------------------------------------------------------------------------------------------------ one error path


def test_a_user_mistake_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        run.cli(["+pruning.ratoi=0.5"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: unknown key pruning.ratoi: pruning has ratio (did you mean pruning.ratio?)\n"


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "check_command", interrupted)
    with pytest.raises(SystemExit) as e:
        run.cli(["pruning.ratio=0.2"])
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_programming_error_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise ZeroDivisionError("a bug, not a user mistake")

    monkeypatch.setattr(run, "check_command", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        run.cli(["pruning.ratio=0.2"])


def test_the_schema_layer_range_is_the_allocation_s():
    """``check_model`` computes the candidate layers without torch; ``pruning.allocation.layer_range`` prunes them."""
    from pruning.allocation import layer_range

    ranges = [(0.0, 1.0, None, None), (0.125, 0.9375, None, None), (0.5, 0.55, None, None), (0.0, 1.0, 1, 4)]
    for n_layers in (5, 30, 32):
        for start_frac, end_frac, start, end in ranges:
            s, e = schema.Layers(start_frac=start_frac, end_frac=end_frac, start=start, end=end).indices(n_layers)
            assert list(range(max(0, s), min(n_layers, e))) == layer_range(n_layers, start_frac, end_frac, start, end)


@pytest.mark.parametrize("target", list(schema.METHODS), ids=[t.rsplit(".", 1)[-1] for t in schema.METHODS])
def test_the_schema_keys_of_a_method_are_its_factory_s_keywords(target):
    """A key the schema accepts reaches the factory as a keyword (or its ``**kwargs``), and every keyword the factory
    takes is a key of the schema: the two cannot drift apart unnoticed."""
    import importlib
    import inspect

    module, name = target.rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    keywords = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    keys = {f.alias or n for n, f in schema.METHODS[target].model_fields.items()} - {"_target_"}
    assert takes_any or keys <= keywords, keys - keywords
    assert keywords - {"lam"} <= keys, keywords - keys  # numerical: `lambda` (a Python keyword) arrives in **kwargs
