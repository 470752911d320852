"""Acceptance: physically pruned == masked dense (<= 1e-5) and params == closed form, per structure kind."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import logits
from pruning.errors import PruningError
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


CASES = (
    [(["kv_group"], r) for r in (0.03, 0.08, 0.12)]
    + [(["q_head"], r) for r in (0.04, 0.055)]
    + [(["mlp"], r) for r in (0.05, 0.2, 0.4)]
    + [(["block"], r) for r in (0.15, 0.3, 0.45)]
    + [(["kv_group", "mlp"], r) for r in (0.1, 0.3, 0.45)]
    + [(["q_head", "mlp"], r) for r in (0.1, 0.25)]
)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("structures,ratio", CASES)
def test_surgery_equals_masking(stories_text_ids, structures, ratio, dtype, tol):
    """float64 shows the removal is exact; float32 differs only by summation order when a matmul's inner
    dimension shrinks (measured up to ~3e-5 on logits of magnitude ~20, i.e. a few ulps)."""
    from conftest import STORIES
    from pruning.models import load_model

    model, _, adapter = load_model(STORIES, dtype)
    # random scores + a layer range give heterogeneous, non-contiguous removals
    method = random(seed=7, structures=structures, layers={"start_frac": 0.2})
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
    plan.add("kv_group", 1, [0, 3])  # group 0 -> query heads 0,1; group 3 -> 6,7
    plan.add("q_head", 2, [1, 2, 5, 6])  # one head from each of the 4 groups
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
    assert torch.equal(adapter.q_proj(adapter.layers[1]).weight, q_before[2 * 8 : 6 * 8])
    assert [layer.self_attn.layer_idx for layer in adapter.layers] == [0, 1, 2, 3]


def test_structure_members_cover_the_right_channels(stories):
    _model, _, adapter = stories
    (kv,) = structure_sets(adapter, "kv_group", [0])
    q = next(m for m in kv.members if m.name == "q_proj")
    assert kv.n_units == 4 and q.index.shape == (4, 16) and q.index[1].tolist() == list(range(16, 32))
    assert kv.params_per_unit == 3072  # METHODS.md §1.1, tiny model
    (mlp,) = structure_sets(adapter, "mlp", [0])
    assert mlp.params_per_unit == 192
    (blk,) = structure_sets(adapter, "block")
    assert blk.params_per_unit == 45_440


@pytest.mark.parametrize(
    "bad", [{"kv_group": [0, 1, 2, 3]}, {"mlp": list(range(172))}, {"q_head": [0, 2, 4, 6, 1, 3, 5, 7]}]
)
def test_plan_that_empties_a_layer_is_refused_before_any_change(stories, bad):
    from pruning.errors import InfeasibleRatioError

    model, _, _adapter = stories
    plan = PrunePlan()
    for kind, units in bad.items():
        plan.add(kind, 2, units)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InfeasibleRatioError):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def uneven_plan() -> PrunePlan:
    """Query heads off single KV groups (g = 2 on stories260K): layer 0 loses head 0 (group 0 keeps one head),
    layer 1 heads 0, 1 (group 0 leaves) and 5, layer 2 heads 2..6 (groups 1 and 2 leave, group 3 keeps head 7)."""
    plan = PrunePlan()
    plan.add("q_head", 0, [0])
    plan.add("q_head", 1, [0, 1, 5])
    plan.add("q_head", 2, [2, 3, 4, 5, 6])
    plan.add("mlp", 2, [1, 2, 3])
    return plan


def test_uneven_query_heads_surgery_equals_masking(stories_text_ids):
    """Any query head may go; a KV head goes with its last query head (masking zeroes its k/v rows). The pruned
    model equals the masked one in float64, its params are the closed form of the kept widths, the kept rows are
    the original ones in order, and only uneven layers leave the stock attention path."""
    from conftest import STORIES
    from pruning.models import load_model
    from pruning.surgery.modeling_pruned_llama import UNEVEN_GQA

    model, _, adapter = load_model(STORIES, "float64")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = uneven_plan()
    masked = mask_plan(copy.deepcopy(model), plan)
    k1 = masked.model.layers[1].self_attn.k_proj.weight
    assert k1[:8].abs().max() == 0 and k1[8:].abs().min() > 0  # KV head 0 of layer 1 lost its heads
    apply_plan(model, plan)
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= 1e-10
    w = adapter.all_widths()
    assert [(x.num_heads, x.num_kv_heads, x.kv_group_sizes) for x in w[:3]] == [
        (7, 4, (1, 2, 2, 2)),
        (5, 3, (2, 1, 2)),
        (3, 2, (2, 1)),
    ]
    assert adapter.num_params() == closed_form_params(model.config, w) == 292_800 - 12 * 1024 - 3 * 192
    q2 = adapter.q_proj(adapter.layers[2]).weight
    assert torch.equal(q2, before["model.layers.2.self_attn.q_proj.weight"][list(range(16)) + list(range(56, 64))])
    assert torch.equal(
        adapter.k_proj(adapter.layers[2]).weight,
        before["model.layers.2.self_attn.k_proj.weight"][list(range(8)) + list(range(24, 32))],
    )
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if i < 3:
            assert attn.config._attn_implementation == UNEVEN_GQA and attn.num_key_value_groups == 1
        else:
            assert attn.config is model.config and attn.num_key_value_groups == 2


def test_uneven_query_heads_generate_with_a_kv_cache_and_every_attention_implementation(stories_text_ids):
    """The KV cache holds the compact keys (one per kept KV head) and attention expands them per query head:
    greedy generation with the cache equals generation without it and the masked model's; eager equals sdpa."""
    from conftest import STORIES
    from pruning.models import load_model

    model, _, _ = load_model(STORIES, "float64")
    masked = mask_plan(copy.deepcopy(model), uneven_plan())
    apply_plan(model, uneven_plan())
    prompt = stories_text_ids[:, :8]
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    cached = model.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
    assert torch.equal(cached, masked.generate(prompt, **kw))
    out = model(cached, use_cache=True)
    assert [out.past_key_values.layers[i].keys.shape[1] for i in range(5)] == [4, 3, 2, 4, 4]
    sdpa = logits(model, stories_text_ids)
    model.set_attn_implementation("eager")  # eager's softmax runs in float32 by design: close, not identical
    assert 0 < (logits(model, stories_text_ids) - sdpa).abs().max().item() <= 1e-5


