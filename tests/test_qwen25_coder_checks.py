"""Issue 26, acceptance 3: the real-weight checks on Qwen2.5-Coder-0.5B-Instruct (q/k/v biases, GQA 14/2 = 7 query
heads per KV head, untied lm_head, 151,936-token vocabulary).

All slow, all on the full 24-layer model (no truncation), on one 1×32-token input; skipped with the reason when the
weights are neither in the user cache nor fetchable (``qwen_spec`` in conftest.py). Memory: at most one
float64 copy (5 GB) or two float32 copies (2.5 GB each) are alive at a time; each test frees its models.
- surgery ≡ masking in float64, with KV-group, query-head and MLP-channel removals;
- parameter count after surgery = two independent closed forms (the widths written out from the plan by hand, and
  the dense count minus a per-unit price), biases included, head untied;
- save → ``from_pretrained`` → identical logits, the reloaded model's own save identical again, and the
  ``trust_remote_code`` path in a process without ``pruning``;
- the uneven-GQA rule: query heads go one by one, a KV head leaves only with the last of its 7 query heads;
- SliceGPT on the untied model: 0% slicing keeps the function, embedding and head rotated each by its own basis,
  a 10% slicing runs, has its closed-form size and reloads;
- LoRA (peft) on the biased q/k/v projections of a pruned model: two steps, biases intact, merged model reloads.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import logits, root_file, same_threads_env
from pruning.errors import InfeasibleRatioError
from pruning.models import adapter_for, load_model
from pruning.models.loading import resolve_checkpoint
from pruning.surgery.apply import apply_plan, mask_plan
from pruning.surgery.plan import PrunePlan
from pruning.surgery.save import save_pruned
from test_qwen25_coder import H_KV, HD, I_MLP, D, H, L, V, closed_form
from test_slicegpt import closed_form as sliced_closed_form

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DENSE = 630_167_424
G = H // H_KV  # 7 query heads per KV head
TEXT = (
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n"
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
)


@pytest.fixture(scope="module")
def ids(qwen_spec):
    tok = AutoTokenizer.from_pretrained(resolve_checkpoint(qwen_spec))
    out = tok(TEXT, return_tensors="pt").input_ids[:, :32]
    assert out.shape == (1, 32)
    return out


def mixed_plan(block: bool = False) -> PrunePlan:
    """KV groups, query heads (uneven groups, KV heads leaving with their last query head) and MLP channels."""
    plan = PrunePlan()
    plan.add("kv_group", 1, [1])  # KV head 1 with its query heads 7..13
    plan.add("q_head", 3, list(range(6)))  # 6 of KV head 0's 7 query heads: it stays, with head 6 alone
    plan.add("q_head", 5, list(range(7, 14)))  # all 7 of KV head 1: it leaves with its last query head
    plan.add("q_head", 7, [2, 5, 9, 12])  # two from each group
    plan.add("q_head", 10, list(range(8)))  # KV head 0 leaves; KV head 1 keeps 6
    plan.add("mlp", 2, list(range(0, I_MLP, 3)))  # 1622 channels
    plan.add("mlp", 7, [0, 1, I_MLP - 1])
    plan.add("mlp", 20, list(range(1000, 3000)))
    if block:
        plan.add("block", None, [L - 1])
    return plan


# (query heads, KV heads, MLP width, query heads per kept KV head) the plan leaves, written out by hand
MIXED_WIDTHS = {
    1: (7, 1, I_MLP, (7,)),
    2: (H, H_KV, I_MLP - 1622, (7, 7)),
    3: (8, 2, I_MLP, (1, 7)),
    5: (7, 1, I_MLP, (7,)),
    7: (10, 2, I_MLP - 3, (5, 5)),
    10: (6, 1, I_MLP, (6,)),
    20: (H, H_KV, I_MLP - 2000, (7, 7)),
}
Q_GONE, KV_GONE, MLP_GONE = 7 + 6 + 7 + 4 + 8, 1 + 1 + 1, 1622 + 3 + 2000  # counted from the plan by hand
LAYER_PARAMS = D * HD * (2 * H + 2 * H_KV) + HD * (H + 2 * H_KV) + 3 * D * I_MLP + 2 * D


def expected_widths(n_layers: int = L) -> list[tuple]:
    return [MIXED_WIDTHS.get(i, (H, H_KV, I_MLP, (G, G))) for i in range(n_layers)]


def expected_params(block: bool = False) -> int:
    """The dense count minus each removed unit's price: a query head takes its q rows, q bias and o columns; a KV
    head its k and v rows and biases; an MLP channel a gate row, an up row and a down column."""
    removed = Q_GONE * (2 * D * HD + HD) + KV_GONE * 2 * (D * HD + HD) + MLP_GONE * 3 * D
    return DENSE - removed - (LAYER_PARAMS if block else 0)


def widths_of(adapter) -> list[tuple]:
    return [(w.num_heads, w.num_kv_heads, w.intermediate_size, w.kv_group_sizes) for w in adapter.all_widths()]


def check_pruned_counts(model, adapter, block: bool = False) -> int:
    want = expected_widths(L - 1 if block else L)
    assert widths_of(adapter) == want
    n = adapter.num_params()
    by_form = closed_form([SimpleNamespace(num_heads=h, num_kv_heads=kv, intermediate_size=i) for h, kv, i, _ in want])
    assert n == by_form == expected_params(block) == sum(p.numel() for p in model.parameters())
    assert not adapter.is_tied and all(w.o_proj_bias is False for w in adapter.all_widths())
    return n


# --------------------------------------------------------------------------------------------------- surgery


def test_surgery_equals_masking_in_float64_and_params_equal_the_closed_form(qwen_spec, ids):
    """Full model, float64. One copy at a time (peak RSS 8 GB): the masked model's logits first (masking in place),
    then a fresh load is pruned physically. Masking zeroes the removed rows and columns, q/k/v bias entries included."""
    model = load_model(qwen_spec, "float64")[0]  # not `model, _, _`: an adapter left in `_` keeps the model alive
    dense = logits(model, ids)
    mask_plan(model, mixed_plan())
    k5 = model.model.layers[5].self_attn.k_proj
    assert k5.weight[HD:].abs().max() == 0 and k5.bias[HD:].abs().max() == 0  # KV head 1 of layer 5 is gone
    assert model.model.layers[3].self_attn.k_proj.weight[:HD].abs().amax(1).min() > 0  # KV 0 of layer 3 stays
    masked = logits(model, ids)
    del model
    gc.collect()

    model, _, adapter = load_model(qwen_spec, "float64")
    apply_plan(model, mixed_plan())
    pruned = logits(model, ids)
    n = check_pruned_counts(model, adapter)
    diff = (pruned - masked).abs().max().item()
    moved = (masked - dense).abs().max().item()
    print(f"\nfloat64 surgery vs masking: max |Δlogit| {diff:.2e} (the plan moves logits by {moved:.2f}); params {n:,}")
    assert diff <= 1e-9, diff
    assert moved > 0.1  # the plan matters, so the equality above says something
    del model
    gc.collect()


def test_a_kv_head_leaves_only_with_the_last_of_its_seven_query_heads(qwen_spec, tmp_path):
    """Layer 4's KV head 0 loses its query heads one by one (always the pruned model's head 0): it stays, with
    unchanged k/v rows and biases, while any of its 7 heads is left, and leaves with the 7th. Layer 9 loses a
    whole KV group; layers 6 and 11 keep uneven groups. The saved config carries the group sizes; no kept KV head
    is without a query head, and k/v hold exactly the kept KV heads."""
    model, tok, adapter = load_model(qwen_spec)
    layer4 = adapter.layers[4]
    k_before = adapter.k_proj(layer4).weight.detach().clone()
    kb_before = adapter.k_proj(layer4).bias.detach().clone()
    v_before = adapter.v_proj(layer4).weight.detach().clone()
    q_before = adapter.q_proj(layer4).weight.detach().clone()
    for k in range(1, G + 1):
        step = PrunePlan()
        step.add("q_head", 4, [0])
        apply_plan(model, step)
        w = adapter.widths(layer4)
        kv_rows = slice(0, 2 * HD) if k < G else slice(HD, 2 * HD)
        assert (w.num_heads, w.num_kv_heads) == (H - k, 2 if k < G else 1)
        assert w.kv_group_sizes == ((G - k, G) if k < G else (G,))
        assert torch.equal(adapter.k_proj(layer4).weight, k_before[kv_rows])
        assert torch.equal(adapter.k_proj(layer4).bias, kb_before[kv_rows])
        assert torch.equal(adapter.v_proj(layer4).weight, v_before[kv_rows])
        assert torch.equal(adapter.q_proj(layer4).weight, q_before[k * HD :])
    more = PrunePlan()
    more.add("kv_group", 9, [0])  # a whole group: KV head 0 and its 7 query heads together
    more.add("q_head", 6, [8, 10, 12])  # uneven groups that stay uneven, so the saved config needs the map
    more.add("q_head", 11, list(range(6)))  # a KV head serving a single query head stays
    apply_plan(model, more)
    assert [adapter.widths(adapter.layers[i]).kv_group_sizes for i in (6, 9, 11)] == [(G, 4), (G,), (1, G)]
    last = PrunePlan()
    last.add("q_head", 4, list(range(G)))  # the layer's last 7 query heads: attention would be empty
    with pytest.raises(InfeasibleRatioError, match="empties the attention of layer 4"):
        apply_plan(model, last)

    out = save_pruned(model, tmp_path / "gqa", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "pruned_qwen2"
    sizes, heads, kvs = cfg["layer_kv_group_sizes"], cfg["layer_num_attention_heads"], cfg["layer_num_key_value_heads"]
    changed = {4: [G], 6: [G, 4], 9: [G], 11: [1, G]}
    assert sizes == [changed.get(i, [G, G]) for i in range(L)]
    assert [heads[i] for i in changed] == [G, 11, G, 8] and [kvs[i] for i in changed] == [1, 2, 1, 2]
    for i in range(L):  # no orphan: every kept KV head serves >= 1 query head, and k/v hold exactly those heads
        assert len(sizes[i]) == kvs[i] and min(sizes[i]) >= 1 and sum(sizes[i]) == heads[i]
    with safe_open(out / "model.safetensors", "pt") as f:
        for i in range(L):
            for p in ("k_proj", "v_proj"):
                assert f.get_slice(f"model.layers.{i}.self_attn.{p}.weight").get_shape() == [HD * kvs[i], D]
                assert f.get_slice(f"model.layers.{i}.self_attn.{p}.bias").get_shape() == [HD * kvs[i]]
    del model
    gc.collect()


# --------------------------------------------------------------------------------------------------- save


REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(k == "pruning" or k.startswith("pruning.") for k in sys.modules), "pruning was imported"
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(m).__module__, "tied" if m.lm_head.weight is m.model.embed_tokens.weight else "untied")
"""


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_save_reload_is_identical_both_ways(qwen_spec, ids, tmp_path):
    """Full model, float32: the pruned model (with the last block removed too) saves as pruned_qwen2 with the head
    untied; reloading gives bit-identical logits; the reloaded model's own save holds the same tensors and
    reloads identically again; a process that never imports pruning reloads it with trust_remote_code, also
    bit-identically when it uses the same one thread (with two threads float32 summation order moved logits 2e-4)."""
    model, tok, adapter = load_model(qwen_spec)
    apply_plan(model, mixed_plan(block=True))
    n = check_pruned_counts(model, adapter, block=True)
    ref = logits(model, ids)
    t0 = time.perf_counter()
    first = save_pruned(model, tmp_path / "first", tok)
    t_save = time.perf_counter() - t0
    del model, adapter
    gc.collect()
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["model_type"] == "pruned_qwen2" and cfg["tie_word_embeddings"] is False
    assert cfg["num_hidden_layers"] == L - 1 and "auto_map" in cfg
    assert [
        cfg[k][7] for k in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
    ] == [
        10,
        2,
        I_MLP - 3,
    ]
    saved = tensors(first)
    assert "lm_head.weight" in saved and not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    assert sum(t.numel() for t in saved.values()) == n
    assert all(f"model.layers.{i}.self_attn.{p}.bias" in saved for i in range(L - 1) for p in ("q_proj", "k_proj"))

    reloaded = AutoModelForCausalLM.from_pretrained(first)
    assert type(reloaded).__name__ == "PrunedQwen2ForCausalLM" and adapter_for(reloaded).family == "qwen2"
    assert sum(p.numel() for p in reloaded.parameters()) == n and not adapter_for(reloaded).is_tied
    assert widths_of(adapter_for(reloaded)) == expected_widths(L - 1)
    got = logits(reloaded, ids)
    d1 = (got - ref).abs().max().item()
    assert torch.equal(got, ref), d1
    second = save_pruned(reloaded, tmp_path / "second", tok)
    del reloaded
    gc.collect()
    again = tensors(second)
    assert sorted(again) == sorted(saved) and all(torch.equal(again[k], saved[k]) for k in saved)
    del again, saved
    assert json.loads((second / "config.json").read_text())["layer_kv_group_sizes"] == cfg["layer_kv_group_sizes"]
    twice = AutoModelForCausalLM.from_pretrained(second)
    assert torch.equal(logits(twice, ids), ref)
    del twice
    gc.collect()

    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(first), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=same_threads_env(),
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transformers_modules" in proc.stdout and "untied" in proc.stdout.split()
    d_remote = (torch.load(tmp_path / "l.pt") - ref).abs().max().item()
    print(f"\nsave/reload: params {n:,}, save {t_save:.0f} s, reload Δ {d1:.1e}, trust_remote_code Δ {d_remote:.1e}")
    assert d_remote == 0.0, d_remote


