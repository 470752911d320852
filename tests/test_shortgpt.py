"""ShortGPT on the real stories260K weights: Block Influence against an independent cosine computation, an
identity block scores 0 and goes first, block surgery and parameter count, n_blocks, save -> reload."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import STORIES, logits
from pruning import data
from pruning.allocation import Uniform
from pruning.calibration import BlockIO, CalibrationStats, LayerStats
from pruning.errors import InfeasibleRatioError
from pruning.importance.activation import BlockInfluenceScorer
from pruning.methods.shortgpt import shortgpt
from pruning.models import load_model
from pruning.structures import structure_sets
from pruning.surgery.apply import mask_plan
from pruning.surgery.save import save_pruned

BLOCK = 45_440


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 8, 32, 0, progress=False)


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.reshape(-1, a.shape[-1]).double().numpy()
    b = b.reshape(-1, b.shape[-1]).double().numpy()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(1 - cos.mean())


def reference_bi(model, ids) -> tuple[list[float], float]:
    """From HF ``output_hidden_states`` (entry i enters block i); the last entry is after the final norm, so the
    last block's raw output is read with a plain forward hook."""
    raw = []
    h = model.model.layers[-1].register_forward_hook(lambda m, a, out: raw.append(out.detach()))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    h.remove()
    L = len(model.model.layers)
    bi = [one_minus_cos(hs[i], hs[i + 1]) for i in range(L - 1)] + [one_minus_cos(hs[L - 1], raw[0])]
    return bi, one_minus_cos(hs[L - 1], hs[L])


def scores(model, adapter, ids, **kw):
    from pruning.calibration import collect

    last = "final_norm" if kw.pop("hf", False) else "raw"
    st = collect(model, ids, stats=("block_io",), sites=(), batch_size=3, progress=False, block_last_output=last)
    (blocks,) = structure_sets(adapter, "block")
    return BlockInfluenceScorer(**kw).bind(st)(blocks)


def test_block_influence_equals_one_minus_cos(stories, calib):
    model, _, adapter = stories
    bi, last_hf = reference_bi(model, calib)
    got = scores(model, adapter, calib)
    np.testing.assert_allclose(got.numpy(), bi, rtol=1e-9)
    assert ((got >= 0) & (got <= 2)).all()
    hf = scores(model, adapter, calib, hf=True)  # official quirk: the last block vs the normed output
    assert hf[-1].item() == pytest.approx(last_hf, rel=1e-9) and torch.equal(hf[:-1], got[:-1])
    ang = scores(model, adapter, calib, angular=True)
    assert torch.equal(torch.argsort(ang), torch.argsort(got))  # arccos is monotone in cos


def test_identity_block_scores_zero_and_goes_first(calib):
    model, _, adapter = load_model(STORIES)
    with torch.no_grad():  # o_proj and down_proj zero: the block adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    got = scores(model, adapter, calib)
    assert abs(got[2].item()) < 1e-12 and (got[[0, 1, 3, 4]] > 1e-3).all()
    plan = shortgpt(n_blocks=1, progress=False).prune(model, 0.0, calib)
    assert plan.blocks == [2]


def test_ratio_removes_the_lowest_bi_blocks(calib, stories_text_ids):
    model, _, adapter = load_model(STORIES)
    bi = scores(model, adapter, calib)
    method = shortgpt(progress=False)
    assert method.budget(model, 0.2).removed_params == BLOCK  # 1 block (15.5%) is closest to 20%
    plan = method.prune(model, 0.2, calib)
    assert plan.blocks == torch.argsort(bi, stable=True)[:1].tolist()
    assert plan.meta["block_influence"] == pytest.approx(dict(enumerate(bi.tolist())))
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert len(adapter.layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in adapter.layers] == [0, 1, 2, 3]
    assert adapter.num_params() == 292_800 - BLOCK
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= 1e-4


def test_n_blocks_override_and_infeasible(calib):
    model, _, adapter = load_model(STORIES)
    bi = scores(model, adapter, calib)
    plan = shortgpt(n_blocks=3, progress=False).prune(model, 0.2, calib)
    assert plan.blocks == sorted(torch.argsort(bi, stable=True)[:3].tolist())
    with pytest.raises(InfeasibleRatioError):
        shortgpt(n_blocks=5).budget(model, 0.2)
    with pytest.raises(InfeasibleRatioError):
        shortgpt().budget(model, 0.9)


def test_ties_go_to_the_lower_index():
    """Equal BI (here written directly into the statistics) -> the lower layer index is removed first."""
    _model, _, adapter = load_model(STORIES)
    layers = {}
    for i, cos in enumerate([0.9, 0.95, 0.9, 0.8, 0.95]):
        io = BlockIO()
        io.n, io.cos_sum = 10, 10 * cos
        layers[i] = LayerStats(i, block=io)
    stats = CalibrationStats(layers, "dense", 1, 10)
    (blocks,) = structure_sets(adapter, "block")
    s = BlockInfluenceScorer().bind(stats)(blocks)
    alloc = Uniform()
    plan = alloc.allocate([blocks], [s], alloc.budget([blocks], 2 * BLOCK / 292_800, 292_800))
    assert plan.blocks == [1, 4]  # BI 0.05 for layers 1 and 4 (lowest), not 0 or 2


def test_save_reload_as_plain_llama(calib, stories_text_ids, tmp_path):
    model, tok, _ = load_model(STORIES)
    method = shortgpt(progress=False)
    method.apply(model, method.prune(model, 0.2, calib))
    ref = logits(model, stories_text_ids)
    out = save_pruned(model, tmp_path / "short", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (logits(reloaded, stories_text_ids) - ref).abs().max().item() <= 1e-6
