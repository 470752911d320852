"""SmolLM2-135M-Instruct as a first-class model (issue 16): GGUF loading through a verified user cache, tied
embeddings, GQA 9/3 surgery, save/reload with the tie, and the PPL loop against an independent computation.

The cache machinery is exercised on the small stories260K GGUF in the default pass (a conversion takes seconds);
everything that loads SmolLM2 itself is marked slow (a cold cache dequantises for ~30 s, a forward is not free).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import logits, same_threads_env
from pruning import data
from pruning.errors import CheckpointError, DataError
from pruning.models import convert as conv
from pruning.models import load_model
from pruning.models.loading import parse_gguf_spec, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMOL = OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml").model.path
SMOL_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES_GGUF = "models/stories260K/stories260K.gguf"
TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums, and",
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a",
]


def root_gguf(rel: str) -> Path:
    root = data.data_root()
    if root is None or not (root / rel).is_file():
        pytest.skip(f"data root file {rel} not available")
    return root / rel


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private $PRUNING_CACHE, so these tests never touch (or trust) the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNING_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------------------------------- fast


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PRUNING_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert conv.cache_root() == Path.home() / ".cache" / "pruning-lab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert conv.cache_root() == tmp_path / "xdg" / "pruning-lab"
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "pc"))
    assert conv.cache_root() == tmp_path / "pc"
    assert REPO not in conv.cache_root().parents


def test_gguf_spec_parsing():
    assert parse_gguf_spec("gguf:a/b.gguf") == ("a/b.gguf", None)
    assert parse_gguf_spec("gguf:a/b.gguf|hub:Org/Model") == ("a/b.gguf", "Org/Model")
    assert parse_gguf_spec(SMOL) == (SMOL_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct")
    for bad in ("gguf:a/b.gguf|Org/Model", "gguf:a/b.bin", "gguf:a/b.gguf|hub:"):
        with pytest.raises(CheckpointError):
            parse_gguf_spec(bad)


def test_missing_gguf_offline_names_the_file_and_the_fixes(monkeypatch, tmp_path, tmp_cache):
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))  # a data root without the model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_model(SMOL)
    msg = str(e.value)
    assert str(tmp_path / SMOL_GGUF) in msg and "$PRUNING_DATA" in msg
    assert "HF_HUB_OFFLINE" in msg and "HuggingFaceTB/SmolLM2-135M-Instruct" in msg
    assert not tmp_cache.exists()  # failed before any conversion work
    with pytest.raises(DataError, match=r"nowhere\.gguf"):
        resolve_checkpoint(f"gguf:{tmp_path / 'nowhere.gguf'}")


def test_corrupt_gguf_is_one_clear_error(tmp_path, tmp_cache):
    gguf = root_gguf(STORIES_GGUF)
    bad = tmp_path / "half.gguf"
    bad.write_bytes(gguf.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"cannot convert GGUF .*half\.gguf"):
        load_model(f"gguf:{bad}")
    assert not any((tmp_cache / "gguf").glob("*-v*/COMPLETE"))  # nothing half-written is left to be trusted


def test_gguf_hash_is_remembered_by_path_size_mtime(tmp_path, tmp_cache):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not really a gguf" * 1000)
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert conv.gguf_sha256(f) == real
    (sidecar,) = (tmp_cache / "hashes").iterdir()
    # The sidecar is trusted while (path, size, mtime) match: a planted digest comes back without re-hashing ...
    entry = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(entry, sha256="0" * 64)))
    assert conv.gguf_sha256(f) == "0" * 64
    # ... and is ignored once the file changes.
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert conv.gguf_sha256(f) == real


def test_cache_converts_once_and_rebuilds_corrupt_entries(tmp_cache, capfd):
    """On the stories260K GGUF (seconds per conversion); the SmolLM2 timings are in the slow test below."""
    root_gguf(STORIES_GGUF)
    spec = f"gguf:{STORIES_GGUF}"
    entry = resolve_checkpoint(spec)
    assert "converting stories260K.gguf" in capfd.readouterr().err
    assert entry.parent == tmp_cache / "gguf" and entry.name.startswith(conv.gguf_sha256(root_gguf(STORIES_GGUF)))
    marker = json.loads((entry / "COMPLETE").read_text())
    weights = entry / "model.safetensors"
    assert marker["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    ref = weights.read_bytes()

    # Second resolve: the same files, untouched, and no conversion.
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert resolve_checkpoint(spec) == entry
    assert "converting" not in capfd.readouterr().err
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp

    # A truncated file (size check) and a same-size rewrite (mtime changed -> re-hash) are rebuilt, never used.
    for corrupt, why in ((lambda b: b[: len(b) // 2], "wrong size"), (lambda b: b[:-8] + b"\0" * 8, "sha256")):
        # loaded weights are mmapped from the cache file; never keep them (the adapter holds the model) across an
        # in-place edit
        adapter = None
        weights.write_bytes(corrupt(ref))
        assert why in conv.verify_entry(entry)
        _, _, adapter = load_model(spec)
        err = capfd.readouterr().err
        assert "unusable" in err and why in err and "converting" in err
        assert weights.read_bytes() == ref  # the conversion is deterministic
        assert conv.verify_entry(entry, full=True) is None
    assert adapter.num_params() == 292_800

    # A directory without COMPLETE (what an interrupted non-atomic write would leave) is never trusted.
    (entry / "COMPLETE").unlink()
    assert "partial" in conv.verify_entry(entry)


def test_stale_temp_dirs_are_cleared_and_no_partial_entry_is_left(tmp_cache):
    gguf = root_gguf(STORIES_GGUF)
    entry = conv.cache_entry(conv.gguf_sha256(gguf))
    stale = entry.parent / f".{entry.name}.crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert conv.cached_conversion(gguf) == entry
    assert not stale.exists()
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted(entry.name + s for s in ("", ".lock", ".verified"))


# --------------------------------------------------------------------------------------------------- SmolLM2

D, HD, V, L, I_MLP = 576, 64, 49152, 30, 1536


def closed_form(widths) -> int:
    """METHODS.md §1.1 with the tied embedding counted once: V·d + d + Σ_l [d·hd·(2H+2H_kv) + 3·d·I + 2d]."""
    return (
        V * D
        + D
        + sum(D * HD * (2 * w.num_heads + 2 * w.num_kv_heads) + 3 * D * w.intermediate_size + 2 * D for w in widths)
    )


@pytest.fixture(scope="module")
def smol_dir():
    root_gguf(SMOL_GGUF)
    return resolve_checkpoint(SMOL)  # the user cache: converted once per machine


@pytest.fixture
def smol(smol_dir):
    return load_model(SMOL)


@pytest.fixture(scope="module")
def smol_ids(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    return torch.stack([tok(t, return_tensors="pt").input_ids[0][:20] for t in TEXTS])


@pytest.mark.slow
def test_dense_smollm2_facts(smol, smol_ids):
    model, tok, adapter = smol
    assert adapter.is_tied and model.lm_head.weight is model.model.embed_tokens.weight
    assert len(adapter.layers) == L and adapter.head_dim == HD
    assert {(w.num_heads, w.num_kv_heads, w.intermediate_size) for w in adapter.all_widths()} == {(9, 3, I_MLP)}
    assert adapter.num_params() == closed_form(adapter.all_widths()) == 134_515_008
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # torch also yields the shared matrix once
    ids = tok("Hello world").input_ids
    assert tok.bos_token_id == 1 and ids[0] != tok.bos_token_id  # SmolLM2's tokenizer adds no BOS
    # A real pretrained model: greedy continuation of a factual prompt (SOURCE.md's check).
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.shape[1] :])


def _mask_vs_surgery(model, adapter, plan, ids):
    from pruning.surgery.apply import apply_plan, mask_plan

    masked = mask_plan(copy.deepcopy(model).double(), plan)  # float64: float32 summation order alone moves
    apply_plan(model, plan)  # SmolLM2's logits by ~4e-4
    diff = (logits(copy.deepcopy(model).double(), ids) - logits(masked, ids)).abs().max().item()
    assert diff <= 1e-9, diff
    assert adapter.is_tied
    assert adapter.num_params() == closed_form(adapter.all_widths()) == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,ratio,expect",
    [
        ("kv_group", 0.05, (6, 2, I_MLP)),  # 1 of 3 KV groups (with its 3 query heads) in layers 6..29
        ("q_head", 0.035, (6, 3, I_MLP)),  # 1 query head from every group: g 3 -> 2
        ("mlp", 0.1, None),
    ],
)
def test_mask_equals_surgery_on_smollm2(smol, smol_ids, kind, ratio, expect):
    from pruning.methods.baselines import random

    model, _, adapter = smol
    method = random(seed=3, structures=[kind], layers={"start_frac": 0.2})
    plan = method.prune(model, ratio)
    assert sorted(plan.remove[kind]) == list(range(6, 30))
    _mask_vs_surgery(model, adapter, plan, smol_ids)
    widths = adapter.all_widths()
    assert all((w.num_heads, w.num_kv_heads, w.intermediate_size) == (9, 3, I_MLP) for w in widths[:6])
    if expect is not None:
        assert {(w.num_heads, w.num_kv_heads, w.intermediate_size) for w in widths[6:]} == {expect}
    else:
        assert all(w.intermediate_size < I_MLP for w in widths[6:])
    assert abs(1 - adapter.num_params() / 134_515_008 - plan.meta["planned_ratio"]) < 1e-12


@pytest.mark.slow
def test_query_heads_go_from_three_to_two_to_one_per_group(smol, smol_ids):
    from pruning.errors import InfeasibleRatioError
    from pruning.surgery.apply import apply_plan
    from pruning.surgery.plan import PrunePlan

    model, _, adapter = smol
    for g_after in (2, 1):
        plan = PrunePlan()
        for layer in (0, 14, 29):
            g = adapter.kv_group_size(adapter.layers[layer])
            plan.add("q_head", layer, [j * g + (j + layer) % g for j in range(3)])  # one head from every group
        _mask_vs_surgery(model, adapter, plan, smol_ids)
        assert [adapter.widths(adapter.layers[i]).num_heads for i in (0, 14, 29)] == [3 * g_after] * 3
        assert all(adapter.layers[i].self_attn.num_key_value_groups == g_after for i in (0, 14, 29))
    plan = PrunePlan()
    plan.add("q_head", 0, [0, 1, 2])  # g = 1: the last query head of every group cannot go
    with pytest.raises(InfeasibleRatioError):
        apply_plan(model, plan)


REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not any(k == "pruning" or k.startswith("pruning.") for k in sys.modules), "pruning was imported"
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(m).__module__, "tied" if m.lm_head.weight is m.model.embed_tokens.weight else "untied")
"""


