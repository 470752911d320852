"""Numerical Pruning on the real stories260K weights (METHODS.md §3.7 invariants): the Newton gradient against a
finite difference of the relaxed-mask objective, the scorer against a numpy computation of the closed form, the
global param-budget threshold, the OBS refit against torch.linalg.lstsq and the paper's multi-row formula, the
per-layer and whole-model effect of compensation, masking == surgery, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES, cli_run, logits, site_inputs
from pruning import data
from pruning.allocation.global_rank import GlobalRank
from pruning.calibration import collect
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.importance.newton import NewtonScorer, hadamard_hessian, newton_gradient, relaxed_mask
from pruning.methods.numerical import numerical
from pruning.models import load_model
from pruning.structures import structure_sets
from pruning.surgery.apply import apply_plan, mask_plan
from pruning.surgery.obs import obs_compensation, obs_update

REPO = Path(__file__).resolve().parents[1]
D, HD, G = 64, 8, 2


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 8, 32, 0, progress=False)  # 256 tokens > I = 172


def weight(model, layer, site):
    blk = model.model.layers[layer]
    return (blk.mlp if site == "down_proj" else blk.self_attn).__getattr__(site).weight.detach().double()


def objective(x, w_hf, z, lam, r):
    """f(z) = ½ Σ_i ‖X W_i − X(z∘W_i)‖² + ½ λ(⟨1,z⟩ − r)², straight from the paper (W = weightᵀ)."""
    w = w_hf.T
    return 0.5 * ((x @ w - x @ (z[:, None] * w)) ** 2).sum() + 0.5 * lam * (z.sum() - r) ** 2


@pytest.mark.parametrize("site", ["o_proj", "down_proj"])
def test_newton_gradient_and_step(stories, calib, site):
    model, _, _ = stories
    x = site_inputs(model, calib)[(2, site)]
    w = weight(model, 2, site)
    a = hadamard_hessian(w, x.T @ x)
    d, rho, lam = a.shape[0], 0.3, 0.7
    r = (1 - rho) * d
    z = torch.rand(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = newton_gradient(a, z, lam, r)
    eps, coords = 1e-5, torch.randperm(d, generator=torch.Generator().manual_seed(1))[:24]  # 24 coordinates
    fd = torch.stack(
        [
            (objective(x, w, z + eps * e, lam, r) - objective(x, w, z - eps * e, lam, r)) / (2 * eps)
            for e in torch.eye(d, dtype=torch.float64)[coords]
        ]
    )
    assert torch.linalg.norm(g[coords] - fd) / torch.linalg.norm(fd) < 1e-4
    z1 = relaxed_mask(a, rho, lam)
    z2 = relaxed_mask(a, rho, lam, z0=torch.zeros(d, dtype=torch.float64))
    assert torch.allclose(z1, z2, rtol=1e-8, atol=1e-8)  # one step from any z0
    assert newton_gradient(a, z1, lam, r).abs().max() < 1e-6 * a.diagonal().max()
    assert torch.allclose(relaxed_mask(a, 0.0, math.inf), torch.ones(d, dtype=torch.float64))
    assert relaxed_mask(a, rho, math.inf).sum().item() == pytest.approx(r, rel=1e-9)
    orders = [torch.argsort(relaxed_mask(a, rho, l)) for l in (1e-3, 1.0, 1e3)]
    assert all(torch.equal(orders[0], o) for o in orders[1:])


def test_scorer_equals_numpy_closed_form(stories, calib):
    model, _, adapter = stories
    xs = site_inputs(model, calib)
    scorer = NewtonScorer(damp=0.01, rho=0.25).bind(collect(model, calib, stats=("xtx",), progress=False))
    for layer in (0, 4):
        for kind in ("kv_group", "q_head", "mlp"):
            (sset,) = structure_sets(adapter, kind, [layer])
            site = "down_proj" if kind == "mlp" else "o_proj"
            x, w = xs[(layer, site)].numpy(), weight(model, layer, site).numpy()
            a = (w.T @ w) * (x.T @ x)
            a = a + 0.01 * np.mean(np.diag(a)) * np.eye(a.shape[0])
            ainv1 = np.linalg.solve(a, np.ones(a.shape[0]))
            z = 1 - (a.shape[0] * 0.25) * ainv1 / ainv1.sum()
            width, alpha = {"kv_group": (G * HD, 2 * (G + 1) * HD / 3), "q_head": (HD, 2 * HD / 3), "mlp": (1, 1.0)}[
                kind
            ]
            np.testing.assert_allclose(scorer(sset).numpy(), alpha * z.reshape(-1, width).mean(1), rtol=1e-7)


def test_global_param_budget_within_one_unit(stories):
    _model, _, adapter = stories
    sets = [s for k in ("kv_group", "mlp") for s in structure_sets(adapter, k)]
    total = adapter.num_params()
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(s.n_units, generator=gen, dtype=torch.float64) for s in sets]
    alloc = GlobalRank()
    for ratio in (0.05, 0.2, 0.4):
        plan = alloc.allocate(sets, scores, alloc.budget(sets, ratio, total))
        removed = sum(len(plan.units(s.kind, s.layer)) * s.params_per_unit for s in sets)
        assert abs(removed - ratio * total) <= max(s.params_per_unit for s in sets) / 2 + 1
        assert plan.meta["allocation"]["achieved"] == removed / total
        for s in sets:  # never empties a layer, and the kept unit is the set's best
            kept = set(range(s.n_units)) - set(plan.units(s.kind, s.layer))
            assert kept and max(range(s.n_units), key=lambda u: scores[sets.index(s)][u]) in kept
    with pytest.raises(InfeasibleRatioError):
        alloc.budget(sets, 0.76, total)
    unit = GlobalRank("unit_count")
    plan = unit.allocate(sets, scores, unit.budget(sets, 0.1, total))
    assert sum(len(v) for per in plan.remove.values() for v in per.values()) == int(0.1 * sum(s.n_units for s in sets))


def test_global_rank_takes_single_query_heads_with_exact_accounting(stories):
    """With q_head units the pooled ranking removes single query heads wherever they rank; a KV head whose last
    query head goes frees its k/v rows (2·d·d_h), which the tally counts as it goes and the plan reports."""
    _model, _, adapter = stories
    sets = [s for k in ("q_head", "mlp") for s in structure_sets(adapter, k)]
    total = adapter.num_params()
    gen = torch.Generator().manual_seed(3)
    scores = [
        torch.rand(s.n_units, generator=gen, dtype=torch.float64) * (0.5 if s.kind == "q_head" else 1.0) for s in sets
    ]
    alloc = GlobalRank()
    plan = alloc.allocate(sets, scores, alloc.budget(sets, 0.3, total))
    removed, uneven = 0, False
    for s in sets:
        gone = plan.units(s.kind, s.layer)
        assert len(gone) < s.n_units
        removed += len(gone) * s.params_per_unit
        if s.kind == "q_head":
            left = [sum(1 for h in range(2 * j, 2 * j + 2) if h not in gone) for j in range(4)]
            removed += left.count(0) * 2 * 64 * 8  # emptied KV heads: their k and v rows
            uneven |= len({v for v in left if v}) > 1 or (0 in left and any(left))
    assert uneven and plan.meta["allocation"]["achieved"] == removed / total
    assert abs(removed - 0.3 * total) <= 2 * 1024
    unit = GlobalRank("unit_count")
    plan = unit.allocate(sets, scores, unit.budget(sets, 0.2, total))
    assert sum(len(v) for per in plan.remove.values() for v in per.values()) == int(0.2 * sum(s.n_units for s in sets))


def test_bad_options_fail_fast():
    for kw in (
        {"lam": -1.0},
        {"comp_inputs": "online"},
        {"unit_ratio": 1.5},
        {"damp": -0.1},
        {"alpha": "huge"},
        {"bogus": 1},
    ):
        with pytest.raises(PruningError):
            numerical(**kw)
    assert math.isinf(numerical(**{"lambda": "inf"}).scorer.lam)


def test_obs_equals_lstsq_and_paper_formula(stories, calib):
    model, _, _ = stories
    xs = site_inputs(model, calib)
    gen = torch.Generator().manual_seed(3)
    for site in ("o_proj", "down_proj"):
        x, w = xs[(2, site)], weight(model, 2, site)
        d = w.shape[1]
        pruned = torch.randperm(d, generator=gen)[: d // 4]
        keep = torch.tensor([j for j in range(d) if j not in set(pruned.tolist())])
        new = obs_update(w, x.T @ x, pruned, damp=0.0)
        ref = torch.linalg.lstsq(x[:, keep], x @ w.T, driver="gelsd").solution.T  # [out, kept]
        assert torch.linalg.norm(new[:, keep] - ref) / torch.linalg.norm(ref) < 1e-4
        assert torch.count_nonzero(new[:, pruned]) == 0
        # the paper's multi-row OBS update δW* = −H⁻¹M(MᵀH⁻¹M)⁻¹MᵀW in X·W notation, with its damping
        h = 2 * x.T @ x
        h = h + 0.01 * h.diagonal().mean() * torch.eye(d, dtype=h.dtype)
        hinv = torch.linalg.inv(h)
        m = torch.eye(d, dtype=h.dtype)[:, pruned]
        dw = -hinv @ m @ torch.linalg.inv(m.T @ hinv @ m) @ m.T @ w.T
        assert torch.allclose(obs_update(w, x.T @ x, pruned, damp=0.01), (w.T + dw).T, rtol=1e-6, atol=1e-9)
        plain = w.clone()
        plain[:, pruned] = 0
        for damp in (0.0, 0.01, 1.0):
            assert output_error(x, w, obs_update(w, x.T @ x, pruned, damp)) <= output_error(x, w, plain) * (1 + 1e-12)
        assert torch.allclose(obs_update(w, x.T @ x, pruned, 1e12)[:, keep], w[:, keep], atol=1e-9)


def output_error(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖XWᵀ − XVᵀ‖: how far weights ``v`` move the layer's output on inputs ``x`` from the original ``w``."""
    return torch.linalg.norm(x @ w.T - x @ v.T)


