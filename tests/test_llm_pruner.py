"""LLM-Pruner (METHODS.md §3.1 "Invariants to test") on the real stories260K weights, plus config-only LLaMA-7B and
Llama-3-8B shapes on the meta device (real surgery on shape-only tensors, no weights) for the published counts."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import STORIES, logits, same_threads_env
from pruning import data
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.methods.llm_pruner import llm_pruner
from pruning.models import adapter_for, load_model
from pruning.surgery.apply import mask_plan
from pruning.surgery.save import save_pruned

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_hidden_layers=32,
    vocab_size=32000,
    tie_word_embeddings=False,
)
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_hidden_layers=32,
    vocab_size=128256,
    tie_word_embeddings=False,
    head_dim=128,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib():
    _, tok, _ = load_model(STORIES)
    return data.calibration_batches(tok, "c4", 10, 64, 42, progress=False)


def closed_form(config, widths, d, tied) -> int:
    """METHODS.md §1.1 with hidden size d: P = V·d·(1 or 2) + d + Σ_l [d·d_h·(2H_l + 2H_kv,l) + 3·d·I_l + 2d]."""
    hd, V = config.head_dim, config.vocab_size
    return (
        V * d * (1 if tied else 2)
        + d
        + sum(d * hd * (2 * w.num_heads + 2 * w.num_kv_heads) + 3 * d * w.intermediate_size + 2 * d for w in widths)
    )


@pytest.mark.parametrize(
    "shape,kv_removed,mlp_kept,expect",
    [
        (LLAMA_7B, 8, 8256, 5_422_977_024),  # issue #34 log: 6,738,415,616 -> 5,422,977,024
        (LLAMA3_8B, 2, 10752, 6_612_586_496),  # more_results/README.md: 8,030,261,248 -> 6,612,586,496
    ],
)
def test_paper_counts_on_config_only_models(shape, kv_removed, mlp_kept, expect):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    adapter = adapter_for(model)
    method = llm_pruner(importance="random", group_ratio=0.25)
    plan = method.prune(model, 0.2)
    method.apply(model, plan)
    assert adapter.num_params() == expect
    kv = shape["num_key_value_heads"]
    for i, w in enumerate(adapter.all_widths()):
        pruned = 4 <= i < 30  # [4, 30) = floor(0.125·32 + ½), floor(0.9375·32 + ½)
        assert w.num_kv_heads == (kv - kv_removed if pruned else kv)
        assert w.num_heads == w.num_kv_heads * 32 // kv
        assert w.intermediate_size == (mlp_kept if pruned else shape["intermediate_size"])


def test_tiny_count_rule_rounds_kv_groups_down(stories):
    """C = H_kv·d_h = 32: p = 0.2 removes ⌊(32 − int(25.6))/8⌋ = 0 groups and 172 − int(137.6) = 35 channels;
    a group first goes at p = 0.25. Only layers [1, 5) are touched."""
    model, _, _adapter = stories
    for p, groups in ((0.2, 0), (0.25, 1)):
        plan = llm_pruner(importance="random", group_ratio=p).prune(model, 0.2)
        assert {l: len(u) for l, u in plan.remove.get("kv_group", {}).items()} == (
            {} if groups == 0 else dict.fromkeys(range(1, 5), groups)
        )
        assert {l: len(u) for l, u in plan.remove["mlp"].items()} == {i: 172 - int(172 * (1 - p)) for i in range(1, 5)}


def test_block_strategy_leaves_everything_outside_the_range_bit_identical(stories, calib, stories_text_ids):
    model, _, adapter = stories
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q_before = adapter.q_proj(adapter.layers[2]).weight.detach().clone()
    method = llm_pruner()
    plan = method.prune(model, 0.2, calib)
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert sorted(int(l) for l in plan.remove["mlp"]) == [1, 2, 3, 4]
    after = dict(model.named_parameters())
    outside = [n for n in before if not any(f"layers.{i}." in n for i in (1, 2, 3, 4)) or "layernorm" in n]
    assert any("embed_tokens" in n for n in outside) and any("lm_head" in n for n in outside)
    assert all(torch.equal(before[n], after[n]) for n in outside)
    # GQA: whole KV groups only; the kept query heads are exactly those whose group ⌊h/g⌋ was kept
    for i in range(1, 5):
        w = adapter.widths(adapter.layers[i])
        assert w.num_heads == 2 * w.num_kv_heads
    kept_groups = [j for j in range(4) if j not in plan.units("kv_group", 2)]
    rows = [h * 8 + r for h in range(8) if h // 2 in kept_groups for r in range(8)]
    assert torch.equal(adapter.q_proj(adapter.layers[2]).weight, q_before[rows])
    diff = (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item()
    assert diff <= 1e-4
    assert abs(plan.meta["planned_ratio"] - 0.2) < 0.02
    assert plan.meta["scoring"]["memory"]["state_ratio"] <= 1.5


def test_block_surgery_equals_masking_in_float64(calib, stories_text_ids):
    model, _, adapter = load_model(STORIES, "float64")
    method = llm_pruner(importance="element2", group_ratio=0.4)
    plan = method.prune(model, 0.2, calib)
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= 1e-10
    assert adapter.num_params() == closed_form(model.config, adapter.all_widths(), 64, False)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("float32", 1e-4)])
def test_channel_strategy_keep_original_dim_equals_masking(calib, stories_text_ids, dtype, tol):
    """RMSNorm in HF runs in float32 even for float64 models, so float64 agrees to ~1e-6, not to 1e-12."""
    model, _, adapter = load_model(STORIES, dtype)
    method = llm_pruner(strategy="channel")
    plan = method.prune(model, 0.25, calib)
    n = len(plan.units("hidden", -1))
    assert n == 64 - int(64 * (1 - plan.meta["allocation"]["p"]))
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert model.config.hidden_size == 64 - n and adapter.embed_tokens.weight.shape == (512, 64 - n)
    assert adapter.num_params() == closed_form(model.config, adapter.all_widths(), 64 - n, False)
    diff = (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item()
    assert diff <= tol, diff


def test_channel_strategy_official_norm_is_not_mask_equivalent(calib, stories_text_ids):
    model, _, _ = load_model(STORIES)
    method = llm_pruner(strategy="channel", surgery={"hidden_norm": "official"})
    plan = method.prune(model, 0.2, calib)
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() > 1e-2


REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(k == "pruning" or k.startswith("pruning.") for k in sys.modules)
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(m.model.norm).__name__, m.config.hidden_size, m.config.rms_norm_mean_dim)
"""


