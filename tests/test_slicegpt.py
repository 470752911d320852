"""SliceGPT on the real stories260K weights (METHODS.md §3.6 invariants): fusion and 0% rotation keep the function,
the bases are orthonormal PCA bases of the official signals, the sliced model has the closed-form size, and it
saves and reloads both ways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import STORIES, cli_run, logits, same_threads_env, stored_records
from pruning import data
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.methods.slicegpt import Dims, pca, rotate_and_slice, slicegpt
from pruning.models import load_model
from pruning.surgery.modeling_sliced_llama import RMSN
from pruning.surgery.save import save_pruned
from pruning.surgery.slicing import fuse_norms

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 8, 64, 0, progress=False)


def full_dims(d=64, L=5):
    return Dims([d] * L, [d] * L, [d] * L)


def test_fusion_keeps_logits(stories_text_ids):
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        model, _, adapter = load_model(STORIES, dtype=dtype)
        ref = logits(model, stories_text_ids)
        fuse_norms(model)
        assert model.config.model_type == "sliced_llama" and not adapter.is_tied
        norms = [m for m in model.modules() if isinstance(m, RMSN)]
        assert len(norms) == 11 and all(n.mean_dim == 64 for n in norms)
        assert not any("norm" in name for name, _ in model.named_parameters())
        assert (logits(model, stories_text_ids) - ref).abs().max().item() <= tol  # fp64: far below 1e-5


def test_rotation_without_slicing_is_exact_and_bases_are_orthonormal(stories, stories_text_ids, calib):
    model, _, adapter = stories
    ref = logits(model, stories_text_ids)
    fuse_norms(model)
    bases = rotate_and_slice(model, calib, full_dims())
    assert (logits(model, stories_text_ids) - ref).abs().max().item() <= 1e-4
    for Q in bases["inputs"] + bases["mids"]:
        assert Q.dtype == torch.float64
        assert (Q.T @ Q - torch.eye(64, dtype=torch.float64)).abs().max().item() <= 1e-6
    layer = adapter.layers[2]  # shortcuts Q_inᵀQ_mid and Q_midᵀQ_out, both orthogonal at full width
    assert torch.allclose(layer.attn_shortcut_Q.double(), bases["inputs"][2].T @ bases["mids"][2], atol=1e-6)
    assert torch.allclose(layer.mlp_shortcut_Q.double(), bases["mids"][2].T @ bases["inputs"][3], atol=1e-6)


def test_random_orientation_gives_the_same_function(stories, stories_text_ids, calib):
    model, _, _ = stories
    ref = logits(model, stories_text_ids)
    method = slicegpt(slicing=0.0, orientation="random", seed=3, progress=False)
    method.apply(model, method.prune(model, 0.0, calib), calib)
    assert (logits(model, stories_text_ids) - ref).abs().max().item() <= 1e-4


def test_pca_sorted_and_damped():
    x = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([5.0, 1, 3, 0.1, 2, 0.5], dtype=torch.float64)
    vals, Q = pca(x.T @ x, damp=0.01)
    assert (vals[:-1] >= vals[1:]).all()
    H = x.T @ x
    H = H + 0.01 * H.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(Q @ torch.diag(vals) @ Q.T, H, atol=1e-8)


def _leading_projector(Q, k):
    return Q[:, :k] @ Q[:, :k].T


def test_bases_are_the_official_signals(calib):
    """Layer 0 recomputed by hand on the fused model, the official order: Q_0 from the embeddings; Q_mid from
    the attention-MLP residual with sliced inputs; Q_out from the output with the MLP input sliced too."""
    a = 40
    model, _, adapter = load_model(STORIES, dtype="float64")
    fuse_norms(model)
    layer = adapter.layers[0]
    X = adapter.embed_tokens(calib)  # [n, T, d]
    H0 = torch.einsum("ntd,nte->de", X, X)
    Q0 = pca(H0)[1]
    P0 = _leading_projector(Q0, a)
    seen = {}
    h = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args: seen.update(mid=args[0]))
    with torch.no_grad():
        model(inputs_embeds=X @ P0)  # = layer 0 on sliced inputs, d-dim basis
    h.remove()
    mid = seen["mid"]
    Qm = pca(torch.einsum("ntd,nte->de", mid, mid))[1]
    mid_p = mid @ _leading_projector(Qm, a)
    with torch.no_grad():
        out = mid_p + layer.mlp(layer.post_attention_layernorm(mid_p))
    Qo = pca(torch.einsum("ntd,nte->de", out, out))[1]

    model2, _, _ = load_model(STORIES, dtype="float64")
    fuse_norms(model2)
    bases = rotate_and_slice(model2, calib, Dims([a] * 5, [a] * 5, [a] * 4 + [64]))
    for ref, got in ((Q0, bases["inputs"][0]), (Qm, bases["mids"][0]), (Qo, bases["inputs"][1])):
        assert (_leading_projector(ref, a) - _leading_projector(got, a)).abs().max().item() <= 1e-6


def closed_form(V, d_h, H, Hkv, I, a, m, o):
    """METHODS.md §1.1 with §3.6: embeddings V·a_0, per layer q/k/v in, o out, shortcuts a·m and m·o, gate/up in,
    down out; lm_head V·o_L; norms hold no weights."""
    p = V * a[0] + V * o[-1]
    for l in range(len(a)):
        p += (H + 2 * Hkv) * d_h * a[l] + H * d_h * m[l] + 2 * I * m[l] + I * o[l]
        p += a[l] * m[l] + m[l] * o[l]
    return p


def test_sliced_model_params_equal_closed_form_and_weights_shrink(stories, stories_text_ids, calib):
    model, _, adapter = stories
    method = slicegpt(slicing=0.25, progress=False)
    plan = method.prune(model, 0.0, calib)
    assert plan.meta["sliced_hidden_size"] == 48 and plan.units("hidden", -1) == list(range(48, 64))
    method.apply(model, plan, calib)
    kept = plan.meta["kept_variance"]
    assert len(kept["mid"]) == len(kept["out"]) == 5 and kept["out"][-1] == pytest.approx(1.0)  # head unsliced
    assert all(0.5 < k < 1.0 for k in [kept["embeddings"], *kept["mid"], *kept["out"][:-1]])
    expected = closed_form(512, 8, 8, 4, 172, [48] * 5, [48] * 5, [48] * 4 + [64])
    assert adapter.num_params() == expected == plan.meta["params_closed_form"]
    assert adapter.embed_tokens.weight.shape == (512, 48) and adapter.lm_head.weight.shape == (512, 64)
    layer = adapter.layers[1]
    assert adapter.q_proj(layer).weight.shape == (64, 48) and adapter.down_proj(layer).weight.shape == (48, 172)
    assert layer.attn_shortcut_Q.shape == (48, 48) and adapter.layers[4].mlp_shortcut_Q.shape == (48, 64)
    out = logits(model, stories_text_ids)
    assert torch.isfinite(out).all()
    # negative control (invariant 5): the norms must divide by the original width, not by d′
    for mod in model.modules():
        if isinstance(mod, RMSN) and mod is not model.model.norm:
            mod.mean_dim = 48
    assert (logits(model, stories_text_ids) - out).abs().max().item() > 1e-3


def test_ratio_picks_closest_width_and_errors_early(stories):
    model, _, adapter = stories
    method = slicegpt(progress=False)
    total = adapter.num_params()
    achieved = {
        w: 1 - closed_form(512, 8, 8, 4, 172, [w] * 5, [w] * 5, [w] * 4 + [64]) / total for w in range(8, 65, 8)
    }
    for r in (0.1, 0.2, 0.3):
        w = method.width_for(model, r)
        assert w % 8 == 0 and abs(achieved[w] - r) == min(abs(v - r) for v in achieved.values())
        assert method.budget(model, r).achieved == pytest.approx(achieved[w])
    assert slicegpt(round_interval=4, progress=False).width_for(model, 0.2) == 44
    with pytest.raises(InfeasibleRatioError):
        method.budget(model, 0.95)
    with pytest.raises(PruningError):
        slicegpt(orientation="sideways")
    with pytest.raises(PruningError):
        method.apply(model, method.prune(model, 0.2), None)


REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(k == "pruning" or k.startswith("pruning.") for k in sys.modules), "pruning was imported"
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(m).__module__)
"""


