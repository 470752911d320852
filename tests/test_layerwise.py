"""Layer-wise gradient scoring (``method.memory.layerwise``) and the one-layer-at-a-time statistics collector, on the
real stories260K weights and real C4 calibration text.

The layer-wise engine must give the whole-model gradients exactly (chain rule, one layer's graph at a time), so
its scores are compared with the whole-model engine's in float64 for every Taylor variant and strategy, with a
tied lm_head (the weight shared by the first and last segment), with NIRVANA's output objective, and against a
plain ``loss.backward()`` computed here; the resulting plans must be identical.
"""

from __future__ import annotations

import pytest
import torch

from conftest import STORIES
from pruning import data
from pruning.calibration import collect
from pruning.errors import PruningError
from pruning.importance.ntk import NTKScorer
from pruning.importance.taylor import MEMORY_OPTIONS, TAYLOR, peak_memory, taylor_scorer
from pruning.methods.llm_pruner import llm_pruner
from pruning.methods.nirvana import nirvana
from pruning.models import load_model
from pruning.structures import structure_sets

pytestmark = pytest.mark.usefixtures("one_thread")
REL = 1e-10


@pytest.fixture(scope="module")
def f64():
    model, tok, adapter = load_model(STORIES, "float64")
    calib = data.calibration_batches(tok, "c4", 4, 32, 42, progress=False)
    return model, tok, adapter, calib


def fitted(model, sets, calib, variant="element1", **memory):
    sc = taylor_scorer(variant, **memory)
    meta = sc.fit(model, calib, sets)
    return torch.cat([sc(s) for s in sets]), meta


def rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("strategy", ["block", "channel"])
@pytest.mark.parametrize("variant", TAYLOR)
def test_layerwise_scores_equal_whole_model(f64, variant, strategy):
    model, _, _, calib = f64
    sets = llm_pruner(importance=variant, strategy=strategy).sets(model)
    whole, _ = fitted(model, sets, calib, variant)
    lw, meta = fitted(model, sets, calib, variant, layerwise=True)
    assert meta["layerwise"] is True and (whole > 0).all()
    assert rel_diff(lw, whole) <= REL


@pytest.mark.parametrize("variant", TAYLOR)
def test_layerwise_gives_the_same_plan(f64, variant):
    """ratio 0.3: KV groups and MLP channels both go (LLM-Pruner's layer range on the tiny model)."""
    model, _, _, calib = f64
    plans = [llm_pruner(importance=variant, memory=mem).prune(model, 0.3, calib) for mem in ({}, {"layerwise": True})]
    assert plans[0].remove == plans[1].remove and plans[0].remove["kv_group"] and plans[0].remove["mlp"]
    assert plans[1].meta["scoring"]["layerwise"] is True


def test_nirvana_output_objective_layerwise(f64):
    model, _, _, calib = f64
    method = nirvana(round_to=4, kl_select={"seeds": []}, memory={"layerwise": True})
    assert isinstance(method.scorer, NTKScorer) and method.scorer.layerwise
    sets = method.sets(model)
    whole = NTKScorer()
    whole.fit(model, calib, sets)
    lw = NTKScorer(layerwise=True)
    lw.fit(model, calib, sets)
    assert rel_diff(torch.cat([lw(s) for s in sets]), torch.cat([whole(s) for s in sets])) <= REL
    ref = nirvana(round_to=4, kl_select={"seeds": []}).prune(model, 0.2, calib)
    assert method.prune(model, 0.2, calib).remove == ref.remove


def test_tied_head_is_folded_once_and_matches_plain_autograd(one_thread):
    """lm_head tied to the embedding: its gradient has a head share and an embedding share; element1 needs
    |w·(g_head + g_embed)| per channel, computed here from one plain backward."""
    model, tok, adapter = load_model(STORIES, "float64")
    model.lm_head.weight = model.model.embed_tokens.weight
    assert adapter.is_tied
    calib = data.calibration_batches(tok, "c4", 6, 32, 42, progress=False)
    (hid,) = structure_sets(adapter, "hidden")
    model.zero_grad(set_to_none=True)
    model(calib, labels=calib).loss.backward()
    ref = torch.zeros(64, dtype=torch.float64)
    for name, p in model.named_parameters():  # named_parameters lists the tied matrix once
        t = (p.detach() * p.grad).abs()
        ref += t if p.dim() == 1 else t.sum(1) if name.endswith(("o_proj.weight", "down_proj.weight")) else t.sum(0)
    model.zero_grad(set_to_none=True)
    for memory in (
        {"layerwise": True},
        {"layerwise": True, "micro_batch": 4},
        {"layerwise": True, "offload": True, "device": "cpu"},
    ):
        got, _ = fitted(model, [hid], calib, **memory)
        assert rel_diff(got, ref) <= REL, memory


def test_layerwise_with_micro_batches_offload_and_cpu_device(f64):
    model, _, _, calib = f64
    sets = llm_pruner().sets(model)
    for variant, memory in (
        ("element2", {"micro_batch": 2, "budget": 0.3}),
        ("element1", {"micro_batch": 3}),
        ("element1", {"offload": True}),
        ("element1", {"device": "cpu"}),
    ):
        ref, _ = fitted(model, sets, calib, variant)
        got, meta = fitted(model, sets, calib, variant, layerwise=True, **memory)
        assert rel_diff(got, ref) <= REL, memory
        assert meta["chunks"] > 1 or variant == "element1"