def _check_saved(out: Path, model, adapter, ids, tmp_path, remote: bool):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as f:  # the shared matrix is stored once
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    ref = logits(model, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert (logits(reloaded, ids) - ref).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) == adapter.num_params()
    if remote:
        torch.save(ids, tmp_path / "ids.pt")
        proc = subprocess.run(
            [sys.executable, "-c", REMOTE, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=same_threads_env(),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "transformers_modules" in proc.stdout and "tied" in proc.stdout.split()
        assert (torch.load(tmp_path / "l.pt") - ref).abs().max().item() <= 1e-5
    return cfg


@pytest.mark.slow
def test_heterogeneous_save_reload_both_ways_keeps_the_tie(smol, smol_ids, tmp_path):
    from pruning.surgery.apply import apply_plan
    from pruning.surgery.plan import PrunePlan
    from pruning.surgery.save import save_pruned

    model, tok, adapter = smol
    plan = PrunePlan()
    plan.add("kv_group", 3, [1])
    plan.add("q_head", 5, [0, 4, 8])
    plan.add("mlp", 7, list(range(0, I_MLP, 3)))
    plan.add("block", None, [29])
    apply_plan(model, plan)
    out = save_pruned(model, tmp_path / "hetero", tok)
    cfg = _check_saved(out, model, adapter, smol_ids, tmp_path, remote=True)
    assert cfg["model_type"] == "pruned_llama" and cfg["num_hidden_layers"] == 29
    assert cfg["layer_num_attention_heads"][3:6] == [6, 9, 6] and cfg["layer_intermediate_size"][7] == 1024


@pytest.mark.slow
def test_uniform_save_is_plain_llama_and_keeps_the_tie(smol, smol_ids, tmp_path):
    from pruning.surgery.apply import apply_plan
    from pruning.surgery.plan import PrunePlan
    from pruning.surgery.save import save_pruned

    model, tok, adapter = smol
    plan = PrunePlan()
    for layer in range(L):
        plan.add("kv_group", layer, [layer % 3])  # 6 heads / 2 KV heads everywhere; 576 % 6 == 0
    apply_plan(model, plan)
    cfg = _check_saved(save_pruned(model, tmp_path / "plain", tok), model, adapter, smol_ids, tmp_path, False)
    assert cfg["model_type"] == "llama" and (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (6, 2)


@pytest.mark.slow
def test_dense_ppl_equals_a_plain_computation(smol_dir, wikitext_rows):
    """The framework's loop (batched, inference_mode) against a window-by-window float64 NLL written here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning.eval.perplexity import PPLProtocol, perplexity

    n, seq = 6, 128
    model, tok, _ = load_model(SMOL)
    proto = PPLProtocol(
        name="ppl128-lp",
        dataset="wikitext2",
        split="test",
        seq_len=seq,
        stride=seq,
        bos="once",
        batch_size=4,
        max_windows=n,
    )  # batches of 4 + 2
    got = perplexity(model, tok, proto, progress=False)
    assert got["n_windows"] == n and got["n_tokens_scored"] == n * (seq - 1) and got["max_windows"] == n

    plain_tok = AutoTokenizer.from_pretrained(smol_dir)
    plain = AutoModelForCausalLM.from_pretrained(smol_dir).eval()
    # A prefix of the joined text is enough: byte-level BPE splits words first, so only the prefix's last word can
    # tokenise differently, and the prefix holds about twice the tokens the windows use.
    ids = plain_tok("\n\n".join(wikitext_rows)[:8000]).input_ids
    assert len(ids) > 1.5 * n * seq
    assert ids[0] != plain_tok.bos_token_id  # no BOS: the stream starts with text
    nll = []
    with torch.no_grad():
        for k in range(n):
            w = torch.tensor(ids[k * seq : (k + 1) * seq])[None]
            logp = torch.log_softmax(plain(w).logits[0, :-1].double(), dim=-1)
            nll.append(-logp.gather(1, w[0, 1:, None]).squeeze(1))
    want = math.exp(torch.cat(nll).mean().item())
    assert abs(got["ppl"] / want - 1) <= 1e-4, (got["ppl"], want)
    assert 10 < want < 200  # a real LM on WikiText (SOURCE.md: 53.9 on 200 windows)


@pytest.mark.slow
def test_smollm2_cache_load_times_and_rebuild(smol_dir, tmp_cache, capfd, smol_ids):
    """A cached load takes seconds and never reconverts; a truncated cache file is rebuilt, byte-identically.

    The private cache is seeded with a copy of the user-cache entry (mtimes kept), so only one conversion runs.
    """
    entry = tmp_cache / "gguf" / smol_dir.name
    shutil.copytree(smol_dir, entry)  # copy2: sizes and mtimes match COMPLETE
    model, _, _ = load_model(SMOL)
    assert "converting" not in capfd.readouterr().err
    assert resolve_checkpoint(SMOL) == entry
    ref = logits(model, smol_ids)
    del model  # its weights are mmapped from the file truncated below: touching them would be a SIGBUS

    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4096)
    t0 = time.perf_counter()
    rebuilt, _, _ = load_model(SMOL)
    t_convert = time.perf_counter() - t0
    err = capfd.readouterr().err
    assert "unusable" in err and "wrong size" in err and "converting SmolLM2-135M-Instruct.Q4_1.gguf" in err
    assert conv.verify_entry(entry, full=True) is None
    want = json.loads((smol_dir / "COMPLETE").read_text())["files"]["model.safetensors"]
    assert json.loads((entry / "COMPLETE").read_text())["files"]["model.safetensors"]["sha256"] == want["sha256"]
    assert torch.equal(logits(rebuilt, smol_ids), ref)

    t0 = time.perf_counter()
    again, _, _ = load_model(SMOL)
    t_cached = time.perf_counter() - t0
    assert "converting" not in capfd.readouterr().err
    assert t_cached < t_convert / 3, (t_cached, t_convert)
    assert torch.equal(logits(again, smol_ids), ref)
    print(f"\nSmolLM2 load: conversion {t_convert:.1f} s, cached {t_cached:.1f} s")