# --------------------------------------------------------------------------------------------------- SliceGPT


def c4_batches(spec: str, n: int, seq: int) -> torch.Tensor:
    from pruning import data

    root_file("calib/c4/c4_validation_2k.parquet")
    tok = AutoTokenizer.from_pretrained(resolve_checkpoint(spec))
    return data.calibration_batches(tok, "c4", n, seq, 0, progress=False)


ROWS = torch.arange(0, V, 297)  # 512 vocabulary rows for Gram checks (the full V×V Gram is 92 GB)


def gram(w: torch.Tensor) -> torch.Tensor:
    x = w.detach()[ROWS].double()
    return x @ x.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_slicegpt_zero_slicing_keeps_the_untied_function(qwen_spec, ids):
    """Exact fusion + full-width rotation is the dense function (METHODS.md §3.6 invariant 3), here with the head
    untied as stored: the embedding turns by Q_0 and the head (the final norm's scale folded in) by Q_L, each its
    own matrix. An orthogonal Q keeps the Gram matrix of any rows, so E·Q_0 and (W·diag g)·Q_L are checked on 512
    rows without the bases. Float32 throughout (HF's RMSNorm normalises in float32 anyway): measured 1.2e-4 on
    logits up to 29, i.e. 4e-6 relative. Any calibration set gives an exact 0% rotation: 8×64 tokens."""
    from pruning.methods.slicegpt import slicegpt

    calib = c4_batches(qwen_spec, 8, 64)
    model, _, adapter = load_model(qwen_spec)
    dense = logits(model, ids)
    emb_gram = gram(adapter.embed_tokens.weight)
    head_gram = gram(adapter.lm_head.weight * adapter.final_norm.weight)
    method = slicegpt(slicing=0.0, progress=False)
    t0 = time.perf_counter()
    plan = method.prune(model, 0.0, calib)
    assert plan.meta["tied_embeddings"] == "were not tied" and plan.meta["sliced_hidden_size"] == D
    method.apply(model, plan, calib)
    t_apply = time.perf_counter() - t0
    assert type(model).__name__ == "SlicedQwen2ForCausalLM" and not adapter.is_tied
    assert adapter.embed_tokens.weight.shape == adapter.lm_head.weight.shape == (V, D)
    got = logits(model, ids)
    diff, scale = (got - dense).abs().max().item(), dense.abs().max().item()
    e_rel, h_rel = rel(gram(adapter.embed_tokens.weight), emb_gram), rel(gram(adapter.lm_head.weight), head_gram)
    print(
        f"\nSliceGPT 0%: {t_apply:.0f} s, max |Δlogit| {diff:.2e} (logits up to {scale:.1f}), "
        f"Gram rel. error embedding {e_rel:.1e}, head {h_rel:.1e}"
    )
    assert e_rel <= 1e-5 and h_rel <= 1e-5
    assert torch.equal(got.argmax(-1), dense.argmax(-1))
    assert diff <= 2e-5 * scale, diff
    del model, adapter
    gc.collect()


