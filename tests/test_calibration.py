"""The calibration-statistics collector: statistics equal an independent numpy computation on the real model,
sequential mode equals dense mode on an unpruned model and equals a physically pruned prefix when told what was
pruned, streaming is batch-size invariant, bad requests fail before any forward pass, memory stays bounded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import STORIES, site_inputs
from pruning import data
from pruning.calibration import collect, sequential
from pruning.errors import PruningError
from pruning.methods.baselines import random
from pruning.models import load_model
from pruning.surgery.apply import apply_plan
from pruning.surgery.plan import PrunePlan

SITES = ("q_proj", "o_proj", "gate_proj", "down_proj", "block_in", "block_out")
ALL = ("mean", "var", "sqnorm", "absmean", "xtx")


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 6, 32, 0, progress=False)


def test_channel_stats_equal_numpy(calib):
    model, _, _ = load_model(STORIES)
    st = collect(model, calib, stats=ALL, sites=SITES, batch_size=4, progress=False)
    ref = _captured(model, calib)
    assert st.n_tokens == 6 * 32 and set(st) == set(range(5))
    for (i, site), x in ref.items():
        s = st[i][site]
        assert s.n == x.shape[0] == 192
        np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.var.numpy(), x.var(0, ddof=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s.sqnorm.numpy(), (x**2).sum(0), rtol=1e-10)
        np.testing.assert_allclose(s.mean_sq.numpy(), (x**2).mean(0), rtol=1e-10)
        np.testing.assert_allclose(s.absmean.numpy(), np.abs(x).mean(0), rtol=1e-10)
        np.testing.assert_allclose(s.xtx.numpy(), x.T @ x, rtol=1e-9, atol=1e-9)


def test_streaming_is_batch_size_invariant(calib):
    model, _, _ = load_model(STORIES)
    runs = [
        collect(model, calib, stats=ALL + ("block_io",), sites=("o_proj", "down_proj"), batch_size=b, progress=False)
        for b in (1, 4, 6)
    ]
    for i in range(5):
        for site in ("o_proj", "down_proj"):
            for other in runs[1:]:
                a, b = runs[0][i][site], other[i][site]
                for name in ALL:
                    torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-10)
        assert runs[0][i].block.bi == pytest.approx(runs[2][i].block.bi, rel=1e-12)


def _assert_same(a, b, rtol=1e-10):
    assert set(a) == set(b)
    for i in a:
        for site in a[i].sites:
            for name in a[i][site].want:
                torch.testing.assert_close(getattr(a[i][site], name), getattr(b[i][site], name), rtol=rtol, atol=1e-9)
        if a[i].block is not None:
            assert a[i].block.bi == pytest.approx(b[i].block.bi, rel=rtol, abs=1e-12)


def test_sequential_equals_dense_on_unpruned_model(calib):
    model, _, _ = load_model(STORIES)
    req = dict(stats=("mean", "var", "sqnorm", "block_io"), sites=("o_proj", "down_proj"), batch_size=4, progress=False)
    dense = collect(model, calib, mode="dense", **req)
    seq = collect(model, calib, mode="sequential", **req)
    steps = {s.layer: s.stats for s in sequential(model, calib, **req)}  # interactive pass, nothing pruned
    read_only = {s.layer: s.stats for s in sequential(model, calib, prunes=False, **req)}  # one run per layer
    assert seq.mode == "sequential"
    _assert_same(dense, seq)
    _assert_same(dense.layers, steps)
    _assert_same(dense.layers, read_only)


def test_read_only_pass_refuses_drops(calib):
    model, _, _ = load_model(STORIES)
    plan = random(seed=0).prune(model, 0.2)
    steps = sequential(model, calib, stats=("sqnorm",), batch_size=4, progress=False, prunes=False)
    step = next(steps)
    with pytest.raises(PruningError, match="prunes=True"):
        step.drop(plan)
    with pytest.raises(PruningError, match="prunes=True"):
        step.drop_inputs("down_proj", [0])
    step.drop(PrunePlan())  # nothing of this layer: allowed


def test_read_only_pass_runs_each_layer_once(calib):
    model, _, _ = load_model(STORIES)
    calls = {True: 0, False: 0}
    for prunes in (True, False):
        handle = model.model.layers[1].register_forward_hook(
            lambda m, a, o, prunes=prunes: calls.__setitem__(prunes, calls[prunes] + 1)
        )
        for _ in sequential(model, calib, stats=("sqnorm",), batch_size=4, progress=False, prunes=prunes):
            pass
        handle.remove()
    n_batches = -(-calib.shape[0] // 4)
    assert calls == {True: 2 * n_batches, False: n_batches}


def test_layer_subset_matches_full_run(calib):
    model, _, _ = load_model(STORIES)
    full = collect(model, calib, stats=("var",), progress=False)
    sub = collect(model, calib, stats=("var",), layers=[3, 1], progress=False)
    assert sorted(sub) == [1, 3]
    for i in (1, 3):
        torch.testing.assert_close(sub[i]["o_proj"].var, full[i]["o_proj"].var, rtol=0, atol=0)


def prefix_plan(model) -> PrunePlan:
    """A random KV-group + MLP plan on layers 0..1 (heterogeneous, non-contiguous)."""
    return random(seed=3, layers={"start": 0, "end": 2}).prune(model, 0.12)


@pytest.mark.parametrize("how", ["drop", "surgery"])
def test_sequential_sees_the_pruned_layers_below(calib, how):
    """Layer l's statistics equal dense statistics of a copy whose layers < l were physically pruned first."""
    model, _, adapter = load_model(STORIES, "float64")
    plan = prefix_plan(model)
    assert plan.units("kv_group", 0) and plan.units("mlp", 1)
    pruned = apply_plan(copy.deepcopy(model), plan)
    ref = collect(pruned, calib, stats=("mean", "var", "sqnorm", "block_io"), progress=False)
    got = {}
    for step in sequential(model, calib, stats=("mean", "var", "sqnorm", "block_io"), batch_size=4, progress=False):
        got[step.layer] = step.stats
        layer_plan = PrunePlan({k: {step.layer: v[step.layer]} for k, v in plan.remove.items() if step.layer in v})
        if how == "drop":
            step.drop(layer_plan)
        else:
            apply_plan(model, layer_plan)
    for i in (2, 3, 4):
        _assert_same({i: ref[i]}, {i: got[i]}, rtol=1e-9)
    dense = collect(load_model(STORIES, "float64")[0], calib, stats=("var",), progress=False)
    assert not torch.allclose(dense[2]["o_proj"].var, got[2]["o_proj"].var, rtol=1e-3)  # the check can fail
    if how == "drop":  # drop leaves the weights alone
        assert adapter.widths(adapter.layers[0]).num_kv_heads == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stats=("mean", "varr")), "unknown statistics"),
        (dict(sites=("o_proj", "v_proj")), "unknown calibration site"),
        (dict(layers=[0, 5]), "subset of 0..4"),
        (dict(batch_size=0), "batch_size"),
        (dict(mode="streaming"), "mode"),
        (dict(stats=(), sites=()), "nothing to collect"),
        (dict(block_last_output="normed", stats=("block_io",)), "block_last_output"),
    ],
)
def test_bad_requests_fail_before_any_forward(stories, calib, kwargs, match):
    model, _, _ = stories
    calls = []
    h = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(PruningError, match=match):
        collect(model, calib, **{"progress": False, **kwargs})
    if "mode" not in kwargs:
        with pytest.raises(PruningError, match=match):
            sequential(model, calib, **{"progress": False, **kwargs})
    h.remove()
    assert not calls