def test_compensation_per_layer_never_worse(calib):
    base, _, _ = load_model(STORIES, dtype="float64")
    meth = numerical(comp_inputs="dense", progress=False)
    plan = meth.prune(base, 0.2, calib)
    assert plan.meta["allocation"]["achieved"] == pytest.approx(0.2, abs=200 / 292_800)
    dense_x = site_inputs(base, calib)
    dense_w = {k: weight(base, *k).clone() for k in dense_x}
    comp, _, _ = load_model(STORIES, dtype="float64")
    obs_compensation(comp, plan, calib, comp_inputs="dense", progress=False, surgery=False)
    plain, _, _ = load_model(STORIES, dtype="float64")
    mask_plan(plain, plan)
    touched = 0
    for key, x in dense_x.items():
        ref = x @ dense_w[key].T
        e_comp = torch.linalg.norm(ref - x @ weight(comp, *key).T)
        e_plain = torch.linalg.norm(ref - x @ weight(plain, *key).T)
        assert e_comp <= e_plain * (1 + 1e-9)
        touched += bool(e_plain > 0)
    assert touched >= 3


def test_compensation_lowers_calibration_loss(calib):
    plan = numerical(progress=False).prune(load_model(STORIES)[0], 0.2, calib)

    def loss(model):
        with torch.no_grad():
            return model(calib, labels=calib).loss.item()

    for mode in ("sequential", "dense"):
        m, _, _ = load_model(STORIES)
        numerical(comp_inputs=mode, progress=False).apply(m, plan, calib)
        m0, _, _ = load_model(STORIES)
        numerical(compensate=False, progress=False).apply(m0, plan, calib)
        assert loss(m) < loss(m0)


