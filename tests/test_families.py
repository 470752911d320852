"""Model families (Llama-3, Mistral, Qwen2/2.5, Qwen3) through their adapters, for every method in conf/method.

No real weights of these families exist offline, so each family is a small model built from its config with the
family's own transformers class (seeded random init; biases and norm scales randomised too, so they matter), fed
real text tokenized with the stories260K tokenizer (vocab 512). For every family × method at pruning.ratio 0.2,
built from the method's yaml exactly as experiments/cell.py does, the test checks:
(a) the pruned model has fewer parameters, exactly the closed form (METHODS.md §1.1, with q/k/v biases, q/k norms
    and FLAP's biases) of the widths the plan leaves, computed here from the plan;
(b) surgery == masking in float64: pruned logits equal the dense model with the plan masked (``mask_plan``), or
    for compensating methods the method's own masked form (FLAP surgery=mask, OBS / ADMM refit then mask; SliceGPT:
    the sliced model equals its zero-padded full-width form, and full-width rotation equals the dense model);
(c) save -> reload (``save_pruned``, ``from_pretrained``) gives bit-identical logits.
A new yaml in conf/method or a new adapter family is covered without editing this file (the family needs a row in
SMALL, which ``test_every_family_has_a_small_model`` demands).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import logits, same_threads_env
from experiments.cell import build_method
from pruning import data
from pruning.errors import CheckpointError, UnsupportedModelError
from pruning.methods.base import DrawsCalibration
from pruning.methods.flap import Flap
from pruning.methods.numerical import Numerical
from pruning.methods.search_llm import SearchLLM
from pruning.methods.slicegpt import SliceGPT
from pruning.models import ADAPTERS, adapter_class, adapter_for, load_model
from pruning.models.loading import read_config
from pruning.surgery.apply import apply_plan, mask_plan
from pruning.surgery.compensation import add_bias
from pruning.surgery.modeling_pruned_llama import FAMILIES, family_name
from pruning.surgery.obs import obs_compensation
from pruning.surgery.plan import PrunePlan
from pruning.surgery.save import save_pruned
from test_slicegpt import closed_form as sliced_closed_form

REPO = Path(__file__).resolve().parents[1]
RATIO = 0.2
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml") if p.stem != "dense")
SEARCH_LLM = "pruning.methods.search_llm.search_llm"
SEARCH_SIZE = ("population", "mutation", "crossover", "parents", "generations")

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------- small models

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=512,
)
# family -> (config class, model class, config fields, architecture facts for the closed form)
SMALL = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,  # Llama-3 style: GQA 4:1 and llama3 RoPE scaling
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_parameters=LLAMA3_ROPE),
        dict(head_dim=8, qkv_bias=False, qk_norm=False),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,  # a window shorter than the test text, so it matters
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=16),
        dict(head_dim=8, qkv_bias=False, qk_norm=False),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,  # q/k/v biases
        dict(num_attention_heads=8, num_key_value_heads=4),
        dict(head_dim=8, qkv_bias=True, qk_norm=False),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,  # q_norm/k_norm, head_dim decoupled from hidden, tied head
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        dict(head_dim=16, qkv_bias=False, qk_norm=True),
    ),
}


def small_model(family: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, fields, _ = SMALL[family]
    config = config_cls(**COMMON, **fields)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float64).eval()
    with torch.no_grad():  # HF starts biases at 0 and norm scales at 1: randomise them so they must be kept
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    return model


@functools.cache
def tokenizer():
    return AutoTokenizer.from_pretrained(data.ASSETS / "stories260K")


@functools.cache
def batches(spec: data.CalibrationSpec):
    return data.draw_calibration(tokenizer(), spec, progress=False)


def sized_calibration(calibration) -> data.CalibrationSpec:
    """The method's own sampler (conf/calibration), at most 128 x 128 tokens (documents: 32 documents in 128-token
    windows), so the paper shapes (1024 x 128, 128 x 2048, every document) stay fast on the small models."""
    spec = data.calibration_spec(calibration)
    n = 32 if spec.n_samples is None else min(spec.n_samples, 32 if spec.variable_length else 128)
    return dataclasses.replace(spec, n_samples=n, seq_len=min(spec.seq_len, 128))


@pytest.fixture(scope="module")
def text_ids():
    """Real text, longer than Mistral's window and than Llama-3's original RoPE length."""
    texts = [
        (
            "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
            "dog. One day the sun was hot and they sat under a big tree to rest."
        ),
        (
            " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a "
            "guest @-@ starring role on the television series The Bill in 2000 ."
        ),
    ]
    ids = [tokenizer()(t, return_tensors="pt").input_ids[0][:40] for t in texts]
    assert min(len(i) for i in ids) == 40
    return torch.stack(ids)


# ------------------------------------------------------------------------------------------ methods (yaml)


@functools.cache
def _composed(name: str) -> str:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", f"pruning.ratio={RATIO}", "progress=false"])
    return OmegaConf.to_yaml(cfg)


def method_config(name: str):
    """conf/ composed as run.py does (the method's own allocation/calibration defaults apply); Search-LLM
    variants get at most the quick preset's search budget, so they stay fast."""
    cfg = OmegaConf.create(_composed(name))
    if cfg.method.get("_target_") == SEARCH_LLM:
        quick = OmegaConf.create(_composed("search_llm_quick")).method.search
        for key in SEARCH_SIZE:
            cfg.method.search[key] = min(cfg.method.search[key], quick[key])
    return cfg


def run_method(cfg, model):
    method = build_method(cfg)
    method.budget(model, RATIO)
    calib = None
    if method.needs_calibration:
        spec = sized_calibration(cfg.calibration)
        calib = batches(spec)
        if isinstance(method, DrawsCalibration):
            method.bind_sampler(
                lambda ds, n, seq_len, seed: batches(
                    dataclasses.replace(spec, dataset=ds, n_samples=n, seq_len=seq_len, seed=seed)
                ),
                dict(cfg.calibration),
            )
    plan = method.prune(model, RATIO, calib)
    method.apply(model, plan, calib)
    return method, plan, calib


def masked_reference(cfg, method, dense, plan, calib):
    """The method's own masked form of its plan (shapes unchanged), as its per-method test builds it."""
    ref = copy.deepcopy(dense)
    if isinstance(method, Flap) and method.bias:  # test_flap: the same method with surgery=mask
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.method.surgery = "mask"
        masked = build_method(cfg)
        assert masked.prune(ref, RATIO, calib).to_dict() == plan.to_dict()
        return masked.apply(ref, plan, calib)
    if isinstance(method, Numerical) and method.compensate:  # test_numerical: OBS refit, then mask
        obs_compensation(
            ref,
            plan,
            calib,
            comp_inputs=method.comp_inputs,
            damp=method.comp_damp,
            batch_size=method.batch_size,
            progress=False,
            surgery=False,
        )
    if isinstance(method, SearchLLM) and method.admm["enabled"]:  # test_search_llm: ADMM reform, then mask
        method.reform(ref, plan, calib)
    return mask_plan(ref, plan)


# ------------------------------------------------------------------------------------------ closed forms


def kept_widths(config, plan: PrunePlan, added_bias: bool) -> list[tuple]:
    """(heads, KV heads, MLP width, o bias added, down bias added) per kept layer, from the plan alone: a KV head
    stays while one of its query heads does (query-head units may empty a group)."""
    H, KV, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    g = H // KV
    out = []
    for layer in range(config.num_hidden_layers):
        if layer in plan.blocks:
            continue
        kv_rm, q_rm = set(plan.units("kv_group", layer)), set(plan.units("q_head", layer))
        kept = [h for h in range(H) if h // g not in kv_rm and h not in q_rm]
        inter = I - len(set(plan.units("mlp", layer)))
        out.append(
            (len(kept), len({h // g for h in kept}), inter, added_bias and len(kept) < H, added_bias and inter < I)
        )
    return out


def closed_form(family: str, widths: list[tuple], tied: bool) -> int:
    """METHODS.md §1.1: V·d·(1|2) + d + Σ_l [d·d_h·(2H_l + 2H_kv,l) + 3·d·I_l + 2d + β_l], plus d_h·(H_l + 2H_kv,l)
    q/k/v bias entries (Qwen2) and 2·d_h q/k norm entries (Qwen3) per layer."""
    facts = SMALL[family][3]
    d, hd, V = COMMON["hidden_size"], facts["head_dim"], COMMON["vocab_size"]
    total = V * d * (1 if tied else 2) + d
    for h, kv, inter, o_bias, d_bias in widths:
        total += d * hd * (2 * h + 2 * kv) + 3 * d * inter + 2 * d + d * (int(o_bias) + int(d_bias))
        total += facts["qkv_bias"] * hd * (h + 2 * kv) + facts["qk_norm"] * 2 * hd
    return total


def fixed_per_layer(family: str) -> int:
    """What SliceGPT's rotation leaves alone per layer: q/k/v biases and q/k norms."""
    _, _, fields, facts = SMALL[family]
    h, kv, hd = fields["num_attention_heads"], fields["num_key_value_heads"], facts["head_dim"]
    return facts["qkv_bias"] * hd * (h + 2 * kv) + facts["qk_norm"] * 2 * hd


def zero_padded(model):
    """The sliced model at full width with the sliced directions zeroed: every weight copied into the leading
    block of a full-width model of the same sliced class (the mask form of slicing in the rotated basis)."""
    cfg = copy.deepcopy(model.config)
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    cfg.embedding_dim = d
    cfg.layer_attn_input_dim, cfg.layer_mlp_input_dim, cfg.layer_mlp_output_dim = [d] * L, [d] * L, [d] * L
    full = type(model)(cfg).to(torch.float64).eval()
    state = {}
    for name, big in full.state_dict().items():
        small = model.state_dict()[name]
        padded = torch.zeros_like(big)
        padded[tuple(slice(0, s) for s in small.shape)] = small
        state[name] = padded
    full.load_state_dict(state)
    return full


# ----------------------------------------------------------------------------------------------- the grid

DEFAULT_FAMILY = "qwen2"  # the default pass runs every quick method on the family with the most to keep in step
# backward passes per candidate seed / OBS refits: the slow CI pass. slicegpt_cpu and shortgpt_cpu are their methods
# at CPU-sized settings (slicegpt and shortgpt run here by default); numerical_cpu's OBS refits take seconds
# (test_numerical.py checks Numerical in the default pass).
SLOW_METHODS = ("nirvana", "numerical", "numerical_cpu", "slicegpt_cpu", "shortgpt_cpu")


def is_slow(family: str, name: str) -> bool:
    """Every family × method runs in CI; the default pass keeps qwen2 × the quick methods and magnitude on every
    family. Searches (any search_llm yaml) are slow even with the quick budget."""
    searches = "search_llm" in (REPO / "conf" / "method" / f"{name}.yaml").read_text()
    if name in SLOW_METHODS or searches:
        return True
    return family != DEFAULT_FAMILY and name != "magnitude"


def grid():
    for family in SMALL:
        for name in METHODS:
            marks = [pytest.mark.slow] if is_slow(family, name) else []
            yield pytest.param(family, name, id=f"{family}-{name}", marks=marks)


@pytest.mark.parametrize("family,name", list(grid()))
def test_family_method(family, name, text_ids, tmp_path):
    cfg = method_config(name)
    model = small_model(family)
    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    assert adapter.family == family
    tied = adapter.is_tied
    n_dense = adapter.num_params()
    assert n_dense == closed_form(family, kept_widths(model.config, PrunePlan(), False), tied)

    method, plan, calib = run_method(cfg, model)
    n = adapter.num_params()
    assert n < n_dense and not plan.is_empty()
    out = logits(model, text_ids)
    assert torch.isfinite(out).all()

    if isinstance(method, SliceGPT):
        a, L, d = plan.meta["sliced_hidden_size"], COMMON["num_hidden_layers"], COMMON["hidden_size"]
        _, _, fields, facts = SMALL[family]
        o = [a] * (L - 1) + [a if cfg.method.slice_head else d]
        expect = sliced_closed_form(
            COMMON["vocab_size"],
            facts["head_dim"],
            fields["num_attention_heads"],
            fields["num_key_value_heads"],
            COMMON["intermediate_size"],
            [a] * L,
            [a] * L,
            o,
        )
        assert n == expect + L * fixed_per_layer(family) == plan.meta["params_closed_form"]
        # slicing == zeroing the trailing directions of the rotated model
        assert (logits(zero_padded(model), text_ids) - out).abs().max().item() <= 1e-8
        # ... and the rotation itself keeps the dense function (fusion + full-width PCA bases + shortcuts). Not to
        # 1e-8: every RMSNorm (HF's and RMSN) normalises in float32 by design, and in another basis that rounding
        # falls elsewhere (measured ~1e-6 on logits of size ~1; a wrong bias or q/k-norm handling gives ~1e-1)
        full = copy.deepcopy(cfg)
        with open_dict(full):
            full.method.slicing = 0.0
        rotated = copy.deepcopy(dense)
        run_method(full, rotated)
        assert (logits(rotated, text_ids) - logits(dense, text_ids)).abs().max().item() <= 1e-5
    else:
        added = isinstance(method, Flap) and method.bias
        widths = kept_widths(dense.config, plan, added)
        got = [
            (w.num_heads, w.num_kv_heads, w.intermediate_size, w.o_proj_bias, w.down_proj_bias)
            for w in adapter.all_widths()
        ]
        assert got == widths
        assert n == closed_form(family, widths, tied)
        ref = masked_reference(cfg, method, dense, plan, calib)
        ref_state = ref.state_dict()
        assert all(ref_state[k].shape == v.shape for k, v in dense.state_dict().items())  # masked, not cut
        assert (logits(ref, text_ids) - out).abs().max().item() <= 1e-8

    saved = save_pruned(model, tmp_path / "pruned", tokenizer())
    config = json.loads((saved / "config.json").read_text())
    assert family_name(config["model_type"]) == family
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float64)
    assert adapter_for(reloaded).family == family
    assert sum(p.numel() for p in {id(p): p for p in reloaded.parameters()}.values()) == n
    assert torch.equal(logits(reloaded, text_ids), out)


# ------------------------------------------------------------------------- save formats without the package

REMOTE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
out = {}
for d in sys.argv[3:]:
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float64)
    with torch.no_grad():
        out[d] = m(ids).logits
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
assert not any(k == "pruning" or k.startswith("pruning.") for k in sys.modules), "pruning was imported"
torch.save(out, sys.argv[2])
"""


def uneven_plan(config) -> PrunePlan:
    """Query heads off single KV groups: layer 0 loses query head 0; layer 1 every query head of KV head 0 (which
    leaves) and one of KV head 1; layer 2 MLP channels. The GQA groups of layers 0 and 1 become uneven."""
    g = config.num_attention_heads // config.num_key_value_heads
    plan = PrunePlan()
    plan.add("q_head", 0, [0])
    plan.add("q_head", 1, list(range(g + 1)))
    plan.add("mlp", 2, list(range(0, 160, 5)))
    return plan


def heterogeneous(family: str):
    """Per-layer widths, uneven GQA groups and a FLAP-style o/down bias: only the pruned_<family> format holds it."""
    model = small_model(family, seed=1)
    adapter = adapter_for(model)
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    plan = PrunePlan()
    plan.add("kv_group", 0, [1])
    plan.add("mlp", 1, list(range(0, 160, 3)))
    plan.add("q_head", 2, list(range(g + 1)))
    plan.add("block", None, [3])
    apply_plan(model, plan)
    add_bias(adapter.o_proj(adapter.layers[0]), torch.randn(COMMON["hidden_size"], dtype=torch.float64))
    add_bias(adapter.down_proj(adapter.layers[1]), torch.randn(COMMON["hidden_size"], dtype=torch.float64))
    return model


@pytest.mark.slow  # a second interpreter (~15 s on a busy machine); test_save / test_slicegpt cover Llama by default
def test_save_formats_reload_with_trust_remote_code(text_ids, tmp_path):
    """pruned_<family> and sliced_<family> for every family, reloaded in one clean process without pruning."""
    dirs, refs = [], {}
    cfg = method_config("slicegpt")
    cfg.calibration.n_samples, cfg.calibration.seq_len = 16, 32  # the format is under test here, not the PCA
    for family in SMALL:
        sliced = small_model(family, seed=2)
        run_method(cfg, sliced)
        for kind, model in (("pruned", heterogeneous(family)), ("sliced", sliced)):
            out = save_pruned(model, tmp_path / f"{family}-{kind}", tokenizer())
            config = json.loads((out / "config.json").read_text())
            assert config["model_type"] == f"{kind}_{family}" and "auto_map" in config
            assert (out / f"modeling_{kind}_llama.py").is_file()
            dirs.append(str(out))
            refs[str(out)] = logits(model, text_ids)
    torch.save(text_ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *dirs],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=same_threads_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for d in dirs:
        assert torch.equal(got[d], refs[d]), d


@pytest.mark.parametrize("family", list(SMALL))
def test_uneven_query_heads_every_family(family, text_ids, tmp_path):
    """Uneven GQA groups in every family (Qwen2's q/k/v biases leave with their rows, Qwen3's q/k norms stay,
    Mistral's window applies): surgery == masking in float64, params == closed form of the kept widths, greedy
    generation with the KV cache == the masked model's, and save -> reload (pruned_<family>, the registered classes)
    gives bit-identical logits and the same map. The trust_remote_code path: test_save_formats_reload_..."""
    model = small_model(family)
    adapter = adapter_for(model)
    plan = uneven_plan(model.config)
    masked = mask_plan(copy.deepcopy(model), plan)
    apply_plan(model, plan)
    out = logits(model, text_ids)
    assert (out - logits(masked, text_ids)).abs().max().item() <= 1e-10
    widths = kept_widths(masked.config, plan, False)
    g = masked.config.num_attention_heads // masked.config.num_key_value_heads
    kv = masked.config.num_key_value_heads
    assert [w.kv_group_sizes for w in adapter.all_widths()[:2]] == [
        (g - 1,) + (g,) * (kv - 1),
        (g - 1,) + (g,) * (kv - 2),
    ]
    assert adapter.num_params() == closed_form(family, widths, adapter.is_tied)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(text_ids[:, :12], **kw), masked.generate(text_ids[:, :12], **kw))
    saved = save_pruned(model, tmp_path / "uneven", tokenizer())
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == f"pruned_{family}"
    assert config["layer_kv_group_sizes"][:2] == [[g - 1] + [g] * (kv - 1), [g - 1] + [g] * (kv - 2)]
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float64)
    assert adapter_for(reloaded).all_widths() == adapter.all_widths()
    assert torch.equal(logits(reloaded, text_ids), out)


@pytest.mark.parametrize("family", list(SMALL))
def test_uniform_widths_save_as_the_family_config(family, text_ids, tmp_path):
    """Uniform removals give a plain checkpoint of the family (no auto_map); head_dim stays explicit (Qwen2's
    config would otherwise derive it from hidden_size / heads)."""
    model = small_model(family)
    adapter = adapter_for(model)
    kv = model.config.num_key_value_heads
    plan = PrunePlan()
    for layer in range(COMMON["num_hidden_layers"]):
        plan.add("kv_group", layer, [kv - 1])
        plan.add("mlp", layer, list(range(32)))
    apply_plan(model, plan)
    out = save_pruned(model, tmp_path / "plain", tokenizer())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert config["head_dim"] == SMALL[family][3]["head_dim"] and config["intermediate_size"] == 128
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    assert type(reloaded) is SMALL[family][1]
    assert adapter_for(reloaded).all_widths() == adapter.all_widths()
    assert torch.equal(logits(reloaded, text_ids), logits(model, text_ids))


def test_every_family_has_a_small_model_and_save_classes():
    """A new adapter needs a small model here and a FAMILIES row; its save classes must be module attributes under
    their own names (auto_map and pickling look them up so)."""
    from pruning.surgery import modeling_pruned_llama, modeling_sliced_llama

    assert set(SMALL) == set(ADAPTERS.names()) == set(FAMILIES)
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        assert cls.family == name and set(cls.model_types) == {name, f"pruned_{name}", f"sliced_{name}"}
        for module, classes in (
            (modeling_pruned_llama, modeling_pruned_llama.PRUNED[name]),
            (modeling_sliced_llama, modeling_sliced_llama.SLICED[name]),
        ):
            assert all(getattr(module, c.__name__, None) is c for c in classes)


# --------------------------------------------------------------------- real models: configs, no weights

# Published architectures (the models' config.json files); totals are the published parameter counts.
REAL = {
    "llama_7b": dict(
        family="llama",
        hub_id="baffo32/decapoda-research-llama-7B-hf",
        total=6_738_415_616,
        hidden=4096,
        layers=32,
        heads=32,
        kv=32,
        inter=11008,
        vocab=32000,
        tie=False,
    ),
    "llama2_7b": dict(
        family="llama",
        hub_id="meta-llama/Llama-2-7b-hf",
        total=6_738_415_616,
        hidden=4096,
        layers=32,
        heads=32,
        kv=32,
        inter=11008,
        vocab=32000,
        tie=False,
    ),
    "llama2_13b": dict(
        family="llama",
        hub_id="meta-llama/Llama-2-13b-hf",
        total=13_015_864_320,
        hidden=5120,
        layers=40,
        heads=40,
        kv=40,
        inter=13824,
        vocab=32000,
        tie=False,
    ),
    "llama3_8b": dict(
        family="llama",
        hub_id="meta-llama/Meta-Llama-3-8B",
        total=8_030_261_248,
        hidden=4096,
        layers=32,
        heads=32,
        kv=8,
        inter=14336,
        vocab=128256,
        tie=False,
    ),
    "vicuna_7b": dict(
        family="llama",
        hub_id="lmsys/vicuna-7b-v1.3",
        total=6_738_415_616,
        hidden=4096,
        layers=32,
        heads=32,
        kv=32,
        inter=11008,
        vocab=32000,
        tie=False,
    ),
    "mistral_7b": dict(
        family="mistral",
        hub_id="mistralai/Mistral-7B-v0.1",
        total=7_241_732_096,
        hidden=4096,
        layers=32,
        heads=32,
        kv=8,
        inter=14336,
        vocab=32000,
        tie=False,
    ),
    "qwen25_7b": dict(
        family="qwen2",
        hub_id="Qwen/Qwen2.5-7B",
        total=7_615_616_512,
        hidden=3584,
        layers=28,
        heads=28,
        kv=4,
        inter=18944,
        vocab=152064,
        tie=False,
        qkv_bias=True,
    ),
    "qwen3_8b": dict(
        family="qwen3",
        hub_id="Qwen/Qwen3-8B",
        total=8_190_735_360,
        hidden=4096,
        layers=36,
        heads=32,
        kv=8,
        inter=12288,
        vocab=151936,
        tie=False,
        head_dim=128,
        qk_norm=True,
    ),
}
ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def real_config_json(r: dict) -> dict:
    cfg = {
        "model_type": r["family"],
        "architectures": [ARCH[r["family"]]],
        "hidden_size": r["hidden"],
        "num_hidden_layers": r["layers"],
        "num_attention_heads": r["heads"],
        "num_key_value_heads": r["kv"],
        "intermediate_size": r["inter"],
        "vocab_size": r["vocab"],
        "tie_word_embeddings": r["tie"],
    }
    if "head_dim" in r:
        cfg["head_dim"] = r["head_dim"]
    return cfg


def real_closed_form(r: dict) -> int:
    d, L, H, KV, I, V = r["hidden"], r["layers"], r["heads"], r["kv"], r["inter"], r["vocab"]
    hd = r.get("head_dim", d // H)
    per_layer = d * hd * (2 * H + 2 * KV) + 3 * d * I + 2 * d
    per_layer += r.get("qkv_bias", False) * hd * (H + 2 * KV) + r.get("qk_norm", False) * 2 * hd
    return V * d * (1 if r["tie"] else 2) + d + L * per_layer


def test_every_real_model_config_is_tested():
    assert set(REAL) <= {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}


@pytest.mark.parametrize("name", list(REAL))
def test_real_model_config_shapes_and_counts(name, tmp_path, monkeypatch):
    r = REAL[name]
    monkeypatch.delenv("PRUNING_MODEL_PATH", raising=False)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    assert cfg.model.name == name and cfg.model.family == r["family"] and cfg.model.hub_id == r["hub_id"]
    assert cfg.model.path == f"hub:{r['hub_id']}"
    ckpt = tmp_path / name
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(real_config_json(r)))
    monkeypatch.setenv("PRUNING_MODEL_PATH", str(ckpt))
    assert cfg.model.path == str(ckpt)  # the local-path override

    config = read_config(ckpt)
    cls = adapter_class(config)
    assert cls.family == r["family"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == ARCH[r["family"]]
    assert cls(model).num_params() == r["total"] == real_closed_form(r)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):  # adapter accepted; weights are what is missing
        load_model(cfg.model.path)


@pytest.mark.parametrize(
    "arch",
    [
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
        {"model_type": "phi", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ],
)
def test_unsupported_architecture_fails_in_one_line_before_weights(arch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(arch))
    (tmp_path / "model.safetensors").write_bytes(b"not a weight file")  # never opened: the check comes first
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and f"model_type={arch['model_type']!r}" in msg
    assert "supported families: llama, mistral, qwen2, qwen3" in msg
