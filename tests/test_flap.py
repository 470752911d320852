"""FLAP on the real stories260K weights: the fluctuation metric against numpy, AL standardisation, the allocation
modes and their counts, bias compensation (exact on constant-per-channel inputs), masking == surgery, and
save -> reload with the added biases."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import STORIES, logits, site_inputs
from pruning import data
from pruning.allocation.flap import FlapAllocation, standardize
from pruning.calibration import collect
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.importance.activation import FluctuationScorer
from pruning.methods.baselines import random
from pruning.methods.flap import flap
from pruning.models import load_model
from pruning.structures import structure_sets
from pruning.surgery.apply import apply_plan
from pruning.surgery.compensation import bias_compensation, bias_deltas
from pruning.surgery.plan import PrunePlan
from pruning.surgery.save import save_pruned

D, HD, G = 64, 8, 2  # stories260K: hidden size, head_dim, query heads per KV group


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 8, 32, 0, progress=False)


@pytest.mark.parametrize("metric", ["WIFV", "IFV", "WIFN"])
def test_fluctuation_equals_numpy(stories, calib, metric):
    model, _, adapter = stories
    x = {k: v.numpy() for k, v in site_inputs(model, calib).items()}
    scorer = FluctuationScorer(metric).bind(
        collect(model, calib, stats=FluctuationScorer(metric).requires, progress=False)
    )
    for layer in (0, 3):
        for kind in ("kv_group", "q_head", "mlp"):
            (sset,) = structure_sets(adapter, kind, [layer])
            site = "down_proj" if kind == "mlp" else "o_proj"
            xs = x[(layer, site)]
            w = getattr(model.model.layers[layer], "mlp" if kind == "mlp" else "self_attn")
            w = getattr(w, site).weight.detach().double().numpy()
            var = xs.var(0, ddof=1)
            ch = {"IFV": var, "WIFV": var * (w**2).sum(0), "WIFN": np.abs(w).mean(0) * np.sqrt((xs**2).mean(0))}[metric]
            if kind != "mlp":
                ch = ch**2  # FLAP's code squares the attention metric
            width = {"kv_group": G * HD, "q_head": HD, "mlp": 1}[kind]
            expected = ch.reshape(-1, width).sum(1)  # a unit's contiguous o_proj/down_proj input channels
            np.testing.assert_allclose(scorer.channel_scores(sset).numpy(), ch, rtol=1e-9, atol=1e-300)
            np.testing.assert_allclose(scorer(sset).numpy(), expected, rtol=1e-9, atol=1e-300)


def test_al_standardisation_and_unit_means(stories, calib):
    model, _, adapter = stories
    scorer = FluctuationScorer().bind(collect(model, calib, progress=False))
    alloc = FlapAllocation("AL-AM")
    for kind in ("kv_group", "mlp"):
        for sset in structure_sets(adapter, kind):
            ch = scorer.channel_scores(sset)
            z = standardize(ch)
            assert abs(z.mean().item()) < 1e-12 and z.std().item() == pytest.approx(1.0, abs=1e-12)
            width = G * HD if kind == "kv_group" else 1
            np.testing.assert_allclose(
                alloc.unit_scores(sset, ch).numpy(), z.reshape(-1, width).mean(1).numpy(), rtol=1e-12
            )
    assert torch.equal(standardize(torch.ones(5)), torch.zeros(5))  # no ranking information -> no NaN


def counts(adapter):
    return [(w.num_heads, w.num_kv_heads, w.intermediate_size) for w in adapter.all_widths()]


def test_al_am_hits_the_target_and_counts_biases(calib):
    model, _, adapter = load_model(STORIES)
    method = flap(progress=False)
    plan = method.prune(model, 0.2, calib)
    method.apply(model, plan)
    achieved = 1 - adapter.num_params() / 292_800
    assert achieved == pytest.approx(plan.meta["planned_ratio"], abs=1e-12)
    assert abs(achieved - 0.2) * 292_800 <= 4 * D * HD  # within one step: a query head with its freed KV head
    widths = adapter.all_widths()
    biased = sum(w.o_proj_bias for w in widths) + sum(w.down_proj_bias for w in widths)
    assert biased == sum(1 for k in ("q_head", "mlp") for layer in plan.remove.get(k, {}) if plan.remove[k][layer])
    assert len(set(counts(adapter))) > 1  # adaptive: layers differ


def test_adaptive_modes_never_empty_a_layer(calib):
    model, _, adapter = load_model(STORIES)
    method = flap(progress=False)
    plan = method.prune(model, 0.7, calib)
    method.apply(model, plan)
    assert all(kv >= 1 and inter >= 1 for _, kv, inter in counts(adapter))
    with pytest.raises(InfeasibleRatioError, match="at most"):
        flap(progress=False).budget(load_model(STORIES)[0], 0.76)  # from counts, before any calibration


def test_ul_um_is_uniform(calib):
    """FLAP's count rule: int(p·n) query heads and MLP channels in every layer (a KV head may leave with its last
    query head, so KV counts may differ); the reported fraction is the exact one."""
    model, _, adapter = load_model(STORIES)
    method = flap("UL-UM", progress=False)
    plan = method.prune(model, 0.2, calib)
    method.apply(model, plan)
    p = plan.meta["allocation"]["counts"]["p"]
    assert {(h, inter) for h, _, inter in counts(adapter)} == {(8 - int(8 * p), 172 - int(172 * p + 1e-9))}
    assert counts(adapter)[0] != (8, 4, 172)
    assert 1 - adapter.num_params() / 292_800 == pytest.approx(plan.meta["planned_ratio"], abs=1e-12)


@pytest.mark.parametrize(
    "structures,kind,heads", [(("q_head", "mlp"), "q_head", 7), (("kv_group", "mlp"), "kv_group", 6)]
)
@pytest.mark.parametrize("structure", ["UL-MM", "AL-MM"])
def test_manual_mix_removes_remove_heads(calib, structure, structures, kind, heads):
    model, _, adapter = load_model(STORIES)
    method = flap(structure, remove_heads=5, structures=structures, progress=False)
    plan = method.prune(model, 0.2, calib)
    assert sum(len(u) for u in plan.remove[kind].values()) == 5
    method.apply(model, plan)
    if structure == "UL-MM":  # remove_heads // 5 layers = one unit per layer
        assert {h for h, _, _ in counts(adapter)} == {heads} and len({c for _, _, c in counts(adapter)}) == 1
    assert abs(1 - adapter.num_params() / 292_800 - 0.2) < 0.01


def test_manual_mix_needs_remove_heads():
    with pytest.raises(PruningError, match="remove_heads"):
        flap("UL-MM")
    with pytest.raises(PruningError, match="unknown FLAP structure"):
        flap("AL-XX")


def test_query_heads_go_one_at_a_time(calib):
    """AL-AM pools single query heads (no rounds of one head per KV group): the lowest go wherever they are, a KV
    head leaves with its last query head, a layer keeps one, and the exact removal (k/v rows included) is reported."""
    model, _, adapter = load_model(STORIES)
    method = flap(progress=False)
    plan = method.prune(model, 0.5, calib)
    per_layer = [len(plan.units("q_head", i)) for i in range(5)]
    assert len(set(per_layer)) > 1 and any(n % 4 for n in per_layer)  # not multiples of the 4 KV groups
    method.apply(model, plan)
    widths = adapter.all_widths()
    assert any(not w.even for w in widths) and all(w.num_heads >= 1 for w in widths)
    for i, w in enumerate(widths):  # a KV head stays exactly while one of its query heads does
        kept = [h for h in range(8) if h not in plan.units("q_head", i)]
        assert w.num_kv_heads == len({h // G for h in kept}) and w.num_heads == len(kept)
    assert 1 - adapter.num_params() / 292_800 == pytest.approx(plan.meta["planned_ratio"], abs=1e-12)


def repeated_token(n=2, length=24, token=300):
    return torch.full((n, length), token, dtype=torch.long)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_constant_inputs_make_compensation_exact(dtype, tol):
    """One repeated token id makes every o_proj/down_proj input constant over positions: v is position-free (no
    RoPE on v), so attention averages identical value vectors, and by induction every layer's inputs are constant.
    The variance is 0, and b = W[:, P]·x̄_P replaces the removed channels exactly, for any pruned set: float64 gives
    the dense logits to ~1e-13 (the ≤ 1e-5 acceptance); float32 differs by summation order only (~7e-6)."""
    ids = repeated_token()
    model, _, _ = load_model(STORIES, dtype)
    ref = logits(model, ids)
    stats = collect(model, ids, stats=("mean", "var"), progress=False)
    for i in stats:
        for site in ("o_proj", "down_proj"):
            st = stats[i][site]
            assert (st.var <= 1e-12 * (1 + st.mean.pow(2))).all()
    # FLAP's own plan, and a random heterogeneous plan (any pruned set works)
    method = flap(progress=False)
    flap_model = copy.deepcopy(model)
    method.apply(flap_model, method.prune(flap_model, 0.3, ids))
    plans = [random(seed=5).prune(model, 0.3)]
    means = {(i, s): stats[i][s].mean for i in stats for s in ("o_proj", "down_proj")}
    outs = [logits(flap_model, ids)] + [logits(bias_compensation(copy.deepcopy(model), p, means), ids) for p in plans]
    for out in outs:
        assert (out - ref).abs().max().item() <= tol
    uncompensated = apply_plan(copy.deepcopy(model), plans[0])
    assert (logits(uncompensated, ids) - ref).abs().max().item() > 1e-1  # the check can fail


def test_bias_is_the_removed_columns_times_the_mean(stories, calib):
    model, _, adapter = stories
    stats = collect(model, calib, progress=False)
    means = {(i, s): stats[i][s].mean for i in stats for s in ("o_proj", "down_proj")}
    plan = PrunePlan()
    plan.add("kv_group", 1, [0, 2])  # query heads 0,1 and 4,5 -> o_proj inputs 0..15 and 32..47
    plan.add("mlp", 3, [7, 100, 171])
    layer1, layer3 = model.model.layers[1], model.model.layers[3]
    o_w = layer1.self_attn.o_proj.weight.detach().double().clone()
    d_w = layer3.mlp.down_proj.weight.detach().double().clone()
    P = list(range(16)) + list(range(32, 48))
    expect_o = o_w[:, P] @ stats[1]["o_proj"].mean[P]
    expect_d = d_w[:, [7, 100, 171]] @ stats[3]["down_proj"].mean[[7, 100, 171]]
    deltas = {id(m): d for m, d in bias_deltas(model, plan, means)}
    assert set(deltas) == {id(layer1.self_attn.o_proj), id(layer3.mlp.down_proj)}
    torch.testing.assert_close(deltas[id(layer1.self_attn.o_proj)], expect_o, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(deltas[id(layer3.mlp.down_proj)], expect_d, rtol=1e-12, atol=1e-14)
    bias_compensation(model, plan, means)
    torch.testing.assert_close(layer1.self_attn.o_proj.bias.double(), expect_o, rtol=1e-6, atol=1e-6)
    assert layer1.self_attn.o_proj.weight.shape == (64, 32) and layer3.mlp.down_proj.weight.shape == (64, 169)
    assert layer1.mlp.down_proj.bias is None and model.model.layers[0].self_attn.o_proj.bias is None
    w = adapter.widths(layer1)
    assert w.o_proj_bias and not w.down_proj_bias


def test_empty_plan_changes_nothing(stories, stories_text_ids, calib):
    model, _, adapter = stories
    ref = logits(model, stories_text_ids)
    method = flap(progress=False)
    plan = method.prune(model, 0.0, calib)
    assert plan.is_empty()
    method.apply(model, plan)
    assert torch.equal(logits(model, stories_text_ids), ref) and adapter.num_params() == 292_800


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_masking_equals_surgery_with_compensation(calib, stories_text_ids, dtype, tol):
    model, _, _ = load_model(STORIES, dtype)
    masked_method, removed_method = flap(surgery="mask", progress=False), flap(progress=False)
    masked = copy.deepcopy(model)
    plan = masked_method.prune(masked, 0.25, calib)
    masked_method.apply(masked, plan)
    assert removed_method.prune(model, 0.25, calib).to_dict() == plan.to_dict()
    removed_method.apply(model, plan)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= tol


def test_save_reload_keeps_biases(calib, stories_text_ids, tmp_path):
    model, tok, adapter = load_model(STORIES)
    method = flap(progress=False)
    method.apply(model, method.prune(model, 0.2, calib))
    ref = logits(model, stories_text_ids)
    out = save_pruned(model, tmp_path / "flap", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "pruned_llama" and any(cfg["layer_o_proj_bias"]) and any(cfg["layer_down_proj_bias"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (logits(reloaded, stories_text_ids) - ref).abs().max().item() <= 1e-6
    assert sum(p.numel() for p in reloaded.parameters()) == adapter.num_params()
    for a, b in zip(model.model.layers, reloaded.model.layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            ba, bb = a.get_submodule(name).bias, b.get_submodule(name).bias
            assert (ba is None) == (bb is None) and (ba is None or torch.equal(ba, bb))


def test_apply_of_a_replayed_plan(calib, stories_text_ids):
    """A plan applied without this instance's prune (e.g. replayed from a record) collects the means itself."""
    model, _, _ = load_model(STORIES)
    replay = copy.deepcopy(model)
    method = flap(progress=False)
    plan = method.prune(model, 0.2, calib)
    method.apply(model, plan)
    with pytest.raises(PruningError, match="call prune"):
        flap(progress=False).apply(copy.deepcopy(replay), plan)
    flap(progress=False).apply(replay, PrunePlan.from_dict(json.loads(plan.to_json())), calib)
    assert torch.equal(logits(replay, stories_text_ids), logits(model, stories_text_ids))


