"""Parity with the official code (issue 22): the official repositories' outputs on stories260K, replayed.

``tests/fixtures/parity/stories260k_official.json`` (a copy of ../shared/reference/parity, see its README) holds what
LLM-Pruner, FLAP / Wanda-SP, SliceGPT and ShortGPT's own code produced on the embedded stories260K checkpoint: the
native settings, the exact calibration rule, every layer's pruned index sets and the shared evaluator's PPL. Each
test here feeds the same tokens at the same native setting and checks the same units go and the PPL agrees.

Tiers: the fast tier prunes exactly as below and checks the units, widths and parameter counts (``-units`` ids); the
full WikiText-2 test PPL that the fixture records (6,367 windows, about 15 s of one core per model) is checked by
the ``slow`` (integration) tier (``-ppl`` ids and the PPL-only tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pruning import data
from pruning.eval.perplexity import PPLProtocol, perplexity
from pruning.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "stories260k_official.json").read_text())
RUNS = {r["run"]: r for r in FIXTURE["runs"]}
FULL_WIKITEXT = PPLProtocol("ppl128-lp", "wikitext2", "test", seq_len=128, stride=128, bos="once", batch_size=64)
PPL_TOL = 0.005  # issue 22: PPL within 0.5% of the official code where the index sets are identical
WITH_PPL = pytest.mark.parametrize(
    "with_ppl", [pytest.param(False, id="units"), pytest.param(True, id="ppl", marks=pytest.mark.slow)]
)


def draw(tokenizer, sampler: str, n: int, seq_len: int, **kw) -> torch.Tensor:
    """The fixture's calibration through our own samplers in their deterministic (file-order) mode; the tests in
    test_samplers.py check these draws against the fixture's rules token for token."""
    spec = data.CalibrationSpec(sampler=sampler, dataset="c4", n_samples=n, seq_len=seq_len, seed=0, order="file", **kw)
    return data.draw_calibration(tokenizer, spec, progress=False)


def wikitext_ppl(model, tokenizer) -> float:
    return perplexity(model, tokenizer, FULL_WIKITEXT, progress=False)["ppl"]


def pruned_sets(plan, layer: int) -> dict:
    return {
        "pruned_kv_heads": sorted(plan.units("kv_group", layer)),
        "pruned_mlp_channels": sorted(plan.units("mlp", layer)),
    }


@pytest.mark.slow
def test_fixture_dense_ppl_is_our_evaluator():
    """The fixture's shared evaluator is our ppl128-lp: the dense model gives its 114.4823 exactly."""
    model, tok, _ = load_model("embedded:stories260K")
    assert wikitext_ppl(model, tok) == pytest.approx(FIXTURE["dense"]["ppl_wikitext2_test_ppl128"], rel=1e-6)


@WITH_PPL
@pytest.mark.parametrize(
    "run,importance,group_ratio,layers",
    [
        ("llm_pruner_element1_g0.2_layers1-4", "element1", 0.2, (1, 5)),
        ("llm_pruner_element2_g0.2_layers1-4", "element2", 0.2, (1, 5)),
        ("llm_pruner_l2_g0.2_layers1-4", "l2", 0.2, (1, 5)),
        ("llm_pruner_element1_g0.25_layers1-4", "element1", 0.25, (1, 5)),
        ("llm_pruner_element1_g0.2_all_layers", "element1", 0.2, (0, 5)),
        ("llm_pruner_element2_g0.2_all_layers", "element2", 0.2, (0, 5)),
    ],
)
def test_llm_pruner_matches_official(run, importance, group_ratio, layers, with_ppl):
    """Same calibration tokens, same --pruning_ratio and layer range -> the same KV groups and MLP channels in every
    layer, the same parameter count and the PPL within 0.5%. The official llama3.py credits KV group j with query
    heads j, j+H_kv (its cross-group fold, ``gqa_fold=official``); at 0.25 that decides which group goes."""
    from pruning.methods.baselines import magnitude
    from pruning.methods.llm_pruner import llm_pruner

    ref = RUNS[run]
    model, tok, adapter = load_model("embedded:stories260K")
    span = {"start": layers[0], "end": layers[1]}
    if importance == "l2":  # --pruner_type l2: MagnitudeImportance(p=2), group_reduction "mean"
        method = magnitude(p=2, aggregation="mean", group_ratio=group_ratio, gqa_fold="official", layers=span)
    else:
        method = llm_pruner(importance=importance, group_ratio=group_ratio, gqa_fold="official", layers=span)
    plan = method.prune(model, None, draw(tok, "first_docs", 10, 64))  # the first 64 tokens of documents 0-9
    for layer in range(len(adapter.layers)):
        want = {k: ref["per_layer"][str(layer)][k] for k in ("pruned_kv_heads", "pruned_mlp_channels")}
        assert pruned_sets(plan, layer) == want, f"layer {layer}"
    method.apply(model, plan)
    assert adapter.num_params() == ref["params_after"]
    if with_ppl:
        assert wikitext_ppl(model, tok) == pytest.approx(ref["ppl_wikitext2_test_ppl128"], rel=PPL_TOL)


