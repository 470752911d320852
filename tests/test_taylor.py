"""Taylor scorers (METHODS.md §3.1 "Importance") against an independent plain-autograd computation on the real
stories260K weights and real C4 calibration text, plus the memory-bounded engine's own guarantees."""

from __future__ import annotations

import pytest
import torch

from conftest import STORIES
from pruning import data
from pruning.errors import PruningError
from pruning.importance.taylor import TAYLOR, peak_memory, taylor_scorer
from pruning.models import load_model
from pruning.structures import structure_sets

LAYERS = [1, 2, 3, 4]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def f64():
    model, tok, adapter = load_model(STORIES, "float64")
    calib = data.calibration_batches(tok, "c4", 6, 32, 42, progress=False)
    return model, tok, adapter, calib


def block_sets(adapter):
    return [s for k in ("kv_group", "mlp") for s in structure_sets(adapter, k, LAYERS)]


# ----------------------------------------------------------------------------------- independent reference


def plain_grads(model, ids):
    """∂L/∂w of every weight from one plain backward (L = mean token CE with labels = inputs)."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def fisher(model, ids):
    """F = (1/N) Σ_n g_n², each g_n from its own batch-1 backward."""
    out = {}
    for i in range(ids.shape[0]):
        for n, g in plain_grads(model, ids[i : i + 1]).items():
            out[n] = out.get(n, 0) + g.square() / ids.shape[0]
    return out


def element_term(variant, w, g, f):
    if variant in ("element1", "vector"):
        return w * g
    if variant == "element2":
        return w * g - 0.5 * w * w * f
    return w * w * f


def unit_members(adapter, kind, layer, u):
    """(param name, weight slice selector, reduce dim) of one unit, written out by hand from METHODS.md §1.1."""
    hd, lay = adapter.head_dim, f"model.layers.{layer}"
    if kind == "kv_group":
        g = adapter.kv_group_size(adapter.layers[layer])
        q = slice(u * g * hd, (u + 1) * g * hd)
        kv = slice(u * hd, (u + 1) * hd)
        return [
            (f"{lay}.self_attn.q_proj.weight", (q, slice(None)), 1),
            (f"{lay}.self_attn.k_proj.weight", (kv, slice(None)), 1),
            (f"{lay}.self_attn.v_proj.weight", (kv, slice(None)), 1),
            (f"{lay}.self_attn.o_proj.weight", (slice(None), q), 0),
        ]
    c = slice(u, u + 1)
    return [
        (f"{lay}.mlp.gate_proj.weight", (c, slice(None)), 1),
        (f"{lay}.mlp.up_proj.weight", (c, slice(None)), 1),
        (f"{lay}.mlp.down_proj.weight", (slice(None), c), 0),
    ]


def reference_scores(model, adapter, ids, variant, kind, layer):
    """Per-unit sum over members of Σ_channels reduce(term); vector = Σ_channels |Σ_elements w·g|."""
    params = dict(model.named_parameters())
    g = plain_grads(model, ids)
    f = fisher(model, ids) if variant.startswith("element2") else {}
    n_units = len(structure_sets(adapter, kind, [layer])[0].members[0].index)
    out = []
    for u in range(n_units):
        total = 0.0
        for name, sel, red in unit_members(adapter, kind, layer, u):
            t = element_term(
                variant, params[name].detach()[sel], g[name][sel], f.get(name, torch.zeros(1))[sel] if f else None
            )
            total += (t.sum(red).abs().sum() if variant == "vector" else t.abs().sum()).item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("variant", TAYLOR)
def test_scores_equal_plain_autograd(f64, variant):
    model, _, adapter, calib = f64
    sets = block_sets(adapter)
    scorer = taylor_scorer(variant)
    meta = scorer.fit(model, calib, sets)
    assert meta["backward_passes"] == {"element1": 1, "vector": 1, "element2_fisher": 6}.get(
        variant, meta["chunks"] * 7
    )
    for s in sets:
        if s.layer in (1, 4):
            ref = reference_scores(model, adapter, calib, variant, s.kind, s.layer)
            torch.testing.assert_close(scorer(s), ref, rtol=1e-9, atol=1e-12)


def test_vector_at_most_element1_and_element2_differs(f64):
    model, _, adapter, calib = f64
    sets = block_sets(adapter)
    got = {}
    for v in ("vector", "element1", "element2"):
        sc = taylor_scorer(v)
        sc.fit(model, calib, sets)
        got[v] = torch.cat([sc(s) for s in sets])
    assert (got["vector"] <= got["element1"] + 1e-12).all()  # triangle inequality, every unit
    assert (got["vector"] < got["element1"]).float().mean() > 0.9
    assert not torch.allclose(got["element2"], got["element1"])  # the Fisher term is really there


def test_aggregations_reduce_the_member_scores(f64):
    """The official order (LLM-Pruner TaylorImportance): each member's per-channel scores are aligned onto the
    root's d_h channels (a group's g query heads summed channel by channel), reduced over the members per channel,
    then summed over the head's channels; "first" is the root k_proj, "last" o_proj."""
    model, _, adapter, calib = f64
    (kv,) = structure_sets(adapter, "kv_group", [2])
    g = plain_grads(model, calib)
    params = dict(model.named_parameters())
    hd = adapter.head_dim

    def per_channel(n, sel, red):  # |w·g| summed over each row (red=1) or column (red=0), folded onto d_h
        return (params[n].detach()[sel] * g[n][sel]).abs().sum(red).reshape(-1, hd).sum(0)

    per = torch.stack(
        [torch.stack([per_channel(*m) for m in unit_members(adapter, "kv_group", 2, u)]) for u in range(4)]
    )  # [unit, member (q, k, v, o), d_h]
    expect = {
        "sum": per.sum(1),
        "mean": per.mean(1),
        "max": per.max(1).values,
        "prod": per.prod(1),
        "first": per[:, 1],
        "last": per[:, 3],
    }
    for how, ref in expect.items():
        sc = taylor_scorer("element1", aggregation=how)
        sc.fit(model, calib, [kv])
        torch.testing.assert_close(sc(kv), ref.sum(-1), rtol=1e-9, atol=0, msg=how)
    per_unit = per.sum(-1)  # members summed over channels first: differs for max and prod
    assert not torch.allclose(per.max(1).values.sum(-1), per_unit.max(1).values)