def test_fit_leaves_no_hooks_grads_or_flags(stories):
    model, tok, _adapter = stories
    calib = data.calibration_batches(tok, "c4", 4, 32, 3, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fitted(model, llm_pruner(strategy="channel").sets(model), calib, layerwise=True, offload=True)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_layerwise_peak_is_a_fraction_of_the_whole_model_peak(stories):
    """Measured (torch allocator events): one layer's graph instead of four (layers [1, 5) are scored)."""
    model, tok, _ = stories
    calib = data.calibration_batches(tok, "c4", 8, 64, 5, progress=False)
    sets = llm_pruner().sets(model)
    with torch.no_grad():
        model(calib[:1])
    whole = fitted(model, sets, calib)[1]["memory"]
    lw = fitted(model, sets, calib, layerwise=True)[1]["memory"]
    assert lw["peak_extra_bytes"] < 0.5 * whole["peak_extra_bytes"]
    assert lw["state_ratio"] == whole["state_ratio"]  # the same gradients are folded the same way


def test_bad_memory_options_fail_before_any_pass(stories):
    _model, _, _ = stories
    with pytest.raises(PruningError, match="layerwise: true"):
        taylor_scorer("element1", offload=True)
    with pytest.raises(PruningError, match="layerwise: true"):
        llm_pruner(memory={"device": "cpu"})
    with pytest.raises(PruningError, match="true or false"):
        taylor_scorer("element1", layerwise="yes")
    with pytest.raises(PruningError, match="not a torch device"):
        taylor_scorer("element1", layerwise=True, device="gpu0")
    with pytest.raises(PruningError, match=r"unknown llm_pruner memory options.*layerwise"):
        llm_pruner(memory={"layer_wise": True})
    with pytest.raises(PruningError, match="unknown nirvana memory options"):
        nirvana(memory={"layer_wise": True})
    with pytest.raises(PruningError, match="layerwise: true"):
        llm_pruner(importance="random", memory={"offload": True})
    if not torch.cuda.is_available():
        with pytest.raises(PruningError, match="CUDA is not available"):
            taylor_scorer("element1", layerwise=True, device="cuda")
    assert set(MEMORY_OPTIONS) == {"micro_batch", "budget", "layerwise", "offload", "device"}


def test_method_configs_expose_the_option_off_by_default():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import experiments.paper_ratios  # noqa: F401  (the ${paper_knob:...} resolver the method configs use)

    conf = Path(__file__).resolve().parents[1] / "conf" / "method"
    for name in ("llm_pruner", "nirvana"):
        cfg = OmegaConf.merge(OmegaConf.load(conf / f"{name}.yaml"), {"seed": 0, "paper_ratio": None})
        mem = cfg.method.memory
        assert (mem.layerwise, mem.offload, mem.device) == (False, False, None)
        cfg.method.memory.layerwise = True
        method = instantiate(cfg.method, _convert_="all")
        assert method.scorer.layerwise is True


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_layerwise_on_other_families(family):
    """Mistral with a sliding window shorter than the sequence (each layer gets its own mask from the model's
    forward) and Qwen3 (q/k norms inside attention). No weights of these families exist offline, so the model is
    built from its config with the family's own modeling class (issue 13)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    from pruning.errors import UnsupportedModelError
    from pruning.models import adapter_for

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    )
    cfg = MistralConfig(sliding_window=8, **common) if family == "mistral" else Qwen3Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    try:
        adapter_for(model)
    except UnsupportedModelError:
        pytest.skip(f"no {family} adapter in this tree")
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    for strategy in ("block", "channel"):
        sets = llm_pruner(strategy=strategy).sets(model)
        whole, _ = fitted(model, sets, ids)
        lw, _ = fitted(model, sets, ids, layerwise=True)
        assert rel_diff(lw, whole) <= REL, strategy


# ------------------------------------------------------------------------------ statistics, one layer at a time


def test_collector_holds_one_layer_at_a_time(stories):
    """Peak memory of statistics collection does not grow with depth in either mode: the 5-layer model and the
    same model cut to its first 2 layers peak within 10% (plus their statistics), while a whole-model backward
    (which keeps every layer's graph) grows with depth; checks the collector is really one layer at a time."""
    model, tok, adapter = stories
    calib = data.calibration_batches(tok, "c4", 16, 64, 7, progress=False)
    with torch.no_grad():
        model(calib[:1])

    def peaks():
        out = {}
        for mode in ("dense", "sequential"):
            with peak_memory("cpu") as mem:
                collect(model, calib, stats=("sqnorm",), sites=("o_proj",), mode=mode, batch_size=4, progress=False)
            out[mode] = mem["peak_extra_bytes"]
        with peak_memory("cpu") as mem, torch.enable_grad():
            model(calib, labels=calib).loss.backward()
        model.zero_grad(set_to_none=True)
        out["backward"] = mem["peak_extra_bytes"]
        return out

    deep = peaks()
    adapter.set_layers([0, 1])
    shallow = peaks()
    stats_bytes = 3 * 64 * 8  # sqnorm at o_proj of the 3 extra layers
    for mode in ("dense", "sequential"):
        assert deep[mode] <= 1.1 * shallow[mode] + stats_bytes, mode
    assert deep["backward"] > 1.5 * shallow["backward"]
