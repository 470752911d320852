"""LLM-BIP ``interp_v1`` (OUR interpretation, METHODS.md §3.8) on the real stories260K weights: the scores against a
numpy computation of the definition, against measured ablations (MLP: block-output change; heads: attention-branch
change), zero-weight units score 0, no backward, masking == surgery, and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES, cli_run, logits, stored_records
from pruning import data
from pruning.calibration import collect
from pruning.errors import PruningError
from pruning.importance.bip import BIPScorer
from pruning.methods.llm_bip import llm_bip
from pruning.models import load_model
from pruning.structures import structure_sets
from pruning.surgery.apply import mask_plan

REPO = Path(__file__).resolve().parents[1]
D, HD, G, H = 64, 8, 2, 8


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 4, 32, 0, progress=False)


def scores(model, adapter, calib, kinds=("kv_group", "q_head", "mlp"), layers=(0, 1, 2, 3, 4), propagate="none"):
    scorer = BIPScorer(propagate=propagate)
    with scorer.recording(model, list(layers)):
        stats = collect(
            model, calib, stats={"down_proj": ("absmean",)}, layers=list(layers), mode="sequential", progress=False
        )
    scorer.bind(stats)
    return {(k, i): scorer(s) for k in kinds for i in layers for s in structure_sets(adapter, k, [i])}


def captured(model, ids, layer):
    """(o_proj input, down_proj input, block output) of one layer from plain hooks, float64 [N, ·]."""
    blk, got = model.model.layers[layer], {}
    hs = [
        blk.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.setdefault("o", a[0].detach())),
        blk.mlp.down_proj.register_forward_pre_hook(lambda m, a: got.setdefault("a", a[0].detach())),
        blk.register_forward_hook(
            lambda m, a, out: got.setdefault("y", (out[0] if isinstance(out, tuple) else out).detach())
        ),
    ]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in got.items()}


def test_scores_equal_interp_v1_definition(stories, calib):
    model, _, adapter = stories
    got = scores(model, adapter, calib)
    for layer in (0, 3):
        cap = captured(model, calib, layer)
        blk = model.model.layers[layer]
        wd = blk.mlp.down_proj.weight.detach().double().numpy()
        wo = blk.self_attn.o_proj.weight.detach().double().numpy()
        a, o = cap["a"].numpy(), cap["o"].numpy()
        np.testing.assert_allclose(
            got[("mlp", layer)].numpy(), np.abs(a).mean(0) * np.linalg.norm(wd, axis=0), rtol=1e-9
        )
        q = [
            np.linalg.norm(o[:, h * HD : (h + 1) * HD] @ wo[:, h * HD : (h + 1) * HD].T, axis=1).mean()
            for h in range(H)
        ]
        kv = [
            np.linalg.norm(o[:, j * G * HD : (j + 1) * G * HD] @ wo[:, j * G * HD : (j + 1) * G * HD].T, axis=1).mean()
            for j in range(H // G)
        ]
        np.testing.assert_allclose(got[("q_head", layer)].numpy(), q, rtol=1e-9)
        np.testing.assert_allclose(got[("kv_group", layer)].numpy(), kv, rtol=1e-9)


def test_scores_equal_measured_ablations(calib):
    model, _, adapter = load_model(STORIES, dtype="float64")
    layer = 2
    got = scores(model, adapter, calib, layers=(layer,))
    base = captured(model, calib, layer)
    blk = model.model.layers[layer]
    for site, kind, units in (("down_proj", "mlp", [0, 171]), ("o_proj", "kv_group", [3])):
        mod = getattr(blk.mlp if site == "down_proj" else blk.self_attn, site)
        width = 1 if kind == "mlp" else G * HD
        for u in units:

            def zero(m, a, u=u, width=width):
                x = a[0].clone()
                x[..., u * width : (u + 1) * width] = 0
                return (x,)

            h = mod.register_forward_pre_hook(zero)
            out_hook, seen = None, {}
            if kind == "kv_group":  # the attention-branch output itself (o_proj output) with/without the unit
                out_hook = mod.register_forward_hook(lambda m, a, out, seen=seen: seen.setdefault("z", out.detach()))
            abl = captured(model, calib, layer)
            h.remove()
            if out_hook is not None:
                out_hook.remove()
                measured = (base["o"] @ mod.weight.detach().T - seen["z"].reshape(-1, D)).norm(dim=-1).mean()
            else:  # an MLP channel: the block output changes by exactly −a_k·W_down[:, k]
                measured = (base["y"] - abl["y"]).norm(dim=-1).mean()
            assert got[(kind, layer)][u].item() == pytest.approx(measured.item(), rel=1e-5)


def test_mlp_jvp_matches_block_output_change_to_first_order(calib):
    """With W_O scaled down the attention perturbation is small, so δ + J·δ is the measured block-output change."""
    model, _, adapter = load_model(STORIES, dtype="float64")
    layer, blk = 2, model.model.layers[2]
    with torch.no_grad():
        blk.self_attn.o_proj.weight.mul_(1e-3)
    plain = scores(model, adapter, calib, kinds=("kv_group", "mlp"), layers=(layer,))
    got = scores(model, adapter, calib, kinds=("kv_group", "mlp"), layers=(layer,), propagate="mlp_jvp")
    assert torch.equal(got[("mlp", layer)], plain[("mlp", layer)])  # the JVP never feeds the MLP statistics
    base = captured(model, calib, layer)["y"]
    for u in range(H // G):

        def zero(m, a, u=u):
            x = a[0].clone()
            x[..., u * G * HD : (u + 1) * G * HD] = 0
            return (x,)

        h = blk.self_attn.o_proj.register_forward_pre_hook(zero)
        measured = (base - captured(model, calib, layer)["y"]).norm(dim=-1).mean().item()
        h.remove()
        assert got[("kv_group", layer)][u].item() == pytest.approx(measured, rel=1e-2)
        assert abs(got[("kv_group", layer)][u].item() - measured) < abs(plain[("kv_group", layer)][u].item() - measured)


def test_zero_weight_units_score_zero(calib):
    model, _, adapter = load_model(STORIES)
    blk = model.model.layers[1]
    with torch.no_grad():
        blk.mlp.down_proj.weight[:, 5] = 0  # W_down column
        blk.mlp.gate_proj.weight[9] = 0  # gate row -> a = silu(0)·up = 0
        blk.mlp.up_proj.weight[11] = 0  # up row -> a = 0
        blk.self_attn.o_proj.weight[:, 0 : G * HD] = 0  # KV group 0's o_proj columns
        blk.self_attn.v_proj.weight[2 * HD : 3 * HD] = 0  # KV head 2's v rows -> its query heads' contexts are 0
    got = scores(model, adapter, calib, layers=(1,))
    assert got[("mlp", 1)][[5, 9, 11]].abs().max().item() == 0
    assert got[("kv_group", 1)][[0, 2]].abs().max().item() == 0
    assert got[("q_head", 1)][[0, 1, 4, 5]].abs().max().item() == 0
    assert got[("mlp", 1)].min() == 0 and (got[("mlp", 1)] > 0).sum() >= 160


def test_one_forward_no_backward_and_bad_switches(stories, calib):
    model, _, adapter = stories
    scores(model, adapter, calib, layers=(0,))
    assert all(p.grad is None for p in model.parameters())
    for kw in ({"variant": "paper"}, {"propagate": "jacobian"}, {"allocation_mode": "searched"}):
        with pytest.raises(PruningError):
            llm_bip(**kw)


@pytest.mark.parametrize(
    "mode,structures,ratio",
    [("per_layer", ("kv_group", "mlp"), 0.2), ("global", ("kv_group", "mlp"), 0.2), ("global", ("q_head", "mlp"), 0.6)],
)  # uneven GQA groups
def test_plan_masking_equals_surgery(calib, stories_text_ids, mode, structures, ratio):
    model, _, _adapter = load_model(STORIES, dtype="float64")
    meth = llm_bip(allocation_mode=mode, structures=structures, progress=False)
    plan = meth.prune(model, ratio, calib)
    assert plan.meta["llm_bip"]["variant"] == "interp_v1"
    assert abs(plan.meta["planned_ratio"] - ratio) < 0.01
    masked = logits(mask_plan(model, plan), stories_text_ids)
    model2, _, adapter2 = load_model(STORIES, dtype="float64")
    meth.apply(model2, plan, calib)
    assert 1 - adapter2.num_params() / 292_800 == pytest.approx(plan.meta["planned_ratio"], abs=1e-12)
    assert ("q_head" not in structures) or any(not w.even for w in adapter2.all_widths())
    assert torch.allclose(logits(model2, stories_text_ids), masked, atol=1e-10)


@pytest.mark.slow
def test_cli_llm_bip_writes_record(tmp_path):
    proc = cli_run(tmp_path, "method=llm_bip", "pruning.ratio=0.2", "eval=quick", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = next(r for r in stored_records(tmp_path) if r["plan"]["meta"].get("method") == "llm_bip")
    assert rec["params"]["after"] < 292_800 and abs(rec["params"]["achieved_ratio"] - 0.2) < 0.01
    assert rec["plan"]["meta"]["llm_bip"]["variant"] == "interp_v1"
    for res in rec["metrics"]["ppl"].values():
        assert res["ppl"] >= 1 and math.isfinite(res["ppl"])
