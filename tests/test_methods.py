"""Baselines: scores against an independent computation, ratio 0 is a no-op, seeds are reproducible."""

from __future__ import annotations

import pytest
import torch

from pruning.allocation import count_rule
from pruning.importance import MagnitudeScorer, aggregate
from pruning.methods.baselines import magnitude, random
from pruning.structures import structure_sets
from pruning.surgery.apply import apply_plan


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_kv_group_scores_match_independent_loop(stories, p):
    model, _, adapter = stories
    layer = model.model.layers[2]
    attn, hd, g = layer.self_attn, 8, 2
    expected = []
    for j in range(4):  # KV group j: k/v rows of head j, q rows / o cols of heads 2j, 2j+1
        q = attn.q_proj.weight[j * g * hd : (j + 1) * g * hd]
        k = attn.k_proj.weight[j * hd : (j + 1) * hd]
        v = attn.v_proj.weight[j * hd : (j + 1) * hd]
        o = attn.o_proj.weight[:, j * g * hd : (j + 1) * g * hd]
        member = [float((t.detach().double().abs() ** p).sum()) for t in (q, k, v, o)]
        expected.append(sum(member) / 4)  # mean over the 4 members (LLM-Pruner default group_reduction)
    (sset,) = structure_sets(adapter, "kv_group", [2])
    got = MagnitudeScorer(p=p, aggregation="mean")(sset)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_magnitude_mlp_scores_and_aggregations(stories):
    model, _, adapter = stories
    mlp = model.model.layers[0].mlp
    per = [
        mlp.gate_proj.weight.double().pow(2).sum(1),
        mlp.up_proj.weight.double().pow(2).sum(1),
        mlp.down_proj.weight.double().pow(2).sum(0),
    ]
    (sset,) = structure_sets(adapter, "mlp", [0])
    for how, ref in [
        ("sum", per[0] + per[1] + per[2]),
        ("max", torch.stack(per).max(0).values),
        ("first", per[0]),
        ("last", per[2]),
        ("prod", per[0] * per[1] * per[2]),
    ]:
        assert torch.allclose(MagnitudeScorer(2, how)(sset), ref, rtol=1e-12), how


def test_zero_unit_scores_zero_and_goes_first(stories):
    model, _, adapter = stories
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[17].zero_()
        model.model.layers[1].mlp.up_proj.weight[17].zero_()
        model.model.layers[1].mlp.down_proj.weight[:, 17].zero_()
    (sset,) = structure_sets(adapter, "mlp", [1])
    assert MagnitudeScorer(1)(sset)[17] == 0
    plan = magnitude(1, structures=["mlp"]).prune(model, 0.01)
    assert 17 in plan.units("mlp", 1)


def test_ratio_zero_leaves_weights_bit_identical(stories):
    model, _, _ = stories
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = magnitude().prune(model, 0.0)
    assert plan.is_empty()
    apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_range_leaves_outside_layers_untouched(stories):
    model, _, _adapter = stories
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = magnitude(layers={"start_frac": 0.125, "end_frac": 0.9375}).prune(model, 0.2)
    apply_plan(model, plan)
    assert {int(l) for per in plan.remove.values() for l in per} <= {1, 2, 3, 4}
    after = model.state_dict()
    untouched = [k for k in before if ".layers.0." in k or "layers" not in k]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


@pytest.mark.parametrize("make", [lambda s: random(seed=s), lambda s: magnitude(p=1)])
def test_same_seed_bit_identical_pruned_weights(make):
    from conftest import STORIES
    from pruning.models import load_model

    states = []
    for _ in range(2):
        model, _, _ = load_model(STORIES)
        apply_plan(model, make(123).prune(model, 0.3))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_different_seed_gives_different_random_plan(stories):
    model, _, _ = stories
    a, b = random(seed=1).prune(model, 0.3), random(seed=2).prune(model, 0.3)
    assert a.remove != b.remove


def test_uniform_budget_follows_count_rule_and_reports_achieved(stories):
    model, _, _adapter = stories
    budget = magnitude().budget(model, 0.2)
    # LLM-Pruner's rule: KV groups counted on k_proj's 4·8 channels, rounded down to whole heads
    per_layer = count_rule(4 * 8, budget.p) // 8 * 3072 + count_rule(172, budget.p) * 192
    assert budget.removed_params == 5 * per_layer
    assert abs(budget.achieved - 0.2) < 0.01  # closest achievable, reported exactly


def test_aggregate_rejects_unknown():
    with pytest.raises(ValueError, match="choices"):
        aggregate([torch.zeros(2)], "median")