def channel_pruned_saved(calib, tmp_path):
    model, tok, _ = load_model(STORIES)
    method = llm_pruner(strategy="channel")
    method.apply(model, method.prune(model, 0.2, calib))
    out = save_pruned(model, tmp_path / "p", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "pruned_llama" and cfg["rms_norm_mean_dim"] == 64 and cfg["hidden_size"] == 51
    return model, out


def test_channel_pruned_model_saves_and_reloads(calib, stories_text_ids, tmp_path):
    model, out = channel_pruned_saved(calib, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].input_layernorm).__name__ == "MeanDimRMSNorm"
    assert (logits(reloaded, stories_text_ids) - logits(model, stories_text_ids)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_channel_pruned_model_reloads_with_trust_remote_code(calib, stories_text_ids, tmp_path):
    """In a process that never imports pruning: the saved modeling file alone rebuilds the mean-dim norms."""
    model, out = channel_pruned_saved(calib, tmp_path)
    torch.save(stories_text_ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=same_threads_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["MeanDimRMSNorm", "51", "64"]
    assert (torch.load(tmp_path / "l.pt") - logits(model, stories_text_ids)).abs().max().item() <= 1e-6


def test_channel_strategy_keeps_a_tied_embedding_tied(calib, stories_text_ids, tmp_path):
    """stories260K is untied; tie its real lm_head to its real embedding to exercise the tied path."""
    model, tok, adapter = load_model(STORIES)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    assert adapter.is_tied and adapter.num_params() == 292_800 - 512 * 64
    method = llm_pruner(strategy="channel")
    plan = method.prune(model, 0.2, calib)
    assert plan.meta["tied_embeddings"] is True
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert adapter.is_tied and adapter.lm_head.in_features == model.config.hidden_size
    d = model.config.hidden_size
    assert adapter.num_params() == closed_form(model.config, adapter.all_widths(), d, True)
    assert (logits(model, stories_text_ids) - logits(masked, stories_text_ids)).abs().max().item() <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "t", tok))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert (logits(reloaded, stories_text_ids) - logits(model, stories_text_ids)).abs().max().item() <= 1e-6


