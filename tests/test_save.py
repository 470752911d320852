"""Acceptance: save -> reload (after `import pruning`, and with trust_remote_code in a process that never
imports pruning) gives identical logits, for heterogeneous widths, uneven GQA groups and removed blocks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import logits, same_threads_env
from pruning.surgery.apply import apply_plan
from pruning.surgery.plan import PrunePlan
from pruning.surgery.save import save_pruned


def heterogeneous_plan() -> PrunePlan:
    plan = PrunePlan()
    plan.add("kv_group", 0, [1])
    plan.add("q_head", 1, [0, 1, 4])  # uneven GQA groups: KV head 0 leaves, KV head 2 keeps one query head
    plan.add("mlp", 2, list(range(0, 172, 4)))
    plan.add("mlp", 3, [5, 6])
    plan.add("block", None, [4])
    return plan


REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(k == "pruning" or k.startswith("pruning.") for k in sys.modules), "pruning was imported"
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"logits": m(ids).logits, "generated": m.generate(ids[:, :8], max_new_tokens=8, do_sample=False)},
               sys.argv[3])
print(type(m).__module__)
"""


def _saved_heterogeneous(stories, ids, tmp_path):
    model, tok, _ = stories
    apply_plan(model, heterogeneous_plan())
    return model, logits(model, ids), save_pruned(model, tmp_path / "pruned", tok, meta={"note": "test"})


def test_heterogeneous_save_reload(stories, stories_text_ids, tmp_path):
    _, ref, out = _saved_heterogeneous(stories, stories_text_ids, tmp_path)
    adapter = stories[2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "pruned_llama" and cfg["num_hidden_layers"] == 4
    assert cfg["layer_num_attention_heads"] == [6, 5, 8, 8] and cfg["layer_intermediate_size"] == [172, 172, 129, 170]
    assert cfg["layer_num_key_value_heads"] == [3, 3, 4, 4]
    assert cfg["layer_kv_group_sizes"] == [[2, 2, 2], [2, 1, 2], [2, 2, 2, 2], [2, 2, 2, 2]]
    assert "auto_map" in cfg and (out / "modeling_pruned_llama.py").is_file()

    # registered classes (this process imported pruning); a clean process: the slow twin below
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (logits(reloaded, stories_text_ids) - ref).abs().max().item() <= 1e-6
    assert sum(p.numel() for p in reloaded.parameters()) == adapter.num_params()


@pytest.mark.slow  # a fresh interpreter
def test_heterogeneous_save_reloads_with_remote_code_in_a_clean_process(stories, stories_text_ids, tmp_path):
    """trust_remote_code in a clean process, run from a directory where `pruning` is not importable."""
    model, ref, out = _saved_heterogeneous(stories, stories_text_ids, tmp_path)
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
    remote = torch.load(tmp_path / "l.pt")
    assert (remote["logits"] - ref).abs().max().item() <= 1e-6
    assert torch.equal(remote["generated"], model.generate(stories_text_ids[:, :8], max_new_tokens=8, do_sample=False))


def test_uniform_widths_save_as_plain_llama(stories, stories_text_ids, tmp_path):
    model, tok, _ = stories
    plan = PrunePlan()
    for layer in range(5):
        plan.add("kv_group", layer, [0, 2])  # 4 heads / 2 KV heads everywhere: LlamaConfig accepts 64 % 4
        plan.add("mlp", layer, list(range(40)))
    apply_plan(model, plan)
    out = save_pruned(model, tmp_path / "plain", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 2, 132)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (logits(reloaded, stories_text_ids) - logits(model, stories_text_ids)).abs().max().item() <= 1e-6


def test_uniform_but_indivisible_heads_fall_back_to_pruned_format(stories, tmp_path):
    """transformers 5 LlamaConfig rejects hidden_size % num_attention_heads != 0 even with an explicit head_dim."""
    model, tok, _ = stories
    plan = PrunePlan()
    for layer in range(5):
        plan.add("kv_group", layer, [3])  # 6 heads: 64 % 6 != 0
    apply_plan(model, plan)
    cfg = json.loads((save_pruned(model, tmp_path / "p6", tok) / "config.json").read_text())
    assert cfg["model_type"] == "pruned_llama"


def test_save_is_atomic_on_failure(stories, tmp_path, monkeypatch):
    model, tok, _ = stories
    out = tmp_path / "m"
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_pruned(model, out, tok)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pruned_model_loads_through_load_model(stories, stories_text_ids, tmp_path):
    from pruning.models import load_model

    model, tok, adapter = stories
    apply_plan(model, heterogeneous_plan())
    out = save_pruned(model, tmp_path / "p", tok)
    m2, _, ad2 = load_model(str(out))
    assert ad2.all_widths() == adapter.all_widths() and len(ad2.layers) == 4
    assert (logits(m2, stories_text_ids) - logits(model, stories_text_ids)).abs().max().item() <= 1e-6