@pytest.fixture(scope="module")
def slicegpt_calib():
    _, tok, _ = load_model("embedded:stories260K")
    return draw(tok, "slicegpt", 128, 128)  # consecutive documents from the first unused one, "\n\n"-joined


def sliced(fusion: str, slicing: float, round_interval: int, calib):
    """(model, tokenizer, parameters, sliced hidden size) after SliceGPT at this setting."""
    from pruning.methods.slicegpt import slicegpt

    model, tok, adapter = load_model("embedded:stories260K")
    method = slicegpt(slicing=slicing, round_interval=round_interval, fusion=fusion, progress=False)
    plan = method.prune(model, None, calib)
    method.apply(model, plan, calib)
    return model, tok, adapter.num_params(), plan.meta["sliced_hidden_size"]


@WITH_PPL
@pytest.mark.parametrize(
    "run,slicing,round_interval,width",
    [("slicegpt_0.0", 0.0, 8, 64), ("slicegpt_0.2_round8", 0.2, 8, 48), ("slicegpt_0.2_round1", 0.2, 1, 51)],
)
def test_slicegpt_official_fusion_reproduces_the_official_code(
    run, slicing, round_interval, width, slicegpt_calib, with_ppl
):
    """With the official fusion (embedding rows centred) our rotation, slicing and shortcuts give the official
    PPL to the fixture's 4 decimals, with the same parameter count: the algorithm is the official one."""
    ref = RUNS[run]
    model, tok, params, d = sliced("official", slicing, round_interval, slicegpt_calib)
    assert (d, params) == (width, ref["params_after"])
    if with_ppl:
        assert wikitext_ppl(model, tok) == pytest.approx(ref["ppl_wikitext2_test_ppl128"], abs=1e-4)


@WITH_PPL
def test_slicegpt_exact_fusion_at_zero_is_the_dense_model(slicegpt_calib, stories_text_ids, with_ppl):
    """At 0% the exact fusion is really evaluated (the model is rotated and carries shortcuts) and equals the dense
    model, where the official fusion's centring costs +0.8% (115.39 vs 114.48)."""
    model, tok, params, d = sliced("exact", 0.0, 8, slicegpt_calib)
    assert (d, params) == (64, RUNS["slicegpt_0.0"]["params_after"])
    dense, _, _ = load_model("embedded:stories260K")
    ids = stories_text_ids
    with torch.no_grad():  # the same function on real text (the PPL below is the same check on the whole test set)
        assert (model(ids).logits - dense(ids).logits).abs().max().item() <= 1e-4
    if with_ppl:
        ppl = wikitext_ppl(model, tok)
        assert ppl == pytest.approx(FIXTURE["dense"]["ppl_wikitext2_test_ppl128"], rel=1e-6)
        assert ppl < RUNS["slicegpt_0.0"]["ppl_wikitext2_test_ppl128"]


@pytest.mark.slow
def test_slicegpt_exact_fusion_against_the_official_numbers(slicegpt_calib):
    """The fixture's expectation, "at or below the official PPL at the same widths", holds at d' = 51 (111.35 vs
    112.16) but not at d' = 48: there the official centring happens to help (exact 116.96 vs official 115.91,
    +0.9%). The exact fusion stays the default because it is the function-preserving one; the measured gap is
    asserted here so a change to either number is seen."""
    ppl51 = wikitext_ppl(*sliced("exact", 0.2, 1, slicegpt_calib)[:2])
    assert ppl51 <= RUNS["slicegpt_0.2_round1"]["ppl_wikitext2_test_ppl128"]
    ppl48 = wikitext_ppl(*sliced("exact", 0.2, 8, slicegpt_calib)[:2])
    assert ppl48 / RUNS["slicegpt_0.2_round8"]["ppl_wikitext2_test_ppl128"] == pytest.approx(1.0090, abs=2e-4)


# -- FLAP and Wanda-SP (CASIA-LMC-Lab/FLAP lib/prune.py on an MHA expansion of the GQA checkpoint) -------------------