@pytest.mark.slow
def test_cli_allocation_modes_are_selectable(tmp_path):
    """One Hydra multirun over the three modes (remove_heads is used by UL-MM only)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            "method=flap",
            "method.structure=AL-AM,UL-UM,UL-MM",
            "method.remove_heads=5",
            "pruning.ratio=0.2",
            "eval=quick",
            "progress=false",
            f"store.dir={tmp_path}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")]
    recs = {r["plan"]["meta"]["allocation"]["structure"]: r for r in recs if r["plan"]["meta"].get("method") == "flap"}
    assert set(recs) == {"AL-AM", "UL-UM", "UL-MM"}
    for rec in recs.values():
        assert abs(rec["params"]["achieved_ratio"] - 0.2) < 0.02
        assert all(np.isfinite(v["ppl"]) for v in rec["metrics"]["ppl"].values())


# -- the native knob: FLAP's --pruning_ratio with the official counts ------------------------------------------------


def unit_scores(model, calib, method):
    """The method's per-unit scores (standardised for AL-*), from its own sets and the dense statistics."""
    sets = method.sets(model)
    scorer = method.scorer.bind(collect(model, calib, progress=False))
    return sets, [method.allocation.unit_scores(s, scorer.channel_scores(s)) for s in sets]


def test_al_am_native_threshold_is_the_official_code(stories, calib):
    """lib/prune.py AL-AM, re-run here line by line on the same standardised scores: pool heads and channels, sort
    descending, weight a head int(512/3)-style (``ones_like`` of the int64 sort indices, so 4·d_h/3 = 10.67 is
    stored as 10), threshold at argmin |cumsum − (1 − p)·Σ|, keep scores > threshold."""
    model, _, _adapter = stories
    p = 0.3
    method = flap(attn_mlp_ratio=p, progress=False)
    sets, scores = unit_scores(model, calib, method)
    attn_metric = torch.stack([sc for s, sc in zip(sets, scores) if s.kind == "q_head"])
    mlp_metric = torch.stack([sc for s, sc in zip(sets, scores) if s.kind == "mlp"])
    prune_metric = torch.cat([attn_metric.view(-1), mlp_metric.view(-1)])
    sorted_prune, indices = torch.sort(prune_metric, descending=True)
    compression_weight = torch.ones_like(indices)
    compression_weight[indices < attn_metric.numel()] = 4 * HD / 3
    threshold = sorted_prune[
        torch.argmin(torch.abs(torch.cumsum(compression_weight, 0) - torch.sum(compression_weight) * (1 - p)))
    ]
    attn_mask, mlp_mask = attn_metric > threshold, mlp_metric > threshold
    plan = method.allocation.allocate(sets, scores, method.allocation.budget(sets, None, 292_800))
    for layer in range(5):
        assert plan.units("q_head", layer) == (~attn_mask[layer]).nonzero().flatten().tolist()
        assert plan.units("mlp", layer) == (~mlp_mask[layer]).nonzero().flatten().tolist()
    assert compression_weight[indices < attn_metric.numel()][0] == 10
    assert "spared" not in plan.meta["allocation"] and plan.meta["allocation"]["attn_mlp_ratio"] == p