def test_pruning_an_uneven_model_again_follows_its_map(stories_text_ids):
    """A second plan in the pruned model's numbering reads the recorded map: removing layer 1's new head 2 (original
    head 4, the last of KV head 2 after head 5 went) frees KV head 2 too, as masking the combined plan shows."""
    from conftest import STORIES
    from pruning.models import load_model
    from pruning.structures import removed_params

    model, _, adapter = load_model(STORIES, "float64")
    combined = uneven_plan()
    combined.add("q_head", 1, [4])
    masked = mask_plan(copy.deepcopy(model), combined)
    apply_plan(model, uneven_plan())
    (sset,) = structure_sets(adapter, "q_head", [1])
    assert sset.partition.tolist() == [0, 0, 1, 2, 2] and sset.group_params == 2 * 64 * 8
    assert removed_params(sset, [2]) == 1024 + 1024 and removed_params(sset, [3]) == 1024
    second = PrunePlan()
    second.add("q_head", 1, [2])
    apply_plan(model, second)
    assert adapter.widths(adapter.layers[1]).kv_group_sizes == (2, 2)  # even again: the stock path
    assert adapter.layers[1].self_attn.config is model.config
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= 1e-10
    with pytest.raises(PruningError, match="uneven KV groups"):  # layer 2 is (2, 1): no whole-group units
        structure_sets(adapter, "kv_group", [2])
    bad = PrunePlan()
    bad.add("kv_group", 2, [0])
    with pytest.raises(PruningError, match="uneven KV groups"):
        apply_plan(model, bad)


def test_masked_in_place_restores_the_kv_rows_of_emptied_groups(stories, stories_text_ids):
    """Search-LLM scores candidates masked in place; a query-head plan that empties a KV head also zeroes its k/v
    rows, and the restore must bring those back bit for bit."""
    from pruning.allocation.evolution import masked_in_place

    model, _, _ = stories
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(mask_plan(copy.deepcopy(model), uneven_plan()), stories_text_ids)
    with masked_in_place(model, uneven_plan()):
        assert torch.equal(logits(model, stories_text_ids), ref)
        assert model.model.layers[1].self_attn.k_proj.weight[:8].abs().max() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_slicegpt_refuses_uneven_groups_before_any_pass(stories):
    """The sliced save format has no query-to-KV map: SliceGPT says so from the shapes, before calibration."""
    from pruning.methods.slicegpt import slicegpt

    model, _, _ = stories
    apply_plan(model, uneven_plan())
    with pytest.raises(PruningError, match="uneven KV groups"):
        slicegpt(slicing=0.2).budget(model, None)