def test_masking_equals_surgery_after_compensation(calib, stories_text_ids):
    """Query-head units at 0.6: the ranking empties some KV heads and leaves uneven groups (checked)."""
    model, _, adapter = load_model(STORIES, dtype="float64")
    meth = numerical(structures=("q_head", "mlp"), progress=False)
    plan = meth.prune(model, 0.6, calib)
    obs_compensation(model, plan, calib, progress=False, surgery=False)
    masked = logits(mask_plan(model, plan), stories_text_ids)
    apply_plan(model, plan)
    assert any(not w.even for w in adapter.all_widths())
    assert 1 - adapter.num_params() / 292_800 == pytest.approx(plan.meta["planned_ratio"], abs=1e-12)
    assert torch.allclose(logits(model, stories_text_ids), masked, atol=1e-10)


def test_ratio_zero_is_identity(stories, calib, stories_text_ids):
    model, _, _ = stories
    before = logits(model, stories_text_ids)
    meth = numerical(progress=False)
    plan = meth.prune(model, 0.0, calib)
    meth.apply(model, plan, calib)
    assert plan.is_empty() and torch.equal(logits(model, stories_text_ids), before)


@pytest.mark.slow
def test_cli_numerical_writes_record(tmp_path):
    proc = cli_run(tmp_path, "method=numerical", "pruning.ratio=0.2", "eval=quick", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = list((tmp_path / "store" / "records").glob("*.json"))
    rec = next(json.loads(p.read_text()) for p in recs if "numerical" in p.read_text())
    assert rec["plan"]["meta"]["method"] == "numerical" and rec["params"]["after"] < 292_800
    assert abs(rec["params"]["achieved_ratio"] - 0.2) < 0.005
    for res in rec["metrics"]["ppl"].values():
        assert res["ppl"] >= 1 and math.isfinite(res["ppl"])