GQA_PARAMS_TOL = 0.01  # issue 22: a GQA parameter count within 1% of the fixture's GQA-equivalent count
FLAP_PPL_TOL = 0.03  # issue 22: within 3% of the official PPL with query-head units


def gqa_params(ref: dict) -> int:
    """The fixture's GQA-equivalent parameter count (``params_note``: the official count is of the MHA form)."""
    return int(ref["params_note"].rsplit(" ", 1)[-1].replace(",", ""))


def head_and_channel_sets(plan, layer: int) -> dict:
    return {
        "pruned_q_heads": sorted(plan.units("q_head", layer)),
        "pruned_mlp_channels": sorted(plan.units("mlp", layer)),
    }


@WITH_PPL
def test_wanda_sp_matches_official(with_ppl):
    """--prune_method wanda_sp --pruning_ratio 0.2 on the same 128 samples: int(0.2·n) units per kind and layer (1 of
    8 query heads, 34 of 172 MLP channels), the same query heads and MLP channels in every layer, the fixture's GQA
    parameter count and its PPL (measured: equal to 1e-8)."""
    from pruning.methods.wanda_sp import wanda_sp

    ref = RUNS["wanda_sp_0.2"]
    model, tok, adapter = load_model("embedded:stories260K")
    method = wanda_sp(attn_mlp_ratio=0.2, progress=False)
    plan = method.prune(model, None, draw(tok, "wanda", 128, 128))  # the first 128 tokens of the k-th document
    # with more than 128 tokens, k = 0..127
    for layer in range(len(adapter.layers)):
        want = {k: ref["per_layer"][str(layer)][k] for k in ("pruned_q_heads", "pruned_mlp_channels")}
        assert head_and_channel_sets(plan, layer) == want, f"layer {layer}"
    method.apply(model, plan)
    assert adapter.num_params() == gqa_params(ref) == 255_040
    if with_ppl:
        assert wikitext_ppl(model, tok) == pytest.approx(ref["ppl_wikitext2_test_ppl128"], rel=PPL_TOL)


@WITH_PPL
@pytest.mark.parametrize(
    "variance",
    ["exact", pytest.param("official_streaming", marks=pytest.mark.slow)],  # one pass per sample: 8 s
)
def test_flap_matches_official(variance, with_ppl):
    """--prune_method flap --structure AL-AM --metrics WIFV --pruning_ratio 0.2 --nsamples 1024, bias compensation.

    AL-AM's threshold is the official one, with the code's integer head weight int(4·d_h/3) = 10 (its weight tensor
    is ``ones_like`` of the sort indices; 10.67 would remove one MLP channel more). With FLAP's own streaming
    variance (``official_streaming``) every layer's pruned query heads and MLP channels are the fixture's and the PPL
    is the official one (measured: equal to 1e-7). With the exact variance (our default) the query heads are the
    same and one boundary MLP channel differs (182 of 183 shared: layer 0 loses channel 158 instead of layer 2's
    channel 45); measured PPL 132.38 against 132.44 at the same 251,136 parameters."""
    from pruning.methods.flap import flap

    ref = RUNS["flap_wifv_al_am_0.2"]
    model, tok, adapter = load_model("embedded:stories260K")
    method = flap(attn_mlp_ratio=0.2, variance=variance, progress=False)
    plan = method.prune(model, None, draw(tok, "stream", 1024, 128, join=" "))  # " ".join(C4 documents) tokenised
    # once, the first 1024 non-overlapping 128-token windows
    got = [head_and_channel_sets(plan, layer) for layer in range(len(adapter.layers))]
    want = [
        {k: ref["per_layer"][str(layer)][k] for k in ("pruned_q_heads", "pruned_mlp_channels")}
        for layer in range(len(adapter.layers))
    ]
    assert [g["pruned_q_heads"] for g in got] == [w["pruned_q_heads"] for w in want]
    ours = {(layer, c) for layer, g in enumerate(got) for c in g["pruned_mlp_channels"]}
    official = {(layer, c) for layer, w in enumerate(want) for c in w["pruned_mlp_channels"]}
    assert len(official) == 183
    if variance == "official_streaming":
        assert ours == official
    else:
        assert len(ours ^ official) <= 2, sorted(ours ^ official)  # one swapped boundary channel, see above
    method.apply(model, plan)
    assert adapter.num_params() == pytest.approx(gqa_params(ref), rel=GQA_PARAMS_TOL)
    if with_ppl:
        tol = PPL_TOL if variance == "official_streaming" else FLAP_PPL_TOL
        assert wikitext_ppl(model, tok) == pytest.approx(ref["ppl_wikitext2_test_ppl128"], rel=tol)