@pytest.mark.parametrize(
    "structure,remove_heads,heads,mlp",
    [
        ("UL-UM", None, [1] * 5, [34] * 5),  # int(0.2·8), int(0.2·172) in every layer
        ("UL-MM", 5, [1] * 5, [40] * 5),  # cal_remove_neuron: int((0.2·(3·172·64 + 4·64²) − 4·64·8) / (3·64))
        ("AL-MM", 7, None, None),  # 7 heads over all layers; int((5·0.2·49408 − 4·64·8·7) / 192) = 182
    ],
)
def test_native_counts_per_mode(calib, structure, remove_heads, heads, mlp):
    model, _, adapter = load_model(STORIES)
    method = flap(structure, remove_heads=remove_heads, attn_mlp_ratio=0.2, progress=False)
    plan = method.prune(model, None, calib)
    got_heads = [len(plan.units("q_head", i)) for i in range(5)]
    got_mlp = [len(plan.units("mlp", i)) for i in range(5)]
    if heads is None:
        assert sum(got_heads) == 7 and sum(got_mlp) == 182
    else:
        assert (got_heads, got_mlp) == (heads, mlp)
    method.apply(model, plan)
    assert 1 - adapter.num_params() / 292_800 == pytest.approx(plan.meta["planned_ratio"], abs=1e-12)