def test_same_seed_gives_bit_identical_pruned_weights():
    states = []
    for _ in range(2):
        model, tok, _ = load_model(STORIES)
        calib = data.calibration_batches(tok, "c4", 10, 64, 42, progress=False)
        method = llm_pruner(importance="element1")
        method.apply(model, method.prune(model, 0.2, calib))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_ratio_zero_and_empty_range_leave_the_model_untouched(stories, calib):
    model, _, _ = stories
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method, ratio in ((llm_pruner(), 0.0), (llm_pruner(layers={"start": 2, "end": 2}), 0.2)):
        plan = method.prune(model, ratio, calib)
        assert plan.is_empty() and "scoring" not in plan.meta  # no backward pass was needed
        method.apply(model, plan)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bad_settings_fail_before_any_backward(stories):
    model, _, _ = stories
    with pytest.raises(PruningError, match="importance"):
        llm_pruner(importance="element3")
    with pytest.raises(PruningError, match="strategy"):
        llm_pruner(strategy="layer")
    with pytest.raises(PruningError, match="aggregation"):
        llm_pruner(aggregation="median")
    with pytest.raises(PruningError, match="hidden_norm"):
        llm_pruner(surgery={"hidden_norm": "mean"})
    with pytest.raises(PruningError, match="memory"):
        llm_pruner(memory={"microbatch": 2})
    with pytest.raises(InfeasibleRatioError):  # no calibration given: the ratio check must come first
        llm_pruner().prune(model, 0.9, None)
    with pytest.raises(PruningError, match="calibration"):
        llm_pruner().prune(model, 0.2, None)


@pytest.mark.slow
def test_channel_strategy_on_smollm2_keeps_its_tie_and_equals_masking(tmp_path):
    """The real tied-embedding model (SmolLM2-135M, GQA 9/3): hidden channels go from the shared matrix once."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from pruning.errors import DataError

    cfg_file = Path(__file__).resolve().parents[1] / "conf" / "model" / "smollm2_135m.yaml"
    if not cfg_file.is_file():
        pytest.skip("conf/model/smollm2_135m.yaml not present")
    try:
        model, tok, adapter = load_model(str(OmegaConf.load(cfg_file).model.path))
    except DataError as e:
        pytest.skip(f"SmolLM2 GGUF not in the data root: {e}")
    assert adapter.is_tied
    calib = data.calibration_batches(tok, "c4", 4, 32, 42, progress=False)
    ids = data.calibration_batches(tok, "c4", 2, 24, 7, progress=False)
    method = llm_pruner(strategy="channel")
    plan = method.prune(model, 0.1, calib)
    assert plan.meta["tied_embeddings"] is True
    n = len(plan.units("hidden", -1))
    masked = mask_plan(copy.deepcopy(model), plan)
    method.apply(model, plan)
    assert adapter.is_tied and model.config.hidden_size == 576 - n
    assert adapter.num_params() == closed_form(model.config, adapter.all_widths(), 576 - n, True)
    ref = logits(masked, ids)
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()  # measured 5e-5 of 39
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "s", tok))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max().item() <= 1e-5
