"""NIRVANA (METHODS.md §3.2 "Invariants to test") on the real stories260K weights and real calibration text."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import STORIES, logits
from pruning import data
from pruning.allocation.nirvana import NirvanaAllocation
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.importance.ntk import NTKScorer, kl_to_reference, next_token_logprobs
from pruning.methods.nirvana import nirvana
from pruning.models import load_model
from pruning.structures import structure_sets
from pruning.surgery.apply import mask_plan

ATTN_MLP = 5 * (4 * 3072 + 172 * 192)  # stories260K: L·(H_kv·P_a + I·P_m) = 226,560


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_model(STORIES)[1]


@pytest.fixture(scope="module")
def calib(tok):
    return data.calibration_batches(tok, "c4", 8, 64, 12, progress=False)


def sampler_for(tok):
    return lambda ds, n, seq_len, seed: data.calibration_batches(tok, ds, n, seq_len, seed, progress=False)


def small_kl(seeds=(0, 1)):
    return {"seeds": list(seeds), "dataset": "alpaca", "n_samples": 16, "seq_len": 32, "seed": 42}


def test_saliency_equals_its_definition(calib):
    """S = |W ⊙ ∂f/∂W|, f = mean_{b,v} max_t logits[b, t, v]; groups/neurons are L1 sums over their own slices."""
    model, _, adapter = load_model(STORIES, "float64")
    sets = [s for k in ("kv_group", "mlp") for s in structure_sets(adapter, k, range(5))]
    scorer = NTKScorer()
    scorer.fit(model, calib, sets)

    model.zero_grad(set_to_none=True)
    model(calib).logits.max(dim=1).values.mean().backward()
    for i, layer in enumerate(adapter.layers):
        S = {
            n: (getattr(adapter, n)(layer).weight.grad * getattr(adapter, n)(layer).weight).abs().detach()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        }
        kv = torch.stack(
            [
                S["q_proj"][16 * j : 16 * (j + 1)].sum()
                + S["k_proj"][8 * j : 8 * (j + 1)].sum()
                + S["v_proj"][8 * j : 8 * (j + 1)].sum()
                + S["o_proj"][:, 16 * j : 16 * (j + 1)].sum()
                for j in range(4)
            ]
        )
        mlp = S["gate_proj"].sum(1) + S["up_proj"].sum(1) + S["down_proj"].sum(0)
        torch.testing.assert_close(scorer(sets[i]), kv, rtol=1e-9, atol=0)
        torch.testing.assert_close(scorer(sets[5 + i]), mlp, rtol=1e-9, atol=0)
    model.zero_grad(set_to_none=True)


def test_zero_weights_score_zero(stories, calib):
    model, _, adapter = stories
    layer = adapter.layers[3]
    with torch.no_grad():
        for proj, rows in (
            (adapter.q_proj, slice(32, 48)),
            (adapter.k_proj, slice(16, 24)),
            (adapter.v_proj, slice(16, 24)),
        ):
            proj(layer).weight[rows] = 0
        adapter.o_proj(layer).weight[:, 32:48] = 0
        adapter.gate_proj(layer).weight[100] = 0
        adapter.up_proj(layer).weight[100] = 0
        adapter.down_proj(layer).weight[:, 100] = 0
    sets = [s for k in ("kv_group", "mlp") for s in structure_sets(adapter, k, [3])]
    sc = NTKScorer()
    sc.fit(model, calib, sets)
    kv, mlp = sc(sets[0]), sc(sets[1])
    assert kv[2] == 0 and mlp[100] == 0 and (kv[[0, 1, 3]] > 0).all() and (mlp > 0).sum() == 171


@pytest.mark.parametrize("gamma", [1.0, 3.36])
def test_budget_splits_attention_and_mlp_by_gamma(stories, gamma):
    """Official counts: (groups pruned / L·H_kv) = (1/γ)·(neurons pruned / L·I) up to truncation, and their params
    equal the budget B = s·(attention+MLP params) up to one group and one neuron."""
    _model, _, adapter = stories
    sets = [s for k in ("kv_group", "mlp") for s in structure_sets(adapter, k, range(5))]
    for s in (0.2, 0.4):
        b = NirvanaAllocation(gamma=gamma, round_to=1, sparsity=s).budget(sets, 0.0, adapter.num_params())
        assert abs(b.n_attn / 20 - (1 / gamma) * b.n_mlp / 860) <= 1 / 20 + 1 / 860
        removed = b.n_attn * 3072 + b.n_mlp * 192
        assert s * ATTN_MLP - 3072 - 192 <= removed <= s * ATTN_MLP


@pytest.mark.parametrize("round_to,ratio", [(8, 0.2), (4, 0.3), (1, 0.4)])
def test_allocation_invariants(calib, stories_text_ids, round_to, ratio):
    model, _, adapter = load_model(STORIES)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = nirvana(round_to=round_to, kl_select={"seeds": []})
    plan = method.prune(model, ratio, calib)
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    widths = adapter.all_widths()
    assert all(w.num_kv_heads >= 1 and w.num_heads == 2 * w.num_kv_heads for w in widths)
    assert all(w.intermediate_size == 172 or w.intermediate_size % round_to == 0 for w in widths)
    assert len({w.intermediate_size for w in widths}) > 1  # global thresholds: widths differ per layer
    achieved = 1 - adapter.num_params() / 292_800
    assert abs(achieved - ratio) <= 0.02, achieved
    alloc = plan.meta["allocation"]
    assert alloc["removed_params"] == 292_800 - adapter.num_params()
    untouched = ("embed_tokens", "lm_head", "norm")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if any(u in n for u in untouched))
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= 1e-4


def test_kl_is_zero_to_itself_and_positive_after_pruning(stories, tok):
    model, _, _ = stories
    ids = data.calibration_batches(tok, "alpaca", 8, 32, 42, progress=False)
    ref = next_token_logprobs(model, ids, batch_size=3)
    assert kl_to_reference(model, ids, ref, batch_size=5) == 0.0
    plan = nirvana(kl_select={"seeds": []}).prune(
        model, 0.3, data.calibration_batches(tok, "c4", 8, 64, 0, progress=False)
    )
    pruned = mask_plan(copy.deepcopy(model), plan)
    kl = kl_to_reference(pruned, ids, ref)
    # independent: D_KL(P‖Q) = Σ_v p (log p − log q), mean over every position
    with torch.no_grad():
        lp, lq = model(ids).logits.log_softmax(-1), pruned(ids).logits.log_softmax(-1)
    assert kl > 0 and abs(kl - (lp.exp() * (lp - lq)).sum(-1).mean().item()) < 1e-5


def test_kl_selection_keeps_the_candidate_closest_to_dense(stories, tok):
    model, _, _ = stories
    method = nirvana(round_to=4, kl_select=small_kl(seeds=(0, 1, 2)))
    method.bind_sampler(sampler_for(tok), {"dataset": "c4", "n_samples": 8, "seq_len": 64, "seed": 12})
    plan = method.prune(model, 0.2)
    sel = plan.meta["kl_select"]
    assert sel["seeds"] == [0, 1, 2] and len(set(sel["kl"])) == 3 and min(sel["kl"]) >= 0
    assert sel["chosen_seed"] == sel["seeds"][sel["kl"].index(min(sel["kl"]))]
    # the chosen plan is exactly the plan of that seed's calibration set
    again = nirvana(round_to=4, kl_select={"seeds": []}).prune(
        model, 0.2, data.calibration_batches(tok, "c4", 8, 64, sel["chosen_seed"], progress=False)
    )
    assert again.remove == plan.remove


def test_bad_input_fails_before_scoring(stories, tok):
    model, _, _ = stories
    with pytest.raises(PruningError, match="sampler"):
        nirvana().prune(model, 0.2, None)
    method = nirvana(kl_select={**small_kl(), "dataset": "c4"})
    method.bind_sampler(sampler_for(tok), {"dataset": "c4", "n_samples": 8, "seq_len": 64, "seed": 12})
    with pytest.raises(PruningError, match="disjoint"):
        method.prune(model, 0.2)
    with pytest.raises(InfeasibleRatioError):
        nirvana(kl_select={"seeds": []}).prune(model, 0.75, None)
    with pytest.raises(PruningError):
        nirvana(gamma=0)
    with pytest.raises(PruningError, match="kl_select"):
        nirvana(kl_select={"seed_list": [1]})