def test_slicegpt_small_slicing_runs_has_its_size_and_reloads(qwen_spec, ids, tmp_path):
    """10% slicing: d′ = 800 (floor(0.9·896) rounded down to 8). Embedding (V, 800), head unsliced (V, 896) and
    still an orthogonal turn of its own weights; size = the §3.6 closed form + the q/k/v biases (not rotated);
    save → reload gives identical logits. Calibration: 16×128 tokens, more than d = 896; with 8×64 = 512 tokens
    XᵀX has rank <= 512, the PCA keeps directions the calibration never saw, and the test text's mean token
    log-prob fell from -1.7 (dense) to -7.9; with 16×128 to -4.2 (the reference runs calibrate on 128×2048)."""
    from pruning.methods.slicegpt import slicegpt

    calib = c4_batches(qwen_spec, 16, 128)
    model, tok, adapter = load_model(qwen_spec)
    dense = logits(model, ids)
    head_gram = gram(adapter.lm_head.weight * adapter.final_norm.weight)
    method = slicegpt(slicing=0.1, progress=False)
    plan = method.prune(model, 0.0, calib)
    a = plan.meta["sliced_hidden_size"]
    assert a == 800
    method.apply(model, plan, calib)
    n = adapter.num_params()
    biases = L * HD * (H + 2 * H_KV)
    want = sliced_closed_form(V, HD, H, H_KV, I_MLP, [a] * L, [a] * L, [a] * (L - 1) + [D]) + biases
    assert n == want == plan.meta["params_closed_form"] == sum(p.numel() for p in model.parameters())
    assert adapter.embed_tokens.weight.shape == (V, a) and adapter.lm_head.weight.shape == (V, D)
    assert rel(gram(adapter.lm_head.weight), head_gram) <= 1e-5
    assert all(adapter.q_proj(layer).bias.shape == (H * HD,) for layer in adapter.layers)
    got = logits(model, ids)
    logp = torch.log_softmax(got[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).mean().item()
    logp_dense = torch.log_softmax(dense[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).mean().item()
    print(
        f"\nSliceGPT 10%: d′ {a}, params {n:,} ({1 - n / DENSE:+.4f} removed), mean token log-prob "
        f"{logp:.3f} vs dense {logp_dense:.3f}, kept variance (emb) {plan.meta['kept_variance']['embeddings']:.4f}"
    )
    # still a language model on this text: far above uniform guessing (-ln V = -11.9); measured -4.2 (dense -1.7)
    assert torch.isfinite(got).all() and logp > -math.log(V) / 2
    out = save_pruned(model, tmp_path / "sliced", tok)
    del model, adapter
    gc.collect()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "sliced_qwen2" and cfg["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "SlicedQwen2ForCausalLM"
    assert sum(p.numel() for p in reloaded.parameters()) == n
    assert torch.equal(logits(reloaded, ids), got)
    del reloaded
    gc.collect()


# --------------------------------------------------------------------------------------------------- LoRA

QKV = ("q_proj", "k_proj", "v_proj")


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft calls a deprecated API
def test_lora_on_the_biased_projections_after_pruning(qwen_spec, ids, tmp_path):
    """peft wraps every q/k/v Linear of the pruned model (heterogeneous widths) with its bias kept in the base
    layer; two optimizer steps on Alpaca train only the LoRA matrices, so after merging the q/k/v weights move by
    a rank <= r update, their biases and everything else are bit-identical, and the merged model reloads."""
    from peft import LoraConfig, get_peft_model

    from pruning.recovery import recover
    from pruning.recovery.lora import target_module_names

    root_file("calib/alpaca/alpaca_200.json")
    model, tok, adapter = load_model(qwen_spec)
    apply_plan(model, mixed_plan())
    n = adapter.num_params()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    targets = target_module_names(model, QKV)
    assert len(targets) == 3 * L
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, bias="none"))
    for name in targets:
        wrapped = peft_model.get_submodule("base_model.model." + name)
        base = wrapped.base_layer
        assert base.bias is not None and torch.equal(base.bias, before[name + ".bias"])
        assert not base.bias.requires_grad and not base.weight.requires_grad
        assert tuple(wrapped.lora_A["default"].weight.shape) == (8, D)
        assert tuple(wrapped.lora_B["default"].weight.shape) == (base.out_features, 8)
    assert {peft_model.get_submodule("base_model.model." + t).base_layer.out_features for t in targets} >= {
        7 * HD,
        8 * HD,
        HD,
        2 * HD,
    }
    peft_model.unload()
    for p in model.parameters():
        p.requires_grad_(True)
    assert not [k for k in model.state_dict() if "lora" in k]

    cfg = dict(
        name="lora",
        data="alpaca",
        max_samples=8,
        max_len=96,
        micro_batch_size=1,
        grad_accum=1,
        warmup_steps=0,
        lr=1e-3,
        max_steps=2,
        target_modules=list(QKV),
    )
    t0 = time.perf_counter()
    rec = recover(model, tok, cfg, progress=False)
    t_train = time.perf_counter() - t0
    after = model.state_dict()
    assert rec["steps"] == 2 and rec["target_modules"] == 3 * L and rec["params"] == n
    assert all(torch.isfinite(torch.tensor(x)) for x in rec["loss"]["per_step"])
    trained = {t + ".weight" for t in targets}
    assert rec["trainable_params"] == sum(8 * (after[k].shape[0] + after[k].shape[1]) for k in trained)
    ranks = []
    for k in before:
        if k in trained:
            delta = (after[k] - before[k]).double()
            ranks.append(torch.linalg.matrix_rank(delta, rtol=1e-4).item())
            assert delta.abs().max() > 0, f"{k} was not trained"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed but is not a LoRA target"
    assert max(ranks) <= 8
    assert all(torch.equal(after[t + ".bias"], before[t + ".bias"]) for t in targets)
    del before
    ref = logits(model, ids)
    out = save_pruned(model, tmp_path / "recovered", tok)
    del model, adapter, after
    gc.collect()
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not [k for k in reloaded.state_dict() if "lora" in k]
    assert sum(p.numel() for p in reloaded.parameters()) == n
    d = (logits(reloaded, ids) - ref).abs().max().item()
    print(f"\nLoRA q/k/v after pruning: 2 steps in {t_train:.0f} s, losses {rec['loss']['per_step']}, reload Δ {d:.1e}")
    assert d == 0.0
    del reloaded
    gc.collect()