def test_native_knob_is_the_cell_operating_point():
    """attn_mlp_ratio defines the cell (pruning.ratio must then be null) and is validated up front."""
    from experiments.cell import operating_point

    method = flap(attn_mlp_ratio=0.2, progress=False)
    assert str(method.operating_point()) == "method.attn_mlp_ratio=0.2"
    assert operating_point(method, None) == (None, method.operating_point().as_dict())
    with pytest.raises(PruningError, match=r"pruning\.ratio=0\.2 would not be used"):
        operating_point(method, 0.2)
    assert flap(progress=False).operating_point() is None
    with pytest.raises(PruningError, match="attn_mlp_ratio"):
        flap(attn_mlp_ratio=1.0)
    with pytest.raises(PruningError, match="variance"):
        flap(variance="welford")


class BiasGPT:
    """lib/layerwrapper.py's estimator as the official code has it (float64 here), fed one sample per forward."""

    def __init__(self, in_dim):
        self.nsamples, self.baseline_inp, self.fluc_inp = 0, torch.zeros(in_dim, dtype=torch.float64), None

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().double()
        batch_size = 1
        old_baseline_inp = self.baseline_inp  # an alias: the in-place update below changes it too
        self.baseline_inp *= self.nsamples / (self.nsamples + batch_size)
        self.baseline_inp += torch.mean(inp, dim=1) / (self.nsamples + batch_size)
        if self.nsamples == 0:
            self.fluc_inp = 0
        else:
            self.fluc_inp *= (self.nsamples - 1) / (self.nsamples + batch_size - 1)
            self.fluc_inp += torch.sum(
                (inp - self.baseline_inp.unsqueeze(1)) * (inp - old_baseline_inp.unsqueeze(1)), dim=1
            ) / (self.nsamples + batch_size)
        self.nsamples += batch_size


def test_streaming_fluctuation_is_flaps_estimator(stories, calib):
    """``variance=official_streaming`` reproduces BiasGPT's per-sample update (first sample in the mean only, the
    aliased mean); it differs from the exact variance beyond the token-count scale (so the check can fail)."""
    from pruning.importance.activation import streaming_fluctuation

    model, _, _ = stories
    wrapped, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for site, mod in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
            w = wrapped[(i, site)] = BiasGPT(mod.in_features)
            handles.append(mod.register_forward_pre_hook(lambda m, a, w=w: w.add_batch(a[0])))
    with torch.no_grad():
        for k in range(calib.shape[0]):
            model(calib[k : k + 1])
    for h in handles:
        h.remove()
    got = streaming_fluctuation(model, calib, list(range(5)), progress=False)
    as_windows = streaming_fluctuation(model, list(calib), list(range(5)), progress=False)  # variable-length form
    exact = collect(model, calib, progress=False)
    for key, w in wrapped.items():
        torch.testing.assert_close(got[key], w.fluc_inp, rtol=1e-9, atol=1e-12)
        assert torch.equal(as_windows[key], got[key])
        ratio = got[key] / exact[key[0]][key[1]].var
        assert ratio.std() / ratio.mean() > 1e-3