def test_zero_unit_scores_zero_for_every_variant(stories):
    model, tok, adapter = stories
    calib = data.calibration_batches(tok, "c4", 4, 32, 1, progress=False)
    layer = adapter.layers[2]
    with torch.no_grad():  # KV group 1 (query heads 2, 3) and MLP channel 7 of layer 2
        adapter.q_proj(layer).weight[16:32] = 0
        adapter.k_proj(layer).weight[8:16] = 0
        adapter.v_proj(layer).weight[8:16] = 0
        adapter.o_proj(layer).weight[:, 16:32] = 0
        adapter.gate_proj(layer).weight[7] = 0
        adapter.up_proj(layer).weight[7] = 0
        adapter.down_proj(layer).weight[:, 7] = 0
    sets = [s for k in ("kv_group", "mlp") for s in structure_sets(adapter, k, [2])]
    for v in TAYLOR:
        sc = taylor_scorer(v)
        sc.fit(model, calib, sets)
        kv, mlp = sc(sets[0]), sc(sets[1])
        assert kv[1] == 0 and mlp[7] == 0, v
        assert (kv[[0, 2, 3]] > 0).all() and (mlp[torch.arange(172) != 7] > 0).all(), v


def test_micro_batches_and_chunks_give_the_same_scores(f64):
    model, _, adapter, calib = f64
    sets = block_sets(adapter)
    for v in ("element1", "element2", "vector"):
        one = taylor_scorer(v)
        one.fit(model, calib, sets)
        small = taylor_scorer(v, micro_batch=3, budget=0.3)
        meta = small.fit(model, calib, sets)
        assert meta["chunks"] > 1
        for s in sets:
            torch.testing.assert_close(small(s), one(s), rtol=1e-9, atol=1e-15)