@pytest.mark.parametrize("bad", [torch.randn(2, 8), torch.arange(8), [[1, 2, 3]], torch.zeros(0, 8, dtype=torch.long)])
def test_bad_calibration_input(stories, bad):
    with pytest.raises(PruningError, match="calibration input"):
        collect(stories[0], bad, progress=False)


def test_uncollected_statistic_is_a_clear_error(stories, calib):
    st = collect(stories[0], calib, stats=("sqnorm",), layers=[0], progress=False)
    with pytest.raises(PruningError, match="'var' was not collected"):
        _ = st[0]["o_proj"].var
    with pytest.raises(PruningError, match="no calibration statistics for layer 2"):
        st[2]
    with pytest.raises(PruningError, match="no statistics at site 'q_proj'"):
        st[0]["q_proj"]


@pytest.mark.slow
def test_memory_is_bounded_by_one_layer_not_all_hidden_states():
    """Peak allocation during collection (torch profiler), doubling the calibration set: dense mode's peak does not
    grow (it holds one batch's activations), sequential mode's grows by exactly one layer's activations for the
    added samples (its one buffer); all hidden states would grow by L + 1 layers' worth."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_collector_memory.py"
    spec = importlib.util.spec_from_file_location("bench_collector_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (d1, s1), (d2, s2) = (bench.measure(n_samples=n, seq_len=64, batch_size=4) for n in (32, 64))
    assert d2["peak_bytes"] <= 1.1 * d1["peak_bytes"]
    grown, one_layer_more = s2["peak_bytes"] - s1["peak_bytes"], s2["one_layer_bytes"] - s1["one_layer_bytes"]
    assert 0.9 * one_layer_more <= grown <= 1.1 * one_layer_more
    assert s2["ratio_to_all_hidden"] < 0.5 and d2["ratio_to_all_hidden"] < 0.5


def test_per_site_requests(stories, calib):
    """A dict asks for different statistics per site (e.g. XᵀX only where a solver needs it)."""
    model, _, _ = stories
    st = collect(
        model, calib, stats={"down_proj": ("xtx",), "block_in": ("mean",), "block_io": True}, layers=[1], progress=False
    )
    ref = _captured(model, calib)
    np.testing.assert_allclose(
        st[1]["down_proj"].xtx.numpy(), ref[(1, "down_proj")].T @ ref[(1, "down_proj")], rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(st[1]["block_in"].mean.numpy(), ref[(1, "block_in")].mean(0), rtol=1e-10)
    assert st[1].block is not None and set(st[1].sites) == {"down_proj", "block_in"}
    with pytest.raises(PruningError, match="'mean' was not collected"):
        _ = st[1]["down_proj"].mean


def _captured(model, ids) -> dict[tuple[int, str], np.ndarray]:
    return {
        k: v.numpy()
        for k, v in site_inputs(
            model, ids, ("q_proj", "o_proj", "gate_proj", "down_proj", "block_in", "block_out")
        ).items()
    }