def _saved_sliced(stories, ids, calib, tmp_path):
    model, tok, _ = stories
    method = slicegpt(slicing=0.25, progress=False)
    method.apply(model, method.prune(model, 0.0, calib), calib)
    return logits(model, ids), save_pruned(model, tmp_path / "sliced", tok, meta={"note": "test"})  # save_sliced


def test_save_reload(stories, stories_text_ids, calib, tmp_path):
    adapter = stories[2]
    ref, out = _saved_sliced(stories, stories_text_ids, calib, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "sliced_llama" and cfg["tie_word_embeddings"] is False
    assert cfg["layer_mlp_output_dim"] == [48, 48, 48, 48, 64] and cfg["rms_norm_mean_dim"] == 64
    assert "auto_map" in cfg and (out / "modeling_sliced_llama.py").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "SlicedLlamaForCausalLM"
    assert (logits(reloaded, stories_text_ids) - ref).abs().max().item() <= 1e-6
    assert sum(p.numel() for p in reloaded.parameters()) == adapter.num_params()

    m2, _, ad2 = load_model(str(out))  # the project's loader and adapter accept it too
    assert (logits(m2, stories_text_ids) - ref).abs().max().item() <= 1e-6 and len(ad2.layers) == 5


@pytest.mark.slow  # a fresh interpreter
def test_sliced_save_reloads_with_remote_code_in_a_clean_process(stories, stories_text_ids, calib, tmp_path):
    ref, out = _saved_sliced(stories, stories_text_ids, calib, tmp_path)
    torch.save(stories_text_ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=same_threads_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transformers_modules" in proc.stdout
    assert (torch.load(tmp_path / "l.pt") - ref).abs().max().item() <= 1e-6


def test_tied_embeddings_are_untied_and_function_kept(stories, stories_text_ids, calib):
    """SmolLM2 ties lm_head to the embeddings; tie the tiny model the same way (a real tied model: the head is
    the embedding) and check fusion + full-width rotation keep its function and record the untying."""
    model, _, adapter = stories
    model.lm_head.weight = model.model.embed_tokens.weight
    assert adapter.is_tied
    ref = logits(model, stories_text_ids)
    method = slicegpt(slicing=0.0, progress=False)
    plan = method.prune(model, 0.0, calib)
    assert plan.meta["tied_embeddings"] == "untied"
    method.apply(model, plan, calib)
    assert not adapter.is_tied
    assert (logits(model, stories_text_ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_cli_run_writes_record(tmp_path):
    proc = cli_run(tmp_path, "method=slicegpt", "pruning.ratio=0.2", "eval=quick", "progress=false", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slicegpt" in proc.stdout
    records = stored_records(tmp_path)
    rec = next(r for r in records if r["plan"]["meta"].get("method") == "slicegpt")
    assert rec["params"]["before"] == 292_800
    assert rec["params"]["after"] == rec["plan"]["meta"]["params_closed_form"]
    assert rec["params"]["achieved_ratio"] == pytest.approx(rec["plan"]["meta"]["planned_ratio"])
    assert rec["plan"]["meta"]["sliced_hidden_size"] == 40
    for key, res in rec["metrics"]["ppl"].items():
        assert res["ppl"] > rec["metrics"]["dense_ppl"][key]["ppl"] > 1