def test_hidden_channel_scores_cover_every_residual_member(f64):
    """element1 per hidden channel = Σ over embedding column, norms, q/k/v/gate/up columns, o/down rows, lm_head."""
    model, _, adapter, calib = f64
    (hid,) = structure_sets(adapter, "hidden")
    sc = taylor_scorer("element1")
    sc.fit(model, calib, [hid])
    g = plain_grads(model, calib)
    ref = torch.zeros(64, dtype=torch.float64)
    for name, p in model.named_parameters():
        t = (p.detach() * g[name]).abs()
        if p.dim() == 1:
            ref += t
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            ref += t.sum(1)
        else:  # embedding, lm_head and every projection reading the residual stream
            ref += t.sum(0)
    torch.testing.assert_close(sc(hid), ref, rtol=1e-9, atol=0)


def test_fit_restores_the_model_and_frees_gradients(stories):
    model, tok, adapter = stories
    calib = data.calibration_batches(tok, "c4", 4, 32, 3, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sc = taylor_scorer("element2")
    meta = sc.fit(model, calib, block_sets(adapter))
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not model.training
    mem = meta["memory"]
    assert mem["weight_bytes"] == 292_800 * 4 and mem["state_ratio"] <= 1.5
    assert mem["peak_ratio"] >= mem["state_ratio"] > 1.0


def test_same_calibration_gives_bit_identical_scores(stories):
    model, tok, adapter = stories
    sets = block_sets(adapter)
    runs = []
    for _ in range(2):
        calib = data.calibration_batches(tok, "c4", 4, 32, 42, progress=False)
        sc = taylor_scorer("element2")
        sc.fit(model, calib, sets)
        runs.append(torch.cat([sc(s) for s in sets]))
    assert torch.equal(runs[0], runs[1])


def test_peak_memory_probe_sees_torch_cpu_allocations():
    with peak_memory("cpu") as mem:
        a = torch.ones(1_000_000)  # 4 MB live ...
        b = torch.ones(500_000)  # ... + 2 MB at the peak
        del a, b
        c = torch.ones(250_000)  # 1 MB after the peak
        del c
    assert 6_000_000 <= mem["peak_extra_bytes"] < 6_100_000
    assert "profiler" in mem["method"]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as outer:  # never start a second session inside someone's
        with peak_memory("cpu") as inner:
            torch.ones(10).sum()
    assert inner["peak_extra_bytes"] is None and any(e.name == "aten::sum" for e in outer.events())


def test_micro_batching_bounds_the_measured_peak(stories):
    """One full-batch backward keeps every activation; one sample per backward keeps ~1/N of them."""
    model, tok, adapter = stories
    calib = data.calibration_batches(tok, "c4", 8, 64, 5, progress=False)
    sets = block_sets(adapter)
    full = taylor_scorer("element1").fit(model, calib, sets)["memory"]
    small = taylor_scorer("element1", micro_batch=1).fit(model, calib, sets)["memory"]
    assert small["peak_extra_bytes"] < 0.35 * full["peak_extra_bytes"]
    assert small["state_ratio"] <= 1.3


def test_bad_input_fails_clearly(stories):
    model, _, adapter = stories
    sets = block_sets(adapter)
    sc = taylor_scorer("element1")
    with pytest.raises(PruningError, match="not fitted"):
        sc(sets[0])
    with pytest.raises(PruningError, match="calibration token ids"):
        sc.fit(model, torch.tensor([1, 2, 3]), sets)
    with pytest.raises(PruningError, match="blocks"):
        sc(structure_sets(adapter, "block")[0])
    with pytest.raises(PruningError, match="unknown Taylor"):
        taylor_scorer("element3")
    with pytest.raises(PruningError, match="micro_batch"):
        taylor_scorer("element1", micro_batch=0)
