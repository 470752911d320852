"""Acceptance: physically pruned == masked dense (<= 1e-5) and params == closed form, per structure kind."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import logits
from pruning.allocation import Uniform
from pruning.methods.baselines import random
from pruning.structures import structure_sets
from pruning.surgery.apply import apply_plan, mask_plan
from pruning.surgery.plan import PrunePlan


def closed_form_params(config, widths) -> int:
    """METHODS.md §1.1: P = V·d (x2 if untied) + d + Σ_l [d·d_h·(2H_l + 2H_kv,l) + 3·d·I_l + 2d + β_l]."""
    d, hd, V = config.hidden_size, config.head_dim, config.vocab_size
    total = V * d * (1 if config.tie_word_embeddings else 2) + d
    for w in widths:
        total += d * hd * (2 * w.num_heads + 2 * w.num_kv_heads) + 3 * d * w.intermediate_size + 2 * d
        total += d * (int(w.o_proj_bias) + int(w.down_proj_bias))
    return total


def test_dense_param_count_matches_closed_form(stories):
    model, _, adapter = stories
    assert adapter.num_params() == 292_800 == closed_form_params(model.config, adapter.all_widths())


CASES = [(["kv_group"], r) for r in (0.03, 0.08, 0.12)] + [(["q_head"], r) for r in (0.04, 0.055)] \
    + [(["mlp"], r) for r in (0.05, 0.2, 0.4)] + [(["block"], r) for r in (0.15, 0.3, 0.45)] \
    + [(["kv_group", "mlp"], r) for r in (0.1, 0.3, 0.45)] + [(["q_head", "mlp"], r) for r in (0.1, 0.25)]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("structures,ratio", CASES)
def test_surgery_equals_masking(stories_text_ids, structures, ratio, dtype, tol):
    """float64 shows the removal is exact; float32 differs only by summation order when a matmul's inner
    dimension shrinks (measured up to ~3e-5 on logits of magnitude ~20, i.e. a few ulps)."""
    from conftest import STORIES
    from pruning.models import load_model

    model, _, adapter = load_model(STORIES, dtype)
    # random scores + a layer range give heterogeneous, non-contiguous removals
    method = random(seed=7, structures=structures, allocation=Uniform(layer_start_frac=0.2))
    plan = method.prune(model, ratio)
    assert not plan.is_empty()
    masked = mask_plan(copy.deepcopy(model), plan)
    apply_plan(model, plan)
    diff = (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item()
    assert diff <= tol, diff
    assert adapter.num_params() == closed_form_params(model.config, adapter.all_widths())
    assert adapter.num_params() < 292_800
    assert abs(1 - adapter.num_params() / 292_800 - plan.meta["planned_ratio"]) < 1e-12


def test_surgery_shapes_and_counts_follow_the_plan(stories):
    model, _, adapter = stories
    plan = PrunePlan()
    plan.add("kv_group", 1, [0, 3])          # group 0 -> query heads 0,1; group 3 -> 6,7
    plan.add("q_head", 2, [1, 2, 5, 6])      # one head from each of the 4 groups
    plan.add("mlp", 3, [0, 5, 171])
    plan.add("block", None, [4])
    q_before = adapter.q_proj(adapter.layers[1]).weight.detach().clone()
    apply_plan(model, plan)
    w = adapter.all_widths()
    assert len(w) == 4 and model.config.num_hidden_layers == 4
    assert (w[1].num_heads, w[1].num_kv_heads) == (4, 2)
    assert (w[2].num_heads, w[2].num_kv_heads) == (4, 4)
    assert w[3].intermediate_size == 169
    assert adapter.layers[2].self_attn.num_key_value_groups == 1
    # kept query heads of layer 1 are exactly the heads of groups 1 and 2 (heads 2..5), in order
    assert torch.equal(adapter.q_proj(adapter.layers[1]).weight, q_before[2 * 8: 6 * 8])
    assert [layer.self_attn.layer_idx for layer in adapter.layers] == [0, 1, 2, 3]


def test_structure_members_cover_the_right_channels(stories):
    model, _, adapter = stories
    (kv,) = structure_sets(adapter, "kv_group", [0])
    q = next(m for m in kv.members if m.name == "q_proj")
    assert kv.n_units == 4 and q.index.shape == (4, 16) and q.index[1].tolist() == list(range(16, 32))
    assert kv.params_per_unit == 3072   # METHODS.md §1.1, tiny model
    (mlp,) = structure_sets(adapter, "mlp", [0])
    assert mlp.params_per_unit == 192
    (blk,) = structure_sets(adapter, "block")
    assert blk.params_per_unit == 45_440


@pytest.mark.parametrize("bad", [{"kv_group": [0, 1, 2, 3]}, {"mlp": list(range(172))},
                                 {"q_head": [0, 2, 4, 6, 1, 3, 5, 7]}])
def test_plan_that_empties_a_layer_is_refused_before_any_change(stories, bad):
    from pruning.errors import InfeasibleRatioError

    model, _, adapter = stories
    plan = PrunePlan()
    for kind, units in bad.items():
        plan.add(kind, 2, units)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InfeasibleRatioError):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uneven_query_head_removal_is_refused(stories):
    model, _, _ = stories
    plan = PrunePlan()
    plan.add("q_head", 0, [0])  # only group 0 loses a head
    with pytest.raises(ValueError, match="evenly"):
        apply_plan(model, plan)
